/*
 * kvmmem-runner: runs commands inside the lab's introspector VM for the host.
 *
 * Static binary in the introspector's initramfs, started by its /init. It
 * talks to the host over one virtio-serial port (name "kvmmem.runner") and
 * multiplexes any number of commands on it. The wire format (little-endian):
 *
 *   u32 len   bytes that follow (type + id + payload), at most RUNNER_MAX_FRAME
 *   u8  type
 *   u32 id    command id chosen by the host (0 for HELLO/PING)
 *   payload
 *
 * host -> guest:  RUN   payload = NUL-terminated strings: flags (decimal; bit 0:
 *                       do not chroot into the share), cwd, argc (decimal),
 *                       argv[0..argc), then any number of "K=V" env entries
 *                 KILL  payload = signal number (decimal); sent to the command's
 *                       process group
 *                 PING  the runner answers HELLO
 * guest -> host:  HELLO payload = the status text init gathered (one line each)
 *                 OUT / ERR  stdout / stderr bytes of command id
 *                 EXIT  payload = "code N" or "signal N", after OUT/ERR are drained
 *                 FAIL  payload = why the command could not start (errno text)
 *
 * Commands run as root in their own session; stdin is /dev/null. Unless flag 1
 * is given, a command runs chrooted into the share (ROOT, the host's / as the
 * introspector mounted it), so host paths mean the same inside.
 *
 * Why C and not a shell or Node: it is ready as soon as init starts it (Node
 * would need the share and ~2.4 s), and it must frame two streams and an exit
 * status per command, which busybox sh cannot do.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define RUNNER_MAX_FRAME (1u << 20)
#define MAX_JOBS 64
#define CHUNK 65536

enum { T_RUN = 1, T_KILL = 2, T_PING = 3, T_HELLO = 16, T_OUT = 17, T_ERR = 18, T_EXIT = 19, T_FAIL = 20 };

struct job {
	int used;
	uint32_t id;
	pid_t pid;
	int out, err;      /* pipe read ends, -1 at EOF */
	int done;          /* waitpid collected */
	int status;
};

static struct job jobs[MAX_JOBS];
static int port = -1;
static int sigpipe_fds[2];
static const char *root = "/host";
static const char *status_file = "/run-status";
extern char **environ;

static void die(const char *what)
{
	fprintf(stderr, "kvmmem-runner: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct pollfd pf = { .fd = fd, .events = POLLOUT };
				poll(&pf, 1, 1000);
				continue;
			}
			die("write to the host port");
		}
		p += w;
		n -= (size_t)w;
	}
}

static void send_frame(uint8_t type, uint32_t id, const void *payload, size_t n)
{
	uint8_t head[9];
	uint32_t len = (uint32_t)(5 + n);
	memcpy(head, &len, 4);
	head[4] = type;
	memcpy(head + 5, &id, 4);
	write_all(port, head, 9);
	if (n)
		write_all(port, payload, n);
}

