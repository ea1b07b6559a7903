/**
 * The device manager's part (QEMU's, in real life): connect to the
 * introspection tool's listening socket (unix, or TCP as real device managers
 * also do), exchange the handshake
 * (kvmi_qemu2introspector -> tool, kvmi_introspector2qemu <- tool, SHA-1 of the
 * shared cookie checked), then hand the connected socket to KVM with
 * KVM_INTROSPECTION_HOOK. When the tool closes the connection QEMU unhooks the
 * VM; before pausing/migrating it runs PREUNHOOK, waits for the tool, UNHOOKs.
 */
import * as net from 'node:net';
import { debuglog } from 'node:util';
import {
  decodeIntrospector2Qemu, encodeQemu2Introspector, readStructSized, QEMU2INTROSPECTOR_NAME_MAX,
} from '../abi/kvmi.js';
import { KVM_INTROSPECTION_PREUNHOOK } from '../abi/ioctl.js';
import { KvmmemError, UsageError } from '../errors.js';
import { timingSafeEqual } from 'node:crypto';
import { cookieHash } from '../abi/cookie.js';
import type { ModelVm } from './host.js';
import type { UnhookAck } from './kvmi-server.js';
import { adoptSocket } from './sockets.js';

const debug = debuglog('kvmmem');

interface AttachCommon {
  /** Shared secret; default the host's `cookie`. None at all: the hash is not checked. */
  cookie?: string | Uint8Array;
  /** Give up on connect + handshake, all attempts included, after this long (default 5000 ms unix, 10000 ms TCP). */
  timeoutMs?: number;
  /**
   * Attempts after the first when the connection is refused, reset, or closed
   * before the tool sent a byte (default 0 unix, 50 TCP): a TCP forwarder such as
   * slirp's hostfwd accepts before anything listens behind it, then closes.
   */
  retries?: number;
  /** Wait before the first retry, doubled each time up to 1000 ms (default 100 ms). */
  retryDelayMs?: number;
  /**
   * An attempt on which the tool has sent nothing this long after connecting
   * is dropped and retried (default 3000 ms TCP; unix: timeoutMs, i.e. one
   * attempt): a forwarder may also hold a connection it cannot complete
   * (slirp while the guest's network is not up yet).
   */
  attemptTimeoutMs?: number;
}

/** Where the tool listens: `{ unix: path }` or `{ tcp: { host, port } }` (host default 127.0.0.1). */
export type AttachOptions = AttachCommon & (
  | { unix: string; tcp?: undefined }
  | { tcp: { host?: string; port: number }; unix?: undefined }
);

export interface Attachment {
  readonly vm: ModelVm;
  /** The connection, owned by the host from HOOK on. */
  readonly socket: net.Socket;
  readonly fd: number;
  /** struct_size the tool announced in its kvmi_introspector2qemu. */
  readonly toolStructSize: number;
}

export interface PreunhookOptions {
  /** How long to wait for the tool (default: the host's preunhookTimeoutMs, 3000 ms). */
  timeoutMs?: number;
}

function fail(message: string, code: string, errno: number, hint: string, cause?: unknown): KvmmemError {
  return new KvmmemError(message, { code, errno, syscall: 'kvmi_handshake', hint, ...(cause === undefined ? {} : { cause }) });
}

/** SHA-1(cookie) equality, in constant time. */
export function cookieMatches(cookie: string | Uint8Array, hash: Uint8Array): boolean {
  const want = cookieHash(cookie);
  return hash.length === want.length && timingSafeEqual(want, hash);
}

/** Truncate to what char name[64] holds, on a UTF-8 boundary. */
function handshakeName(name: string): string {
  let out = name.replace(/\0/g, '');
  while (Buffer.byteLength(out, 'utf8') > QEMU2INTROSPECTOR_NAME_MAX) out = out.slice(0, -1);
  return out;
}

interface Target {
  /** 'unix:PATH' or 'tcp:HOST:PORT', for messages. */
  label: string;
  tcp: boolean;
  connect(): net.Socket;
}

