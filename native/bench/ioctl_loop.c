/*
 * C baseline for the ioctl path: the same KVM_INTRO_MEM_MAP (pointer to a
 * 48-byte kvmi_mem_map) and KVM_INTRO_MEM_UNMAP (the address as the value)
 * requests kvmmem issues, in a plain loop, on a given fd (the bench uses
 * /dev/null, which answers ENOTTY after a real syscall).
 *
 * usage: ioctl_loop PATH COUNT
 * prints one JSON line: {"count":N,"map_ns":ns-per-ioctl,"unmap_ns":...,"map_errno":e,"unmap_errno":e}
 * Built and run by the kvmmem bench harness (src/cli/bench.ts); one run per
 * invocation so that the harness can interleave it with the TypeScript runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include "../include/kvmi_mem.h"

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s PATH COUNT\n", argv[0]);
		return 2;
	}
	long count = atol(argv[2]);
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0 || count <= 0) {
		perror(argv[1]);
		return 1;
	}
	struct kvmi_mem_map *recs = calloc(count, sizeof(*recs));
	for (long i = 0; i < count; i++) {
		recs[i].gpa = (uint64_t)i * 4096;
		recs[i].gva = 0x7f0000000000ull + (uint64_t)i * 4096;
	}
	int map_errno = 0, unmap_errno = 0;
	volatile long fails = 0;
	double t0 = now_ns();
	for (long i = 0; i < count; i++) {
		if (ioctl(fd, KVM_INTRO_MEM_MAP, &recs[i]) < 0) { fails++; map_errno = errno; }
	}
	double t1 = now_ns();
	for (long i = 0; i < count; i++) {
		if (ioctl(fd, KVM_INTRO_MEM_UNMAP, (unsigned long)recs[i].gva) < 0) { fails++; unmap_errno = errno; }
	}
	double t2 = now_ns();
	printf("{\"count\":%ld,\"map_ns\":%.2f,\"unmap_ns\":%.2f,\"map_errno\":%d,\"unmap_errno\":%d}\n",
	       count, (t1 - t0) / count, (t2 - t1) / count, map_errno, unmap_errno);
	free(recs);
	close(fd);
	return 0;
}
