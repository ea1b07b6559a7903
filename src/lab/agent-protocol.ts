/**
 * The QEMU lab agent's control-socket protocol, mirrored from
 * native/lab/kvmmem_agent.h (the one source; test/lab-host.test.ts checks
 * every value here against the header). 48-byte requests (+ payload for
 * ATTACH_PATH), 48-byte responses in request order, EVENTs interleaved after
 * SUBSCRIBE. Little-endian. See docs/lab-agent.md.
 */
export const AGENT_MAGIC = 0x47414d4b;
export const AGENT_VERSION = 1;
export const AGENT_PAGE = 4096;
export const AGENT_MAX_PAYLOAD = 4096;
export const AGENT_F_EVENT = 1;
export const AGENT_REQ_SIZE = 48;
export const AGENT_RESP_SIZE = 48;

export const AGENT_OP = {
  INFO: 1, ATTACH_FD: 2, ATTACH_PATH: 3, DETACH: 4, MAP: 5, RESTORE: 6, FRESH: 7, RESTORE_ALL: 8,
  STATS: 9, DOORBELL_FDS: 10, SUBSCRIBE: 11, RING: 12, EVENT: 0x100,
} as const;

export interface AgentRequest {
  op: number;
  /** Target id (MAP, DETACH) or vector (RING). */
  target?: number;
  gpa?: bigint | number;
  offset?: bigint | number;
  npages?: bigint | number;
  /** ATTACH_PATH's path bytes. */
  payload?: Uint8Array;
}

export interface AgentResponse {
  op: number;
  flags: number;
  seq: number;
  /** 0 or -errno. */
  status: number;
  v: [bigint, bigint, bigint, bigint];
}

/** Writes request `q` with `seq` at `off` of `out` (48 bytes; the payload is the caller's). */
export function encodeRequest(q: AgentRequest, seq: number, out: Buffer, off = 0): void {
  out.writeUInt32LE(AGENT_MAGIC, off);
  out.writeUInt16LE(q.op, off + 4);
  out.writeUInt16LE(0, off + 6);
  out.writeUInt32LE(seq >>> 0, off + 8);
  out.writeUInt32LE(q.target ?? 0, off + 12);
  out.writeBigUInt64LE(BigInt(q.gpa ?? 0), off + 16);
  out.writeBigUInt64LE(BigInt(q.offset ?? 0), off + 24);
  out.writeBigUInt64LE(BigInt(q.npages ?? 0), off + 32);
  out.writeUInt32LE(q.payload?.length ?? 0, off + 40);
  out.writeUInt32LE(0, off + 44);
}

export function decodeResponse(b: Buffer, off = 0): AgentResponse & { magic: number } {
  return {
    magic: b.readUInt32LE(off), op: b.readUInt16LE(off + 4), flags: b.readUInt16LE(off + 6), seq: b.readUInt32LE(off + 8),
    status: b.readInt32LE(off + 12),
    v: [b.readBigUInt64LE(off + 16), b.readBigUInt64LE(off + 24), b.readBigUInt64LE(off + 32), b.readBigUInt64LE(off + 40)],
  };
}