function targetOf(opts: AttachOptions): Target {
  if (opts === null || typeof opts !== 'object') throw new UsageError('attach: options are required: { unix: path } or { tcp: { host, port } }');
  if (typeof opts.unix === 'string' && opts.tcp === undefined) {
    const path = opts.unix;
    return { label: path, tcp: false, connect: () => net.createConnection({ path }) };
  }
  const tcp = opts.tcp as { host?: unknown; port?: unknown } | undefined;
  if (opts.unix === undefined && tcp !== null && typeof tcp === 'object') {
    const host = tcp.host ?? '127.0.0.1';
    const port = tcp.port;
    if (typeof host !== 'string' || host === '') throw new UsageError(`attach: tcp.host must be a non-empty string, got ${String(host)}`);
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`attach: tcp.port must be 1..65535, got ${String(port)}`);
    return {
      label: `tcp:${host.includes(':') ? `[${host}]` : host}:${port}`, tcp: true,
      connect: () => net.createConnection({ host, port, noDelay: true }),
    };
  }
  throw new UsageError('attach: give exactly one of { unix: path } or { tcp: { host, port } }');
}

/** A failed attempt: `retriable` when nothing of the tool was seen (refused, reset, closed before its first byte). */
interface Failure { error: KvmmemError; retriable: boolean }

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Connects `vm` to the tool listening on `opts.unix` or `opts.tcp` and hooks
 * it. Resolves once KVM_INTROSPECTION_HOOK succeeded; rejects (and closes the
 * socket) on a connect error, a bad or missing handshake reply, a cookie
 * mismatch, a timeout, or a HOOK error (EEXIST, EPERM...). A refused, reset or
 * at-once-closed connection is retried `retries` times within `timeoutMs`;
 * the last error then names the attempts and what was waited for.
 */
export async function attach(vm: ModelVm, opts: AttachOptions): Promise<Attachment> {
  const target = targetOf(opts);
  const timeoutMs = opts.timeoutMs ?? (target.tcp ? 10_000 : 5000);
  const retries = opts.retries ?? (target.tcp ? 50 : 0);
  const retryDelayMs = opts.retryDelayMs ?? 100;
  const attemptTimeoutMs = opts.attemptTimeoutMs ?? (target.tcp ? 3000 : timeoutMs);
  if (!(attemptTimeoutMs > 0)) throw new UsageError(`attach: attemptTimeoutMs must be positive, got ${String(attemptTimeoutMs)}`);
  if (!(timeoutMs > 0)) throw new UsageError(`attach: timeoutMs must be positive, got ${String(timeoutMs)}`);
  if (!Number.isInteger(retries) || retries < 0) throw new UsageError(`attach: retries must be a non-negative integer, got ${String(retries)}`);
  if (!(retryDelayMs >= 0)) throw new UsageError(`attach: retryDelayMs must be >= 0, got ${String(retryDelayMs)}`);
  const cookie = opts.cookie ?? vm.host.cookie;
  const t0 = Date.now();
  const deadline = t0 + timeoutMs;
  for (let attempt = 1; ; attempt++) {
    const left = Math.max(1, deadline - Date.now());
    const r = await attachOnce(vm, target, cookie, Math.min(left, attemptTimeoutMs), attemptTimeoutMs < left);
    if (!('error' in r)) return r;
    const delay = Math.min(1000, retryDelayMs * 2 ** (attempt - 1));
    if (!r.retriable || attempt > retries || Date.now() + delay >= deadline) {
      if (attempt === 1) throw r.error;
      const e = r.error;
      throw new KvmmemError(`attach ${vm.label} to ${target.label}: ${attempt} attempts in ${Date.now() - t0} ms, the last: ${e.message}`, {
        code: e.code, ...(e.errno === undefined ? {} : { errno: e.errno }), syscall: 'kvmi_handshake', cause: e,
        hint: target.tcp
          ? 'nothing answered the handshake there: is the introspection tool listening (kvmmem --listen tcp:HOST:PORT)? A forwarder (slirp hostfwd) accepts and closes until it does'
          : 'the introspection tool must be listening on that socket',
      });
    }
    debug('%s: attach attempt %d to %s failed (%s): retrying in %d ms', vm.label, attempt, target.label, r.error.message, delay);
    await sleep(delay);
  }
}

