/*
 * kvmmem batch helper: many ioctls or page remaps in one call, so that a batch
 * crosses the JS/native boundary (ffi-rs, ~1.5-4 us a call) once instead of
 * once per page. Every entry point returns per-record results (0/value or
 * -errno) and never stops at the first failure: the caller decides.
 * Built by `npm install` (scripts/build-native.mjs); optional at run time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/*
 * ABI 1: kvmmem_ioctl_many_ptr/_val, kvmmem_remap_many (kinds 0 and 1).
 * ABI 2: + kvmmem_remap_one, + remap kind 2 (a read-only image: private copy-on-write, populated).
 * ABI 3: + kvmmem_map_one (the model driver's page lookup and the host's remap in one call).
 * ABI 4: + the REMAP_GUARD kind flag, kvmmem_fault_state, kvmmem_fault_guarded: pages of a guest
 *        RAM file that may shrink are guarded; a SIGBUS on one becomes a zero page and a count.
 *        Kinds 0-2 without the flag behave exactly as in ABI 3.
 */
int kvmmem_batch_abi_version(void) { return 4; }

/* ---- guarded pages: a SIGBUS there is a typed error for JS, never a signal death ----
 *
 * A MAP_SHARED (or private) mapping of a file faults with SIGBUS (BUS_ADRERR) when
 * the file shrinks below a mapped page. The model host maps pages of guest RAM files
 * it does not control (a QEMU memory-backend-file, a dump), so it asks for those
 * remaps with REMAP_GUARD: the pages are recorded here, and the SIGBUS handler
 * (installed on the first guarded remap) puts an anonymous zero page at a guarded
 * faulting page, records it in fault_state and returns: the access restarts and
 * reads zeros. JS reads fault_state through a live view after every chunk it reads
 * and raises ERR_GUEST_MEMORY_SHRUNK. Any other SIGBUS goes to the previous
 * disposition, so unrelated crashes behave as before.
 *
 * The table is a bitmap per GiB of address space (a bit per 4 KiB page), reached
 * through a fixed array of 2^17 pointers: O(1) and lock-free for the handler. A
 * bitmap, once allocated, is never freed (a handler on another thread may read it).
 * Every remap clears the bits of its range first (the range is replaced), a guarded
 * one sets them after the mmap succeeded.
 */
#define GUARD_PAGE_SHIFT 12
#define GUARD_GIB_SHIFT 30
#define GUARD_L1 (1u << (47 - GUARD_GIB_SHIFT))
#define GUARD_WORDS ((1u << (GUARD_GIB_SHIFT - GUARD_PAGE_SHIFT)) / 64)
#define REMAP_GUARD 0x100u
#define FAULT_RING 16

static uint64_t *guard_l1[GUARD_L1];
static int guard_used;

/* Shared with JS (a live view): count first; ring[(n - 1) % FAULT_RING] is the n-th fault's page. */
struct kvmmem_fault_state {
	uint32_t count;      /* guarded faults handled so far */
	uint32_t ring_size;  /* FAULT_RING */
	uint32_t installed;  /* 1 once the handler is in place */
	uint32_t passed_on;  /* SIGBUS not ours, handed to the previous disposition */
	uint64_t ring[FAULT_RING];
};
static struct kvmmem_fault_state fault_state = { .ring_size = FAULT_RING };
static uint32_t fault_seq;
static struct sigaction prev_bus;
static long guard_ps;

void *kvmmem_fault_state(void) { return &fault_state; }

static int guard_test(uintptr_t a)
{
	if (a >> 47) return 0;
	uint64_t *w = __atomic_load_n(&guard_l1[a >> GUARD_GIB_SHIFT], __ATOMIC_ACQUIRE);
	if (w == NULL) return 0;
	uint64_t bit = (a >> GUARD_PAGE_SHIFT) & ((1u << (GUARD_GIB_SHIFT - GUARD_PAGE_SHIFT)) - 1);
	return (__atomic_load_n(&w[bit >> 6], __ATOMIC_ACQUIRE) >> (bit & 63)) & 1;
}

/* 1 if the page holding addr is guarded (tests and diagnostics). */
int32_t kvmmem_fault_guarded(uint64_t addr) { return guard_test((uintptr_t)addr); }

