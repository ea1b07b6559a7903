// The KVMI socket protocol as seen by the introspection tool: the two
// handshake structs (length-prefixed by their own struct_size), then framed
// messages (kvmi_msg_hdr + `size` bytes). All little-endian.

import { Buffer } from 'node:buffer';
import { UsageError } from '../errors.js';
import {
  AbiDecodeError, asBuffer, checkBytes, checkInt32, checkS64, checkUint, copyBytes, expectZero, hex,
  needBytes, outBuffer,
} from './errors.js';
import { MEM_TOKEN_SIZE, type StructLayout } from './structs.js';

export const KVMI_VERSION = 1;
export const KVMI_EVENT_UNHOOK = 0;
export const KVMI_EVENT_ACTION_CONTINUE = 0;
export const KVMI_EVENT_ACTION_RETRY = 1;
export const KVMI_EVENT_ACTION_CRASH = 2;

// ---- message ids (they differ between the v4 and v6 patch sets) ----

export type KvmiProtocol = 'v4' | 'v6';

export interface KvmiMessageIds {
  EVENT_REPLY: number;
  EVENT: number;
  GET_VERSION: number;
  /** v4 has no such command. */
  CONTROL_VM_EVENTS: number | null;
  GET_MAP_TOKEN: number;
  /** KVMI_READ_PHYSICAL (v4 13, v6 17; later series call it KVMI_VM_READ_PHYSICAL). */
  READ_PHYSICAL: number;
  WRITE_PHYSICAL: number;
  /** KVMI_GET_MAX_GFN (v6 29: the highest guest frame number of the VM's memory slots); the v4 set here has none. */
  GET_MAX_GFN: number | null;
}

export const KVMI_IDS: Readonly<Record<KvmiProtocol, Readonly<KvmiMessageIds>>> = Object.freeze({
  v4: Object.freeze({ EVENT_REPLY: 24, EVENT: 23, GET_VERSION: 1, CONTROL_VM_EVENTS: null, GET_MAP_TOKEN: 15, READ_PHYSICAL: 13, WRITE_PHYSICAL: 14, GET_MAX_GFN: null }),
  v6: Object.freeze({ EVENT_REPLY: 0, EVENT: 1, GET_VERSION: 2, CONTROL_VM_EVENTS: 8, GET_MAP_TOKEN: 22, READ_PHYSICAL: 17, WRITE_PHYSICAL: 18, GET_MAX_GFN: 29 }),
});

function checkProtocol(protocol: KvmiProtocol): KvmiProtocol {
  if (protocol !== 'v4' && protocol !== 'v6') throw new UsageError(`unknown KVMI protocol ${JSON.stringify(protocol)}`);
  return protocol;
}

const MESSAGE_NAMES: Readonly<Record<KvmiProtocol, ReadonlyMap<number, string>>> = {
  v4: namesOf(KVMI_IDS.v4),
  v6: namesOf(KVMI_IDS.v6),
};

function namesOf(ids: KvmiMessageIds): ReadonlyMap<number, string> {
  const m = new Map<number, string>();
  for (const [k, v] of Object.entries(ids)) if (v !== null) m.set(v, `KVMI_${k}`);
  return m;
}

/** 'KVMI_GET_MAP_TOKEN' etc.; unknown ids give 'unknown message <id>'. */
export function kvmiMessageName(protocol: KvmiProtocol, id: number): string {
  return MESSAGE_NAMES[checkProtocol(protocol)].get(id) ?? `unknown message ${String(id)}`;
}

// ---- layouts ----

export const KVMI_MSG_HDR_LAYOUT = {
  name: 'kvmi_msg_hdr',
  size: 8,
  fields: { id: { offset: 0, size: 2 }, size: { offset: 2, size: 2 }, seq: { offset: 4, size: 4 } },
} as const satisfies StructLayout;

export const KVMI_ERROR_CODE_LAYOUT = {
  name: 'kvmi_error_code',
  size: 8,
  fields: { err: { offset: 0, size: 4 }, padding: { offset: 4, size: 4 } },
} as const satisfies StructLayout;

export const KVMI_QEMU2INTROSPECTOR_LAYOUT = {
  name: 'kvmi_qemu2introspector',
  size: 96,
  fields: {
    struct_size: { offset: 0, size: 4 },
    uuid: { offset: 4, size: 16 },
    padding: { offset: 20, size: 4 },
    start_time: { offset: 24, size: 8 },
    name: { offset: 32, size: 64 },
  },
} as const satisfies StructLayout;

export const KVMI_INTROSPECTOR2QEMU_LAYOUT = {
  name: 'kvmi_introspector2qemu',
  size: 24,
  fields: { struct_size: { offset: 0, size: 4 }, cookie_hash: { offset: 4, size: 20 } },
} as const satisfies StructLayout;

