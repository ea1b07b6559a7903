/* SPDX-License-Identifier: (GPL-2.0 OR MIT) */
/*
 * kvmmem_mailbox.h - the lab "hypercall" mailbox between the guest module
 * (native/kmod/kvmmem.c, transport=mailbox) and the lab host (src/lab/).
 * THE one source for this layout: src/lab/mailbox.ts mirrors it and a test
 * compiles a C program against this header to cross-check every offset and
 * constant. Contract and protocol: /work/briefs/mailbox.md, docs/kmod.md.
 *
 * Transport: an ivshmem-doorbell PCI device (1af4:1110) in the introspector
 * VM whose server is the lab agent (docs/lab-agent.md). BAR0 = registers,
 * BAR2 = this shared memory (the agent's KVMMEM_AGENT_MAILBOX file on the
 * host, 1 MiB by default). Little-endian. Usable from the kernel and from
 * user space (only <linux/types.h> types).
 *
 * Protocol (guest):
 *   take a free slot (resp_seq == req_seq, not held by another caller, not
 *   poisoned); write nr, flags, a0..a2, token; wmb(); req_seq++ (wrapping,
 *   skipping 0); write the Doorbell register ((host_peer << 16) | vector);
 *   sleep until resp_seq == req_seq (MSI-X vector `vector` wakes it; it also
 *   re-checks every few ms so a lost interrupt costs latency, not a hang),
 *   bounded by module param mbox_timeout_ms (default 5000). On timeout the
 *   call returns -ETIMEDOUT and the slot stays poisoned (never reused) until
 *   the host answers it, so a late answer can never be taken for a later
 *   request's.
 * Protocol (host):
 *   write magic/version/nslots/host_peer/vector to start serving (magic
 *   last); on each doorbell (EVENTs may be coalesced) scan every slot with
 *   req_seq != resp_seq in slot order, serve it, write result, then
 *   resp_seq = req_seq (store ordering: result first), then RING the vector
 *   once. Clearing the magic means "not serving": a module loaded then does
 *   not bind (probe again by reloading it).
 */
#ifndef KVMMEM_MAILBOX_H
#define KVMMEM_MAILBOX_H

#include <linux/types.h>

#define KVMMEM_MBOX_MAGIC	0x31584f424d4d564bULL	/* "KVMMBOX1" in memory order */
#define KVMMEM_MBOX_VERSION	1u
#define KVMMEM_MBOX_MAX_SLOTS	16u

#define KVMMEM_MBOX_HEADER_SIZE	64u
#define KVMMEM_MBOX_SLOT_SIZE	128u
#define KVMMEM_MBOX_SLOT_OFFSET(i)	(KVMMEM_MBOX_HEADER_SIZE + (i) * KVMMEM_MBOX_SLOT_SIZE)
/* Bytes the guest needs mapped: the header and every possible slot (2112). */
#define KVMMEM_MBOX_LAYOUT_SIZE	KVMMEM_MBOX_SLOT_OFFSET(KVMMEM_MBOX_MAX_SLOTS)

/* kvmmem_mbox_header.guest_state */
#define KVMMEM_MBOX_GUEST_OFF	0u	/* no module bound (or it unbound) */
#define KVMMEM_MBOX_GUEST_BOUND	1u	/* the module is bound and uses the mailbox */

/* kvmmem_mbox_slot.nr: the hypercall numbers of kvm_para.h (kvmi_mem.h). */
#define KVMMEM_MBOX_NR_MEM_MAP		32u	/* KVM_HC_MEM_MAP */
#define KVMMEM_MBOX_NR_MEM_UNMAP	33u	/* KVM_HC_MEM_UNMAP */

/* ivshmem BAR0 registers (QEMU docs/specs/ivshmem-spec.txt), 32-bit each. */
#define KVMMEM_IVSHMEM_INTR_MASK	0u	/* INTx only: unused with MSI-X */
#define KVMMEM_IVSHMEM_INTR_STATUS	4u	/* INTx only: unused with MSI-X */
#define KVMMEM_IVSHMEM_IV_POSITION	8u	/* this peer's id (read-only) */
#define KVMMEM_IVSHMEM_DOORBELL		12u	/* write (peer << 16) | vector */
#define KVMMEM_IVSHMEM_VENDOR		0x1af4u
#define KVMMEM_IVSHMEM_DEVICE		0x1110u

struct kvmmem_mbox_header {		/* 64 bytes at BAR2 offset 0 */
	__u64 magic;		/* host: KVMMEM_MBOX_MAGIC while it serves (written last) */
	__u32 version;		/* host: KVMMEM_MBOX_VERSION */
	__u32 nslots;		/* host: slots it serves, 1..KVMMEM_MBOX_MAX_SLOTS */
	__u32 host_peer;	/* host: ivshmem peer id the guest rings (the agent's host peer, 0) */
	__u32 vector;		/* host: doorbell/MSI-X vector used both ways (0) */
	__u32 guest_state;	/* guest: KVMMEM_MBOX_GUEST_* */
	__u32 reserved[9];	/* 0 */
};

