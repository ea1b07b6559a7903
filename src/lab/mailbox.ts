/**
 * The lab mailbox layout, mirrored from native/kmod/kvmmem_mailbox.h (the one
 * source, written for the guest module, whose static asserts pin the offsets;
 * test/lab-host.test.ts checks every value here against it). Little-endian, at offset 0
 * of the ivshmem-doorbell BAR2 = the agent's KVMMEM_AGENT_MAILBOX file.
 */
export const MBOX_MAGIC = 0x31584f424d4d564bn; // "KVMMBOX1" in memory order
export const MBOX_VERSION = 1;
export const MBOX_MAX_SLOTS = 16;
export const MBOX_HEADER_SIZE = 64;
export const MBOX_SLOT_SIZE = 128;
/** Bytes the header and every possible slot take (2112). */
export const MBOX_LAYOUT_SIZE = MBOX_HEADER_SIZE + MBOX_MAX_SLOTS * MBOX_SLOT_SIZE;
export const MBOX_GUEST_OFF = 0;
export const MBOX_GUEST_BOUND = 1;
export const MBOX_NR_MEM_MAP = 32;
export const MBOX_NR_MEM_UNMAP = 33;
export const MBOX_TOKEN_SIZE = 32;

/** struct kvmmem_mbox_header field offsets. */
export const MBOX_HEADER = { magic: 0, version: 8, nslots: 12, hostPeer: 16, vector: 20, guestState: 24 } as const;
/** struct kvmmem_mbox_slot field offsets. */
export const MBOX_SLOT = { reqSeq: 0, respSeq: 4, nr: 8, flags: 12, a0: 16, a1: 24, a2: 32, result: 40, token: 48 } as const;

/** Offset of slot i (KVMMEM_MBOX_SLOT_OFFSET). */
export const mboxSlotOffset = (i: number): number => MBOX_HEADER_SIZE + i * MBOX_SLOT_SIZE;

/** ivshmem BAR0 registers (the guest's side; listed for the header cross-check). */
export const IVSHMEM_REG = { intrMask: 0, intrStatus: 4, ivPosition: 8, doorbell: 12 } as const;