static void send_text(uint8_t type, uint32_t id, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void send_text(uint8_t type, uint32_t id, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	send_frame(type, id, buf, (size_t)n);
}

static void send_hello(void)
{
	char buf[8192];
	ssize_t n = 0;
	int fd = open(status_file, O_RDONLY);
	if (fd >= 0) {
		n = read(fd, buf, sizeof buf);
		close(fd);
	}
	send_frame(T_HELLO, 0, buf, n > 0 ? (size_t)n : 0);
}

static void on_sigchld(int sig)
{
	(void)sig;
	int e = errno;
	char c = 0;
	(void)!write(sigpipe_fds[1], &c, 1);
	errno = e;
}

static struct job *find_job(uint32_t id)
{
	for (int i = 0; i < MAX_JOBS; i++)
		if (jobs[i].used && jobs[i].id == id)
			return &jobs[i];
	return NULL;
}

static void maybe_finish(struct job *j)
{
	if (!j->used || !j->done || j->out >= 0 || j->err >= 0)
		return;
	if (WIFSIGNALED(j->status))
		send_text(T_EXIT, j->id, "signal %d", WTERMSIG(j->status));
	else
		send_text(T_EXIT, j->id, "code %d", WEXITSTATUS(j->status));
	j->used = 0;
}

/* Splits a RUN payload into NUL-terminated strings; returns how many. */
static int split(char *p, size_t n, char **out, int max)
{
	int k = 0;
	size_t start = 0;
	for (size_t i = 0; i < n && k < max; i++) {
		if (p[i] == '\0') {
			out[k++] = p + start;
			start = i + 1;
		}
	}
	return k;
}

static void start_job(uint32_t id, char *payload, size_t n)
{
	static char *parts[4098];
	int np = split(payload, n, parts, 4095);
	if (np < 3) {
		send_text(T_FAIL, id, "malformed RUN frame (%d fields)", np);
		return;
	}
	int flags = atoi(parts[0]);
	const char *cwd = parts[1];
	int argc = atoi(parts[2]);
	if (argc < 1 || 3 + argc > np) {
		send_text(T_FAIL, id, "malformed RUN frame (argc %d, %d fields)", argc, np);
		return;
	}
	if (find_job(id)) {
		send_text(T_FAIL, id, "command id %u is already running", id);
		return;
	}
	struct job *j = NULL;
	for (int i = 0; i < MAX_JOBS; i++)
		if (!jobs[i].used) {
			j = &jobs[i];
			break;
		}
	if (!j) {
		send_text(T_FAIL, id, "too many commands at once (%d)", MAX_JOBS);
		return;
	}
	char **argv = parts + 3;
	char **envp = parts + 3 + argc;
	int envc = np - 3 - argc;
	/* argv and envp need NULL terminators: shift env by one slot to end argv. */
	for (int i = envc; i > 0; i--)
		envp[i] = envp[i - 1];
	envp[0] = NULL;
	envp++;
	envp[envc] = NULL;

	int po[2], pe[2], pf[2];
	if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC) || pipe2(pf, O_CLOEXEC)) {
		send_text(T_FAIL, id, "pipe: %s", strerror(errno));
		return;
	}
	pid_t pid = fork();
	if (pid < 0) {
		send_text(T_FAIL, id, "fork: %s", strerror(errno));
		close(po[0]); close(po[1]); close(pe[0]); close(pe[1]); close(pf[0]); close(pf[1]);
		return;
	}
	if (pid == 0) {
		/* Child: report a failure to start through pf (errno + where), else exec closes it. */
		char msg[256];
		signal(SIGCHLD, SIG_DFL);
		signal(SIGPIPE, SIG_DFL);
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		int nul = open("/dev/null", O_RDONLY);
		if (nul >= 0)
			dup2(nul, 0);
		dup2(po[1], 1);
		dup2(pe[1], 2);
		if (!(flags & 1)) {
			if (chroot(root) != 0) {
				snprintf(msg, sizeof msg, "chroot %s: %s", root, strerror(errno));
				goto fail;
			}
		}
		if (chdir(cwd) != 0) {
			snprintf(msg, sizeof msg, "chdir %s: %s", cwd, strerror(errno));
			goto fail;
		}
		environ = envp;
		execvp(argv[0], argv);
		snprintf(msg, sizeof msg, "exec %s: %s", argv[0], strerror(errno));
	fail:
		(void)!write(pf[1], msg, strlen(msg));
		_exit(127);
	}
	close(po[1]);
	close(pe[1]);
	close(pf[1]);
	char msg[256];
	ssize_t m;
	do
		m = read(pf[0], msg, sizeof msg);
	while (m < 0 && errno == EINTR);
	close(pf[0]);
	if (m > 0) {
		/* Did not start: reap it here so the SIGCHLD loop does not look for it. */
		waitpid(pid, NULL, 0);
		close(po[0]);
		close(pe[0]);
		send_frame(T_FAIL, id, msg, (size_t)m);
		return;
	}
	fcntl(po[0], F_SETFL, O_NONBLOCK);
	fcntl(pe[0], F_SETFL, O_NONBLOCK);
	*j = (struct job){ .used = 1, .id = id, .pid = pid, .out = po[0], .err = pe[0] };
}

static void reap(void)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_JOBS; i++) {
			if (jobs[i].used && jobs[i].pid == pid && !jobs[i].done) {
				jobs[i].done = 1;
				jobs[i].status = st;
				maybe_finish(&jobs[i]);
			}
		}
	}
}

