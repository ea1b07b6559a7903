/*
 * kvmmem lab agent: LD_PRELOADed into the introspector's QEMU.
 *
 * On request over a unix socket it replaces the host page behind one (or a
 * run of) guest-physical page(s) of QEMU's RAM file with a page of another
 * file (the target VM's RAM) or a fresh zeroed page, and puts the RAM file's
 * own page back on RESTORE.  That is what a real KVMI host's mm_remote_map()
 * does: the guest kernel's page tables and the user's VMA never change.
 * Optionally it is the ivshmem server for an ivshmem-doorbell device, so a
 * guest<->host mailbox can be event-driven.  Protocol: kvmmem_agent.h;
 * design and limits: docs/lab-agent.md.
 *
 * It runs inside QEMU, so nothing here may crash QEMU: every request is
 * validated, no signal is raised (MSG_NOSIGNAL, all signals blocked in the
 * agent thread), every fd is CLOEXEC, and one thread owns all state.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#include "scm.h"
#include "kvmmem_agent.h"

#define PAGE ((uint64_t)KVMMEM_AGENT_PAGE)
#define ST_ORIG 0
#define ST_FRESH 0xffff
/* Far above any RAM size below the PCI hole; keeps npages*PAGE from overflowing. */
#define MAX_NPAGES (1ull << 40)

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof buf, "kvmmem-agent[%d]: ", (int)getpid());
	va_start(ap, fmt);
	vsnprintf(buf + n, sizeof buf - n, fmt, ap);
	va_end(ap);
	size_t l = strlen(buf);
	if (l < sizeof buf - 1) buf[l++] = '\n';
	ssize_t w = write(2, buf, l); /* QEMU's stderr: best effort */
	(void)w;
}

/* ------------------------------------------------------------ state */

struct target {
	uint32_t id; /* 0: free slot */
	int fd;
	uint64_t mapped; /* pages of RAM currently backed by this file */
};

struct client {
	int fd; /* -1: free */
	unsigned char in[sizeof(struct kvmmem_agent_req) + KVMMEM_AGENT_MAX_PAYLOAD];
	size_t have;
	int in_fd;     /* fd received with the current request, -1 if none */
	int bad_fds;   /* more than one fd / unexpected fd with this request */
	unsigned char out[sizeof(struct kvmmem_agent_resp)];
	size_t out_len, out_off;
	int out_fds[1 + 2 * KVMMEM_AGENT_MAX_VECTORS];
	int out_nfds; /* fds still to send with out[out_off..] (dups, closed after) */
	int closing;  /* close once out is flushed */
	int subscribed;
	uint64_t ev_pending[KVMMEM_AGENT_MAX_VECTORS];
};

static struct {
	char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char *ram_path;
	int listen_fd;
	/* RAM mapping, found lazily (QEMU maps RAM after main starts). */
	int ram_found;
	unsigned char *ram_base;
	uint64_t ram_size;
	int ram_fd;
	int ram_fd_is_qemus; /* a dup of QEMU's own fd (restores merge VMAs) */
	int madv_dontfork, madv_dontdump, madv_hugepage; /* copied from the original VMA */
	uint16_t *state; /* per RAM page: ST_ORIG, ST_FRESH or target slot + 1 */
	uint64_t n_mapped, n_fresh, n_requests;
	uint32_t next_id;
	struct target targets[KVMMEM_AGENT_MAX_TARGETS];
	struct client clients[KVMMEM_AGENT_MAX_CLIENTS];
	/* ivshmem doorbell */
	int ivs_listen_fd, ivs_conn_fd;
	int shm_fd;
	uint64_t shm_size;
	unsigned vectors;
	int g2h[KVMMEM_AGENT_MAX_VECTORS]; /* QEMU writes when the guest rings peer HOST_PEER */
	int h2g[KVMMEM_AGENT_MAX_VECTORS]; /* we write to raise a vector in the guest */
	int n_subscribers;
} A;

#define HOST_PEER 0
#define QEMU_PEER 1

/* ------------------------------------------------------------ RAM discovery */