/** v6 layout (the C header's `struct kvmi_get_version_reply`). */
export const KVMI_GET_VERSION_REPLY_LAYOUT = {
  name: 'kvmi_get_version_reply',
  size: 8,
  fields: { version: { offset: 0, size: 4 }, padding: { offset: 4, size: 4 } },
} as const satisfies StructLayout;

export const KVMI_GET_VERSION_REPLY_V4_LAYOUT = {
  name: 'kvmi_get_version_reply_v4',
  size: 16,
  fields: {
    version: { offset: 0, size: 4 },
    commands: { offset: 4, size: 4 },
    events: { offset: 8, size: 4 },
    padding: { offset: 12, size: 4 },
  },
} as const satisfies StructLayout;

export const KVMI_CONTROL_VM_EVENTS_LAYOUT = {
  name: 'kvmi_control_vm_events',
  size: 8,
  fields: {
    event_id: { offset: 0, size: 2 },
    enable: { offset: 2, size: 1 },
    padding1: { offset: 3, size: 1 },
    padding2: { offset: 4, size: 4 },
  },
} as const satisfies StructLayout;

export const KVMI_EVENT_LAYOUT = {
  name: 'kvmi_event',
  size: 8,
  fields: {
    size: { offset: 0, size: 2 },
    vcpu: { offset: 2, size: 2 },
    event: { offset: 4, size: 1 },
    padding: { offset: 5, size: 3 },
  },
} as const satisfies StructLayout;

export const KVMI_EVENT_REPLY_LAYOUT = {
  name: 'kvmi_event_reply',
  size: 8,
  fields: {
    action: { offset: 0, size: 1 },
    event: { offset: 1, size: 1 },
    padding1: { offset: 2, size: 2 },
    padding2: { offset: 4, size: 4 },
  },
} as const satisfies StructLayout;

/**
 * KVMI_READ_PHYSICAL's parameters, as the KVMI documentation (kvmi.rst) gives
 * struct kvmi_vm_read_physical. The v4/v6 headers declare `__u64 size` where
 * this has `__u16 size; __u16 padding1; __u32 padding2`: the same 16 bytes,
 * identical for every valid size (1..4096), and a value with any of bytes
 * 10..15 set is refused (-KVM_EINVAL) by both readings. Reply: kvmi_error_code,
 * then exactly `size` bytes.
 */
export const KVMI_READ_PHYSICAL_LAYOUT = {
  name: 'kvmi_vm_read_physical',
  size: 16,
  fields: {
    gpa: { offset: 0, size: 8 },
    size: { offset: 8, size: 2 },
    padding1: { offset: 10, size: 2 },
    padding2: { offset: 12, size: 4 },
  },
} as const satisfies StructLayout;

/** KVMI_WRITE_PHYSICAL: the same 16 bytes, then `size` bytes of data (data[0]). Reply: kvmi_error_code only. */
export const KVMI_WRITE_PHYSICAL_LAYOUT = {
  name: 'kvmi_vm_write_physical',
  size: 16,
  fields: {
    gpa: { offset: 0, size: 8 },
    size: { offset: 8, size: 2 },
    padding1: { offset: 10, size: 2 },
    padding2: { offset: 12, size: 4 },
  },
} as const satisfies StructLayout;

/** KVMI wire structs, for tooling and the C cross-check. */
export const KVMI_STRUCT_LAYOUTS: readonly StructLayout[] = [
  KVMI_MSG_HDR_LAYOUT, KVMI_ERROR_CODE_LAYOUT, KVMI_QEMU2INTROSPECTOR_LAYOUT, KVMI_INTROSPECTOR2QEMU_LAYOUT,
  KVMI_GET_VERSION_REPLY_LAYOUT, KVMI_GET_VERSION_REPLY_V4_LAYOUT, KVMI_CONTROL_VM_EVENTS_LAYOUT,
  KVMI_EVENT_LAYOUT, KVMI_EVENT_REPLY_LAYOUT, KVMI_READ_PHYSICAL_LAYOUT, KVMI_WRITE_PHYSICAL_LAYOUT,
];

// ---- kvmi_msg_hdr ----

export const MSG_HDR_SIZE = 8;
/** Largest body a header can announce (u16 size). */
export const MSG_MAX_BODY_SIZE = 0xffff;

export interface MsgHdr { id: number; size: number; seq: number }