static void drain(struct job *j, int *fd, uint8_t type)
{
	static char buf[CHUNK];
	ssize_t n = read(*fd, buf, sizeof buf);
	if (n > 0) {
		send_frame(type, j->id, buf, (size_t)n);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	close(*fd);
	*fd = -1;
	maybe_finish(j);
}

static uint8_t *inbuf;
static size_t inlen;

static void handle_frames(void)
{
	size_t off = 0;
	while (inlen - off >= 4) {
		uint32_t len;
		memcpy(&len, inbuf + off, 4);
		if (len < 5 || len > RUNNER_MAX_FRAME) {
			/* Lost framing: the host reconnected mid-frame. Drop what we have. */
			fprintf(stderr, "kvmmem-runner: bad frame length %u, resynchronising\n", len);
			inlen = 0;
			return;
		}
		if (inlen - off < 4 + len)
			break;
		uint8_t type = inbuf[off + 4];
		uint32_t id;
		memcpy(&id, inbuf + off + 5, 4);
		char *payload = (char *)inbuf + off + 9;
		size_t plen = len - 5;
		if (type == T_RUN) {
			start_job(id, payload, plen);
		} else if (type == T_KILL) {
			char s[16] = { 0 };
			memcpy(s, payload, plen < 15 ? plen : 15);
			struct job *j = find_job(id);
			if (j && !j->done)
				kill(-j->pid, atoi(s));
		} else if (type == T_PING) {
			send_hello();
		}
		off += 4 + len;
	}
	memmove(inbuf, inbuf + off, inlen - off);
	inlen -= off;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: kvmmem-runner PORT-DEVICE [ROOT [STATUS-FILE]]\n");
		return 2;
	}
	if (argc >= 3)
		root = argv[2];
	if (argc >= 4)
		status_file = argv[3];
	port = open(argv[1], O_RDWR | O_CLOEXEC);
	if (port < 0)
		die(argv[1]);
	if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK))
		die("pipe");
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = { .sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP };
	sigaction(SIGCHLD, &sa, NULL);
	inbuf = malloc(RUNNER_MAX_FRAME + 4);
	if (!inbuf)
		die("malloc");
	send_hello();

	for (;;) {
		struct pollfd pfd[2 + 2 * MAX_JOBS];
		struct job *who[2 + 2 * MAX_JOBS];
		int which[2 + 2 * MAX_JOBS];
		int n = 0;
		pfd[n++] = (struct pollfd){ .fd = port, .events = POLLIN };
		pfd[n++] = (struct pollfd){ .fd = sigpipe_fds[0], .events = POLLIN };
		for (int i = 0; i < MAX_JOBS; i++) {
			if (!jobs[i].used)
				continue;
			if (jobs[i].out >= 0) {
				who[n] = &jobs[i]; which[n] = 1;
				pfd[n++] = (struct pollfd){ .fd = jobs[i].out, .events = POLLIN };
			}
			if (jobs[i].err >= 0) {
				who[n] = &jobs[i]; which[n] = 2;
				pfd[n++] = (struct pollfd){ .fd = jobs[i].err, .events = POLLIN };
			}
		}
		int r = poll(pfd, (nfds_t)n, -1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (pfd[1].revents) {
			char b[64];
			while (read(sigpipe_fds[0], b, sizeof b) > 0)
				;
			reap();
		}
		for (int i = 2; i < n; i++) {
			if (!pfd[i].revents)
				continue;
			struct job *j = who[i];
			if (!j->used)
				continue;
			if (which[i] == 1 && j->out >= 0)
				drain(j, &j->out, T_OUT);
			else if (which[i] == 2 && j->err >= 0)
				drain(j, &j->err, T_ERR);
		}
		if (pfd[0].revents & POLLIN) {
			ssize_t got = read(port, inbuf + inlen, RUNNER_MAX_FRAME + 4 - inlen);
			if (got > 0) {
				inlen += (size_t)got;
				handle_frames();
			} else if (got == 0 || (got < 0 && errno != EINTR && errno != EAGAIN)) {
				/* No host on the other end (virtio-serial says POLLHUP/EOF): wait, do not spin. */
				usleep(100000);
			}
		} else if (pfd[0].revents & (POLLHUP | POLLERR)) {
			usleep(100000);
		}
	}
}