static int find_ram(void)
{
	if (A.ram_found) return 0;
	if (!A.ram_path) return -ENODEV;
	int fd = open(A.ram_path, O_RDWR | O_CLOEXEC);
	if (fd < 0) return -ENODEV;
	struct stat st;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return -ENODEV;
	}
	FILE *f = fopen("/proc/self/smaps", "re");
	if (!f) {
		close(fd);
		return -ENODEV;
	}
	char line[4096 + 256];
	unsigned long best_lo = 0, best_hi = 0;
	int in_best = 0, flags_dc = 0, flags_dd = 0, flags_hg = 0;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi, off, ino;
		unsigned maj, mnr;
		char perms[8];
		int pos = 0;
		if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu %n", &lo, &hi, perms, &off, &maj, &mnr, &ino, &pos) >= 7) {
			in_best = 0;
			if (ino != st.st_ino || makedev(maj, mnr) != st.st_dev || perms[3] != 's') continue;
			/* QEMU may have split its RAM VMA (madvise of a part): extend
			 * the offset-0 mapping over contiguous pieces of the file. */
			if (best_hi && lo == best_hi && off == best_hi - best_lo) {
				best_hi = hi;
				continue;
			}
			if (off != 0 || hi - lo <= best_hi - best_lo) continue;
			best_lo = lo;
			best_hi = hi;
			in_best = 1;
		} else if (in_best && strncmp(line, "VmFlags:", 8) == 0) {
			flags_dc = strstr(line, " dc") != NULL;
			flags_dd = strstr(line, " dd") != NULL;
			flags_hg = strstr(line, " hg") != NULL;
		}
	}
	fclose(f);
	if (!best_hi) {
		close(fd);
		return -ENODEV;
	}
	/* Restore through QEMU's own open file of the RAM (it keeps the fd):
	 * the kernel merges a VMA back into its neighbours only if it maps the
	 * same struct file, so restored pages leave no VMA splits behind. */
	DIR *dir = opendir("/proc/self/fd");
	if (dir) {
		struct dirent *de;
		while ((de = readdir(dir))) {
			char *end;
			long n = strtol(de->d_name, &end, 10);
			if (*end || n < 0 || n == fd || n == dirfd(dir)) continue;
			struct stat s2;
			int fl = fcntl((int)n, F_GETFL);
			if (fl < 0 || (fl & O_ACCMODE) != O_RDWR || fstat((int)n, &s2) < 0) continue;
			if (s2.st_ino != st.st_ino || s2.st_dev != st.st_dev) continue;
			int d = fcntl((int)n, F_DUPFD_CLOEXEC, 0);
			if (d >= 0) {
				close(fd);
				fd = d;
				A.ram_fd_is_qemus = 1;
			}
			break;
		}
		closedir(dir);
	}
	uint64_t size = best_hi - best_lo;
	if ((uint64_t)st.st_size < size) size = (uint64_t)st.st_size & ~(PAGE - 1);
	uint64_t npages = size / PAGE;
	void *st_mem = mmap(NULL, npages * sizeof(uint16_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (st_mem == MAP_FAILED) {
		close(fd);
		return -ENOMEM;
	}
	A.state = st_mem;
	A.ram_base = (unsigned char *)best_lo;
	A.ram_size = size;
	A.ram_fd = fd;
	A.madv_dontfork = flags_dc;
	A.madv_dontdump = flags_dd;
	A.madv_hugepage = flags_hg;
	A.ram_found = 1;
	logf_("RAM %s at %p, %llu MiB (dontfork=%d dontdump=%d hugepage=%d, %s fd)", A.ram_path, (void *)A.ram_base,
	      (unsigned long long)(size >> 20), flags_dc, flags_dd, flags_hg, A.ram_fd_is_qemus ? "QEMU's" : "own");
	return 0;
}

/* Give a new mapping the VMA flags QEMU set on its RAM, so a restored page
 * merges back into QEMU's VMA (bounded map count) and forks/dumps stay as
 * QEMU configured them. */
static void copy_vma_flags(void *addr, size_t len)
{
	if (A.madv_dontfork) madvise(addr, len, MADV_DONTFORK);
	if (A.madv_dontdump) madvise(addr, len, MADV_DONTDUMP);
	if (A.madv_hugepage) madvise(addr, len, MADV_HUGEPAGE);
}

static void set_state(uint64_t page, uint16_t s)
{
	uint16_t old = A.state[page];
	if (old == s) return;
	if (old == ST_FRESH) A.n_fresh--;
	else if (old != ST_ORIG) {
		A.targets[old - 1].mapped--;
		A.n_mapped--;
	}
	if (s == ST_FRESH) A.n_fresh++;
	else if (s != ST_ORIG) {
		A.targets[s - 1].mapped++;
		A.n_mapped++;
	}
	A.state[page] = s;
}

/* Put the RAM file's own pages back behind [first, first+n). */
static int remap_orig(uint64_t first, uint64_t n)
{
	void *want = A.ram_base + first * PAGE;
	void *p = mmap(want, n * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, A.ram_fd, (off_t)(first * PAGE));
	if (p == MAP_FAILED) return -errno;
	copy_vma_flags(want, n * PAGE);
	for (uint64_t i = 0; i < n; i++) set_state(first + i, ST_ORIG);
	return 0;
}

/* After a failed MAP_FIXED the old mapping may already be gone: QEMU would
 * fault on the hole.  Put the original back; failing that, anything. */
static void repair(uint64_t first, uint64_t n)
{
	if (remap_orig(first, n) == 0) return;
	void *want = A.ram_base + first * PAGE;
	void *p = mmap(want, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (p != MAP_FAILED) {
		for (uint64_t i = 0; i < n; i++) set_state(first + i, ST_FRESH);
		logf_("could not restore RAM pages 0x%llx+%llu; they are zero pages now", (unsigned long long)(first * PAGE),
		      (unsigned long long)n);
	} else {
		logf_("could not repair RAM pages 0x%llx+%llu: %s", (unsigned long long)(first * PAGE), (unsigned long long)n,
		      strerror(errno));
	}
}

/* Restore the non-original pages of [first, first+n); returns count or -errno. */
static int64_t restore_run(uint64_t first, uint64_t n)
{
	int64_t done = 0;
	uint64_t i = 0;
	while (i < n) {
		if (A.state[first + i] == ST_ORIG) {
			i++;
			continue;
		}
		uint64_t j = i;
		while (j < n && A.state[first + j] != ST_ORIG) j++;
		int r = remap_orig(first + i, j - i);
		if (r < 0) return done ? done : r;
		done += (int64_t)(j - i);
		i = j;
	}
	return done;
}

/* ------------------------------------------------------------ requests */

static struct target *find_target(uint32_t id)
{
	if (!id) return NULL;
	for (unsigned i = 0; i < KVMMEM_AGENT_MAX_TARGETS; i++)
		if (A.targets[i].id == id) return &A.targets[i];
	return NULL;
}

static int attach(int fd, struct kvmmem_agent_resp *r)
{
	struct stat st;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) return -EINVAL;
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (fl & O_ACCMODE) != O_RDWR) return -EACCES; /* MAP_SHARED + PROT_WRITE needs it */
	for (unsigned i = 0; i < KVMMEM_AGENT_MAX_TARGETS; i++) {
		if (A.targets[i].id) continue;
		if (++A.next_id == 0) A.next_id = 1;
		A.targets[i].id = A.next_id;
		A.targets[i].fd = fd;
		A.targets[i].mapped = 0;
		r->v[0] = A.next_id;
		r->v[1] = (uint64_t)st.st_size;
		return 0;
	}
	return -EMFILE;
}