export function encodeMsgHdr(h: MsgHdr, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_MSG_HDR_LAYOUT;
  const id = checkUint('kvmi_msg_hdr.id', h.id, 16);
  const size = checkUint('kvmi_msg_hdr.size', h.size, 16);
  const seq = checkUint('kvmi_msg_hdr.seq', h.seq, 32);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.writeUInt16LE(id, offset + L.fields.id.offset);
  buf.writeUInt16LE(size, offset + L.fields.size.offset);
  buf.writeUInt32LE(seq, offset + L.fields.seq.offset);
  return buf;
}

export function decodeMsgHdr(buf: Uint8Array, offset = 0): MsgHdr {
  const L = KVMI_MSG_HDR_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  return {
    id: b.readUInt16LE(offset + L.fields.id.offset),
    size: b.readUInt16LE(offset + L.fields.size.offset),
    seq: b.readUInt32LE(offset + L.fields.seq.offset),
  };
}

/** Header + body in one Buffer (KVMI wants both in a single sendmsg). */
export function encodeMessage(hdr: { id: number; seq: number }, body: Uint8Array): Buffer {
  if (!(body instanceof Uint8Array)) throw new UsageError('message body must be a Uint8Array');
  if (body.length > MSG_MAX_BODY_SIZE) {
    throw new UsageError(`message body of ${body.length} bytes exceeds the u16 size limit (${MSG_MAX_BODY_SIZE})`);
  }
  const buf = Buffer.allocUnsafe(MSG_HDR_SIZE + body.length);
  encodeMsgHdr({ id: hdr.id, seq: hdr.seq, size: body.length }, buf, 0);
  buf.set(body, MSG_HDR_SIZE);
  return buf;
}

// ---- kvmi_error_code (first 8 bytes of every reply) ----

export const ERROR_CODE_SIZE = 8;

/** `err` is 0 or a negated error (e.g. -KVM_ENOSYS). */
export function encodeErrorCode(err: number, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_ERROR_CODE_LAYOUT;
  checkInt32('kvmi_error_code.err', err);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.writeInt32LE(err, offset + L.fields.err.offset);
  buf.writeUInt32LE(0, offset + L.fields.padding.offset);
  return buf;
}

export function decodeErrorCode(buf: Uint8Array, offset = 0): number {
  const L = KVMI_ERROR_CODE_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  expectZero(L.name, 'padding', b.readUInt32LE(offset + L.fields.padding.offset));
  return b.readInt32LE(offset + L.fields.err.offset);
}

// ---- handshake: struct_size-prefixed, extensible ----

/** Bounds on a handshake struct_size; more than a page is taken as garbage. */
export const HANDSHAKE_MIN_STRUCT_SIZE = 4;
export const HANDSHAKE_MAX_STRUCT_SIZE = 4096;

function checkStructSizeArg(struct: string, size: number): number {
  if (!Number.isInteger(size) || size < HANDSHAKE_MIN_STRUCT_SIZE || size > HANDSHAKE_MAX_STRUCT_SIZE) {
    throw new UsageError(`${struct}.struct_size must be in ${HANDSHAKE_MIN_STRUCT_SIZE}..${HANDSHAKE_MAX_STRUCT_SIZE}, got ${String(size)}`);
  }
  return size;
}

function checkStructSizeWire(struct: string, size: number): void {
  if (size < HANDSHAKE_MIN_STRUCT_SIZE || size > HANDSHAKE_MAX_STRUCT_SIZE) {
    throw new AbiDecodeError(struct, 'struct_size',
      `must be in ${HANDSHAKE_MIN_STRUCT_SIZE}..${HANDSHAKE_MAX_STRUCT_SIZE}, got ${size}`);
  }
}

/**
 * Emits `full` (the encoding of the struct we know) resized to `structSize`:
 * zero bytes appended to play a newer peer, or truncated to play an older one.
 */
function resizeStruct(full: Buffer, structSize: number): Buffer {
  if (structSize === full.length) return full;
  const out = Buffer.alloc(structSize);
  full.copy(out, 0, 0, Math.min(structSize, full.length));
  out.writeUInt32LE(structSize, 0);
  return out;
}

/**
 * Validates a whole received handshake struct and returns it widened to our
 * size: shorter (older peer) is zero-filled, longer (newer peer) is cut.
 */
function receiveStruct(L: StructLayout, buf: Uint8Array): { b: Buffer; structSize: number } {
  const b = needBytes(L.name, buf, 0, 4);
  const structSize = b.readUInt32LE(0);
  checkStructSizeWire(L.name, structSize);
  if (b.length !== structSize) {
    throw new AbiDecodeError(L.name, 'struct_size', `is ${structSize} but ${b.length} bytes were given`);
  }
  if (structSize >= L.size) return { b: b.subarray(0, L.size), structSize };
  const out = Buffer.alloc(L.size);
  b.copy(out, 0, 0, structSize);
  return { b: out, structSize };
}

