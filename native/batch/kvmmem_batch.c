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
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/*
 * ABI 1: kvmmem_ioctl_many_ptr/_val, kvmmem_remap_many (kinds 0 and 1).
 * ABI 2: + kvmmem_remap_one, + remap kind 2 (a read-only image: private copy-on-write, populated).
 * ABI 3: + kvmmem_map_one (the model driver's page lookup and the host's remap in one call).
 */
int kvmmem_batch_abi_version(void) { return 3; }

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
 * One remap: kind 0 shared read-write (file at off), 1 fresh private zero
 * page(s), 2 a read-only memory image (file at off) as a copy-on-write private
 * mapping: reads see the file live, a write stays local to this process and
 * never reaches the image -- and never faults, as a PROT_READ page would.
 * Kind 2 is populated, not locked: mlock of a writable private mapping would
 * copy every page at once and end the liveness.
 */
static int remap(uint32_t kind, uint64_t addr, uint64_t len, int fd, int64_t off)
{
	void *want = (void *)(uintptr_t)addr;
	void *p;
	if (kind == 1)
		p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	else if (kind == 2)
		p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off);
	else
		p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, off);
	if (p == MAP_FAILED) return -errno;
	if (kind == 2) {
		madvise(p, len, 22 /* MADV_POPULATE_READ, Linux 5.14+; best effort */);
		return 0;
	}
	/* A page put in with MAP_FIXED is not locked even if the range was: lock again. */
	if (mlock(p, len) < 0) return -errno;
	return 0;
}

/*
 * The model host's page remaps. kind 0: put the target VM's memory (fd, off)
 * at addr (MAP_SHARED|MAP_FIXED); kind 1: give addr a fresh zeroed private page;
 * kind 2: a read-only memory image (see remap()).
 * Runs of records are independent; each gets 0 or -errno.
 */
int32_t kvmmem_remap_many(uint32_t kind, const uint64_t *addrs, const uint64_t *lens,
                          int fd, const int64_t *offs, uint32_t count, int32_t *results)
{
	int32_t ok = 0;
	for (uint32_t i = 0; i < count; i++) {
		results[i] = remap(kind, addrs[i], lens[i], fd, kind == 1 ? 0 : offs[i]);
		ok += results[i] == 0;
	}
	return ok;
}

/* One remap (as kvmmem_remap_many with count 1): one ffi crossing instead of mmap + mlock. */
int32_t kvmmem_remap_one(uint32_t kind, uint64_t addr, uint64_t len, int fd, int64_t off)
{
	return remap(kind, addr, len, fd, off);
}

/*
 * The model's single MAP in one crossing: the driver's find_vma/follow_page
 * stand-in (mincore of the page at addr), then -- only when a page is present --
 * the host's remap (as kvmmem_remap_one). Returns
 *   0 / -errno  the page was present: the remap's result;
 *   1           no mapping covers the page (mincore ENOMEM): nothing done;
 *   2           mapped but not resident: nothing done;
 *   3           mincore failed otherwise: nothing done (the caller asks again its own way).
 * The caller has already validated everything the hypercall checks, so the
 * remap is exactly what the hypercall would do next.
 */
int32_t kvmmem_map_one(uint32_t kind, uint64_t addr, uint64_t len, int fd, int64_t off)
{
	unsigned char v = 0;
	long ps = sysconf(_SC_PAGESIZE);
	if (mincore((void *)(uintptr_t)addr, (size_t)ps, &v) < 0)
		return errno == ENOMEM ? 1 : 3;
	if (!(v & 1))
		return 2;
	return remap(kind, addr, len, fd, off);
}
