/*
 * kvmmem lab agent: wire protocol of the control socket.
 *
 * The agent (kvmmem_agent.so) is LD_PRELOADed into the *introspector's* QEMU.
 * It remaps guest-physical pages of that QEMU's RAM file, as a real KVMI
 * host's mm_remote_map() does, and optionally serves the ivshmem doorbell
 * server protocol.  Full description: docs/lab-agent.md.
 *
 * Transport: a unix SOCK_STREAM socket (path in $KVMMEM_AGENT_SOCKET, mode
 * 0600).  Framing: each request is one fixed 48-byte kvmmem_agent_req,
 * followed by exactly `len` payload bytes (only ATTACH_PATH has a payload).
 * Each request gets exactly one 48-byte kvmmem_agent_resp, in request order
 * (requests may be pipelined; that is the batch mode).  Asynchronous doorbell
 * events (after SUBSCRIBE) are 48-byte responses with op KVMMEM_AGENT_EVENT,
 * flags KVMMEM_AGENT_F_EVENT and seq 0, interleaved between responses.
 * All integers are in host byte order (little-endian on x86-64).
 *
 * Errors: resp.status is 0 or a negative errno (Linux values).  A request
 * whose magic is wrong or whose len exceeds KVMMEM_AGENT_MAX_PAYLOAD cannot
 * be framed: it gets one -EPROTO / -EMSGSIZE response and the agent closes
 * the connection.  Every other error leaves the connection usable.
 *
 * File descriptors (SCM_RIGHTS): ATTACH_FD carries exactly one fd, sent with
 * the sendmsg() whose data begins with that request's first byte.  An fd that
 * arrives with any other request is closed and that request fails -EINVAL.
 * DOORBELL_FDS answers with fds attached to its response.
 */
#ifndef KVMMEM_AGENT_H
#define KVMMEM_AGENT_H

#include <stdint.h>

#define KVMMEM_AGENT_MAGIC 0x47414d4bu /* "KMAG" in memory order */
#define KVMMEM_AGENT_VERSION 1u
#define KVMMEM_AGENT_PAGE 4096u
#define KVMMEM_AGENT_MAX_PAYLOAD 4096u /* ATTACH_PATH path bytes (no NUL needed) */
#define KVMMEM_AGENT_MAX_TARGETS 64u
#define KVMMEM_AGENT_MAX_CLIENTS 16u
#define KVMMEM_AGENT_MAX_VECTORS 8u

/* Environment read by the agent's constructor; it serves only in a process whose
 * executable is named qemu-system-* (wrappers that exec QEMU stay inert), and
 * then removes these variables from environ so QEMU's children stay inert. */
#define KVMMEM_AGENT_ENV_SOCKET "KVMMEM_AGENT_SOCKET"   /* control socket path (required) */
#define KVMMEM_AGENT_ENV_RAM "KVMMEM_AGENT_RAM"         /* RAM file path (mem-path=) */
#define KVMMEM_AGENT_ENV_IVSHMEM "KVMMEM_AGENT_IVSHMEM" /* ivshmem server socket path (optional) */
#define KVMMEM_AGENT_ENV_MAILBOX "KVMMEM_AGENT_MAILBOX" /* doorbell shared memory file (optional) */
#define KVMMEM_AGENT_ENV_MAILBOX_SIZE "KVMMEM_AGENT_MAILBOX_SIZE" /* bytes, power of 2, default 1 MiB */
#define KVMMEM_AGENT_ENV_VECTORS "KVMMEM_AGENT_VECTORS" /* doorbell vectors, 1..8, default 1 */