/* Sets (on) or clears the bits of [addr, addr+len). Setting needs guard_alloc() first. */
static void guard_mark(uint64_t addr, uint64_t len, int on)
{
	uint64_t p = addr >> GUARD_PAGE_SHIFT, end = (addr + len + (1u << GUARD_PAGE_SHIFT) - 1) >> GUARD_PAGE_SHIFT;
	const uint64_t per = 1u << (GUARD_GIB_SHIFT - GUARD_PAGE_SHIFT);
	while (p < end && (p >> (47 - GUARD_PAGE_SHIFT)) == 0) {
		uint64_t *w = guard_l1[p / per];
		if (w == NULL) { p = (p / per + 1) * per; continue; } /* nothing guarded in this GiB */
		uint64_t bit = p % per;
		if (on) __atomic_fetch_or(&w[bit >> 6], 1ull << (bit & 63), __ATOMIC_RELEASE);
		else if (w[bit >> 6]) __atomic_fetch_and(&w[bit >> 6], ~(1ull << (bit & 63)), __ATOMIC_RELEASE);
		p++;
	}
}

/* The bitmaps [addr, addr+len) needs: 0 or -ENOMEM (then nothing is remapped). */
static int guard_alloc(uint64_t addr, uint64_t len)
{
	if (len == 0 || addr + len > (1ull << 47)) return -EINVAL;
	for (uint64_t g = addr >> GUARD_GIB_SHIFT; g <= (addr + len - 1) >> GUARD_GIB_SHIFT; g++) {
		if (guard_l1[g] != NULL) continue;
		uint64_t *w = calloc(GUARD_WORDS, sizeof(uint64_t));
		if (w == NULL) return -ENOMEM;
		__atomic_store_n(&guard_l1[g], w, __ATOMIC_RELEASE);
	}
	return 0;
}

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
	uintptr_t a = (uintptr_t)si->si_addr;
	if (si->si_code == BUS_ADRERR && guard_test(a)) {
		int saved = errno;
		void *page = (void *)(a & ~(uintptr_t)(guard_ps - 1));
		/* mmap is a plain syscall: safe here. The access restarts and reads zeros. */
		void *p = mmap(page, (size_t)guard_ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
		if (p != MAP_FAILED) {
			guard_mark((uint64_t)(uintptr_t)page, (uint64_t)guard_ps, 0);
			uint32_t n = __atomic_fetch_add(&fault_seq, 1, __ATOMIC_RELAXED);
			__atomic_store_n(&fault_state.ring[n % FAULT_RING], (uint64_t)(uintptr_t)page, __ATOMIC_RELAXED);
			__atomic_fetch_add(&fault_state.count, 1, __ATOMIC_RELEASE);
			errno = saved;
			return;
		}
		errno = saved;
	}
	/* Not ours: what would have happened without this handler. */
	__atomic_fetch_add(&fault_state.passed_on, 1, __ATOMIC_RELAXED);
	if (prev_bus.sa_flags & SA_SIGINFO) {
		if (prev_bus.sa_sigaction != NULL) { prev_bus.sa_sigaction(sig, si, ctx); return; }
	} else if (prev_bus.sa_handler != SIG_DFL && prev_bus.sa_handler != SIG_IGN) {
		prev_bus.sa_handler(sig);
		return;
	}
	/* SIG_DFL / SIG_IGN: put it back; a fault re-executes the access and takes it,
	 * a SIGBUS sent by kill() is sent again (delivered once this handler returns). */
	sigaction(SIGBUS, &prev_bus, NULL);
	if (si->si_code <= 0) raise(SIGBUS);
}

/* Installs the handler once: 0 or -errno. */
static int guard_install(void)
{
	if (__atomic_load_n(&fault_state.installed, __ATOMIC_ACQUIRE)) return 0;
	struct sigaction sa = { 0 };
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	guard_ps = sysconf(_SC_PAGESIZE);
	if (sigaction(SIGBUS, &sa, &prev_bus) < 0) return -errno;
	__atomic_store_n(&fault_state.installed, 1, __ATOMIC_RELEASE);
	return 0;
}

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
	int guard = (kind & REMAP_GUARD) != 0 && kind != (1 | REMAP_GUARD);
	kind &= ~REMAP_GUARD;
	if (guard) {
		int e = guard_install();
		if (e == 0) e = guard_alloc(addr, len);
		if (e < 0) return e;
		guard_used = 1;
	}
	if (kind == 1)
		p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	else if (kind == 2)
		p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off);
	else
		p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, off);
	if (p == MAP_FAILED) return -errno;
	/* The range was replaced: guarded now, or not any more (a failed mmap left it as it was). */
	if (guard) guard_mark(addr, len, 1);
	else if (guard_used) guard_mark(addr, len, 0);
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
 * kind 2: a read-only memory image (see remap()). Kinds 0 and 2 | REMAP_GUARD (ABI 4):
 * the same, and the pages are guarded (see above) until something remaps them.
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
