/**
 * The host (KVM) side of the KVMI socket once a VM is hooked: the model's
 * "receive thread" (KVMI v9 kvmi_recv_thread / kvmi_msg_process). It serves
 * KVMI_GET_VERSION, KVMI_CONTROL_VM_EVENTS (v6), KVMI_GET_MAP_TOKEN and
 * KVMI_READ_PHYSICAL / KVMI_WRITE_PHYSICAL (kvmi.rst: 1..4096 bytes within one
 * page, else -KVM_EINVAL; non-zero padding -KVM_EINVAL; no RAM there
 * -KVM_ENOENT; a write to a read-only image -KVM_EPERM, the model's choice), takes
 * KVMI_EVENT_REPLY for the UNHOOK event it sends on PREUNHOOK, and answers any
 * other id with -KVM_ENOSYS. A framing error (a header announcing more than
 * KVMI_MAX_MESSAGE_SIZE bytes, or a known command whose body has the wrong
 * size, or an undecodable event reply) closes the socket, as the kernel drops
 * the connection. Codecs come from src/abi.
 */
import * as fs from 'node:fs';
import type * as net from 'node:net';
import { debuglog } from 'node:util';
import {
  CONTROL_VM_EVENTS_SIZE, ERROR_CODE_SIZE, EVENT_REPLY_SIZE, FrameReader, MAP_TOKEN_REPLY_SIZE, MSG_HDR_SIZE, KVMI_EVENT_UNHOOK, KVMI_IDS, KVMI_VERSION,
  decodeControlVmEvents, decodeEventReply, decodeReadPhysical, decodeWritePhysical, encodeErrorCode, encodeEvent, encodeGetVersionReply,
  encodeMapTokenReply, encodeMaxGfnReply, encodeMessage, encodeMsgHdr, kvmiMessageName, physicalRangeProblem, PHYSICAL_REQUEST_SIZE,
  type KvmiFrame, type KvmiProtocol,
} from '../abi/kvmi.js';
import { AbiDecodeError } from '../abi/errors.js';
import { KVM_EAGAIN, KVM_EINVAL, KVM_ENOENT, KVM_ENOSYS, KVM_EPERM } from '../abi/hypercall.js';
import type { GuestMemory } from './memory.js';

const debug = debuglog('kvmmem');

/** v6 KVMI_MSG_SIZE: header + body never exceed two pages. */
export const KVMI_MAX_MESSAGE_SIZE = 8192;

/** What the connection needs from its VM. */
export interface KvmiConnectionOwner {
  readonly protocol: KvmiProtocol;
  /** Used in debug lines only. */
  readonly label: string;
  /** KVMI_GET_MAP_TOKEN: a token, or null for -KVM_EAGAIN (too many outstanding). */
  issueToken(): Uint8Array | null;
  /** issueToken() writing the 32 bytes into `out` at `offset` (no copy); false for -KVM_EAGAIN. */
  issueTokenInto?(out: Uint8Array, offset: number): boolean;
  /** The VM's RAM, for KVMI_READ_PHYSICAL / KVMI_WRITE_PHYSICAL (absent: both answer -KVM_ENOSYS). */
  readonly memory?: GuestMemory;
  /** The socket is gone (tool closed it, error, or shutdown()). */
  onDisconnect(conn: KvmiConnection): void;
}

export type UnhookAck = 'reply' | 'closed' | 'timeout';

export class KvmiConnection {
  readonly socket: net.Socket;
  readonly #owner: KvmiConnectionOwner;
  readonly #reader = new FrameReader({ maxMessageSize: KVMI_MAX_MESSAGE_SIZE });
  #unhookEvent = false;
  #errored = false;
  #closed = false;
  #eventSeq = 0;
  #waiters: ((ack: UnhookAck) => void)[] = [];
  /** Replies produced while handling one incoming chunk, written at once at its end. */
  #out: Buffer | null = null;
  #outLen = 0;
  #batching = false;
  /** Counters for diagnostics and tests. */
  readonly counts = { commands: 0, replies: 0, events: 0, framingErrors: 0, physicalReads: 0, physicalWrites: 0 };