export const QEMU2INTROSPECTOR_SIZE = 96;
/** Longest name in bytes; char name[64] keeps room for the NUL. */
export const QEMU2INTROSPECTOR_NAME_MAX = 63;

export interface Qemu2Introspector {
  structSize: number;
  uuid: Uint8Array;
  padding: number;
  /** s64, as QEMU sends it (seconds since the epoch in practice). */
  startTime: bigint;
  name: string;
}

/**
 * Device manager -> tool. `structSize` (default 96) also sets the encoded
 * length: larger simulates a newer peer (zeros appended), smaller an older
 * one (truncated). `padding` defaults to 0.
 */
export function encodeQemu2Introspector(
  h: Omit<Qemu2Introspector, 'structSize' | 'padding'> & { structSize?: number; padding?: number },
): Buffer {
  const L = KVMI_QEMU2INTROSPECTOR_LAYOUT;
  const structSize = checkStructSizeArg(L.name, h.structSize ?? L.size);
  checkBytes(`${L.name}.uuid`, h.uuid, 16);
  const padding = checkUint(`${L.name}.padding`, h.padding ?? 0, 32);
  const startTime = checkS64(`${L.name}.start_time`, h.startTime);
  if (typeof h.name !== 'string') throw new UsageError(`${L.name}.name must be a string`);
  if (h.name.includes('\0')) throw new UsageError(`${L.name}.name must not contain NUL`);
  const name = Buffer.from(h.name, 'utf8');
  if (name.length > QEMU2INTROSPECTOR_NAME_MAX) {
    throw new UsageError(`${L.name}.name must be at most ${QEMU2INTROSPECTOR_NAME_MAX} UTF-8 bytes, got ${name.length}`);
  }
  const F = L.fields;
  const buf = Buffer.alloc(L.size); // zeroed: terminates and pads the name
  buf.writeUInt32LE(structSize, F.struct_size.offset);
  buf.set(h.uuid, F.uuid.offset);
  buf.writeUInt32LE(padding, F.padding.offset);
  buf.writeBigInt64LE(startTime, F.start_time.offset);
  buf.set(name, F.name.offset);
  return resizeStruct(buf, structSize);
}

/**
 * `buf` is the whole struct as received (see readStructSized). The name must
 * be NUL-terminated within its 64 bytes: a C peer would read past it otherwise.
 */
export function decodeQemu2Introspector(buf: Uint8Array): Qemu2Introspector {
  const L = KVMI_QEMU2INTROSPECTOR_LAYOUT;
  const F = L.fields;
  const { b, structSize } = receiveStruct(L, buf);
  const nameBytes = b.subarray(F.name.offset, F.name.offset + F.name.size);
  const nul = nameBytes.indexOf(0);
  if (nul < 0) throw new AbiDecodeError(L.name, 'name', 'is not NUL-terminated within its 64 bytes');
  return {
    structSize,
    uuid: copyBytes(b, F.uuid.offset, 16),
    padding: b.readUInt32LE(F.padding.offset),
    startTime: b.readBigInt64LE(F.start_time.offset),
    name: nameBytes.toString('utf8', 0, nul),
  };
}

export const INTROSPECTOR2QEMU_SIZE = 24;
// Not exported: cookie.ts (node:crypto, kept out of this pure module) owns the public name.
const COOKIE_HASH_SIZE = 20;

export interface Introspector2Qemu {
  structSize: number;
  /** SHA-1 of the shared cookie. */
  cookieHash: Uint8Array;
}

/** Tool -> device manager; `structSize` rules as for encodeQemu2Introspector. */
export function encodeIntrospector2Qemu(h: { cookieHash: Uint8Array; structSize?: number }): Buffer {
  const L = KVMI_INTROSPECTOR2QEMU_LAYOUT;
  const structSize = checkStructSizeArg(L.name, h.structSize ?? L.size);
  checkBytes(`${L.name}.cookie_hash`, h.cookieHash, COOKIE_HASH_SIZE);
  const buf = Buffer.alloc(L.size);
  buf.writeUInt32LE(structSize, L.fields.struct_size.offset);
  buf.set(h.cookieHash, L.fields.cookie_hash.offset);
  return resizeStruct(buf, structSize);
}

export function decodeIntrospector2Qemu(buf: Uint8Array): Introspector2Qemu {
  const L = KVMI_INTROSPECTOR2QEMU_LAYOUT;
  const { b, structSize } = receiveStruct(L, buf);
  return { structSize, cookieHash: copyBytes(b, L.fields.cookie_hash.offset, COOKIE_HASH_SIZE) };
}