struct kvmmem_mbox_slot {		/* 128 bytes, slot i at KVMMEM_MBOX_SLOT_OFFSET(i) */
	__u32 req_seq;		/* guest: bumped (wrapping, never 0 after first use) AFTER the request (wmb) */
	__u32 resp_seq;		/* host: set to req_seq AFTER result is written */
	__u32 nr;		/* KVMMEM_MBOX_NR_MEM_MAP or KVMMEM_MBOX_NR_MEM_UNMAP */
	__u32 flags;		/* 0 */
	__u64 a0;		/* MAP: 0 (the token is in token[]); UNMAP: map_gpa */
	__u64 a1;		/* MAP: req_gpa (target guest-physical address); UNMAP: 0 */
	__u64 a2;		/* MAP: map_gpa (page_to_phys of the pinned user page); UNMAP: 0 */
	__s64 result;		/* host: 0 or -errno (Linux values), as kvm_hypercall3/1 would return */
	__u8 token[32];		/* MAP: the 32 bytes of struct kvmi_map_mem_token, copied (the real
				 * hypercall passes a guest-virtual pointer a host cannot translate here) */
	__u8 reserved[48];	/* 0 */
};

#define KVMMEM_MBOX_OFF_MAGIC		0u
#define KVMMEM_MBOX_OFF_VERSION		8u
#define KVMMEM_MBOX_OFF_NSLOTS		12u
#define KVMMEM_MBOX_OFF_HOST_PEER	16u
#define KVMMEM_MBOX_OFF_VECTOR		20u
#define KVMMEM_MBOX_OFF_GUEST_STATE	24u

#define KVMMEM_MBOX_SLOT_OFF_REQ_SEQ	0u
#define KVMMEM_MBOX_SLOT_OFF_RESP_SEQ	4u
#define KVMMEM_MBOX_SLOT_OFF_NR		8u
#define KVMMEM_MBOX_SLOT_OFF_FLAGS	12u
#define KVMMEM_MBOX_SLOT_OFF_A0		16u
#define KVMMEM_MBOX_SLOT_OFF_A1		24u
#define KVMMEM_MBOX_SLOT_OFF_A2		32u
#define KVMMEM_MBOX_SLOT_OFF_RESULT	40u
#define KVMMEM_MBOX_SLOT_OFF_TOKEN	48u

#ifdef __cplusplus
#define KVMMEM_MBOX_ASSERT(c, m) static_assert(c, m)
#else
#define KVMMEM_MBOX_ASSERT(c, m) _Static_assert(c, m)
#endif
#define KVMMEM_MBOX_OFFSETOF(t, f) __builtin_offsetof(t, f)
KVMMEM_MBOX_ASSERT(sizeof(struct kvmmem_mbox_header) == KVMMEM_MBOX_HEADER_SIZE, "header is 64 bytes");
KVMMEM_MBOX_ASSERT(sizeof(struct kvmmem_mbox_slot) == KVMMEM_MBOX_SLOT_SIZE, "slot is 128 bytes");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_header, magic) == KVMMEM_MBOX_OFF_MAGIC, "magic");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_header, version) == KVMMEM_MBOX_OFF_VERSION, "version");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_header, nslots) == KVMMEM_MBOX_OFF_NSLOTS, "nslots");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_header, host_peer) == KVMMEM_MBOX_OFF_HOST_PEER, "host_peer");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_header, vector) == KVMMEM_MBOX_OFF_VECTOR, "vector");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_header, guest_state) == KVMMEM_MBOX_OFF_GUEST_STATE, "guest_state");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, req_seq) == KVMMEM_MBOX_SLOT_OFF_REQ_SEQ, "req_seq");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, resp_seq) == KVMMEM_MBOX_SLOT_OFF_RESP_SEQ, "resp_seq");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, nr) == KVMMEM_MBOX_SLOT_OFF_NR, "nr");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, flags) == KVMMEM_MBOX_SLOT_OFF_FLAGS, "flags");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, a0) == KVMMEM_MBOX_SLOT_OFF_A0, "a0");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, a1) == KVMMEM_MBOX_SLOT_OFF_A1, "a1");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, a2) == KVMMEM_MBOX_SLOT_OFF_A2, "a2");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, result) == KVMMEM_MBOX_SLOT_OFF_RESULT, "result");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_OFFSETOF(struct kvmmem_mbox_slot, token) == KVMMEM_MBOX_SLOT_OFF_TOKEN, "token");
KVMMEM_MBOX_ASSERT(KVMMEM_MBOX_LAYOUT_SIZE == 2112, "header + 16 slots");

#endif /* KVMMEM_MAILBOX_H */
