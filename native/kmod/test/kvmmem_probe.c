// SPDX-License-Identifier: MIT
/*
 * kvmmem_probe: the guest side of test/kmod.test.ts. Exercises /dev/kvmmem
 * (native/kmod/kvmmem.ko) through real ioctls and prints one machine-readable
 * line per observation on the console: "KPROBE <case> key=value ...".
 *
 *   kvmmem_probe waitmagic <mailbox resource2> <0|1> <timeout ms>
 *   kvmmem_probe run <mailbox resource2>
 *
 * Tokens are 32 bytes "KVMTEST:" + kind (8, space padded) + 16 characters;
 * the test's host responder gives each kind its meaning (VALID: a real MAP
 * of target page gpa/4096 through the lab agent; BUSY: -EBUSY; SILENT: an
 * answer only after the timeout; BENCH: 0 without remapping; MARK: a
 * checkpoint, answered -ENOENT, that splits the responder's log into cases;
 * NORING: 0 a little later, and the host does not ring back).
 * Built static with the system gcc (scripts/lab/kmod-initramfs.sh).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvmi_mem.h"
#include "kvmmem_mailbox.h"

#define PAGE 4096UL

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	/* one write per line: lines of the children and threads do not interleave */
	dprintf(1, "KPROBE %s\n", buf);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int kfd(void)
{
	int fd = open("/dev/kvmmem", O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		say("fatal open /dev/kvmmem errno=%d", errno);
		exit(2);
	}
	return fd;
}

static unsigned long serial;

static void mktoken(struct kvmi_map_mem_token *t, const char *kind, const char *tail)
{
	char b[33];

	snprintf(b, sizeof(b), "KVMTEST:%-8s%-16.16s", kind, tail);
	memcpy(t, b, 32);
}

/* MAP with a fresh token of `kind`: 0 or -errno. */
static int kmap_tok(int fd, const struct kvmi_map_mem_token *tok, uint64_t gpa, const void *gva)
{
	struct kvmi_mem_map m;

	memcpy(&m.token, tok, sizeof(m.token));
	m.gpa = gpa;
	m.gva = (uint64_t)(uintptr_t)gva;
	return ioctl(fd, KVM_INTRO_MEM_MAP, &m) == 0 ? 0 : -errno;
}

static int kmap(int fd, const char *kind, uint64_t gpa, const void *gva)
{
	struct kvmi_map_mem_token t;
	char tail[17];

	/* the pid too: forked children must not reuse the parent's tokens (they are single use) */
	snprintf(tail, sizeof(tail), "%06u%010lu", (unsigned int)getpid() % 1000000u,
		 __atomic_add_fetch(&serial, 1, __ATOMIC_RELAXED) % 10000000000ul);
	mktoken(&t, kind, tail);
	return kmap_tok(fd, &t, gpa, gva);
}

static int kunmap(int fd, const void *va)
{
	return ioctl(fd, KVM_INTRO_MEM_UNMAP, (unsigned long)(uintptr_t)va) == 0 ? 0 : -errno;
}

/* A checkpoint in the responder's log: a MAP of a present page with a MARK token named `name`. */
static char *mark_page;
static int mark_fd;
static void mark(const char *name)
{
	struct kvmi_map_mem_token t;
	int r;

	mktoken(&t, "MARK", name);
	r = kmap_tok(mark_fd, &t, 0, mark_page);
	say("mark name=%s rc=%d", name, r);
}

static char *page_alloc(const char *fill)
{
	char *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		say("fatal mmap errno=%d", errno);
		exit(2);
	}
	if (fill) {
		memset(p, '.', PAGE);
		memcpy(p, fill, strlen(fill));
	}
	return p;
}

static uint64_t pfn_of(const void *va)
{
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0)
		return 0;
	if (pread(fd, &e, 8, (off_t)((uintptr_t)va / PAGE) * 8) != 8)
		e = 0;
	close(fd);
	return (e >> 63) & 1 ? e & ((1ull << 55) - 1) : 0;
}