/**
 * Splits one struct_size-prefixed handshake struct off `buf` at `offset`.
 * Returns null until all of it is there; the struct is a view, not a copy.
 */
export function readStructSized(buf: Buffer, offset = 0): { struct: Buffer; consumed: number } | null {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new UsageError(`offset must be a non-negative integer, got ${String(offset)}`);
  if (buf.length - offset < 4) return null;
  const size = buf.readUInt32LE(offset);
  checkStructSizeWire('handshake', size);
  if (buf.length - offset < size) return null;
  return { struct: buf.subarray(offset, offset + size), consumed: size };
}

// ---- KVMI_GET_VERSION reply (the struct after the error code) ----

export const GET_VERSION_REPLY_SIZE: Readonly<Record<KvmiProtocol, number>> = Object.freeze({ v4: 16, v6: 8 });

export interface GetVersionReply {
  version: number;
  /** v4 only (bitmaps of allowed commands/events); 0 when not given. */
  commands?: number;
  events?: number;
}

/** Just the reply struct, without the leading error code. v6 ignores commands/events. */
export function encodeGetVersionReply(protocol: KvmiProtocol, r: GetVersionReply): Buffer {
  const version = checkUint('kvmi_get_version_reply.version', r.version, 32);
  if (checkProtocol(protocol) === 'v6') {
    const L = KVMI_GET_VERSION_REPLY_LAYOUT;
    const buf = Buffer.alloc(L.size);
    buf.writeUInt32LE(version, L.fields.version.offset);
    return buf;
  }
  const L = KVMI_GET_VERSION_REPLY_V4_LAYOUT;
  const buf = Buffer.alloc(L.size);
  buf.writeUInt32LE(version, L.fields.version.offset);
  buf.writeUInt32LE(checkUint(`${L.name}.commands`, r.commands ?? 0, 32), L.fields.commands.offset);
  buf.writeUInt32LE(checkUint(`${L.name}.events`, r.events ?? 0, 32), L.fields.events.offset);
  return buf;
}

export function decodeGetVersionReply(protocol: KvmiProtocol, buf: Uint8Array, offset = 0): GetVersionReply {
  if (checkProtocol(protocol) === 'v6') {
    const L = KVMI_GET_VERSION_REPLY_LAYOUT;
    const b = needBytes(L.name, buf, offset, L.size);
    expectZero(L.name, 'padding', b.readUInt32LE(offset + L.fields.padding.offset));
    return { version: b.readUInt32LE(offset + L.fields.version.offset) };
  }
  const L = KVMI_GET_VERSION_REPLY_V4_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  expectZero(L.name, 'padding', b.readUInt32LE(offset + L.fields.padding.offset));
  return {
    version: b.readUInt32LE(offset + L.fields.version.offset),
    commands: b.readUInt32LE(offset + L.fields.commands.offset),
    events: b.readUInt32LE(offset + L.fields.events.offset),
  };
}

// ---- KVMI_CONTROL_VM_EVENTS (v6) ----

export const CONTROL_VM_EVENTS_SIZE = 8;

export interface ControlVmEvents { eventId: number; enable: boolean }

export function encodeControlVmEvents(c: ControlVmEvents, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_CONTROL_VM_EVENTS_LAYOUT;
  const eventId = checkUint(`${L.name}.event_id`, c.eventId, 16);
  if (typeof c.enable !== 'boolean') throw new UsageError(`${L.name}.enable must be a boolean`);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.writeUInt16LE(eventId, offset + L.fields.event_id.offset);
  buf.writeUInt8(c.enable ? 1 : 0, offset + L.fields.enable.offset);
  buf.writeUInt8(0, offset + L.fields.padding1.offset);
  buf.writeUInt32LE(0, offset + L.fields.padding2.offset);
  return buf;
}

/** Any non-zero `enable` byte reads as true, as the host's C code does. */
export function decodeControlVmEvents(buf: Uint8Array, offset = 0): ControlVmEvents {
  const L = KVMI_CONTROL_VM_EVENTS_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  expectZero(L.name, 'padding1', b.readUInt8(offset + L.fields.padding1.offset));
  expectZero(L.name, 'padding2', b.readUInt32LE(offset + L.fields.padding2.offset));
  return {
    eventId: b.readUInt16LE(offset + L.fields.event_id.offset),
    enable: b.readUInt8(offset + L.fields.enable.offset) !== 0,
  };
}

// ---- kvmi_event (common part at the start of every KVMI_EVENT body) ----

export const EVENT_SIZE = 8;

export interface KvmiEvent {
  /** Size of the common + arch part, >= 8; event-specific data follows it. */
  size: number;
  vcpu: number;
  event: number;
}

