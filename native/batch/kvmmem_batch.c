/*
 * kvmmem batch helper: many ioctls or page remaps in one call, so that a batch
 * crosses the JS/native boundary (ffi-rs, ~1.5-4 us a call) once instead of
 * once per page. Every entry point returns per-record results (0/value or
 * -errno) and never stops at the first failure: the caller decides.
 * Built by `npm install` (scripts/build-native.mjs); optional at run time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

int kvmmem_batch_abi_version(void) { return 1; }

/* count ioctls whose argument is a pointer to record i (base + i * stride). */
int32_t kvmmem_ioctl_many_ptr(int fd, unsigned long req, uint8_t *base, uint64_t stride,
                              uint32_t count, int32_t *results)
{
	int32_t ok = 0;
	for (uint32_t i = 0; i < count; i++) {
		int r = ioctl(fd, req, base + (uint64_t)i * stride);
		results[i] = r < 0 ? -errno : r;
		ok += r >= 0;
	}
	return ok;
}

/* count ioctls whose argument is a value (KVM_INTRO_MEM_UNMAP passes the address itself). */
int32_t kvmmem_ioctl_many_val(int fd, unsigned long req, const uint64_t *vals,
                              uint32_t count, int32_t *results)
{
	int32_t ok = 0;
	for (uint32_t i = 0; i < count; i++) {
		int r = ioctl(fd, req, (unsigned long)vals[i]);
		results[i] = r < 0 ? -errno : r;
		ok += r >= 0;
	}
	return ok;
}

/*
 * The model host's page remaps. kind 0: put the target VM's memory (fd, off)
 * at addr (MAP_SHARED|MAP_FIXED); kind 1: give addr a fresh zeroed private page.
 * A page put in with MAP_FIXED is not locked even if the range was: lock again.
 * Runs of records are independent; each gets 0 or -errno.
 */
int32_t kvmmem_remap_many(uint32_t kind, const uint64_t *addrs, const uint64_t *lens,
                          int fd, const int64_t *offs, uint32_t count, int32_t *results)
{
	int32_t ok = 0;
	for (uint32_t i = 0; i < count; i++) {
		void *want = (void *)(uintptr_t)addrs[i];
		void *p = kind == 0
			? mmap(want, lens[i], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, offs[i])
			: mmap(want, lens[i], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
		if (p == MAP_FAILED) { results[i] = -errno; continue; }
		if (mlock(p, lens[i]) < 0) { results[i] = -errno; continue; }
		results[i] = 0;
		ok++;
	}
	return ok;
}
