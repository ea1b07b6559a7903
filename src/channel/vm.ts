/**
 * One introspected VM = one KVMI connection (after the handshake). Frames
 * messages (kvmi_msg_hdr + body), matches replies to requests by seq so any
 * number can be in flight, answers host events, and turns error codes into
 * typed errors. Works over any connected Duplex (unix socket, vsock RawFdDuplex,
 * an in-memory pair).
 *
 * Framing is checked header-first: a reply whose seq answers nothing, whose id
 * does not match its request, or whose size does not fit the command is a
 * violation as soon as its 8-byte header arrives (no waiting for a body that
 * may never come). Any violation closes the connection and is reported through
 * 'gone' ({ reason, error: ProtocolError }); 'error' is never emitted.
 *
 * Bounds (ChannelLimits): whatever the peer sends, this connection holds at
 * most maxReadBufferBytes of unprocessed input and maxWriteQueueBytes of
 * output. Event replies of one read are written at once; while more than
 * writeHighWaterBytes wait to be written, the connection stops reading (the
 * peer's sends block in its kernel) and resumes once half of that is written; a peer that leaves
 * them unread for writeStallMs is closed. At most eventsPerTurn events are
 * handled per turn of the event loop, so one busy peer cannot starve the
 * others. Going over a bound closes the connection with a ChannelLimitError.
 */
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import { debuglog } from 'node:util';
import { stringify as uuidStringify, validate as uuidValidate } from 'uuid';
import {
  decodeEvent, decodeGetVersionReply, decodeMaxGfnReply, MAX_GFN_REPLY_SIZE, encodeControlVmEvents, encodeEventReply, encodeMsgHdr, encodeReadPhysical, encodeWritePhysical,
  PHYSICAL_MAX_SIZE, PHYSICAL_REQUEST_SIZE,
  kvmiMessageName, ERROR_CODE_SIZE, EVENT_REPLY_SIZE, EVENT_SIZE, GET_VERSION_REPLY_SIZE, KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_UNHOOK,
  KVMI_IDS, MSG_HDR_SIZE, MSG_MAX_BODY_SIZE, type GetVersionReply, type KvmiMessageIds, type KvmiProtocol, type MsgHdr, type Qemu2Introspector,
} from '../abi/kvmi.js';
import { MEM_TOKEN_SIZE } from '../abi/structs.js';
import { ERRNO } from '../abi/errno.js';
import { hex } from '../abi/errors.js';
import { KvmmemError, UsageError } from '../errors.js';
import { ChannelLimitError, KvmiError, ProtocolError, TimeoutError, VmGoneError, type ChannelLimitName } from './errors.js';

const debug = debuglog('kvmmem');
/** Every KVMI request batch (NODE_DEBUG=kvmmem_kvmi): thousands of lines for a large mapRange, so apart from the operations. */
const wire = debuglog('kvmmem_kvmi');

/** Largest event body accepted (kvmi_event + x86 arch data is ~1 KiB); more is a framing error. */
export const MAX_EVENT_BODY = 4096;
/** Most requests getMapTokens()/requestMany() put in one write. */
export const MAX_PIPELINE = 4096;
/** Timed-out requests whose late replies are still tolerated; beyond this the host is deemed stuck. */
const MAX_ABANDONED = 256;
/**
 * Per-connection bounds. The defaults hold for a real host: its messages are
 * at most two pages (v6 KVMI_MSG_SIZE), it sends few events (a vCPU waits for
 * each reply) and it reads what the tool writes.
 */
export interface ChannelLimits {
  /** Largest message (header + body) accepted from the peer (default 8192, v6 KVMI_MSG_SIZE). */
  maxMessageBytes: number;
  /** Received bytes not processed yet (default 1 MiB). */
  maxReadBufferBytes: number;
  /** Stop reading from the peer while more than this waits to be written to it (default 256 KiB). */
  writeHighWaterBytes: number;
  /** Bytes waiting to be written to the peer (default 4 MiB). */
  maxWriteQueueBytes: number;
  /** The write queue may stay over writeHighWaterBytes this long (default: requestTimeoutMs). */
  writeStallMs: number;
  /** Events handled per turn of the event loop before yielding to other connections (default 64: a host's vCPUs each wait for their reply, so a real burst is about one per vCPU). */
  eventsPerTurn: number;
  /**
   * Requests awaiting replies (default 16384); more are refused with code
   * 'EAGAIN' and the connection stays open. At 8 bytes per token request this
   * keeps our own requests below writeHighWaterBytes, so pausing the reads
   * (which only event replies can force) never waits on replies we stopped reading.
   */
  maxPending: number;
  /**
   * Most bytes one readPhysical()/writePhysical() call moves (default 16 MiB):
   * the tool allocates that much for a read; more is a UsageError, not a request.
   */
  maxPhysicalBytes: number;
}

export const DEFAULT_LIMITS: Readonly<Omit<ChannelLimits, 'writeStallMs'>> = Object.freeze({
  maxMessageBytes: 8192,
  maxReadBufferBytes: 1 << 20,
  writeHighWaterBytes: 256 << 10,
  maxWriteQueueBytes: 4 << 20,
  eventsPerTurn: 64,
  maxPending: 16384,
  maxPhysicalBytes: 16 << 20,
});

/** Fills in and checks limits (UsageError for a bad value). */
export function resolveLimits(given: Partial<ChannelLimits> | undefined, requestTimeoutMs: number): Readonly<ChannelLimits> {
  if (given !== undefined && (given === null || typeof given !== 'object')) throw new UsageError('limits must be an object');
  const l: ChannelLimits = { ...DEFAULT_LIMITS, writeStallMs: requestTimeoutMs, ...given };
  for (const [k, v] of Object.entries(l)) {
    if (!(k in DEFAULT_LIMITS) && k !== 'writeStallMs') throw new UsageError(`unknown limit ${JSON.stringify(k)}`);
    if (typeof v !== 'number' || !(v > 0) || (k !== 'writeStallMs' && !Number.isSafeInteger(v))) {
      throw new UsageError(`limits.${k} must be a positive ${k === 'writeStallMs' ? 'number of milliseconds' : 'integer'}, got ${String(v)}`);
    }
  }
  if (l.maxMessageBytes < 64 || l.maxMessageBytes > MSG_HDR_SIZE + MSG_MAX_BODY_SIZE) {
    throw new UsageError(`limits.maxMessageBytes must be in 64..${MSG_HDR_SIZE + MSG_MAX_BODY_SIZE}, got ${l.maxMessageBytes}`);
  }
  if (l.writeHighWaterBytes > l.maxWriteQueueBytes) throw new UsageError('limits.writeHighWaterBytes must not exceed limits.maxWriteQueueBytes');
  return Object.freeze(l);
}

/** Why reading from the peer is paused (bits; reading resumes when none is left). */
const HOLD_YIELD = 1, HOLD_WRITE = 2;