/** Writes the 8-byte common part only; the caller appends arch/event data. */
export function encodeEvent(e: { vcpu: number; event: number; size?: number }, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_EVENT_LAYOUT;
  const size = checkUint(`${L.name}.size`, e.size ?? L.size, 16);
  if (size < L.size) throw new UsageError(`${L.name}.size must be at least ${L.size}, got ${size}`);
  const vcpu = checkUint(`${L.name}.vcpu`, e.vcpu, 16);
  const event = checkUint(`${L.name}.event`, e.event, 8);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.writeUInt16LE(size, offset + L.fields.size.offset);
  buf.writeUInt16LE(vcpu, offset + L.fields.vcpu.offset);
  buf.writeUInt8(event, offset + L.fields.event.offset);
  buf.fill(0, offset + L.fields.padding.offset, offset + L.fields.padding.offset + L.fields.padding.size);
  return buf;
}

/** Checks the common part only; whether `size` bytes follow is the framing layer's business. */
export function decodeEvent(buf: Uint8Array, offset = 0): KvmiEvent {
  const L = KVMI_EVENT_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  const size = b.readUInt16LE(offset + L.fields.size.offset);
  if (size < L.size) throw new AbiDecodeError(L.name, 'size', `must be at least ${L.size}, got ${size}`);
  const p = offset + L.fields.padding.offset;
  expectZero(L.name, 'padding', b.readUIntLE(p, L.fields.padding.size));
  return {
    size,
    vcpu: b.readUInt16LE(offset + L.fields.vcpu.offset),
    event: b.readUInt8(offset + L.fields.event.offset),
  };
}

// ---- kvmi_event_reply ----

export const EVENT_REPLY_SIZE = 8;

export interface KvmiEventReply { action: number; event: number }

export function encodeEventReply(r: KvmiEventReply, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_EVENT_REPLY_LAYOUT;
  const action = checkUint(`${L.name}.action`, r.action, 8);
  const event = checkUint(`${L.name}.event`, r.event, 8);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.writeUInt8(action, offset + L.fields.action.offset);
  buf.writeUInt8(event, offset + L.fields.event.offset);
  buf.writeUInt16LE(0, offset + L.fields.padding1.offset);
  buf.writeUInt32LE(0, offset + L.fields.padding2.offset);
  return buf;
}

export function decodeEventReply(buf: Uint8Array, offset = 0): KvmiEventReply {
  const L = KVMI_EVENT_REPLY_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  expectZero(L.name, 'padding1', b.readUInt16LE(offset + L.fields.padding1.offset));
  expectZero(L.name, 'padding2', b.readUInt32LE(offset + L.fields.padding2.offset));
  return {
    action: b.readUInt8(offset + L.fields.action.offset),
    event: b.readUInt8(offset + L.fields.event.offset),
  };
}

// ---- KVMI_GET_MAP_TOKEN reply: error code, then the token when err == 0 ----

export const MAP_TOKEN_REPLY_SIZE = ERROR_CODE_SIZE + MEM_TOKEN_SIZE;

/** Success reply body (40 bytes). A failure reply is just encodeErrorCode(-err). */
export function encodeMapTokenReply(token: Uint8Array): Buffer {
  checkBytes('kvmi_map_mem_token', token, MEM_TOKEN_SIZE);
  const buf = Buffer.alloc(MAP_TOKEN_REPLY_SIZE);
  encodeErrorCode(0, buf, 0);
  buf.set(token, ERROR_CODE_SIZE);
  return buf;
}

/** `token` (a copy) is present only when err == 0. */
export function decodeMapTokenReply(buf: Uint8Array): { err: number; token?: Uint8Array } {
  const err = decodeErrorCode(buf, 0);
  if (err !== 0) return { err };
  const b = needBytes('kvmi_map_mem_token', buf, ERROR_CODE_SIZE, MEM_TOKEN_SIZE);
  return { err, token: copyBytes(b, ERROR_CODE_SIZE, MEM_TOKEN_SIZE) };
}

// ---- KVMI_GET_MAX_GFN ----

/** KVMI_GET_MAX_GFN's reply body after the error code: `struct { __u64 gfn; }`. */
export const MAX_GFN_REPLY_SIZE = 8;

export function encodeMaxGfnReply(gfn: bigint): Buffer {
  const b = Buffer.alloc(MAX_GFN_REPLY_SIZE);
  b.writeBigUInt64LE(gfn);
  return b;
}

