/*
 * kvmmem-agentctl: a small host-side client of the lab agent's control socket
 * (protocol: kvmmem_agent.h).  Does what Node's net module cannot (SCM_RIGHTS)
 * and measures round trips without a JS runtime in the way.
 *
 *   kvmmem-agentctl SOCK attach-fd FILE          -> "id=N size=BYTES"
 *   kvmmem-agentctl SOCK raw-fd OP FILE          -> "status=S v0=V" (OP sent with FILE's fd)
 *   kvmmem-agentctl SOCK bench GPA TARGET OFF N  -> round-trip percentiles
 *   kvmmem-agentctl SOCK doorbell-wait MS        -> "RANG vector=V count=C" or "TIMEOUT"
 *
 * Exit status: 0 ok, 1 the agent answered an error (printed as errno name),
 * 2 usage / connection failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "scm.h"
#include "kvmmem_agent.h"

static int sock_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path) return -1;
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) return -1;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int send_req(int fd, const struct kvmmem_agent_req *q, int pass_fd)
{
	return kvmmem_send_with_fd(fd, q, sizeof *q, pass_fd);
}

/* Read one response (skipping events); fds received go to fds[0..*nfds). */
static int recv_resp(int fd, struct kvmmem_agent_resp *r, int *fds, int *nfds)
{
	size_t have = 0;
	int got = 0;
	while (have < sizeof *r) {
		struct iovec iov = { (char *)r + have, sizeof *r - have };
		union {
			char buf[CMSG_SPACE(sizeof(int) * 32)];
			struct cmsghdr align;
		} cm;
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
		ssize_t n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
		if (n <= 0) return -1;
		for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
			if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
			int cnt = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			int tmp[32];
			memcpy(tmp, CMSG_DATA(h), sizeof(int) * (size_t)cnt);
			for (int i = 0; i < cnt; i++) {
				if (fds && got < 32) fds[got++] = tmp[i];
				else close(tmp[i]);
			}
		}
		have += (size_t)n;
	}
	if (nfds) *nfds = got;
	return r->magic == KVMMEM_AGENT_MAGIC ? 0 : -1;
}

static int call(int fd, struct kvmmem_agent_req *q, struct kvmmem_agent_resp *r, int pass_fd)
{
	static uint32_t seq;
	q->magic = KVMMEM_AGENT_MAGIC;
	q->seq = ++seq;
	if (send_req(fd, q, pass_fd) < 0) return -1;
	do {
		if (recv_resp(fd, r, NULL, NULL) < 0) return -1;
	} while (r->flags & KVMMEM_AGENT_F_EVENT);
	return r->seq == q->seq ? 0 : -1;
}

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void report(const char *what, double *v, int n)
{
	qsort(v, (size_t)n, sizeof *v, cmp_d);
	printf("%s n=%d p50_us=%.1f p99_us=%.1f max_us=%.1f\n", what, n, v[n / 2], v[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1],
	       v[n - 1]);
}