/** Host-side cap on unconsumed tokens (v6 KVMI_MEM_MAX_TOKENS; v4 has none). */
export const HOST_TOKEN_LIMIT: Readonly<Record<KvmiProtocol, number>> = Object.freeze({ v4: Infinity, v6: 8 });

const EMPTY = Buffer.alloc(0);
const TOKEN_OPTIONS: RequestOptions = Object.freeze({ expect: MEM_TOKEN_SIZE });
const noop = () => {};
/** n empty bodies (KVMI_GET_MAP_TOKEN has none), shared: never written to. */
let emptyBodies: Uint8Array[] = [];
function tokenBodies(n: number): Uint8Array[] {
  if (emptyBodies.length < n) emptyBodies = new Array<Uint8Array>(Math.max(n, 2 * emptyBodies.length)).fill(EMPTY);
  return n === emptyBodies.length ? emptyBodies : emptyBodies.slice(0, n);
}

export type VmState = 'connected' | 'unhooking' | 'gone';

export interface VmGoneInfo {
  reason: string;
  /** Present when the end was abnormal: ProtocolError for violations, the socket error otherwise. */
  error?: Error;
}

export interface VmUnhookInfo { vcpu: number; seq: number }

/** Any other host event ('event'); it has been answered with ACTION_CONTINUE. */
export interface VmEventInfo { event: number; vcpu: number; seq: number; body: Buffer }

export interface VmOptions {
  protocol?: KvmiProtocol;
  /** Per-request reply timeout (default 10000 ms). */
  requestTimeoutMs?: number;
  /** A partial frame with no new bytes for this long is a violation (default: requestTimeoutMs). */
  frameTimeoutMs?: number;
  /** Close the socket after answering the UNHOOK event (default true). */
  autoCloseOnUnhook?: boolean;
  /** 'unix', 'vsock' or 'stream'; for messages only. */
  transport?: string;
  /** Per-connection bounds (defaults: DEFAULT_LIMITS; writeStallMs = requestTimeoutMs). */
  limits?: Partial<ChannelLimits>;
}

export interface PhysicalOptions {
  /** Per-request reply timeout (default: the server's requestTimeoutMs). */
  timeoutMs?: number;
}

const PHYSICAL_HINTS: Readonly<Record<number, string>> = {
  [ERRNO.ENOENT!]: 'no guest memory at that gpa: a hole in the guest-physical map (e.g. below 4 GiB on a PC) or past the end of its RAM',
  [ERRNO.EINVAL!]: 'the host refused the gpa/size pair: each request must stay within one 4 KiB page (kvmmem splits them so) with zero padding',
  [ERRNO.EPERM!]: 'the device manager or KVM does not allow this command for this VM',
};

/** A u64 guest-physical address from a bigint or a safe non-negative integer. */
function physicalGpa(what: string, gpa: bigint | number): bigint {
  if (typeof gpa === 'number' && Number.isSafeInteger(gpa) && gpa >= 0) return BigInt(gpa);
  if (typeof gpa === 'bigint' && gpa >= 0n && gpa <= 0xffff_ffff_ffff_ffffn) return gpa;
  throw new UsageError(`${what}: gpa must be a non-negative bigint (u64) or safe integer, got ${String(gpa)}`);
}

export interface RequestOptions {
  /** Exact size of the data after kvmi_error_code on success; other sizes are framing errors. */
  expect?: number;
  timeoutMs?: number;
  /** Name for errors and logs (default: from the id, e.g. 'KVMI_GET_MAP_TOKEN'). */
  name?: string;
}

interface Expectation { id: number; name: string; expect: number | undefined }

/**
 * The requests of one requestMany() write share one deadline, so they share one
 * timer (a timer per request cost more than the request itself).
 */
interface Group {
  /** Requests of the group still pending. */
  left: number;
  /** performance.now() at which the group's requests time out. */
  deadline: number;
  ms: number;
  seqs: number[];
}

/** Captures a Promise's resolve function without a closure per promise (see #captureResolve). */
let captured: ((v: (Uint8Array | Error)[]) => void) | null = null;
function captureResolve(resolve: (v: (Uint8Array | Error)[]) => void): void { captured = resolve; }

/** One getMapTokensSettled() call: its requests settle straight into `out` (no closure per request). */
interface TokenBatch {
  out: (Uint8Array | Error)[];
  left: number;
  resolve(out: (Uint8Array | Error)[]): void;
}

interface Pending extends Expectation {
  seq: number;
  /** Set for requests of a token batch (then resolve/reject are unused); k = index in it. */
  batch: TokenBatch | null;
  k: number;
  /** Gets the reply's data (after kvmi_error_code), as a view into the receive buffer: copy it to keep it. */
  resolve(data: Buffer): void;
  reject(e: Error): void;
  group: Group | null;
}

/** 8-4-4-4-12 lowercase hex. uuid's stringify when the bytes form an RFC 9562 UUID; QEMU accepts any 16 bytes, so others are formatted the same way. */
export function formatUuid(bytes: Uint8Array): string {
  if (bytes.length !== 16) throw new RangeError(`a UUID is 16 bytes, got ${bytes.length}`);
  const hex = Buffer.from(bytes).toString('hex');
  const s = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  return uuidValidate(s) ? uuidStringify(bytes) : s;
}

/**
 * kvmi_qemu2introspector.start_time is an s64 without a documented unit; QEMU
 * fills it from time(NULL) (seconds since the epoch). Values are read by
 * magnitude: < 1e11 seconds, < 1e14 milliseconds, < 1e17 microseconds, else
 * nanoseconds. 0 or negative: unknown (null).
 */
export function startTimeToDate(t: bigint): Date | null {
  if (t <= 0n) return null;
  let ms: bigint;
  if (t < 100_000_000_000n) ms = t * 1000n;
  else if (t < 100_000_000_000_000n) ms = t;
  else if (t < 100_000_000_000_000_000n) ms = t / 1000n;
  else ms = t / 1_000_000n;
  return new Date(Number(ms));
}

export declare interface Vm {
  on(event: 'unhook', listener: (info: VmUnhookInfo) => void): this;
  on(event: 'gone', listener: (info: VmGoneInfo) => void): this;
  on(event: 'event', listener: (info: VmEventInfo) => void): this;
  once(event: 'unhook', listener: (info: VmUnhookInfo) => void): this;
  once(event: 'gone', listener: (info: VmGoneInfo) => void): this;
  once(event: 'event', listener: (info: VmEventInfo) => void): this;
}

/**
 * A connected, introspected VM. Created by IntrospectionServer (after the
 * handshake, GET_VERSION and enabling the UNHOOK event), never directly.
 *
 * Events: 'unhook' ({ vcpu, seq }) synchronously when KVMI_EVENT_UNHOOK
 * arrives (state is already 'unhooking'); after all listeners return, the
 * event is answered with ACTION_CONTINUE and, if autoCloseOnUnhook, the
 * socket is closed (the signal the device manager waits for). 'gone'
 * ({ reason, error? }) exactly once when the connection ends for any reason.
 * 'event' for other host events (already answered with CONTINUE).
 */