  constructor(socket: net.Socket, owner: KvmiConnectionOwner) {
    this.socket = socket;
    this.#owner = owner;
    socket.on('data', this.#onData);
    socket.on('error', this.#onError);
    socket.on('close', this.#onClose);
    socket.on('end', this.#onEnd);
    if (socket.destroyed) queueMicrotask(this.#onClose);
    else socket.resume();
  }

  /** The tool enabled KVMI_EVENT_UNHOOK through KVMI_CONTROL_VM_EVENTS. */
  get unhookEventEnabled(): boolean { return this.#unhookEvent; }
  /** The socket reported an error. */
  get errored(): boolean { return this.#errored; }
  get closed(): boolean { return this.#closed; }

  /**
   * Sends the UNHOOK event (kvmi_msg_send_unhook). false when it cannot be sent
   * (the socket is gone or errored): PREUNHOOK then answers -ENOENT.
   */
  sendUnhookEvent(): boolean {
    if (this.#closed || this.#errored || this.socket.destroyed || !this.socket.writable) return false;
    const ids = KVMI_IDS[this.#owner.protocol];
    const body = encodeEvent({ vcpu: 0, event: KVMI_EVENT_UNHOOK });
    this.counts.events++;
    this.socket.write(encodeMessage({ id: ids.EVENT, seq: ++this.#eventSeq >>> 0 }, body));
    debug('%s: sent KVMI_EVENT(UNHOOK)', this.#owner.label);
    return true;
  }

  /** Resolves when the tool replies to the UNHOOK event, closes the socket, or after timeoutMs. */
  waitUnhookAck(timeoutMs: number): Promise<UnhookAck> {
    if (this.#closed) return Promise.resolve('closed');
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== done);
        resolve('timeout');
      }, timeoutMs);
      const done = (ack: UnhookAck) => {
        clearTimeout(timer);
        resolve(ack);
      };
      this.#waiters.push(done);
    });
  }

  /** kvmi_sock_shutdown + put: the tool sees EOF, the fd is released. */
  shutdown(): void {
    // Replies already produced for this chunk go out before the EOF, as they would have one by one.
    this.#batching = false;
    this.#flush();
    if (!this.socket.destroyed) {
      this.socket.end();
      this.socket.destroy();
    }
    this.#markClosed();
  }

  #onData = (chunk: Buffer): void => {
    if (this.#closed) return;
    this.#batching = true;
    try {
      let at = 0;
      // Fast path: whole GET_MAP_TOKEN requests read straight from the chunk
      // (nothing buffered before them), answered into the chunk's reply buffer.
      if (this.#reader.buffered === 0) at = this.#tokenRun(chunk);
      if (at < chunk.length) {
        this.#reader.push(at === 0 ? chunk : chunk.subarray(at));
        for (let f = this.#reader.next(); f !== null; f = this.#reader.next()) {
          if (!this.#handle(f)) return;
        }
      }
    } catch (e) {
      this.#framingError(e instanceof AbiDecodeError ? e.message : String(e));
    } finally {
      this.#batching = false;
      this.#flush();
    }
  };

  /**
   * Handles the leading run of well-formed KVMI_GET_MAP_TOKEN requests (8-byte
   * header, empty body) of `chunk` exactly as #handle would; returns where it
   * stopped (the first other message, or a partial header).
   */
  #tokenRun(chunk: Buffer): number {
    const id = KVMI_IDS[this.#owner.protocol].GET_MAP_TOKEN;
    const into = this.#owner.issueTokenInto;
    if (into === undefined) return 0;
    const end = chunk.length - MSG_HDR_SIZE;
    let at = 0;
    while (at <= end && (chunk[at]! | (chunk[at + 1]! << 8)) === id && chunk[at + 2] === 0 && chunk[at + 3] === 0) {
      const seq = (chunk[at + 4]! | (chunk[at + 5]! << 8) | (chunk[at + 6]! << 16) | (chunk[at + 7]! << 24)) >>> 0;
      at += MSG_HDR_SIZE;
      this.counts.commands++;
      const out = this.#reserve(MSG_HDR_SIZE + MAP_TOKEN_REPLY_SIZE);
      const o = this.#outLen;
      if (!into.call(this.#owner, out, o + MSG_HDR_SIZE + ERROR_CODE_SIZE)) {
        debug('%s: KVMI_GET_MAP_TOKEN refused: too many tokens have accumulated', this.#owner.label);
        this.#reply(id, seq, -KVM_EAGAIN);
        continue;
      }
      // kvmi_msg_hdr { id, size, seq } + kvmi_error_code { 0, 0 }, byte by byte (cheaper than write*LE here)
      out[o] = id & 0xff; out[o + 1] = id >>> 8;
      out[o + 2] = MAP_TOKEN_REPLY_SIZE & 0xff; out[o + 3] = MAP_TOKEN_REPLY_SIZE >>> 8;
      out[o + 4] = seq & 0xff; out[o + 5] = (seq >>> 8) & 0xff; out[o + 6] = (seq >>> 16) & 0xff; out[o + 7] = seq >>> 24;
      for (let i = o + MSG_HDR_SIZE; i < o + MSG_HDR_SIZE + ERROR_CODE_SIZE; i++) out[i] = 0;
      this.#outLen = o + MSG_HDR_SIZE + MAP_TOKEN_REPLY_SIZE;
    }
    return at;
  }

  /** The reply buffer with room for `n` more bytes. */
  #reserve(n: number): Buffer {
    let out = this.#out;
    if (out === null || this.#outLen + n > out.length) {
      this.#flush();
      out = this.#out = Buffer.allocUnsafe(Math.max(n, 16384));
    }
    return out;
  }

  /** Writes the queued replies (one socket write). */
  #flush(): void {
    const out = this.#out;
    if (out === null || this.#outLen === 0) return;
    const len = this.#outLen;
    this.#outLen = 0;
    // The socket keeps the written bytes until they are sent: never reuse them.
    this.#out = out.length - len >= 4096 ? out.subarray(len) : null;
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(out.subarray(0, len));
  }

  /** Handles one message; false when the connection was dropped. */
  #handle(f: KvmiFrame): boolean {
    const ids = KVMI_IDS[this.#owner.protocol];
    const { id, size, seq } = f.hdr;
    if (id === ids.EVENT_REPLY) {
      if (size !== EVENT_REPLY_SIZE && size !== 8 + EVENT_REPLY_SIZE) {
        return this.#framingError(`KVMI_EVENT_REPLY of ${size} bytes`);
      }
      // v6 replies to vCPU events carry a kvmi_vcpu_hdr first; the reply is the last 8 bytes.
      const reply = decodeEventReply(f.body, size - EVENT_REPLY_SIZE);
      this.counts.replies++;
      if (reply.event === KVMI_EVENT_UNHOOK && this.#waiters.length > 0) this.#wake('reply');
      else debug('%s: event reply for event %d with nothing waiting: ignored', this.#owner.label, reply.event);
      return true;
    }
    this.counts.commands++;
    if (id === ids.GET_VERSION) {
      if (size !== 0) return this.#framingError(`KVMI_GET_VERSION with a ${size}-byte body`);
      const data = encodeGetVersionReply(this.#owner.protocol, this.#owner.protocol === 'v4'
        ? { version: KVMI_VERSION, commands: (1 << ids.GET_VERSION) | (1 << ids.GET_MAP_TOKEN), events: 0 }
        : { version: KVMI_VERSION });
      return this.#reply(id, seq, 0, data);
    }
    if (ids.CONTROL_VM_EVENTS !== null && id === ids.CONTROL_VM_EVENTS) {
      if (size !== CONTROL_VM_EVENTS_SIZE) return this.#framingError(`KVMI_CONTROL_VM_EVENTS with a ${size}-byte body`);
      let req;
      try {
        req = decodeControlVmEvents(f.body);
      } catch {
        return this.#reply(id, seq, -KVM_EINVAL); // non-zero padding
      }
      if (req.eventId !== KVMI_EVENT_UNHOOK) return this.#reply(id, seq, -KVM_EINVAL);
      this.#unhookEvent = req.enable;
      debug('%s: UNHOOK event %s', this.#owner.label, req.enable ? 'enabled' : 'disabled');
      return this.#reply(id, seq, 0);
    }
    if (id === ids.GET_MAP_TOKEN) {
      if (size !== 0) return this.#framingError(`KVMI_GET_MAP_TOKEN with a ${size}-byte body`);
      const token = this.#owner.issueToken();
      if (token === null) {
        debug('%s: KVMI_GET_MAP_TOKEN refused: too many tokens have accumulated', this.#owner.label);
        return this.#reply(id, seq, -KVM_EAGAIN);
      }
      this.#send(encodeMessage({ id, seq }, encodeMapTokenReply(token)));
      return true;
    }
    if (id === ids.GET_MAX_GFN && this.#owner.memory !== undefined) {
      if (size !== 0) return this.#framingError(`KVMI_GET_MAX_GFN with a ${size}-byte body`);
      // The highest frame of the VM's memory slots: the last page of RAM (holes below it included, as KVM's).
      const end = this.#owner.memory.end;
      if (end === 0n) return this.#reply(id, seq, -KVM_EINVAL);
      return this.#reply(id, seq, 0, encodeMaxGfnReply(end / 4096n - 1n));
    }
    if (id === ids.READ_PHYSICAL && this.#owner.memory !== undefined) return this.#readPhysical(id, seq, f.body, this.#owner.memory);
    if (id === ids.WRITE_PHYSICAL && this.#owner.memory !== undefined) return this.#writePhysical(id, seq, f.body, this.#owner.memory);
    debug('%s: %s (id %d, %d bytes): -KVM_ENOSYS', this.#owner.label, kvmiMessageName(this.#owner.protocol, id), id, size);
    return this.#reply(id, seq, -KVM_ENOSYS);
  }

  /** KVMI_READ_PHYSICAL: the reply (header, error code, data) is read straight into the reply buffer. */
  #readPhysical(id: number, seq: number, body: Buffer, mem: GuestMemory): boolean {
    if (body.length !== PHYSICAL_REQUEST_SIZE) return this.#framingError(`KVMI_READ_PHYSICAL with a ${body.length}-byte body`);
    let req;
    try {
      req = decodeReadPhysical(body);
    } catch {
      return this.#reply(id, seq, -KVM_EINVAL); // non-zero padding
    }
    if (physicalRangeProblem(req.gpa, req.size) !== null) return this.#reply(id, seq, -KVM_EINVAL);
    const where = mem.resolve(req.gpa, req.size);
    if (where === null) return this.#reply(id, seq, -KVM_ENOENT);
    this.counts.physicalReads++;
    const total = MSG_HDR_SIZE + ERROR_CODE_SIZE + req.size;
    const batching = this.#batching;
    const out = batching ? this.#reserve(total) : Buffer.allocUnsafe(total);
    const o = batching ? this.#outLen : 0;
    encodeMsgHdr({ id, size: ERROR_CODE_SIZE + req.size, seq }, out, o);
    encodeErrorCode(0, out, o + MSG_HDR_SIZE);
    const at = o + MSG_HDR_SIZE + ERROR_CODE_SIZE;
    let got = 0;
    try {
      for (let n; got < req.size; got += n) {
        n = fs.readSync(where.fd, out, at + got, req.size - got, where.offset + got);
        if (n === 0) break;
      }
    } catch (e) {
      debug('%s: KVMI_READ_PHYSICAL gpa 0x%s: %s', this.#owner.label, req.gpa.toString(16), (e as Error).message);
      return this.#reply(id, seq, -KVM_ENOENT); // the memory was closed under us
    }
    if (got < req.size) out.fill(0, at + got, at + req.size); // a file shrunk under the VM: its tail reads as zeros
    if (batching) this.#outLen += total;
    else if (!this.socket.destroyed && this.socket.writable) this.socket.write(out);
    return true;
  }

  #writePhysical(id: number, seq: number, body: Buffer, mem: GuestMemory): boolean {
    if (body.length < PHYSICAL_REQUEST_SIZE) return this.#framingError(`KVMI_WRITE_PHYSICAL with a ${body.length}-byte body`);
    let req;
    try {
      req = decodeWritePhysical(body);
    } catch {
      return this.#reply(id, seq, -KVM_EINVAL); // non-zero padding
    }
    if (req.data.length !== req.size || physicalRangeProblem(req.gpa, req.size) !== null) return this.#reply(id, seq, -KVM_EINVAL);
    const where = mem.resolve(req.gpa, req.size);
    if (where === null) return this.#reply(id, seq, -KVM_ENOENT);
    if (!where.writable) return this.#reply(id, seq, -KVM_EPERM);
    try {
      for (let done = 0; done < req.size;) done += fs.writeSync(where.fd, req.data, done, req.size - done, where.offset + done);
    } catch (e) {
      debug('%s: KVMI_WRITE_PHYSICAL gpa 0x%s: %s', this.#owner.label, req.gpa.toString(16), (e as Error).message);
      return this.#reply(id, seq, -KVM_ENOENT);
    }
    this.counts.physicalWrites++;
    return this.#reply(id, seq, 0);
  }

  #reply(id: number, seq: number, err: number, data?: Uint8Array): boolean {
    const ec = encodeErrorCode(err);
    const body = err === 0 && data !== undefined ? Buffer.concat([ec, data]) : ec;
    this.#send(encodeMessage({ id, seq }, body));
    return true;
  }

  #send(buf: Buffer): void {
    if (this.#batching) {
      buf.copy(this.#reserve(buf.length), this.#outLen);
      this.#outLen += buf.length;
      return;
    }
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(buf);
  }

  #framingError(why: string): false {
    this.counts.framingErrors++;
    debug('%s: framing error (%s): closing the socket', this.#owner.label, why);
    this.shutdown();
    return false;
  }

  #wake(ack: UnhookAck): void {
    const ws = this.#waiters;
    this.#waiters = [];
    for (const w of ws) w(ack);
  }

  #onError = (e: Error): void => {
    this.#errored = true;
    debug('%s: socket error: %s', this.#owner.label, e.message);
  };

  #onEnd = (): void => {
    // The tool closed its side: the receive loop ends and shuts the socket down.
    this.shutdown();
  };

  #onClose = (): void => {
    this.#markClosed();
  };

  #markClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake('closed');
    this.#owner.onDisconnect(this);
  }
}