/* Checks shared by the ops that take a RAM run. */
static int check_run(const struct kvmmem_agent_req *q)
{
	int e = find_ram();
	if (e) return e;
	if (q->gpa % PAGE) return -EINVAL;
	if (q->npages == 0 || q->npages > MAX_NPAGES) return -EINVAL;
	if (q->gpa >= A.ram_size || q->npages > (A.ram_size - q->gpa) / PAGE) return -ERANGE;
	return 0;
}

static int op_map(const struct kvmmem_agent_req *q, struct kvmmem_agent_resp *r)
{
	int e = check_run(q);
	if (e) return e;
	if (q->offset % PAGE) return -EINVAL;
	struct target *t = find_target(q->target);
	if (!t) return -EBADF;
	struct stat st;
	if (fstat(t->fd, &st) < 0) return -errno;
	uint64_t fsize = (uint64_t)st.st_size;
	/* A page past EOF would SIGBUS QEMU on first guest access. */
	if (q->offset >= fsize || q->npages > (fsize - q->offset) / PAGE) return -ENXIO;
	uint64_t first = q->gpa / PAGE;
	void *want = A.ram_base + q->gpa;
	void *p = mmap(want, q->npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, t->fd, (off_t)q->offset);
	if (p == MAP_FAILED) {
		int err = errno;
		repair(first, q->npages);
		return -err;
	}
	copy_vma_flags(want, q->npages * PAGE);
	uint16_t s = (uint16_t)(t - A.targets + 1);
	for (uint64_t i = 0; i < q->npages; i++) set_state(first + i, s);
	r->v[0] = q->npages;
	return 0;
}