export class Vm extends EventEmitter {
  /** The VM's UUID as sent by the device manager, 8-4-4-4-12 lowercase hex. */
  readonly uuid: string;
  /** The VM's name (kvmi_qemu2introspector.name, up to 63 bytes). */
  readonly name: string;
  /** Raw s64 start_time from the handshake (QEMU: seconds since the epoch). */
  readonly startTime: bigint;
  /** startTime read as a date (see startTimeToDate); null if it is 0/negative. */
  readonly startDate: Date | null;
  /** struct_size the device manager sent (96 today; other sizes were accepted). */
  readonly handshakeStructSize: number;
  readonly protocol: KvmiProtocol;
  readonly transport: string;
  /** Host-side limit on unconsumed tokens (8 on v6, Infinity on v4): a hint for batching, not enforced here. */
  readonly tokenLimit: number;
  /** Close the socket after answering UNHOOK (default true); may be changed at any time. */
  autoCloseOnUnhook: boolean;
  #version = 0;
  #versionInfo: GetVersionReply | null = null;
  #unhookEventEnabled = false;
  #memorySize: Promise<bigint> | undefined;

  readonly #stream: Duplex;
  readonly #ids: KvmiMessageIds;
  readonly #requestTimeoutMs: number;
  readonly #frameTimeoutMs: number;
  #state: VmState = 'connected';
  #ready = false;
  #goneInfo: VmGoneInfo | null = null;
  #acc: Buffer = EMPTY;
  #stallTimer: NodeJS.Timeout | null = null;
  #pending = new Map<number, Pending>();
  /** Groups with requests still pending, in creation order; one timer covers them all. */
  #groups = new Set<Group>();
  #groupTimer: NodeJS.Timeout | null = null;
  /** When #groupTimer fires (performance.now() time). */
  #groupTimerAt = Infinity;
  #abandoned = new Map<number, Expectation>();
  #seq = 0;
  #maxInFlight = 0;
  #received = 0;
  #labelText: string | undefined;
  readonly #limits: Readonly<ChannelLimits>;
  /** Largest body accepted (maxMessageBytes - header). */
  readonly #maxBody: number;
  /** HOLD_* bits: why reading is paused. */
  #holds = 0;
  #writeStallTimer: NodeJS.Timeout | null = null;
  /** (seq, event) of the events answered while parsing one read; their replies go out in one write after it. */
  #eventReplies: number[] = [];

