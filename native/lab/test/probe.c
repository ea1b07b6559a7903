/*
 * Guest-side probe for test/lab-agent.test.ts (static, runs as root in the
 * live-target kernel's initramfs).
 *
 * It mlocks pages, fills page 0 with a known pattern, reads its own PFN from
 * /proc/self/pagemap and prints `PROBE pfn <hex>` (and `PROBE pfns` for
 * 16 mlocked pages: page 0 is the watched one, the rest "PROBE-EXTRA-NN").  Then it polls the page
 * every millisecond and prints `PROBE see hex=<first 16 bytes> text=<same>`
 * whenever the page changes.  The host drives it through the page itself:
 * a command block at offset 64 ("CMD:" + u32 seq + 8-byte verb) makes it
 *   WRITE___  write "GUEST-WROTE-<seq>" at offset 2048   -> `PROBE wrote <seq>`
 *   RING____  ring the ivshmem doorbell (peer 0, vector 0) -> `PROBE rang <seq>`
 *   QUIET___  stop polling and sleep forever (idle-CPU measurement)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define CMD_OFF 64
#define WROTE_OFF 2048
#define NPAGES 16

static volatile uint32_t *doorbell_regs;

static int read_hex(const char *path, unsigned *out)
{
	char buf[32] = { 0 };
	int fd = open(path, O_RDONLY);
	if (fd < 0) return -1;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0) return -1;
	*out = (unsigned)strtoul(buf, NULL, 16);
	return 0;
}

/* The first 1af4:1110 (ivshmem) device with an MSI-X BAR (resource1): the doorbell one. */
static void find_doorbell(void)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	if (!d) return;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.') continue;
		char p[512];
		unsigned ven, dev;
		snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/vendor", e->d_name);
		if (read_hex(p, &ven) || ven != 0x1af4) continue;
		snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/device", e->d_name);
		if (read_hex(p, &dev) || dev != 0x1110) continue;
		snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/resource1", e->d_name);
		if (access(p, F_OK)) continue;
		snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/enable", e->d_name);
		int fd = open(p, O_WRONLY);
		if (fd >= 0) {
			if (write(fd, "1", 1) != 1) { /* already enabled is fine */ }
			close(fd);
		}
		snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/resource0", e->d_name);
		fd = open(p, O_RDWR | O_SYNC);
		if (fd < 0) continue;
		void *m = mmap(NULL, 256, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		close(fd);
		if (m == MAP_FAILED) continue;
		doorbell_regs = m;
		printf("PROBE ivshmem %s ivposition %u\n", e->d_name, doorbell_regs[2]);
		break;
	}
	closedir(d);
}

static void show(const unsigned char *pg)
{
	char hex[33], text[17];
	for (int i = 0; i < 16; i++) {
		sprintf(hex + 2 * i, "%02x", pg[i]);
		text[i] = pg[i] >= 0x21 && pg[i] < 0x7f ? (char)pg[i] : '.';
	}
	text[16] = 0;
	printf("PROBE see hex=%s text=%s\n", hex, text);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	/* Page 0 is watched; the others give the host a run of adjacent
	 * guest-physical pages that belong to this process (multi-page MAP). */
	unsigned char *pg = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (pg == MAP_FAILED || mlock(pg, NPAGES * PAGE)) {
		perror("PROBE error mmap/mlock");
		return 1;
	}
	memcpy(pg, "PROBE-ORIGINAL-A", 16);
	for (int i = 16; i < PAGE; i++) pg[i] = (unsigned char)(i * 7);
	memset(pg + CMD_OFF, 0, 16);
	for (int k = 1; k < NPAGES; k++) {
		memset(pg + k * PAGE, 0x5a, PAGE);
		snprintf((char *)pg + k * PAGE, 17, "PROBE-EXTRA-%02d..", k);
	}

	int pm = open("/proc/self/pagemap", O_RDONLY);
	uint64_t pfn[NPAGES];
	for (int k = 0; k < NPAGES; k++) {
		uint64_t ent = 0;
		if (pm < 0 || pread(pm, &ent, 8, (off_t)((uintptr_t)(pg + k * PAGE) / PAGE) * 8) != 8 || !(ent >> 63)) {
			perror("PROBE error pagemap");
			return 1;
		}
		pfn[k] = ent & ((1ull << 55) - 1);
	}
	close(pm);
	printf("PROBE pfns");
	for (int k = 0; k < NPAGES; k++) printf("%c%llx", k ? ',' : ' ', (unsigned long long)pfn[k]);
	printf("\n");
	find_doorbell();
	printf("PROBE pfn %llx\n", (unsigned long long)pfn[0]);

	static unsigned char last[PAGE];
	memcpy(last, pg, PAGE);
	uint32_t done_seq = 0;
	for (;;) {
		usleep(1000);
		if (!memcmp(last, pg, PAGE)) continue;
		memcpy(last, pg, PAGE);
		show(last);
		if (memcmp(last + CMD_OFF, "CMD:", 4)) continue;
		uint32_t seq;
		memcpy(&seq, last + CMD_OFF + 4, 4);
		if (seq == done_seq) continue;
		done_seq = seq;
		const char *verb = (const char *)last + CMD_OFF + 8;
		if (!memcmp(verb, "WRITE___", 8)) {
			char msg[32];
			int n = snprintf(msg, sizeof msg, "GUEST-WROTE-%u", seq);
			memcpy(pg + WROTE_OFF, msg, (size_t)n + 1);
			printf("PROBE wrote %u\n", seq);
		} else if (!memcmp(verb, "RING____", 8)) {
			if (doorbell_regs) {
				doorbell_regs[3] = 0; /* Doorbell: peer 0 << 16 | vector 0 */
				printf("PROBE rang %u\n", seq);
			} else {
				printf("PROBE nodoorbell %u\n", seq);
			}
		} else if (!memcmp(verb, "QUIET___", 8)) {
			printf("PROBE quiet %u\n", seq);
			for (;;) pause();
		}
		memcpy(last, pg, PAGE);
	}
}