static int fail(const char *what, const struct kvmmem_agent_resp *r)
{
	fprintf(stderr, "kvmmem-agentctl: %s: %s (%d)\n", what, strerrorname_np(-r->status) ? strerrorname_np(-r->status) : "?",
		r->status);
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: kvmmem-agentctl SOCK attach-fd FILE | raw-fd OP FILE | bench GPA TARGET OFF N | doorbell-wait MS\n");
		return 2;
	}
	int s = sock_connect(argv[1]);
	if (s < 0) {
		fprintf(stderr, "kvmmem-agentctl: connect %s: %s\n", argv[1], strerror(errno));
		return 2;
	}
	struct kvmmem_agent_req q;
	struct kvmmem_agent_resp r;
	if (!strcmp(argv[2], "attach-fd") && argc == 4) {
		int fd = open(argv[3], O_RDWR | O_CLOEXEC);
		if (fd < 0) {
			fprintf(stderr, "kvmmem-agentctl: open %s: %s\n", argv[3], strerror(errno));
			return 2;
		}
		memset(&q, 0, sizeof q);
		q.op = KVMMEM_AGENT_ATTACH_FD;
		if (call(s, &q, &r, fd) < 0) return 2;
		if (r.status) return fail("attach-fd", &r);
		printf("id=%llu size=%llu\n", (unsigned long long)r.v[0], (unsigned long long)r.v[1]);
		return 0;
	}
	if (!strcmp(argv[2], "raw-fd") && argc == 5) {
		/* Send request OP with FILE's fd attached; print the status (tests
		 * the agent's handling of an fd on a request that takes none). */
		int fd = open(argv[4], O_RDWR | O_CLOEXEC);
		if (fd < 0) {
			fprintf(stderr, "kvmmem-agentctl: open %s: %s\n", argv[4], strerror(errno));
			return 2;
		}
		memset(&q, 0, sizeof q);
		q.op = (uint16_t)strtoul(argv[3], NULL, 0);
		if (call(s, &q, &r, fd) < 0) return 2;
		printf("status=%d v0=%llu\n", r.status, (unsigned long long)r.v[0]);
		return 0;
	}
	if (!strcmp(argv[2], "bench") && argc == 7) {
		uint64_t gpa = strtoull(argv[3], NULL, 0), off = strtoull(argv[5], NULL, 0);
		uint32_t tid = (uint32_t)strtoul(argv[4], NULL, 0);
		int n = atoi(argv[6]);
		if (n < 1 || n > 1000000) return 2;
		double *tm = calloc((size_t)n, sizeof *tm), *tr = calloc((size_t)n, sizeof *tr), *tp = calloc((size_t)n, sizeof *tp);
		double *ti = calloc((size_t)n, sizeof *ti);
		for (int i = 0; i < n; i++) {
			double t0 = now_us();
			memset(&q, 0, sizeof q);
			q.op = KVMMEM_AGENT_MAP, q.gpa = gpa, q.target = tid, q.offset = off, q.npages = 1;
			if (call(s, &q, &r, -1) < 0) return 2;
			if (r.status) return fail("map", &r);
			double t1 = now_us();
			memset(&q, 0, sizeof q);
			q.op = KVMMEM_AGENT_RESTORE, q.gpa = gpa, q.npages = 1;
			if (call(s, &q, &r, -1) < 0) return 2;
			if (r.status) return fail("restore", &r);
			double t2 = now_us();
			memset(&q, 0, sizeof q);
			q.op = KVMMEM_AGENT_INFO;
			if (call(s, &q, &r, -1) < 0) return 2;
			double t3 = now_us();
			tm[i] = t1 - t0, tr[i] = t2 - t1, tp[i] = t2 - t0, ti[i] = t3 - t2;
		}
		report("map", tm, n);
		report("restore", tr, n);
		report("map+restore", tp, n);
		report("info", ti, n);
		return 0;
	}
	if (!strcmp(argv[2], "doorbell-wait") && argc == 4) {
		int ms = atoi(argv[3]);
		memset(&q, 0, sizeof q);
		q.op = KVMMEM_AGENT_DOORBELL_FDS;
		q.magic = KVMMEM_AGENT_MAGIC;
		if (send_req(s, &q, -1) < 0) return 2;
		int fds[32], nfds = 0;
		if (recv_resp(s, &r, fds, &nfds) < 0) return 2;
		if (r.status) return fail("doorbell-fds", &r);
		unsigned vec = (unsigned)r.v[0];
		if (nfds != 1 + 2 * (int)vec) {
			fprintf(stderr, "kvmmem-agentctl: expected %u fds, got %d\n", 1 + 2 * vec, nfds);
			return 2;
		}
		printf("DOORBELL vectors=%u qemu_peer=%llu host_peer=%llu shm_size=%llu\n", vec, (unsigned long long)r.v[1],
		       (unsigned long long)r.v[2], (unsigned long long)r.v[3]);
		fflush(stdout);
		struct pollfd pf[KVMMEM_AGENT_MAX_VECTORS];
		for (unsigned v = 0; v < vec; v++) pf[v] = (struct pollfd){ fds[1 + v], POLLIN, 0 };
		int k = poll(pf, vec, ms);
		if (k <= 0) {
			printf("TIMEOUT\n");
			return 0;
		}
		for (unsigned v = 0; v < vec; v++) {
			uint64_t cnt;
			if ((pf[v].revents & POLLIN) && read(fds[1 + v], &cnt, sizeof cnt) == sizeof cnt)
				printf("RANG vector=%u count=%llu\n", v, (unsigned long long)cnt);
		}
		return 0;
	}
	fprintf(stderr, "kvmmem-agentctl: bad command\n");
	return 2;
}