enum kvmmem_agent_op {
	/* -> v[0]=protocol version, v[1]=RAM mapping size (0: not found yet),
	 *    v[2]=doorbell vectors (0: no doorbell), v[3]=page size. Never fails. */
	KVMMEM_AGENT_INFO = 1,
	/* fd by SCM_RIGHTS (O_RDWR regular file / memfd / shm).
	 * -> v[0]=target id (nonzero), v[1]=file size at attach. */
	KVMMEM_AGENT_ATTACH_FD = 2,
	/* payload = path (len bytes); the agent opens it O_RDWR. -> as ATTACH_FD. */
	KVMMEM_AGENT_ATTACH_PATH = 3,
	/* target = id. Fails -EBUSY while any page is mapped to it. */
	KVMMEM_AGENT_DETACH = 4,
	/* gpa, npages, target, offset: RAM pages [gpa, gpa+npages*4096) now show
	 * the target file's [offset, ...).  -> v[0]=npages. */
	KVMMEM_AGENT_MAP = 5,
	/* gpa, npages: put back the RAM file's own pages (the original content)
	 * for the pages of the run that are remapped or fresh; others untouched.
	 * -> v[0]=pages restored. */
	KVMMEM_AGENT_RESTORE = 6,
	/* gpa, npages: private zero-filled anonymous pages (the file keeps the
	 * original, so RESTORE can bring it back). -> v[0]=npages. */
	KVMMEM_AGENT_FRESH = 7,
	/* Restore every remapped or fresh page. -> v[0]=pages restored. */
	KVMMEM_AGENT_RESTORE_ALL = 8,
	/* -> v[0]=pages mapped to targets, v[1]=fresh pages, v[2]=targets
	 *    attached, v[3]=requests served (all connections). */
	KVMMEM_AGENT_STATS = 9,
	/* -> fds by SCM_RIGHTS: [shm, guest->host eventfd x N, host->guest
	 *    eventfd x N]; v[0]=N, v[1]=QEMU's ivshmem peer id, v[2]=the host's
	 *    peer id (the guest rings it), v[3]=shm size. -ENODEV: no doorbell. */
	KVMMEM_AGENT_DOORBELL_FDS = 10,
	/* This connection receives an EVENT per guest doorbell. -ENODEV: none. */
	KVMMEM_AGENT_SUBSCRIBE = 11,
	/* target = vector: raise that MSI-X vector in the guest. */
	KVMMEM_AGENT_RING = 12,
	/* Asynchronous (response direction only): v[0]=vector, v[1]=doorbells
	 *    coalesced since the last event of that vector. */
	KVMMEM_AGENT_EVENT = 0x100,
};

#define KVMMEM_AGENT_F_EVENT 1u

struct kvmmem_agent_req {
	uint32_t magic;   /* KVMMEM_AGENT_MAGIC */
	uint16_t op;      /* enum kvmmem_agent_op */
	uint16_t flags;   /* must be 0 */
	uint32_t seq;     /* echoed in the response */
	uint32_t target;  /* target id (MAP, DETACH) or vector (RING); else 0 */
	uint64_t gpa;     /* RAM file offset = guest-physical address below the PCI hole */
	uint64_t offset;  /* target file offset (MAP); else 0 */
	uint64_t npages;  /* run length in pages (MAP, RESTORE, FRESH) */
	uint32_t len;     /* payload bytes that follow (ATTACH_PATH only) */
	uint32_t reserved; /* must be 0 */
};

struct kvmmem_agent_resp {
	uint32_t magic;   /* KVMMEM_AGENT_MAGIC */
	uint16_t op;      /* the request's op, or KVMMEM_AGENT_EVENT */
	uint16_t flags;   /* KVMMEM_AGENT_F_EVENT on events */
	uint32_t seq;     /* the request's seq (0 on events) */
	int32_t status;   /* 0 or -errno */
	uint64_t v[4];    /* op-specific results, 0 when unused */
};

#ifdef __cplusplus
static_assert(sizeof(struct kvmmem_agent_req) == 48, "req is 48 bytes");
static_assert(sizeof(struct kvmmem_agent_resp) == 48, "resp is 48 bytes");
#else
_Static_assert(sizeof(struct kvmmem_agent_req) == 48, "req is 48 bytes");
_Static_assert(sizeof(struct kvmmem_agent_resp) == 48, "resp is 48 bytes");
#endif

#endif
