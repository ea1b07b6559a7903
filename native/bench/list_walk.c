/*
 * The real kvmmem driver's UNMAP (seed 003, kvm_dev_ioctl_unmap) walks the
 * file's map_list until it meets the entry with the given vaddr: O(n) in live
 * mappings. This measures that walk in C with the driver's struct page_map
 * (list_head + gpa + vaddr + paddr, 40 bytes, allocated one by one as kmalloc
 * would), to put a number on what it costs at n live mappings.
 *
 * usage: list_walk N WALKS
 * prints one JSON line: {"n":N,"ns_per_entry":..,"newest_unmap_us":..}
 *   newest_unmap_us: finding the most recently mapped entry (a walk of all n).
 * Allocation here is sequential and cache-friendly, so this is the optimistic case.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct list_head { struct list_head *next, *prev; };
struct page_map { struct list_head map_list; uint64_t gpa, vaddr, paddr; };

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 3) { fprintf(stderr, "usage: %s N WALKS\n", argv[0]); return 2; }
	long n = atol(argv[1]), walks = atol(argv[2]);
	if (n <= 0 || walks <= 0) return 2;
	struct list_head head = { &head, &head };
	for (long i = 0; i < n; i++) {
		struct page_map *p = malloc(sizeof(*p));
		p->gpa = i * 4096; p->vaddr = 0x7f0000000000ull + i * 4096; p->paddr = 0x100000000ull + i * 4096;
		/* list_add_tail */
		p->map_list.next = &head; p->map_list.prev = head.prev;
		head.prev->next = &p->map_list; head.prev = &p->map_list;
	}
	uint64_t want = 0x7f0000000000ull + (n - 1) * 4096; /* the newest mapping */
	volatile uint64_t found = 0;
	double t0 = now_ns();
	for (long w = 0; w < walks; w++) {
		for (struct list_head *cur = head.next; cur != &head; cur = cur->next) {
			struct page_map *p = (struct page_map *)cur;
			if (p->vaddr == want) { found += p->paddr; break; }
		}
	}
	double per_walk = (now_ns() - t0) / walks;
	printf("{\"n\":%ld,\"ns_per_entry\":%.3f,\"newest_unmap_us\":%.3f}\n", n, per_walk / n, per_walk / 1000);
	return found == 0;
}
