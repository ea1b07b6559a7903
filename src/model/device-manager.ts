/**
 * The device manager's part (QEMU's, in real life): connect to the
 * introspection tool's listening unix socket, exchange the handshake
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
import { KvmmemError } from '../errors.js';
import { timingSafeEqual } from 'node:crypto';
import { cookieHash } from '../abi/cookie.js';
import type { ModelVm } from './host.js';
import type { UnhookAck } from './kvmi-server.js';
import { adoptSocket } from './sockets.js';

const debug = debuglog('kvmmem');

export interface AttachOptions {
  /** Path of the tool's listening unix socket. */
  unix: string;
  /** Shared secret; default the host's `cookie`. None at all: the hash is not checked. */
  cookie?: string | Uint8Array;
  /** Give up on connect + handshake after this long (default 5000 ms). */
  timeoutMs?: number;
}

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

/**
 * Connects `vm` to the tool listening on `opts.unix` and hooks it. Resolves
 * once KVM_INTROSPECTION_HOOK succeeded; rejects (and closes the socket) on a
 * connect error, a bad or missing handshake reply, a cookie mismatch, a
 * timeout, or a HOOK error (EEXIST, EPERM...).
 */
export function attach(vm: ModelVm, opts: AttachOptions): Promise<Attachment> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  const cookie = opts.cookie ?? vm.host.cookie;
  return new Promise<Attachment>((resolve, reject) => {
    const socket = net.createConnection({ path: opts.unix });
    let buf: Buffer = Buffer.alloc(0);
    let settled = false;
    const finish = (err: KvmmemError | null, value?: Attachment) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
      if (err !== null) {
        socket.destroy();
        reject(err);
      } else {
        resolve(value!);
      }
    };
    const timer = setTimeout(() => finish(fail(`kvmi handshake with ${opts.unix}: no reply within ${timeoutMs} ms`, 'ETIMEDOUT', -110,
      'the tool must answer kvmi_qemu2introspector with a kvmi_introspector2qemu (struct_size, SHA-1 of the cookie)')), timeoutMs);
    const onError = (e: NodeJS.ErrnoException) => finish(fail(`connect ${opts.unix}: ${e.message}`, e.code ?? 'ECONNREFUSED',
      typeof e.errno === 'number' ? -Math.abs(e.errno) : -111,
      'the introspection tool must be listening on that unix socket before the VM is attached', e));
    const onClose = () => finish(fail(`kvmi handshake with ${opts.unix}: the tool closed the connection`, 'ECONNRESET', -104,
      'the tool hung up during the handshake (wrong protocol, or it rejected the VM)'));
    const onData = (chunk: Buffer) => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      let got;
      try {
        got = readStructSized(buf);
      } catch (e) {
        finish(fail(`kvmi handshake with ${opts.unix}: bad kvmi_introspector2qemu`, 'EPROTO', -71, 'struct_size must be 4..4096', e));
        return;
      }
      if (got === null) return;
      let reply;
      try {
        reply = decodeIntrospector2Qemu(got.struct);
      } catch (e) {
        finish(fail(`kvmi handshake with ${opts.unix}: bad kvmi_introspector2qemu`, 'EPROTO', -71, 'the reply must be a well-formed kvmi_introspector2qemu', e));
        return;
      }
      if (cookie !== undefined && !cookieMatches(cookie, reply.cookieHash)) {
        debug('%s: handshake cookie hash mismatch: closing', vm.label);
        finish(fail(`kvmi handshake with ${opts.unix}: cookie hash mismatch`, 'EACCES', -13,
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
 * PREUNHOOK (seed 004) as the device manager runs it: the ioctl (throws
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
