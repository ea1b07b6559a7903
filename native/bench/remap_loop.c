/*
 * C floor for the model host's page remaps (src/model/host.ts): what a
 * KVM_HC_MEM_MAP / KVM_HC_MEM_UNMAP must do to this process, without any JS,
 * ffi, token or bookkeeping around it.
 *
 *   map:   mmap(page, MAP_SHARED|MAP_FIXED, vm_fd, gpa) + mlock(page)
 *   unmap: mmap(page, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED) + mlock(page)
 *
 * usage: remap_loop MODE PAGES
 *   MODE page: per page, map then unmap (one page at a time: the per-page floor)
 *   MODE run:  the whole range as one run each way (the floor for a contiguous
 *              mapRange the host coalesces)
 * prints one JSON line: {"mode":..,"pages":N,"map_ns":per page,"unmap_ns":per page,"total_ns":per page}
 * The guest memory is a memfd of PAGES pages, populated before timing (as a
 * running VM's RAM is); the window is anonymous, populated and locked (as a
 * kvmmem Window is).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PS 4096UL
#define RW (PROT_READ | PROT_WRITE)

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void remap_shared(char *addr, size_t len, int fd, off_t off)
{
	if (mmap(addr, len, RW, MAP_SHARED | MAP_FIXED, fd, off) == MAP_FAILED) die("mmap shared");
	if (mlock(addr, len) < 0) die("mlock");
}

static void remap_fresh(char *addr, size_t len)
{
	if (mmap(addr, len, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) die("mmap fresh");
	if (mlock(addr, len) < 0) die("mlock");
}

int main(int argc, char **argv)
{
	if (argc != 3 || (strcmp(argv[1], "page") && strcmp(argv[1], "run"))) {
		fprintf(stderr, "usage: %s page|run PAGES\n", argv[0]);
		return 2;
	}
	int per_page = strcmp(argv[1], "page") == 0;
	long pages = atol(argv[2]);
	if (pages <= 0) return 2;
	size_t len = pages * PS;
	int fd = memfd_create("kvmmem-bench-vm", MFD_CLOEXEC);
	if (fd < 0) die("memfd_create");
	if (ftruncate(fd, len) < 0) die("ftruncate");
	char *guest = mmap(NULL, len, RW, MAP_SHARED, fd, 0);
	if (guest == MAP_FAILED) die("mmap guest");
	memset(guest, 0x5a, len); /* the VM's RAM exists before anyone maps it */
	munmap(guest, len);
	char *win = mmap(NULL, len, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (win == MAP_FAILED) die("mmap window");
	if (mlock(win, len) < 0) die("mlock window");

	double map_ns = 0, unmap_ns = 0, t0, t1, t2;
	if (per_page) {
		for (long i = 0; i < pages; i++) {
			t0 = now_ns();
			remap_shared(win + i * PS, PS, fd, i * PS);
			t1 = now_ns();
			remap_fresh(win + i * PS, PS);
			t2 = now_ns();
			map_ns += t1 - t0;
			unmap_ns += t2 - t1;
		}
	} else {
		t0 = now_ns();
		remap_shared(win, len, fd, 0);
		t1 = now_ns();
		remap_fresh(win, len);
		t2 = now_ns();
		map_ns = t1 - t0;
		unmap_ns = t2 - t1;
	}
	if (win[0] != 0) { fprintf(stderr, "fresh page not zero\n"); return 1; }
	printf("{\"mode\":\"%s\",\"pages\":%ld,\"map_ns\":%.2f,\"unmap_ns\":%.2f,\"total_ns\":%.2f}\n",
	       argv[1], pages, map_ns / pages, unmap_ns / pages, (map_ns + unmap_ns) / pages);
	return 0;
}