static long vmstat(const char *name)
{
	char line[128];
	size_t n = strlen(name);
	long v = -1;
	FILE *f;
	int fd = open("/proc/sys/vm/stat_refresh", O_WRONLY);

	/* fold the per-cpu deltas first: /proc/vmstat alone lags by up to the stat threshold */
	if (fd < 0 || write(fd, "1", 1) != 1)
		say("fatal stat_refresh errno=%d", errno);
	if (fd >= 0)
		close(fd);
	f = fopen("/proc/vmstat", "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, name, n) && line[n] == ' ')
			v = strtol(line + n + 1, NULL, 10);
	fclose(f);
	return v;
}

static void set_param(const char *name, const char *value)
{
	char path[128];
	int fd;

	snprintf(path, sizeof(path), "/sys/module/kvmmem/parameters/%s", name);
	fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, value, strlen(value)) < 0)
		say("fatal param %s errno=%d", name, errno);
	if (fd >= 0)
		close(fd);
}

/* 16 printable bytes at p (the test compares them with the target file), in one of 4 rotating buffers. */
static const char *text16(const char *p)
{
	static char bufs[4][17];
	static int next;
	char *b = bufs[next++ % 4];
	int i;

	for (i = 0; i < 16; i++)
		b[i] = (p[i] > ' ' && p[i] < 127) ? p[i] : '.';
	b[16] = 0;
	return b;
}

static volatile uint64_t *mbox_map(const char *res2)
{
	int fd = open(res2, O_RDONLY | O_SYNC);
	void *p;

	if (fd < 0)
		return NULL;
	p = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	return p == MAP_FAILED ? NULL : p;
}