  /** @internal Used by IntrospectionServer once the handshake is done; `leftover` = bytes read past it. */
  constructor(stream: Duplex, hello: Qemu2Introspector, options: VmOptions = {}, leftover: Buffer = EMPTY) {
    super();
    this.protocol = options.protocol ?? 'v6';
    this.#ids = KVMI_IDS[this.protocol];
    this.uuid = formatUuid(hello.uuid);
    this.name = hello.name;
    this.startTime = hello.startTime;
    this.startDate = startTimeToDate(hello.startTime);
    this.handshakeStructSize = hello.structSize;
    this.transport = options.transport ?? 'stream';
    this.tokenLimit = HOST_TOKEN_LIMIT[this.protocol];
    this.autoCloseOnUnhook = options.autoCloseOnUnhook ?? true;
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.#frameTimeoutMs = options.frameTimeoutMs ?? this.#requestTimeoutMs;
    this.#limits = resolveLimits(options.limits, this.#requestTimeoutMs);
    this.#maxBody = this.#limits.maxMessageBytes - MSG_HDR_SIZE;
    this.#stream = stream;
    stream.on('data', (chunk: Buffer) => this.#onData(chunk));
    stream.on('end', () => this.#onEnd());
    stream.on('error', (e: Error) => this.#onError(e));
    stream.on('close', () => this.#onEnd());
    if (leftover.length > 0) this.#onData(leftover);
    debug('vm %s: connected over %s (%s)', this.#label(), this.transport, this.protocol);
  }

  get state(): VmState {
    return this.#state;
  }

  /** KVMI version from GET_VERSION. */
  get version(): number {
    return this.#version;
  }

  /** The whole GET_VERSION reply (v4 adds commands/events bitmaps). */
  get versionInfo(): GetVersionReply | null {
    return this.#versionInfo;
  }

  /** Whether the host accepted CONTROL_VM_EVENTS(UNHOOK, enable) at connect. */
  get unhookEventEnabled(): boolean {
    return this.#unhookEventEnabled;
  }

  /** Requests sent and awaiting a reply. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** High-water mark of inFlight since connect (or resetMaxInFlight). */
  get maxInFlight(): number {
    return this.#maxInFlight;
  }

  resetMaxInFlight(): void {
    this.#maxInFlight = this.#pending.size;
  }

  /** Why the VM is gone (null while connected). */
  get goneInfo(): VmGoneInfo | null {
    return this.#goneInfo;
  }

  /** Messages received after the handshake. */
  get messagesReceived(): number {
    return this.#received;
  }

  override toString(): string {
    return `Vm(${this.#label()}, ${this.#state})`;
  }

  // ---- commands ----

  /**
   * Sends a command and resolves with the data after kvmi_error_code; a
   * non-zero error code rejects with KvmiError, a closed connection with
   * VmGoneError, no reply in time with TimeoutError.
   */
  async request(id: number, body: Uint8Array = EMPTY, options: RequestOptions = {}): Promise<Buffer> {
    return this.requestMany(id, [body], options)[0]!;
  }

  /**
   * Sends one command per body back-to-back in ONE socket write (pipelined);
   * one promise per body, each settled by the reply carrying its seq. Bad
   * arguments (id, too many or too large bodies) throw synchronously.
   */
  requestMany(id: number, bodies: readonly Uint8Array[], options: RequestOptions = {}): Promise<Buffer>[] {
    if (!Number.isInteger(id) || id < 0 || id > 0xffff) throw new UsageError(`KVMI message id must be a u16, got ${String(id)}`);
    if (bodies.length > MAX_PIPELINE) throw new UsageError(`at most ${MAX_PIPELINE} requests per write, got ${bodies.length}`);
    if (bodies.length === 0) return [];
    const name = options.name ?? kvmiMessageName(this.protocol, id);
    if (this.#state !== 'connected') {
      const reason = this.#goneInfo?.reason ?? 'unhooking';
      return bodies.map(() => Promise.reject(new VmGoneError(reason, { vm: this.#label(), syscall: name })));
    }
    const busy = this.#overPending(bodies.length, name);
    if (busy !== null) return bodies.map(() => Promise.reject(busy));
    const promises = new Array<Promise<Buffer>>(bodies.length);
    this.#send(id, name, bodies, options, (k, p) => {
      promises[k] = new Promise<Buffer>((resolve, reject) => {
        p.resolve = (data: Buffer) => resolve(Buffer.from(data));
        p.reject = reject;
      });
    }, null);
    return promises;
  }

  /**
   * Encodes every request into ONE buffer (a bad body throws before anything is
   * registered), registers them under one shared timer, and writes them at once.
   * `bind(k, p)` sets request k's callbacks.
   */
  #send(id: number, name: string, bodies: readonly Uint8Array[], options: RequestOptions, bind: ((k: number, p: Pending) => void) | null, batch: TokenBatch | null): void {
    const timeoutMs = options.timeoutMs ?? this.#requestTimeoutMs;
    let total = 0;
    for (const body of bodies) {
      if (!(body instanceof Uint8Array)) throw new TypeError('message body must be a Uint8Array');
      if (body.length > MSG_MAX_BODY_SIZE) throw new RangeError(`message body of ${body.length} bytes exceeds the u16 size limit (${MSG_MAX_BODY_SIZE})`);
      total += MSG_HDR_SIZE + body.length;
    }
    const frames = Buffer.allocUnsafe(total);
    const seqs: number[] = new Array<number>(bodies.length);
    const group: Group | null = timeoutMs > 0 && Number.isFinite(timeoutMs) ? { left: bodies.length, deadline: performance.now() + timeoutMs, ms: timeoutMs, seqs } : null;
    let off = 0;
    for (let k = 0; k < bodies.length; k++) {
      const body = bodies[k]!;
      const seq = this.#nextSeq();
      seqs[k] = seq;
      // kvmi_msg_hdr { u16 id; u16 size; u32 seq } (id and size checked above)
      const len = body.length;
      frames[off] = id & 0xff; frames[off + 1] = id >>> 8;
      frames[off + 2] = len & 0xff; frames[off + 3] = len >>> 8;
      frames[off + 4] = seq & 0xff; frames[off + 5] = (seq >>> 8) & 0xff; frames[off + 6] = (seq >>> 16) & 0xff; frames[off + 7] = seq >>> 24;
      if (body.length > 0) frames.set(body, off + MSG_HDR_SIZE);
      off += MSG_HDR_SIZE + body.length;
      const p: Pending = { id, name, expect: options.expect, seq, resolve: noop, reject: noop, group, batch, k };
      if (bind !== null) bind(k, p);
      this.#pending.set(seq, p);
    }
    if (group !== null) {
      this.#groups.add(group);
      if (group.deadline < this.#groupTimerAt) this.#armGroupTimer(group.deadline);
    }
    if (this.#pending.size > this.#maxInFlight) this.#maxInFlight = this.#pending.size;
    if (wire.enabled) wire('vm %s: %s x%d (in flight %d)', this.#label(), name, bodies.length, this.#pending.size);
    this.#write(frames);
  }

  /** A transient 'EAGAIN' when n more requests would pass limits.maxPending; null when they fit. */
  #overPending(n: number, name: string): KvmmemError | null {
    const max = this.#limits.maxPending;
    if (this.#pending.size + n <= max) return null;
    return new KvmmemError(`${name}: ${this.#pending.size} requests already await replies from VM ${this.#label()} (limit ${max})`, {
      code: 'EAGAIN', errno: -ERRNO.EAGAIN!, syscall: name,
      hint: 'wait for pending requests to settle before sending more (limits.maxPending)',
    });
  }

  /** Read-side stats: bytes received and not processed yet, and bytes waiting to be written to the peer. */
  get buffered(): { read: number; write: number } {
    return { read: this.#acc.length, write: this.#stream.writableLength ?? 0 };
  }

  /** One KVMI_GET_MAP_TOKEN round trip: a fresh single-use 32-byte token. */
  async getMapToken(): Promise<Uint8Array> {
    return (await this.getMapTokens(1))[0]!;
  }

  /**
   * n KVMI_GET_MAP_TOKEN requests in one write, awaited together. Rejects with
   * the first failure (e.g. KvmiError EAGAIN over the host's limit, see
   * tokenLimit); tokens that did succeed are then dropped (they expire on the
   * host after 3 s on v6). Use getMapTokensSettled to keep them.
   */
  async getMapTokens(n: number): Promise<Uint8Array[]> {
    const r = await this.getMapTokensSettled(n);
    for (const x of r) if (x instanceof Error) throw x;
    return r as Uint8Array[];
  }

  /**
   * Like getMapTokens, but one result per request: a token or the error for that request.
   * One promise for the whole batch (not one per request): the hot path of every map.
   */
  getMapTokensSettled(n: number): Promise<(Uint8Array | Error)[]> {
    if (!Number.isInteger(n) || n < 0 || n > MAX_PIPELINE) return Promise.reject(new UsageError(`token count must be an integer in 0..${MAX_PIPELINE}, got ${String(n)}`));
    if (n === 0) return Promise.resolve([]);
    const id = this.#ids.GET_MAP_TOKEN;
    const name = 'KVMI_GET_MAP_TOKEN';
    const out = new Array<Uint8Array | Error>(n);
    if (this.#state !== 'connected') {
      const reason = this.#goneInfo?.reason ?? 'unhooking';
      for (let k = 0; k < n; k++) out[k] = new VmGoneError(reason, { vm: this.#label(), syscall: name });
      return Promise.resolve(out);
    }
    const busy = this.#overPending(n, name);
    if (busy !== null) return Promise.resolve(out.fill(busy));
    const promise = new Promise<(Uint8Array | Error)[]>(captureResolve);
    const batch: TokenBatch = { out, left: n, resolve: captured! };
    captured = null;
    this.#send(id, name, tokenBodies(n), TOKEN_OPTIONS, null, batch);
    return promise;
  }

  /** Settles request k of a token batch; `from` = offset of the token in `src` (ignored for an error). */
  #settleToken(b: TokenBatch, k: number, src: Buffer | null, from: number, err: Error | null): void {
    if (err !== null) b.out[k] = err;
    else {
      const token = new Uint8Array(MEM_TOKEN_SIZE); // each token owns its bytes
      const s = src!;
      for (let i = 0; i < MEM_TOKEN_SIZE; i++) token[i] = s[from + i]!; // one copy, out of the receive buffer
      b.out[k] = token;
    }
    if (--b.left === 0) b.resolve(b.out);
  }

  /**
   * KVMI_READ_PHYSICAL: copies `length` bytes of guest-physical memory from
   * `gpa` over the socket (the LibVMI way; session.mapRange() maps instead).
   * Split into one request per page piece (the host takes at most one page
   * each), pipelined in windows that keep the replies in flight under half of
   * limits.maxReadBufferBytes. Rejects with the first failure: KvmiError
   * ENOENT (no memory there) / EINVAL / EPERM naming the piece, VmGoneError,
   * TimeoutError; a UsageError for a bad gpa or a length over limits.maxPhysicalBytes.
   */
  async readPhysical(gpa: bigint | number, length: number, options: PhysicalOptions = {}): Promise<Buffer> {
    const name = 'KVMI_READ_PHYSICAL';
    const start = this.#physicalArgs(name, gpa, length);
    const out = Buffer.allocUnsafe(length);
    if (length === 0) return out;
    const reply = MSG_HDR_SIZE + ERROR_CODE_SIZE + PHYSICAL_MAX_SIZE;
    const window = Math.max(1, Math.min(MAX_PIPELINE, Math.floor(this.#limits.maxReadBufferBytes / 2 / reply)));
    await this.#physical(name, this.#ids.READ_PHYSICAL, start, length, window, options, (a, size) => encodeReadPhysical({ gpa: a, size }),
      (at) => (data: Buffer) => { data.copy(out, at); });
    return out;
  }

  /**
   * KVMI_WRITE_PHYSICAL: writes `data` into guest-physical memory at `gpa`,
   * one request per page piece, in windows that keep what waits to be written
   * under half of limits.writeHighWaterBytes (a host that answers slowly
   * then only slows us, it never pauses our reads). Errors as readPhysical;
   * pieces before a failing one may have been written.
   */
  async writePhysical(gpa: bigint | number, data: Uint8Array, options: PhysicalOptions = {}): Promise<void> {
    const name = 'KVMI_WRITE_PHYSICAL';
    if (!(data instanceof Uint8Array)) throw new UsageError(`${name}: data must be a Buffer or Uint8Array`);
    const start = this.#physicalArgs(name, gpa, data.length);
    if (data.length === 0) return;
    const request = MSG_HDR_SIZE + PHYSICAL_REQUEST_SIZE + PHYSICAL_MAX_SIZE;
    const window = Math.max(1, Math.min(MAX_PIPELINE, Math.floor(this.#limits.writeHighWaterBytes / 2 / request)));
    await this.#physical(name, this.#ids.WRITE_PHYSICAL, start, data.length, window, options,
      (a, size, at) => encodeWritePhysical(a, data.subarray(at, at + size)), null);
  }

  #physicalArgs(name: string, gpa: bigint | number, length: number): bigint {
    const start = physicalGpa(name, gpa);
    const max = this.#limits.maxPhysicalBytes;
    if (!Number.isSafeInteger(length) || length < 0 || length > max) {
      throw new UsageError(`${name}: length must be an integer in 0..${max} (limits.maxPhysicalBytes), got ${String(length)}`);
    }
    if (start + BigInt(length) > 1n << 64n) throw new UsageError(`${name}: [${hex(start)}, +${length}) runs past the 64-bit address space`);
    return start;
  }

  /**
   * The page pieces of [start, start + length), `window` requests per write;
   * each window is awaited before the next is sent. `onData(at)` gets the
   * piece at byte offset `at` (null: the reply carries no data).
   */
  async #physical(name: string, id: number, start: bigint, length: number, window: number, options: PhysicalOptions,
    body: (gpa: bigint, size: number, at: number) => Buffer, onData: ((at: number) => (data: Buffer) => void) | null): Promise<void> {
    const pieces: { gpa: bigint; size: number; at: number }[] = [];
    for (let at = 0; at < length;) {
      const a = start + BigInt(at);
      const size = Math.min(length - at, PHYSICAL_MAX_SIZE - Number(a & 0xfffn));
      pieces.push({ gpa: a, size, at });
      at += size;
    }
    for (let from = 0; from < pieces.length; from += window) {
      const batch = pieces.slice(from, from + window);
      if (this.#state !== 'connected') {
        throw new VmGoneError(this.#goneInfo?.reason ?? 'unhooking', { vm: this.#label(), syscall: name });
      }
      const busy = this.#overPending(batch.length, name);
      if (busy !== null) throw busy;
      let left = batch.length;
      let failed: Error | null = null;
      let done!: () => void;
      const settled = new Promise<void>((resolve) => { done = resolve; });
      const settle = () => { if (--left === 0) done(); };
      this.#send(id, name, batch.map((p) => body(p.gpa, p.size, p.at)), options, (k, p) => {
        const piece = batch[k]!;
        p.expect = onData === null ? 0 : piece.size;
        const take = onData?.(piece.at);
        p.resolve = (data: Buffer) => {
          take?.(data);
          settle();
        };
        p.reject = (e: Error) => {
          if (failed === null) {
            failed = e instanceof KvmiError
              ? new KvmiError(e.errno ?? -ERRNO.EIO!, name, {
                ...(e.seq === undefined ? {} : { seq: e.seq }), vm: this.#label(), detail: `gpa ${hex(piece.gpa)}, ${piece.size} bytes`,
                ...(PHYSICAL_HINTS[Math.abs(e.errno ?? 0)] === undefined ? {} : { hint: PHYSICAL_HINTS[Math.abs(e.errno ?? 0)]! }),
              })
              : e;
          }
          settle();
        };
      }, null);
      await settled;
      if (failed !== null) throw failed;
    }
  }

  /** KVMI_CONTROL_VM_EVENTS (v6 only; v4 has no such command and rejects with KvmiError ENOSYS). */
  async controlVmEvents(eventId: number, enable: boolean): Promise<void> {
    const id = this.#ids.CONTROL_VM_EVENTS;
    if (id === null) {
      throw new KvmiError(-ERRNO.ENOSYS!, 'KVMI_CONTROL_VM_EVENTS', {
        vm: this.#label(), hint: 'the v4 protocol has no KVMI_CONTROL_VM_EVENTS: VM events cannot be controlled',
      });
    }
    await this.request(id, encodeControlVmEvents({ eventId, enable }), { expect: 0 });
  }

  /**
   * KVMI_GET_MAX_GFN: the highest guest frame number of the VM's memory
   * (v6; the v4 set spoken here has no such command: a KvmiError naming it).
   */
  async getMaxGfn(): Promise<bigint> {
    const id = this.#ids.GET_MAX_GFN;
    if (id === null) {
      throw new KvmiError(-ERRNO.ENOSYS!, 'KVMI_GET_MAX_GFN', { vm: this.#label(), hint: 'the v4 protocol has no KVMI_GET_MAX_GFN: give the end of guest memory yourself (e.g. scan({ to }))' });
    }
    const data = await this.request(id, EMPTY, { expect: MAX_GFN_REPLY_SIZE });
    return decodeMaxGfnReply(data);
  }

  /**
   * Where the VM's guest-physical memory ends (exclusive): (max gfn + 1) pages,
   * asked once (KVMI_GET_MAX_GFN) and kept. What scans default `to` to.
   */
  memorySize(): Promise<bigint> {
    this.#memorySize ??= this.getMaxGfn().then((g) => (g + 1n) * 4096n);
    this.#memorySize.catch(() => { this.#memorySize = undefined; }); // a failure is not cached
    return this.#memorySize;
  }

  /** KVMI_GET_VERSION; the result is also kept in version/versionInfo. */
  async getVersion(): Promise<GetVersionReply> {
    const data = await this.request(this.#ids.GET_VERSION, EMPTY, { expect: GET_VERSION_REPLY_SIZE[this.protocol] });
    let v: GetVersionReply;
    try {
      v = decodeGetVersionReply(this.protocol, data);
    } catch (e) {
      const err = this.#violation(`malformed KVMI_GET_VERSION reply: ${(e as Error).message}`, e);
      throw new VmGoneError(err.reason, { vm: this.#label(), syscall: 'KVMI_GET_VERSION', cause: err });
    }
    this.#version = v.version;
    this.#versionInfo = v;
    return v;
  }

  /**
   * @internal The server's post-handshake sequence: GET_VERSION (version >= 1
   * required), then CONTROL_VM_EVENTS(UNHOOK, enable) on v6 when asked. A host
   * refusing the event (KvmiError) leaves unhookEventEnabled false, no failure.
   */
  async _init(opts: { enableUnhookEvent: boolean }): Promise<void> {
    const v = await this.getVersion();
    if (v.version < 1) {
      const err = this.#violation(`host reports KVMI version ${v.version}`);
      throw err;
    }
    if (opts.enableUnhookEvent && this.#ids.CONTROL_VM_EVENTS !== null) {
      try {
        await this.controlVmEvents(KVMI_EVENT_UNHOOK, true);
        this.#unhookEventEnabled = true;
      } catch (e) {
        if (!(e instanceof KvmiError)) throw e;
        debug('vm %s: the host refused to enable the UNHOOK event (%s); continuing without it', this.#label(), e.code);
      }
    }
    this.#ready = true;
  }

  /** Ends the connection (state 'gone'); pending and later requests reject with VmGoneError. */
  close(reason = 'closed by the tool'): void {
    this.#teardown(reason);
  }

  // ---- internals ----

  /** (A method, so TypeScript does not narrow #state across calls that change it.) */
  #gone(): boolean {
    return this.#state === 'gone';
  }

  #label(): string {
    return (this.#labelText ??= this.name === '' ? this.uuid : `${this.name} (${this.uuid})`);
  }

  #nextSeq(): number {
    do this.#seq = (this.#seq + 1) >>> 0;
    while (this.#pending.has(this.#seq) || this.#abandoned.has(this.#seq));
    return this.#seq;
  }

  #write(frame: Buffer): void {
    if (this.#stream.destroyed || this.#stream.writableEnded) return;
    this.#stream.write(frame, this.#onWritten);
    this.#checkWriteQueue();
  }

  /** Backpressure: over the high-water mark, stop reading until the peer has taken half of it; over the cap, close. */
  #checkWriteQueue(): void {
    const queued = this.#stream.writableLength;
    const L = this.#limits;
    if (queued > L.maxWriteQueueBytes) {
      this.#limitExceeded('writeQueue', queued, L.maxWriteQueueBytes, `${queued} bytes wait to be written to the peer (limit ${L.maxWriteQueueBytes})`);
      return;
    }
    if (queued <= L.writeHighWaterBytes || (this.#holds & HOLD_WRITE) !== 0 || this.#gone()) return;
    this.#hold(HOLD_WRITE);
    const ms = L.writeStallMs;
    this.#writeStallTimer = setTimeout(() => {
      this.#writeStallTimer = null;
      const left = this.#stream.writableLength;
      this.#limitExceeded('writeStall', ms, ms, `the peer left ${left} bytes of replies unread for ${ms} ms (high-water mark ${L.writeHighWaterBytes})`);
    }, ms);
    this.#writeStallTimer.unref();
    debug('vm %s: %d bytes queued for writing: reading paused until the peer reads', this.#label(), queued);
  }

  #writeDrained(): void {
    if (this.#writeStallTimer !== null) clearTimeout(this.#writeStallTimer);
    this.#writeStallTimer = null;
    this.#release(HOLD_WRITE);
  }

  #hold(bit: number): void {
    if (this.#holds === 0) this.#stream.pause();
    this.#holds |= bit;
    this.#armStall(); // (clears it)
  }

  #release(bit: number): void {
    if ((this.#holds & bit) === 0) return;
    this.#holds &= ~bit;
    if (this.#holds !== 0 || this.#gone()) return;
    this.#stream.resume();
    this.#armStall();
  }

  #limitExceeded(limit: ChannelLimitName, value: number, max: number, what: string): void {
    if (this.#gone()) return;
    const err = new ChannelLimitError(limit, value, max, what);
    debug('vm %s: %s: closing', this.#label(), err.reason);
    this.#teardown(err.reason, err);
  }

  /** Writes the event replies of this read in one write. */
  #flushEventReplies(): void {
    const r = this.#eventReplies;
    if (r.length === 0) return;
    this.#eventReplies = [];
    this.#write(this.#encodeEventReplies(r));
  }

  /** KVMI_EVENT_REPLY messages (ACTION_CONTINUE) for (seq, event) pairs, into one buffer. */
  #encodeEventReplies(r: number[]): Buffer {
    const one = MSG_HDR_SIZE + EVENT_REPLY_SIZE;
    const out = Buffer.allocUnsafe((r.length / 2) * one);
    for (let i = 0, off = 0; i < r.length; i += 2, off += one) {
      encodeMsgHdr({ id: this.#ids.EVENT_REPLY, seq: r[i]!, size: EVENT_REPLY_SIZE }, out, off);
      encodeEventReply({ action: KVMI_EVENT_ACTION_CONTINUE, event: r[i + 1]! }, out, off + MSG_HDR_SIZE);
    }
    return out;
  }

  #onWritten = (err?: Error | null): void => {
    if (err) this.#onError(err);
    // Back under half the high-water mark: read again. (Not 'drain': a stream emits it only
    // after a write() returned false, i.e. over its own writableHighWaterMark, which may be above ours.)
    else if ((this.#holds & HOLD_WRITE) !== 0 && this.#stream.writableLength <= this.#limits.writeHighWaterBytes / 2) this.#writeDrained();
  };

  #armGroupTimer(at: number): void {
    if (this.#groupTimer !== null) clearTimeout(this.#groupTimer);
    this.#groupTimerAt = at;
    this.#groupTimer = setTimeout(this.#onGroupTimer, Math.max(0, at - performance.now()));
    this.#groupTimer.unref();
  }

  #stopGroupTimer(): void {
    if (this.#groupTimer !== null) clearTimeout(this.#groupTimer);
    this.#groupTimer = null;
    this.#groupTimerAt = Infinity;
  }

  /** The shared timer: times out every group past its deadline, then re-arms for the earliest left. */
  #onGroupTimer = (): void => {
    this.#groupTimer = null;
    this.#groupTimerAt = Infinity;
    const t = performance.now();
    let next = Infinity;
    for (const g of this.#groups) {
      if (this.#state === 'gone') return;
      if (g.deadline <= t) {
        this.#groups.delete(g);
        this.#timeoutGroup(g);
      } else if (g.deadline < next) next = g.deadline;
    }
    if (this.#state !== 'gone' && next !== Infinity && next < this.#groupTimerAt) this.#armGroupTimer(next);
  };

  #timeoutGroup(group: Group): void {
    for (const seq of group.seqs) {
      const p = this.#pending.get(seq);
      if (p !== undefined && p.group === group) this.#timeout(p, group.ms);
      if (this.#state === 'gone') return;
    }
  }

  #timeout(p: Pending, ms: number): void {
    if (this.#pending.get(p.seq) !== p) return;
    this.#pending.delete(p.seq);
    this.#settled(p);
    this.#abandoned.set(p.seq, { id: p.id, name: p.name, expect: p.expect });
    debug('vm %s: %s seq %d timed out after %d ms', this.#label(), p.name, p.seq, ms);
    this.#reject(p, new TimeoutError(`${p.name} on VM ${this.#label()}`, ms, {
      syscall: p.name, hint: 'the host did not answer in time: it may be overloaded or stuck; the connection stays open and a late reply is ignored',
    }));
    if (this.#abandoned.size > MAX_ABANDONED) this.#teardown(`the host left ${this.#abandoned.size} requests unanswered`, new TimeoutError(p.name, ms));
  }

  #onData(chunk: Buffer): void {
    if (this.#state === 'gone') return;
    this.#acc = this.#acc.length === 0 ? chunk : Buffer.concat([this.#acc, chunk]);
    // While yielding, the scheduled turn parses what arrived (a stream that ignores pause() may still push).
    if ((this.#holds & HOLD_YIELD) === 0) this.#process();
    this.#checkReadBuffer();
  }

  #checkReadBuffer(): void {
    const max = this.#limits.maxReadBufferBytes;
    if (this.#acc.length > max) this.#limitExceeded('readBuffer', this.#acc.length, max, `${this.#acc.length} bytes received and not processed yet (limit ${max})`);
  }

  /** The next turn after yielding: parse on, then read again. */
  #resume = (): void => {
    if (this.#gone()) return;
    this.#holds &= ~HOLD_YIELD; // (without reading yet: #process may yield again)
    this.#process();
    if (!this.#gone() && this.#holds === 0) this.#stream.resume();
  };

  #process(): void {
    this.#parse();
    if (this.#gone()) return;
    this.#flushEventReplies();
    if (!this.#gone()) this.#armStall();
  }

  /**
   * A partial frame with nothing more for frameTimeoutMs is a violation, but
   * only while we read: bytes we hold back (yield, backpressure) are not the peer's stall.
   */
  #armStall(): void {
    if (this.#stallTimer !== null) {
      clearTimeout(this.#stallTimer);
      this.#stallTimer = null;
    }
    if (this.#holds === 0 && this.#acc.length > 0 && this.#frameTimeoutMs > 0 && Number.isFinite(this.#frameTimeoutMs)) {
      this.#stallTimer = setTimeout(() => {
        this.#stallTimer = null;
        this.#violation(`incomplete message: ${this.#acc.length} bytes of a frame and nothing more for ${this.#frameTimeoutMs} ms`);
      }, this.#frameTimeoutMs);
      this.#stallTimer.unref();
    }
  }

  #parse(): void {
    // Frames are walked by offset; #acc is cut once at the end (or before an event,
    // whose listeners may look at the connection).
    let acc = this.#acc;
    let off = 0;
    const evId = this.#ids.EVENT;
    let events = 0;
    while (this.#state !== 'gone' && acc.length - off >= MSG_HDR_SIZE) {
      // kvmi_msg_hdr { u16 id; u16 size; u32 seq }
      const id = acc[off]! | (acc[off + 1]! << 8);
      const size = acc[off + 2]! | (acc[off + 3]! << 8);
      const seq = (acc[off + 4]! | (acc[off + 5]! << 8) | (acc[off + 6]! << 16) | (acc[off + 7]! << 24)) >>> 0;
      const p = id === evId ? undefined : this.#pending.get(seq);
      // The common case, checked without building any string.
      if (!(p !== undefined && p.id === id && size >= ERROR_CODE_SIZE && size <= this.#maxBody
        && (p.expect === undefined || size === ERROR_CODE_SIZE || size === ERROR_CODE_SIZE + p.expect))) {
        const problem = this.#headerProblem({ id, size, seq });
        if (problem !== null) {
          this.#acc = acc.subarray(off);
          this.#violation(problem);
          return;
        }
        if (size > this.#maxBody) {
          const max = this.#limits.maxMessageBytes;
          this.#limitExceeded('message', MSG_HDR_SIZE + size, max, `message id ${id} (seq 0x${seq.toString(16)}) announces ${MSG_HDR_SIZE + size} bytes (limit ${max})`);
          return;
        }
      }
      const end = off + MSG_HDR_SIZE + size;
      if (acc.length < end) break;
      this.#received++;
      if (id === evId) {
        const body = acc.subarray(off + MSG_HDR_SIZE, end);
        this.#acc = acc = end === acc.length ? EMPTY : acc.subarray(end);
        off = 0;
        this.#onEvent(seq, body);
        if (this.#gone()) return;
        acc = this.#acc;
        if (++events >= this.#limits.eventsPerTurn && acc.length >= MSG_HDR_SIZE) {
          // Fairness: the rest waits for the next turn, and the peer for us to read again.
          this.#hold(HOLD_YIELD);
          setImmediate(this.#resume);
          return;
        }
      } else {
        this.#onReply(seq, p, acc, off + MSG_HDR_SIZE, size);
        off = end;
      }
    }
    if (this.#gone()) return;
    this.#acc = off === 0 ? acc : off === acc.length ? EMPTY : acc.subarray(off);
  }

  #headerProblem(hdr: MsgHdr): string | null {
    const seq = `0x${hdr.seq.toString(16)}`;
    if (hdr.id === this.#ids.EVENT) {
      if (hdr.size < EVENT_SIZE) return `event message (seq ${seq}) of ${hdr.size} bytes is shorter than kvmi_event (${EVENT_SIZE})`;
      if (hdr.size > MAX_EVENT_BODY) return `event message (seq ${seq}) announces ${hdr.size} bytes (limit ${MAX_EVENT_BODY})`;
      return null;
    }
    const p = this.#pending.get(hdr.seq) ?? this.#abandoned.get(hdr.seq);
    if (p === undefined) {
      return `message id ${hdr.id} (${kvmiMessageName(this.protocol, hdr.id)}) with seq ${seq} answers no pending request`;
    }
    if (p.id !== hdr.id) return `reply with id ${hdr.id} for seq ${seq}, which was ${p.name} (id ${p.id})`;
    if (hdr.size < ERROR_CODE_SIZE) return `reply to ${p.name} (seq ${seq}) of ${hdr.size} bytes is shorter than kvmi_error_code (${ERROR_CODE_SIZE})`;
    if (p.expect !== undefined && hdr.size !== ERROR_CODE_SIZE && hdr.size !== ERROR_CODE_SIZE + p.expect) {
      return `reply to ${p.name} (seq ${seq}) has ${hdr.size} bytes; expected ${ERROR_CODE_SIZE} (error) or ${ERROR_CODE_SIZE + p.expect}`;
    }
    return null;
  }

  /** A reply whose header passed the checks: its body is buf[at, at + size). */
  #onReply(seqNo: number, p: Pending | undefined, buf: Buffer, at: number, size: number): void {
    const e = p ?? this.#abandoned.get(seqNo)!;
    const err = buf.readInt32LE(at);
    const padding = buf.readUInt32LE(at + 4);
    if (padding !== 0) {
      this.#violation(`reply to ${e.name} (seq 0x${seqNo.toString(16)}) has non-zero kvmi_error_code padding 0x${padding.toString(16)}`);
      return;
    }
    if (err !== 0 && size !== ERROR_CODE_SIZE) {
      this.#violation(`error reply to ${e.name} (seq 0x${seqNo.toString(16)}) carries ${size - ERROR_CODE_SIZE} bytes of data`);
      return;
    }
    if (err === 0 && e.expect !== undefined && size !== ERROR_CODE_SIZE + e.expect) {
      this.#violation(`reply to ${e.name} (seq 0x${seqNo.toString(16)}) has ${size - ERROR_CODE_SIZE} bytes of data, expected ${e.expect}`);
      return;
    }
    if (p === undefined) {
      this.#abandoned.delete(seqNo);
      debug('vm %s: late reply to %s seq 0x%s dropped', this.#label(), e.name, seqNo.toString(16));
      return;
    }
    this.#pending.delete(seqNo);
    this.#settled(p);
    if (err !== 0) this.#reject(p, new KvmiError(err, p.name, { seq: seqNo, vm: this.#label() }));
    else if (p.batch !== null) this.#settleToken(p.batch, p.k, buf, at + ERROR_CODE_SIZE, null);
    else p.resolve(buf.subarray(at + ERROR_CODE_SIZE, at + size));
  }

  #reject(p: Pending, e: Error): void {
    if (p.batch !== null) this.#settleToken(p.batch, p.k, null, 0, e);
    else p.reject(e);
  }

  /** p left #pending: the last of its group stops the group's timer. */
  #settled(p: Pending): void {
    const g = p.group;
    // The shared timer stays armed (unref'd) when nothing is left: it then fires once for
    // nothing instead of a set/clear pair per round trip.
    if (g !== null && --g.left === 0) this.#groups.delete(g);
  }

  #onEvent(seq: number, body: Buffer): void {
    let ev;
    try {
      ev = decodeEvent(body);
    } catch (e) {
      this.#violation(`malformed kvmi_event (seq 0x${seq.toString(16)}): ${(e as Error).message}`, e);
      return;
    }
    if (ev.size > body.length) {
      this.#violation(`kvmi_event.size ${ev.size} exceeds its ${body.length}-byte message (seq 0x${seq.toString(16)})`);
      return;
    }
    let thrown: unknown = null;
    if (ev.event === KVMI_EVENT_UNHOOK) {
      debug('vm %s: UNHOOK event', this.#label());
      if (this.#state === 'connected') this.#state = 'unhooking';
      try {
        this.emit('unhook', { vcpu: ev.vcpu, seq } satisfies VmUnhookInfo);
      } catch (e) {
        thrown = e;
      }
      this.#replyEvent(seq, ev.event);
      if (this.autoCloseOnUnhook) this.#teardown('unhooked by the host');
    } else {
      if (debug.enabled) debug('vm %s: event %d (vcpu %d) answered with CONTINUE', this.#label(), ev.event, ev.vcpu);
      // (The copy of the body only for someone listening: a flood of events costs no allocation per event here.)
      if (this.listenerCount('event') > 0) {
        try {
          this.emit('event', { event: ev.event, vcpu: ev.vcpu, seq, body: Buffer.from(body) } satisfies VmEventInfo);
        } catch (e) {
          thrown = e;
        }
      }
      this.#replyEvent(seq, ev.event);
    }
    // A throwing listener is a bug in the caller: the protocol duties above are done, now let it surface.
    if (thrown !== null) process.nextTick(() => { throw thrown; });
  }

  #replyEvent(seq: number, event: number): void {
    if (this.#state === 'gone') return;
    this.#eventReplies.push(seq, event);
  }

  #onError(e: Error): void {
    if (this.#state === 'gone') return;
    const code = (e as NodeJS.ErrnoException).code;
    // Our GET_VERSION may hit the device manager's hang-up before we read its EOF.
    if (!this.#ready && this.#received === 0 && (code === 'EPIPE' || code === 'ECONNRESET')) {
      this.#violation('handshake rejected by the device manager (wrong cookie?)', e);
      return;
    }
    this.#teardown(`socket error: ${e.message}`, e);
  }

  #onEnd(): void {
    if (this.#state === 'gone') return;
    if (this.#acc.length > 0) {
      this.#violation(`connection closed in the middle of a message (${this.#acc.length} bytes of an incomplete frame)`);
    } else if (!this.#ready && this.#received === 0) {
      this.#violation('handshake rejected by the device manager (wrong cookie?)');
    } else {
      this.#teardown('connection closed by the host');
    }
  }

  #violation(reason: string, cause?: unknown): ProtocolError {
    const err = new ProtocolError(reason, cause === undefined ? {} : { cause });
    debug('vm %s: %s', this.#label(), reason);
    this.#teardown(reason, err);
    return err;
  }

  #teardown(reason: string, error?: Error): void {
    if (this.#state === 'gone') return;
    this.#state = 'gone';
    this.#goneInfo = error === undefined ? { reason } : { reason, error };
    if (this.#stallTimer !== null) clearTimeout(this.#stallTimer);
    this.#stallTimer = null;
    if (this.#writeStallTimer !== null) clearTimeout(this.#writeStallTimer);
    this.#writeStallTimer = null;
    this.#acc = EMPTY;
    // A graceful close still sends what was answered (the UNHOOK event's reply).
    const replies = this.#eventReplies;
    this.#eventReplies = [];
    if (error === undefined && replies.length > 0) this.#write(this.#encodeEventReplies(replies));
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    this.#abandoned.clear();
    this.#groups.clear();
    this.#stopGroupTimer();
    for (const p of pending) {
      this.#reject(p, new VmGoneError(reason, { vm: this.#label(), syscall: p.name, ...(error === undefined ? {} : { cause: error }) }));
    }
    this.#closeStream(error !== undefined);
    debug('vm %s: gone (%s)', this.#label(), reason);
    this.emit('gone', this.#goneInfo);
  }

  /** Graceful: FIN after queued writes (the event reply), then close; a violation closes at once. */
  #closeStream(abrupt: boolean): void {
    const s = this.#stream;
    if (s.destroyed) return;
    if (abrupt) {
      s.destroy();
      return;
    }
    const t = setTimeout(() => s.destroy(), 1000);
    t.unref();
    s.once('close', () => clearTimeout(t));
    s.end(() => s.destroy());
  }
}