export function decodeMaxGfnReply(buf: Uint8Array): bigint {
  if (buf.length !== MAX_GFN_REPLY_SIZE) throw new AbiDecodeError('kvmi_get_max_gfn_reply', undefined, `${buf.length} bytes, want ${MAX_GFN_REPLY_SIZE}`);
  return Buffer.from(buf.buffer, buf.byteOffset, buf.length).readBigUInt64LE(0);
}

// ---- KVMI_READ_PHYSICAL / KVMI_WRITE_PHYSICAL ----

export const PHYSICAL_REQUEST_SIZE = 16;
/**
 * One request reads or writes 1..4096 bytes inside one 4 KiB page
 * ((gpa & 4095) + size <= 4096); the host answers anything else -KVM_EINVAL.
 */
export const PHYSICAL_MAX_SIZE = 4096;

export interface PhysicalRequest { gpa: bigint; size: number }

/** Why (gpa, size) is not one valid request, or null. The host's rule, shared by both ends. */
export function physicalRangeProblem(gpa: bigint, size: number): string | null {
  if (!Number.isInteger(size) || size < 1 || size > PHYSICAL_MAX_SIZE) return `size must be 1..${PHYSICAL_MAX_SIZE}, got ${String(size)}`;
  if ((Number(gpa & 0xfffn) + size) > PHYSICAL_MAX_SIZE) return `[${hex(gpa)}, +${size}) crosses a page boundary`;
  return null;
}

function encodePhysicalHeader(L: typeof KVMI_READ_PHYSICAL_LAYOUT | typeof KVMI_WRITE_PHYSICAL_LAYOUT, r: PhysicalRequest, buf: Buffer, offset: number): void {
  if (typeof r.gpa !== 'bigint' || r.gpa < 0n || r.gpa > 0xffff_ffff_ffff_ffffn) throw new UsageError(`${L.name}.gpa must be a u64 bigint, got ${String(r.gpa)}`);
  const problem = physicalRangeProblem(r.gpa, r.size);
  if (problem !== null) throw new UsageError(`${L.name}: ${problem}`);
  buf.writeBigUInt64LE(r.gpa, offset + L.fields.gpa.offset);
  buf.writeUInt16LE(r.size, offset + L.fields.size.offset);
  buf.writeUInt16LE(0, offset + L.fields.padding1.offset);
  buf.writeUInt32LE(0, offset + L.fields.padding2.offset);
}

/** The 16-byte KVMI_READ_PHYSICAL body; a size or page crossing the host would refuse is a UsageError. */
export function encodeReadPhysical(r: PhysicalRequest, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_READ_PHYSICAL_LAYOUT;
  const buf = outBuffer(L.name, L.size, into, offset);
  encodePhysicalHeader(L, r, buf, offset);
  return buf;
}

/**
 * Decodes a KVMI_READ_PHYSICAL body as the host does: AbiDecodeError for a
 * body that is not 16 bytes or non-zero padding. The range itself is not
 * judged here (physicalRangeProblem): the host answers that with an error code.
 */
export function decodeReadPhysical(buf: Uint8Array): PhysicalRequest {
  const L = KVMI_READ_PHYSICAL_LAYOUT;
  const b = needBytes(L.name, buf, 0, L.size);
  if (b.length !== L.size) throw new AbiDecodeError(L.name, 'size', `body is ${b.length} bytes, expected ${L.size}`);
  expectZero(L.name, 'padding1', b.readUInt16LE(L.fields.padding1.offset));
  expectZero(L.name, 'padding2', b.readUInt32LE(L.fields.padding2.offset));
  return { gpa: b.readBigUInt64LE(L.fields.gpa.offset), size: b.readUInt16LE(L.fields.size.offset) };
}

/** The KVMI_WRITE_PHYSICAL body: 16 bytes + data (data.length is the size). */
export function encodeWritePhysical(gpa: bigint, data: Uint8Array): Buffer {
  const L = KVMI_WRITE_PHYSICAL_LAYOUT;
  if (!(data instanceof Uint8Array)) throw new UsageError(`${L.name}.data must be a Uint8Array`);
  const buf = Buffer.allocUnsafe(L.size + data.length);
  encodePhysicalHeader(L, { gpa, size: data.length }, buf, 0);
  buf.set(data, L.size);
  return buf;
}

/**
 * Decodes a KVMI_WRITE_PHYSICAL body: AbiDecodeError if shorter than 16
 * bytes or with non-zero padding. `data` is a view of what follows the
 * header; whether its length equals `size` is for the host to answer
 * (-KVM_EINVAL), as the kernel does.
 */
