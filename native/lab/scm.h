/* One write of `len` bytes on a unix socket, with `pass_fd` attached by
 * SCM_RIGHTS when it is >= 0. Shared by the agent and its C client.
 * Returns 0 when the whole buffer went out, else -1 (errno set). */
#ifndef KVMMEM_LAB_SCM_H
#define KVMMEM_LAB_SCM_H
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

static inline int kvmmem_send_with_fd(int fd, const void *buf, size_t len, int pass_fd)
{
	struct iovec iov = { (void *)buf, len };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cm;
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (pass_fd >= 0) {
		m.msg_control = cm.buf;
		m.msg_controllen = sizeof cm.buf;
		struct cmsghdr *h = CMSG_FIRSTHDR(&m);
		h->cmsg_level = SOL_SOCKET;
		h->cmsg_type = SCM_RIGHTS;
		h->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(h), &pass_fd, sizeof(int));
	}
	return sendmsg(fd, &m, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}
#endif