static int op_fresh(const struct kvmmem_agent_req *q, struct kvmmem_agent_resp *r)
{
	int e = check_run(q);
	if (e) return e;
	if (q->offset || q->target) return -EINVAL;
	uint64_t first = q->gpa / PAGE;
	void *want = A.ram_base + q->gpa;
	void *p = mmap(want, q->npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (p == MAP_FAILED) {
		int err = errno;
		repair(first, q->npages);
		return -err;
	}
	copy_vma_flags(want, q->npages * PAGE);
	for (uint64_t i = 0; i < q->npages; i++) set_state(first + i, ST_FRESH);
	r->v[0] = q->npages;
	return 0;
}

static void client_close(struct client *c);

/* Fill r for q; returns status.  `in_fd` is the fd received with q (owned). */
static int dispatch(struct client *c, const struct kvmmem_agent_req *q, const unsigned char *payload, struct kvmmem_agent_resp *r)
{
	int in_fd = c->in_fd;
	c->in_fd = -1;
	if (c->bad_fds || (in_fd >= 0 && q->op != KVMMEM_AGENT_ATTACH_FD)) {
		if (in_fd >= 0) close(in_fd);
		return -EINVAL;
	}
	if (q->flags || q->reserved || (q->len && q->op != KVMMEM_AGENT_ATTACH_PATH)) {
		if (in_fd >= 0) close(in_fd);
		return -EINVAL;
	}
	switch (q->op) {
	case KVMMEM_AGENT_INFO:
		find_ram();
		r->v[0] = KVMMEM_AGENT_VERSION;
		r->v[1] = A.ram_found ? A.ram_size : 0;
		r->v[2] = A.vectors;
		r->v[3] = PAGE;
		return 0;
	case KVMMEM_AGENT_ATTACH_FD: {
		if (in_fd < 0) return -EBADF;
		int e = attach(in_fd, r);
		if (e) close(in_fd);
		return e;
	}
	case KVMMEM_AGENT_ATTACH_PATH: {
		if (q->len == 0) return -EINVAL;
		char path[KVMMEM_AGENT_MAX_PAYLOAD + 1];
		memcpy(path, payload, q->len);
		path[q->len] = 0;
		if (strlen(path) != q->len) return -EINVAL; /* embedded NUL */
		int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
		if (fd < 0) return -errno;
		int e = attach(fd, r);
		if (e) close(fd);
		return e;
	}
	case KVMMEM_AGENT_DETACH: {
		struct target *t = find_target(q->target);
		if (!t) return -EBADF;
		if (t->mapped) {
			r->v[0] = t->mapped;
			return -EBUSY;
		}
		close(t->fd);
		t->id = 0;
		t->fd = -1;
		return 0;
	}
	case KVMMEM_AGENT_MAP:
		return op_map(q, r);
	case KVMMEM_AGENT_RESTORE: {
		int e = check_run(q);
		if (e) return e;
		if (q->offset || q->target) return -EINVAL;
		int64_t n = restore_run(q->gpa / PAGE, q->npages);
		if (n < 0) return (int)n;
		r->v[0] = (uint64_t)n;
		return 0;
	}
	case KVMMEM_AGENT_FRESH:
		return op_fresh(q, r);
	case KVMMEM_AGENT_RESTORE_ALL: {
		if (q->gpa || q->npages || q->offset || q->target) return -EINVAL;
		if (!A.ram_found) return 0;
		int64_t n = restore_run(0, A.ram_size / PAGE);
		if (n < 0) return (int)n;
		r->v[0] = (uint64_t)n;
		return 0;
	}
	case KVMMEM_AGENT_STATS:
		r->v[0] = A.n_mapped;
		r->v[1] = A.n_fresh;
		for (unsigned i = 0; i < KVMMEM_AGENT_MAX_TARGETS; i++) r->v[2] += A.targets[i].id != 0;
		r->v[3] = A.n_requests;
		return 0;
	case KVMMEM_AGENT_DOORBELL_FDS: {
		if (!A.vectors) return -ENODEV;
		int n = 0;
		int want[1 + 2 * KVMMEM_AGENT_MAX_VECTORS];
		want[n++] = A.shm_fd;
		for (unsigned v = 0; v < A.vectors; v++) want[n++] = A.g2h[v];
		for (unsigned v = 0; v < A.vectors; v++) want[n++] = A.h2g[v];
		for (int i = 0; i < n; i++) {
			int d = fcntl(want[i], F_DUPFD_CLOEXEC, 0);
			if (d < 0) {
				int err = errno;
				for (int k = 0; k < i; k++) close(c->out_fds[k]);
				return -err;
			}
			c->out_fds[i] = d;
		}
		c->out_nfds = n;
		r->v[0] = A.vectors;
		r->v[1] = QEMU_PEER;
		r->v[2] = HOST_PEER;
		r->v[3] = A.shm_size;
		return 0;
	}
	case KVMMEM_AGENT_SUBSCRIBE:
		if (!A.vectors) return -ENODEV;
		if (!c->subscribed) {
			c->subscribed = 1;
			A.n_subscribers++;
		}
		return 0;
	case KVMMEM_AGENT_RING: {
		if (!A.vectors) return -ENODEV;
		if (q->target >= A.vectors || q->gpa || q->npages || q->offset) return -EINVAL;
		uint64_t one = 1;
		if (write(A.h2g[q->target], &one, sizeof one) != sizeof one) return -errno;
		return 0;
	}
	default:
		return -EOPNOTSUPP;
	}
}

/* ------------------------------------------------------------ connections */

static void client_close(struct client *c)
{
	if (c->fd < 0) return;
	close(c->fd);
	c->fd = -1;
	if (c->in_fd >= 0) close(c->in_fd);
	c->in_fd = -1;
	for (int i = 0; i < c->out_nfds; i++) close(c->out_fds[i]);
	c->out_nfds = 0;
	if (c->subscribed) A.n_subscribers--;
	c->subscribed = 0;
}

/* Try to send c->out; returns 0 when drained or still pending, -1 when the client is gone. */
static int flush_out(struct client *c)
{
	while (c->out_off < c->out_len) {
		struct iovec iov = { c->out + c->out_off, c->out_len - c->out_off };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		union {
			char buf[CMSG_SPACE(sizeof(int) * (1 + 2 * KVMMEM_AGENT_MAX_VECTORS))];
			struct cmsghdr align;
		} cm;
		if (c->out_nfds) {
			m.msg_control = cm.buf;
			m.msg_controllen = CMSG_SPACE(sizeof(int) * c->out_nfds);
			struct cmsghdr *h = CMSG_FIRSTHDR(&m);
			h->cmsg_level = SOL_SOCKET;
			h->cmsg_type = SCM_RIGHTS;
			h->cmsg_len = CMSG_LEN(sizeof(int) * c->out_nfds);
			memcpy(CMSG_DATA(h), c->out_fds, sizeof(int) * c->out_nfds);
		}
		ssize_t n = sendmsg(c->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
			return -1;
		}
		if (c->out_nfds) { /* the kernel holds its own references now */
			for (int i = 0; i < c->out_nfds; i++) close(c->out_fds[i]);
			c->out_nfds = 0;
		}
		c->out_off += (size_t)n;
	}
	c->out_len = c->out_off = 0;
	return 0;
}

static int queue_resp(struct client *c, const struct kvmmem_agent_resp *r)
{
	memcpy(c->out, r, sizeof *r);
	c->out_len = sizeof *r;
	c->out_off = 0;
	return flush_out(c);
}

static int flush_events(struct client *c)
{
	for (unsigned v = 0; v < A.vectors && c->out_len == 0; v++) {
		if (!c->ev_pending[v]) continue;
		struct kvmmem_agent_resp r = { KVMMEM_AGENT_MAGIC, KVMMEM_AGENT_EVENT, KVMMEM_AGENT_F_EVENT, 0, 0, { v, c->ev_pending[v], 0, 0 } };
		c->ev_pending[v] = 0;
		if (queue_resp(c, &r) < 0) return -1;
	}
	return 0;
}

/* Read the rest of the current request (exactly: so an fd that arrives
 * belongs to this request).  Returns 1 complete, 0 need more, -1 close. */
static int read_request(struct client *c)
{
	const size_t hdr = sizeof(struct kvmmem_agent_req);
	for (;;) {
		size_t want = hdr;
		if (c->have >= hdr) {
			const struct kvmmem_agent_req *q = (const void *)c->in;
			want = hdr + q->len;
		}
		if (c->have == want) return 1;
		struct iovec iov = { c->in + c->have, want - c->have };
		union {
			char buf[CMSG_SPACE(sizeof(int) * 4)];
			struct cmsghdr align;
		} cm;
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
		ssize_t n = recvmsg(c->fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
		for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
			if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
			int cnt = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			int fds[4];
			memcpy(fds, CMSG_DATA(h), sizeof(int) * (cnt > 4 ? 4 : cnt));
			for (int i = 0; i < cnt && i < 4; i++) {
				if (c->in_fd < 0 && !c->bad_fds) c->in_fd = fds[i];
				else {
					close(fds[i]);
					c->bad_fds = 1;
				}
			}
		}
		if (m.msg_flags & MSG_CTRUNC) c->bad_fds = 1; /* extra fds were dropped by the kernel */
		if (n == 0) return -1; /* EOF, maybe mid-request: discard it */
		c->have += (size_t)n;
		if (c->have == hdr) {
			const struct kvmmem_agent_req *q = (const void *)c->in;
			if (q->magic != KVMMEM_AGENT_MAGIC || q->len > KVMMEM_AGENT_MAX_PAYLOAD) return 1; /* answered, then closed */
		}
	}
}

static void client_readable(struct client *c)
{
	for (int budget = 64; budget > 0 && c->fd >= 0 && c->out_len == 0 && !c->closing; budget--) {
		int st = read_request(c);
		if (st < 0) {
			client_close(c);
			return;
		}
		if (st == 0) return;
		const struct kvmmem_agent_req *q = (const void *)c->in;
		struct kvmmem_agent_resp r = { KVMMEM_AGENT_MAGIC, q->op, 0, q->seq, 0, { 0, 0, 0, 0 } };
		if (q->magic != KVMMEM_AGENT_MAGIC || q->len > KVMMEM_AGENT_MAX_PAYLOAD) {
			/* Framing is lost: answer once, then close. */
			r.status = q->magic != KVMMEM_AGENT_MAGIC ? -EPROTO : -EMSGSIZE;
			if (q->magic != KVMMEM_AGENT_MAGIC) r.op = 0, r.seq = 0;
			c->closing = 1;
		} else {
			r.status = dispatch(c, q, c->in + sizeof *q, &r);
		}
		A.n_requests++;
		c->have = 0;
		c->bad_fds = 0;
		if (c->in_fd >= 0) {
			close(c->in_fd);
			c->in_fd = -1;
		}
		if (queue_resp(c, &r) < 0) {
			client_close(c);
			return;
		}
	}
	if (c->fd >= 0 && c->closing && c->out_len == 0) client_close(c);
}

static void accept_client(void)
{
	int fd = accept4(A.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0) return;
	for (unsigned i = 0; i < KVMMEM_AGENT_MAX_CLIENTS; i++) {
		struct client *c = &A.clients[i];
		if (c->fd >= 0) continue;
		memset(c, 0, sizeof *c);
		c->fd = fd;
		c->in_fd = -1;
		return;
	}
	close(fd); /* full: the client sees EOF */
}

/* ------------------------------------------------------------ ivshmem server */

static int send_ivs(int fd, int64_t v, int pass_fd)
{
	return kvmmem_send_with_fd(fd, &v, sizeof v, pass_fd);
}

/* QEMU's ivshmem-doorbell connected: the setup of ivshmem-spec.txt. */
static void accept_ivs(void)
{
	int fd = accept4(A.ivs_listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) return;
	if (A.ivs_conn_fd >= 0) { /* one device per agent */
		close(fd);
		return;
	}
	int ok = send_ivs(fd, 0, -1) == 0 /* version */
		 && send_ivs(fd, QEMU_PEER, -1) == 0 /* its id */
		 && send_ivs(fd, -1, A.shm_fd) == 0; /* shared memory */
	for (unsigned v = 0; ok && v < A.vectors; v++) ok = send_ivs(fd, HOST_PEER, A.g2h[v]) == 0; /* peer "host" */
	for (unsigned v = 0; ok && v < A.vectors; v++) ok = send_ivs(fd, QEMU_PEER, A.h2g[v]) == 0; /* its own vectors */
	if (!ok) {
		logf_("ivshmem setup failed: %s", strerror(errno));
		close(fd);
		return;
	}
	A.ivs_conn_fd = fd;
}

static void doorbell(unsigned v)
{
	uint64_t cnt;
	if (read(A.g2h[v], &cnt, sizeof cnt) != sizeof cnt) return;
	for (unsigned i = 0; i < KVMMEM_AGENT_MAX_CLIENTS; i++) {
		struct client *c = &A.clients[i];
		if (c->fd < 0 || !c->subscribed) continue;
		c->ev_pending[v] += cnt;
		if (flush_events(c) < 0) client_close(c);
	}
}

/* ------------------------------------------------------------ thread */

static void *agent_main(void *arg)
{
	(void)arg;
	struct pollfd pf[2 + 1 + KVMMEM_AGENT_MAX_VECTORS + KVMMEM_AGENT_MAX_CLIENTS];
	struct client *who[sizeof pf / sizeof pf[0]];
	for (;;) {
		int n = 0;
		pf[n] = (struct pollfd){ A.listen_fd, POLLIN, 0 };
		who[n++] = NULL;
		if (A.ivs_listen_fd >= 0) {
			pf[n] = (struct pollfd){ A.ivs_listen_fd, POLLIN, 0 };
			who[n++] = NULL;
		}
		int ev_base = n;
		/* Doorbells are only consumed while someone listens; otherwise they
		 * stay in the eventfds for a DOORBELL_FDS holder. */
		if (A.n_subscribers > 0)
			for (unsigned v = 0; v < A.vectors; v++) {
				pf[n] = (struct pollfd){ A.g2h[v], POLLIN, 0 };
				who[n++] = NULL;
			}
		int ev_end = n;
		for (unsigned i = 0; i < KVMMEM_AGENT_MAX_CLIENTS; i++) {
			struct client *c = &A.clients[i];
			if (c->fd < 0) continue;
			short evs = c->out_len ? POLLOUT : POLLIN;
			pf[n] = (struct pollfd){ c->fd, evs, 0 };
			who[n++] = c;
		}
		if (poll(pf, (nfds_t)n, -1) < 0) {
			if (errno == EINTR) continue;
			logf_("poll: %s; agent stops", strerror(errno));
			return NULL;
		}
		if (pf[0].revents & POLLIN) accept_client();
		if (A.ivs_listen_fd >= 0 && (pf[1].revents & POLLIN)) accept_ivs();
		for (int i = ev_base; i < ev_end; i++)
			if (pf[i].revents & POLLIN) doorbell((unsigned)(i - ev_base));
		for (int i = ev_end; i < n; i++) {
			struct client *c = who[i];
			if (c->fd < 0 || !pf[i].revents) continue;
			if (pf[i].revents & POLLOUT) {
				if (flush_out(c) < 0) {
					client_close(c);
					continue;
				}
				if (c->out_len == 0 && c->closing) {
					client_close(c);
					continue;
				}
			}
			if (c->out_len == 0 && flush_events(c) < 0) {
				client_close(c);
				continue;
			}
			if (pf[i].revents & (POLLIN | POLLHUP | POLLERR)) client_readable(c);
			if (c->fd >= 0 && c->out_len == 0 && flush_events(c) < 0) client_close(c);
		}
	}
}

/* ------------------------------------------------------------ setup */

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(sa.sun_path, path);
	/* A live listener keeps its path; only a stale one is replaced. */
	int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (probe >= 0) {
		int busy = connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0;
		close(probe);
		if (busy) {
			errno = EADDRINUSE;
			return -1;
		}
	}
	unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) return -1;
	mode_t old = umask(077);
	int r = bind(fd, (struct sockaddr *)&sa, sizeof sa);
	umask(old);
	if (r < 0 || listen(fd, 8) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static int setup_doorbell(const char *ivs_path)
{
	const char *vs = getenv(KVMMEM_AGENT_ENV_VECTORS);
	const char *ss = getenv(KVMMEM_AGENT_ENV_MAILBOX_SIZE);
	const char *mb = getenv(KVMMEM_AGENT_ENV_MAILBOX);
	unsigned long vectors = vs && *vs ? strtoul(vs, NULL, 10) : 1;
	unsigned long long size = ss && *ss ? strtoull(ss, NULL, 0) : (1ull << 20);
	if (vectors < 1 || vectors > KVMMEM_AGENT_MAX_VECTORS) {
		logf_("%s must be 1..%u", KVMMEM_AGENT_ENV_VECTORS, KVMMEM_AGENT_MAX_VECTORS);
		return -1;
	}
	if (size < PAGE || (size & (size - 1)) || size > (1ull << 30)) {
		logf_("%s must be a power of 2 in 4096..1 GiB", KVMMEM_AGENT_ENV_MAILBOX_SIZE);
		return -1;
	}
	int fd = mb && *mb ? open(mb, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : memfd_create("kvmmem-mailbox", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
		logf_("mailbox %s: %s", mb && *mb ? mb : "(memfd)", strerror(errno));
		if (fd >= 0) close(fd);
		return -1;
	}
	A.shm_fd = fd;
	A.shm_size = size;
	for (unsigned v = 0; v < vectors; v++) {
		A.g2h[v] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		A.h2g[v] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (A.g2h[v] < 0 || A.h2g[v] < 0) {
			logf_("eventfd: %s", strerror(errno));
			return -1;
		}
	}
	A.ivs_listen_fd = listen_unix(ivs_path);
	if (A.ivs_listen_fd < 0) {
		logf_("ivshmem socket %s: %s", ivs_path, strerror(errno));
		return -1;
	}
	A.vectors = (unsigned)vectors;
	return 0;
}

__attribute__((constructor)) static void kvmmem_agent_init(void)
{
	const char *sock = getenv(KVMMEM_AGENT_ENV_SOCKET);
	if (!sock || !*sock) return; /* inert: e.g. a child that inherited LD_PRELOAD */
	/* Only QEMU serves: a wrapper (env, setsid, a shell) that loads us on
	 * its way to exec QEMU must neither take the socket nor clear the env. */
	char exe[4096];
	ssize_t el = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (el <= 0) return;
	exe[el] = 0;
	const char *base = strrchr(exe, '/');
	base = base ? base + 1 : exe;
	if (strncmp(base, "qemu-system-", 12) != 0) return;
	A.listen_fd = A.ivs_listen_fd = A.ivs_conn_fd = A.shm_fd = A.ram_fd = -1;
	for (unsigned i = 0; i < KVMMEM_AGENT_MAX_TARGETS; i++) A.targets[i].fd = -1;
	for (unsigned i = 0; i < KVMMEM_AGENT_MAX_CLIENTS; i++) A.clients[i].fd = -1, A.clients[i].in_fd = -1;
	snprintf(A.sock_path, sizeof A.sock_path, "%s", sock);
	const char *ram = getenv(KVMMEM_AGENT_ENV_RAM);
	A.ram_path = ram && *ram ? strdup(ram) : NULL;
	const char *ivs = getenv(KVMMEM_AGENT_ENV_IVSHMEM);
	char *ivs_path = ivs && *ivs ? strdup(ivs) : NULL;

	A.listen_fd = listen_unix(A.sock_path);
	if (A.listen_fd < 0) {
		logf_("control socket %s: %s; agent disabled", A.sock_path, strerror(errno));
		free(ivs_path);
		return;
	}
	/* The ivshmem server must listen before QEMU's main creates the chardev. */
	if (ivs_path && setup_doorbell(ivs_path) < 0) logf_("doorbell disabled (QEMU will fail to connect its chardev)");
	free(ivs_path);

	/* Children (helpers QEMU may exec) must not serve the same sockets. */
	unsetenv(KVMMEM_AGENT_ENV_SOCKET);
	unsetenv(KVMMEM_AGENT_ENV_RAM);
	unsetenv(KVMMEM_AGENT_ENV_IVSHMEM);
	unsetenv(KVMMEM_AGENT_ENV_MAILBOX);
	unsetenv(KVMMEM_AGENT_ENV_MAILBOX_SIZE);
	unsetenv(KVMMEM_AGENT_ENV_VECTORS);

	/* All signals blocked: QEMU's signals (SIG_IPI, SIGTERM, SIGCHLD...) go
	 * to its own threads, and our syscalls are never interrupted. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_attr_t at;
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&at, 256 * 1024);
	pthread_t th;
	int e = pthread_create(&th, &at, agent_main, NULL);
	pthread_attr_destroy(&at);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (e) {
		logf_("pthread_create: %s; agent disabled", strerror(e));
		close(A.listen_fd);
		unlink(A.sock_path);
		return;
	}
	pthread_setname_np(th, "kvmmem-agent");
	logf_("listening on %s%s", A.sock_path, A.vectors ? " (with ivshmem doorbell)" : "");
}