export function decodeWritePhysical(buf: Uint8Array): PhysicalRequest & { data: Buffer } {
  const L = KVMI_WRITE_PHYSICAL_LAYOUT;
  const b = needBytes(L.name, buf, 0, L.size);
  expectZero(L.name, 'padding1', b.readUInt16LE(L.fields.padding1.offset));
  expectZero(L.name, 'padding2', b.readUInt32LE(L.fields.padding2.offset));
  return { gpa: b.readBigUInt64LE(L.fields.gpa.offset), size: b.readUInt16LE(L.fields.size.offset), data: b.subarray(L.size) };
}

// ---- stream framing ----

export interface KvmiFrame { hdr: MsgHdr; body: Buffer }

/**
 * Incremental splitter for a KVMI byte stream. Bodies that lie inside one
 * pushed chunk are returned as views of it (no copy); only messages that
 * straddle chunks are gathered. Callers must not modify chunks after push().
 */
export class FrameReader {
  /** Header + body limit; a header announcing more is a framing error. */
  readonly maxMessageSize: number;
  #chunks: (Buffer | undefined)[] = [];
  #first = 0; // index of the oldest live chunk in #chunks
  #head = 0; // bytes already consumed from #chunks[#first]
  #buffered = 0;

  constructor(opts: { maxMessageSize?: number } = {}) {
    const max = opts.maxMessageSize ?? MSG_HDR_SIZE + MSG_MAX_BODY_SIZE;
    if (!Number.isSafeInteger(max) || max < MSG_HDR_SIZE) {
      throw new UsageError(`maxMessageSize must be an integer >= ${MSG_HDR_SIZE}, got ${String(max)}`);
    }
    this.maxMessageSize = max;
  }

  /** Bytes pushed but not yet returned. */
  get buffered(): number {
    return this.#buffered;
  }

  push(chunk: Uint8Array): void {
    if (!(chunk instanceof Uint8Array)) throw new UsageError('FrameReader.push expects a Uint8Array');
    if (chunk.length === 0) return;
    this.#chunks.push(asBuffer(chunk));
    this.#buffered += chunk.length;
  }

  /**
   * The next complete message, or null if more bytes are needed. Throws
   * AbiDecodeError only for a header announcing more than maxMessageSize.
   */
  next(): KvmiFrame | null {
    if (this.#buffered < MSG_HDR_SIZE) return null;
    const hdr = decodeMsgHdr(this.#read(MSG_HDR_SIZE, false));
    if (MSG_HDR_SIZE + hdr.size > this.maxMessageSize) {
      throw new AbiDecodeError('kvmi_msg_hdr', 'size',
        `${hdr.size} (id ${hdr.id}, seq ${hex(hdr.seq)}) exceeds the ${this.maxMessageSize - MSG_HDR_SIZE}-byte body limit`);
    }
    if (this.#buffered < MSG_HDR_SIZE + hdr.size) return null;
    this.#read(MSG_HDR_SIZE, true);
    return { hdr, body: this.#read(hdr.size, true) };
  }

  /**
   * The next struct_size-prefixed handshake struct (see readStructSized), or
   * null; lets one reader carry the handshake and then the framed messages.
   */
  nextStructSized(): Buffer | null {
    if (this.#buffered < 4) return null;
    const size = this.#read(4, false).readUInt32LE(0);
    checkStructSizeWire('handshake', size);
    if (this.#buffered < size) return null;
    return this.#read(size, true);
  }

  /** First `n` buffered bytes (n <= buffered), consumed if `consume`. */
  #read(n: number, consume: boolean): Buffer {
    const first = this.#chunks[this.#first];
    if (n === 0) return Buffer.alloc(0);
    if (first !== undefined && first.length - this.#head >= n) {
      const view = first.subarray(this.#head, this.#head + n);
      if (consume) this.#advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    let i = this.#first;
    let pos = this.#head;
    while (copied < n) {
      const c = this.#chunks[i]!;
      const k = Math.min(c.length - pos, n - copied);
      c.copy(out, copied, pos, pos + k);
      copied += k;
      i++;
      pos = 0;
    }
    if (consume) this.#advance(n);
    return out;
  }

  #advance(n: number): void {
    this.#buffered -= n;
    while (n > 0) {
      const c = this.#chunks[this.#first]!;
      const left = c.length - this.#head;
      if (n < left) {
        this.#head += n;
        return;
      }
      n -= left;
      this.#chunks[this.#first] = undefined; // let the chunk be collected now
      this.#first++;
      this.#head = 0;
    }
    // Compact now and then so the array does not grow without bound.
    if (this.#first === this.#chunks.length) {
      this.#chunks = [];
      this.#first = 0;
    } else if (this.#first > 64 && this.#first * 2 > this.#chunks.length) {
      this.#chunks = this.#chunks.slice(this.#first);
      this.#first = 0;
    }
  }
}