static int wait_magic(const char *res2, int want, int timeout_ms)
{
	volatile uint64_t *m = mbox_map(res2);
	uint64_t t0 = now_ns();

	if (!m) {
		say("waitmagic error=%d", errno);
		return 1;
	}
	while ((*m == KVMMEM_MBOX_MAGIC) != want) {
		if ((now_ns() - t0) / 1000000 > (uint64_t)timeout_ms) {
			say("waitmagic want=%d timeout_ms=%d", want, timeout_ms);
			return 1;
		}
		usleep(2000);
	}
	say("waitmagic want=%d ms=%" PRIu64, want, (now_ns() - t0) / 1000000);
	munmap((void *)m, PAGE);
	return 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void stats(const char *what, uint64_t *ns, int n)
{
	qsort(ns, n, sizeof(*ns), cmp_u64);
	say("bench what=%s n=%d p50_us=%.1f p99_us=%.1f max_us=%.1f", what, n, ns[n / 2] / 1e3,
	    ns[(n * 99) / 100] / 1e3, ns[n - 1] / 1e3);
}

struct par {
	int iters, fails;
};

static void *par_thread(void *arg)
{
	struct par *p = arg;
	int fd = kfd(), i;
	char *pg = page_alloc("PARALLEL");

	for (i = 0; i < p->iters; i++) {
		if (kmap(fd, "BENCH", 0, pg))
			p->fails++;
		else if (kunmap(fd, pg))
			p->fails++;
	}
	close(fd);
	return NULL;
}

/* A child that maps two pages and then exits (how = "exit") or waits to be killed ("kill"). */
static void release_child(const char *how, uint64_t gpa0, int ready_fd)
{
	int fd = kfd();
	char *a = page_alloc("CHILD-A"), *b = page_alloc("CHILD-B");
	int ra = kmap(fd, "VALID", gpa0, a), rb = kmap(fd, "VALID", gpa0 + PAGE, b);

	say("release-%s child=%d map=%d,%d pfns=%" PRIx64 ",%" PRIx64, how, getpid(), ra, rb, pfn_of(a), pfn_of(b));
	if (!strcmp(how, "exit"))
		_exit(0);	/* the fd is still open: exit_files() releases it */
	if (write(ready_fd, "r", 1) != 1)
		_exit(3);
	for (;;)
		pause();
}

static int run(const char *res2)
{
	int fd = kfd(), r, r2;
	long acq0 = vmstat("nr_foll_pin_acquired"), rel0 = vmstat("nr_foll_pin_released");

	mark_fd = fd;
	mark_page = page_alloc("MARK-PAGE");
	say("start pins_acquired=%ld pins_released=%ld", acq0, rel0);

	/* ---- ENOTTY: another command, and MAP's number with another size */
	mark("enotty");
	{
		struct kvmi_mem_map m = { 0 };

		r = ioctl(fd, _IOW('i', 0x03, struct kvmi_mem_map), &m) ? errno : 0;
		r2 = ioctl(fd, _IOC(_IOC_WRITE, 'i', 0x01, 40), &m) ? errno : 0;
		say("enotty other=%d size40=%d", r, r2);
	}

	/* ---- EFAULT: copy_from_user of the 48-byte argument */
	mark("efault");
	r = ioctl(fd, KVM_INTRO_MEM_MAP, NULL) ? errno : 0;
	{
		char *edge = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		munmap(edge + PAGE, PAGE);	/* the struct straddles into a hole */
		r2 = ioctl(fd, KVM_INTRO_MEM_MAP, edge + PAGE - 16) ? errno : 0;
		say("efault null=%d straddle=%d", r, r2);
	}

	/* ---- EINVAL: access_ok(gva, PAGE_SIZE) */
	mark("einval");
	{
		char *p = page_alloc("EINVAL");
		int a = kmap(fd, "VALID", 0, (void *)0x7fffffffe001UL);
		int b = kmap(fd, "VALID", 0, (void *)0xffff888000000000UL);
		int c = kmap(fd, "VALID", 0, (void *)(1UL << 47));

		say("einval past_limit=%d kernel=%d noncanonical=%d", a, b, c);
		(void)p;
	}

	/* ---- the quirk: no page there -> 0, no hypercall, an entry is kept */
	mark("quirk");
	{
		char *fresh = page_alloc(NULL);		/* never touched */
		char *zero = page_alloc(NULL);
		char *hole = page_alloc(NULL);
		volatile char c = zero[0];		/* maps the shared zero page */
		int a, b, h, e, ua, ub, uh;

		(void)c;
		munmap(hole, PAGE);
		a = kmap(fd, "VALID", 0, fresh);
		b = kmap(fd, "VALID", 0, zero);
		h = kmap(fd, "VALID", 0, hole);
		say("quirk fresh=%d zero=%d hole=%d fresh_present_after=%d zero_pfn=%" PRIx64, a, b, h,
		    pfn_of(fresh) != 0, pfn_of(zero));
		e = kunmap(fd, fresh + 1);	/* exact vaddr match: no rounding */
		ua = kunmap(fd, fresh);
		ub = kunmap(fd, zero);
		uh = kunmap(fd, hole);
		r = kunmap(fd, fresh);
		r2 = kunmap(fd, mark_page);
		say("quirk unmap_plus1=%d unmap=%d,%d,%d again=%d never=%d", e, ua, ub, uh, r, r2);
	}

	/* ---- a real MAP: the target page shows through, pinned while mapped */
	mark("map");
	{
		char *p = page_alloc("PROBE-ORIGINAL-A");
		uint64_t pfn = pfn_of(p);
		long a0 = vmstat("nr_foll_pin_acquired"), l0 = vmstat("nr_foll_pin_released");
		long a1, l1, a2, l2;

		r = kmap(fd, "VALID", 5 * PAGE, p);
		a1 = vmstat("nr_foll_pin_acquired");
		l1 = vmstat("nr_foll_pin_released");
		say("map rc=%d pfn=%" PRIx64 " pfn_after=%" PRIx64 " text=%s pin_acq=%ld pin_rel=%ld", r, pfn, pfn_of(p),
		    text16(p), a1 - a0, l1 - l0);
		memcpy(p + 2048, "GUEST-WROTE-MAP", 16);
		r = kunmap(fd, p);
		a2 = vmstat("nr_foll_pin_acquired");
		l2 = vmstat("nr_foll_pin_released");
		say("map unmap=%d text=%s at2048=%s pin_acq=%ld pin_rel=%ld", r, text16(p), text16(p + 2048), a2 - a0, l2 - l0);
	}

	/* ---- hypercall errors pass through; no entry is kept */
	mark("passthrough");
	{
		char *p = page_alloc("PASSTHROUGH");
		long a0 = vmstat("nr_foll_pin_acquired"), l0 = vmstat("nr_foll_pin_released");
		struct kvmi_map_mem_token junk;
		int busy, unknown, efault;

		busy = kmap(fd, "BUSY", 5 * PAGE, p);
		memset(&junk, 0xa5, sizeof(junk));
		unknown = kmap_tok(fd, &junk, 5 * PAGE, p);
		efault = kmap(fd, "VALID", 1ull << 40, p);	/* outside the target: the host's -EFAULT */
		say("passthrough busy=%d unknown=%d host_efault=%d unmap=%d pin_acq=%ld pin_rel=%ld", busy, unknown, efault,
		    kunmap(fd, p), vmstat("nr_foll_pin_acquired") - a0, vmstat("nr_foll_pin_released") - l0);
	}

	/* ---- the host's EALREADY (same introspector page twice); a used token is unknown */
	mark("ealready");
	{
		char *p = page_alloc("EALREADY");
		struct kvmi_map_mem_token t;

		mktoken(&t, "VALID", "reused-token-001");
		r = kmap_tok(fd, &t, 7 * PAGE, p);
		r2 = kmap(fd, "VALID", 8 * PAGE, p);
		say("ealready first=%d second=%d text=%s", r, r2, text16(p));
		r = kunmap(fd, p);
		r2 = kunmap(fd, p);
		say("ealready unmap=%d again=%d", r, r2);
		say("ealready reuse=%d", kmap_tok(fd, &t, 7 * PAGE, p));
	}

	/* ---- pinning: the page stays ours after munmap while the host aliases it */
	mark("pin");
	{
		int f2 = kfd(), pinned;
		size_t big = 32ul << 20;
		char *buf;

		for (pinned = 1; pinned >= 0; pinned--) {
			/* pinned=0: the seed's unreferenced lookup (lab.md §7), to show what pinning prevents */
			uint64_t gpa = pinned ? 6 * PAGE : 9 * PAGE;
			char *p = page_alloc(pinned ? "PIN-ON" : "PIN-OFF");
			uint64_t pfn = pfn_of(p);
			size_t i;

			set_param("pin_pages", pinned ? "1" : "0");
			r = kmap(f2, "VALID", gpa, p);
			munmap(p, PAGE);	/* without UNMAP: the seed frees the page here */
			buf = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			for (i = 0; i < big; i += 8)
				memcpy(buf + i, "CLOBBER!", 8);
			say("pin pinned=%d map=%d pfn=%" PRIx64 " filled_mb=%zu", pinned, r, pfn, big >> 20);
			/* close (UNMAP) while the buffer still holds the page, then free it */
			close(f2);
			munmap(buf, big);
			f2 = kfd();
		}
		set_param("pin_pages", "1");
		close(f2);
	}

	/* ---- release(): close() unmaps everything this file mapped */
	mark("release-close");
	{
		int f3 = kfd();
		char *a = page_alloc("CLOSE-A"), *b = page_alloc("CLOSE-B"), *c = page_alloc("CLOSE-C");

		int ra = kmap(f3, "VALID", 10 * PAGE, a);
		int rb = kmap(f3, "VALID", 11 * PAGE, b);
		int rc = kmap(f3, "VALID", 12 * PAGE, c);

		say("release-close map=%d,%d,%d pfns=%" PRIx64 ",%" PRIx64 ",%" PRIx64, ra, rb, rc, pfn_of(a), pfn_of(b),
		    pfn_of(c));
		say("release-close text=%s", text16(a));
		close(f3);
		say("release-close closed=1 text=%s", text16(a));
	}

	/* ---- release() at process exit, and after kill -9 */
	mark("release-exit");
	{
		int st = 0;
		pid_t c = fork();

		if (c == 0)
			release_child("exit", 13 * PAGE, -1);
		waitpid(c, &st, 0);
		say("release-exit done status=%d", st);
	}
	mark("release-kill");
	{
		int st = 0, pp[2];
		char x;
		pid_t c;

		if (pipe(pp))
			say("fatal pipe errno=%d", errno);
		c = fork();
		if (c == 0)
			release_child("kill", 15 * PAGE, pp[1]);
		if (read(pp[0], &x, 1) != 1)
			say("release-kill no-ready");
		kill(c, SIGKILL);
		waitpid(c, &st, 0);
		say("release-kill done signaled=%d sig=%d", WIFSIGNALED(st), WIFSIGNALED(st) ? WTERMSIG(st) : 0);
	}

	/* ---- mailbox timeout: -ETIMEDOUT, the slot stays poisoned, a late MAP is undone */
	mark("timeout");
	{
		char *e = page_alloc("TIMEOUT-E"), *f = page_alloc("TIMEOUT-F");
		uint64_t t0;
		int ms, a, b, c, d;

		set_param("mbox_timeout_ms", "300");
		t0 = now_ns();
		r = kmap(fd, "SILENT", 17 * PAGE, e);
		ms = (int)((now_ns() - t0) / 1000000);
		a = kmap(fd, "VALID", 18 * PAGE, f);	/* another slot meanwhile */
		b = kunmap(fd, f);
		say("timeout silent=%d ms=%d pfn=%" PRIx64 " next_map=%d next_unmap=%d unmap_silent=%d", r, ms, pfn_of(e), a, b,
		    kunmap(fd, e));
		usleep(2500 * 1000);	/* the responder answers the SILENT request late */
		c = kmap(fd, "VALID", 19 * PAGE, f);	/* reaps the late answer first */
		d = kunmap(fd, f);
		set_param("mbox_timeout_ms", "5000");
		say("timeout after_late map=%d unmap=%d", c, d);
	}

	/* ---- an answer without a RING (a lost interrupt): found by the periodic re-check */
	mark("noring");
	{
		char *p = page_alloc("NORING");
		uint64_t t0 = now_ns();

		r = kmap(fd, "NORING", 0, p);
		r2 = (int)((now_ns() - t0) / 1000);
		say("noring map=%d us=%d unmap=%d", r, r2, kunmap(fd, p));
	}

	/* ---- the host stops serving: -ENODEV; it serves again: works */
	mark("enodev");
	{
		char *p = page_alloc("ENODEV");

		say("want magic=0");
		wait_magic(res2, 0, 30000);
		r = kmap(fd, "VALID", 20 * PAGE, p);
		say("want magic=1");
		wait_magic(res2, 1, 30000);
		r2 = kmap(fd, "VALID", 20 * PAGE, p);
		say("enodev stopped=%d again=%d unmap=%d", r, r2, kunmap(fd, p));
	}

	/* ---- several threads at once: several slots in flight */
	mark("parallel");
	{
		struct par ps[4] = { { 150, 0 }, { 150, 0 }, { 150, 0 }, { 150, 0 } };
		pthread_t th[4];
		int i, fails = 0;

		for (i = 0; i < 4; i++)
			pthread_create(&th[i], NULL, par_thread, &ps[i]);
		for (i = 0; i < 4; i++) {
			pthread_join(th[i], NULL);
			fails += ps[i].fails;
		}
		say("parallel threads=4 iters=150 fails=%d", fails);
	}

	/* ---- round trips through the mailbox */
	mark("bench");
	{
		enum { N = 1000 };
		static uint64_t mapns[N], unmapns[N], pairns[N], nullns[N];
		char *p = page_alloc("BENCH");
		int i, fails = 0;

		for (i = 0; i < N; i++) {
			uint64_t t0 = now_ns(), t1, t2;

			fails += kmap(fd, "BENCH", 0, p) != 0;
			t1 = now_ns();
			fails += kunmap(fd, p) != 0;
			t2 = now_ns();
			mapns[i] = t1 - t0;
			unmapns[i] = t2 - t1;
			pairns[i] = t2 - t0;
		}
		for (i = 0; i < N; i++) {
			uint64_t t0 = now_ns();

			ioctl(fd, _IOW('i', 0x03, struct kvmi_mem_map), p);
			nullns[i] = now_ns() - t0;
		}
		say("bench fails=%d", fails);
		stats("map", mapns, N);
		stats("unmap", unmapns, N);
		stats("map+unmap", pairns, N);
		stats("enotty", nullns, N);
	}

	mark("end");
	say("end pins_acquired=%ld pins_released=%ld", vmstat("nr_foll_pin_acquired") - acq0,
	    vmstat("nr_foll_pin_released") - rel0);
	close(fd);
	say("end closed=1 pins_acquired=%ld pins_released=%ld", vmstat("nr_foll_pin_acquired") - acq0,
	    vmstat("nr_foll_pin_released") - rel0);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc == 5 && !strcmp(argv[1], "waitmagic"))
		return wait_magic(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "run"))
		return run(argv[2]);
	fprintf(stderr, "usage: kvmmem_probe waitmagic RES2 0|1 MS | run RES2\n");
	return 64;
}