/** One connect + handshake; silence for `timeoutMs` is retriable when `silenceRetriable` (time is left for another attempt). */
function attachOnce(vm: ModelVm, target: Target, cookie: string | Uint8Array | undefined, timeoutMs: number, silenceRetriable: boolean): Promise<Attachment | Failure> {
  const where = target.label;
  return new Promise<Attachment | Failure>((resolve) => {
    const socket = target.connect();
    let received = 0;
    let buf: Buffer = Buffer.alloc(0);
    let settled = false;
    const finish = (err: KvmmemError | null, value?: Attachment, retriable = false) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
      if (err !== null) {
        socket.on('error', () => {}); // a late error of a socket we dropped is no one's
        socket.destroy();
        resolve({ error: err, retriable });
      } else {
        resolve(value!);
      }
    };
    const timer = setTimeout(() => finish(fail(`kvmi handshake with ${where}: no reply within ${timeoutMs} ms${received === 0 ? '' : ` (${received} bytes of it)`}`, 'ETIMEDOUT', -110,
      'the tool must answer kvmi_qemu2introspector with a kvmi_introspector2qemu (struct_size, SHA-1 of the cookie)'), undefined, silenceRetriable && received === 0), timeoutMs);
    const onError = (e: NodeJS.ErrnoException) => finish(fail(`connect ${where}: ${e.message}`, e.code ?? 'ECONNREFUSED',
      typeof e.errno === 'number' ? -Math.abs(e.errno) : -111,
      `the introspection tool must be listening on ${where} before the VM is attached`, e), undefined, received === 0);
    const onClose = () => finish(fail(`kvmi handshake with ${where}: the tool closed the connection${received === 0 ? ' before sending anything' : ` after ${received} bytes`}`, 'ECONNRESET', -104,
      'the tool hung up during the handshake (wrong protocol, or it rejected the VM)'), undefined, received === 0);
    const onData = (chunk: Buffer) => {
      received += chunk.length;
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      let got;
      try {
        got = readStructSized(buf);
      } catch (e) {
        finish(fail(`kvmi handshake with ${where}: bad kvmi_introspector2qemu`, 'EPROTO', -71, 'struct_size must be 4..4096', e));
        return;
      }
      if (got === null) return;
      let reply;
      try {
        reply = decodeIntrospector2Qemu(got.struct);
      } catch (e) {
        finish(fail(`kvmi handshake with ${where}: bad kvmi_introspector2qemu`, 'EPROTO', -71, 'the reply must be a well-formed kvmi_introspector2qemu', e));
        return;
      }
      if (cookie !== undefined && !cookieMatches(cookie, reply.cookieHash)) {
        debug('%s: handshake cookie hash mismatch: closing', vm.label);
        finish(fail(`kvmi handshake with ${where}: cookie hash mismatch`, 'EACCES', -13,
          'the tool must send SHA-1 of the same cookie the host (device manager) was configured with'));
        return;
      }
      // Bytes the tool sent after its handshake are its first KVMI messages: give them back.
      const rest = buf.subarray(got.consumed);
      socket.off('data', onData);
      socket.pause();
      if (rest.length > 0) socket.unshift(rest);
      let fd: number;
      try {
        fd = adoptSocket(socket);
        vm.hook({ fd, padding: 0, uuid: vm.uuidBytes });
      } catch (e) {
        finish(e instanceof KvmmemError ? e : fail(`hook ${vm.label}: ${(e as Error).message}`, 'EINVAL', -22, 'see the cause', e));
        return;
      }
      // QEMU unhooks when the tool goes away.
      socket.once('close', () => {
        if (vm.connection?.socket === socket && vm.hooked && vm.host.introspection) {
          debug('%s: the tool closed the connection: unhooking', vm.label);
          vm.unhook();
        }
      });
      finish(null, { vm, socket, fd, toolStructSize: reply.structSize });
    };
    socket.on('error', onError);
    socket.on('close', onClose);
    socket.on('data', onData);
    socket.once('connect', () => {
      socket.write(encodeQemu2Introspector({
        uuid: vm.uuidBytes,
        startTime: vm.startTime,
        name: handshakeName(vm.name),
      }));
    });
  });
}

/**
 * PREUNHOOK (the KVM_INTROSPECTION_PREUNHOOK patch) as the device manager runs it: the ioctl (throws
 * EPERM, EFAULT when not hooked, ENOENT when the socket errored or the tool
 * did not enable the UNHOOK event), then wait until the tool replies to the
 * event or closes the socket, or the timeout passes; then UNHOOK. Resolves
 * with what ended the wait.
 */
export async function preunhook(vm: ModelVm, opts: PreunhookOptions = {}): Promise<UnhookAck> {
  vm.ioctl(KVM_INTROSPECTION_PREUNHOOK);
  const ack = await vm._waitUnhookAck(opts.timeoutMs ?? vm.host.preunhookTimeoutMs);
  debug('%s: preunhook: %s', vm.label, ack);
  if (vm.hooked && vm.host.introspection) vm.unhook();
  return ack;
}
