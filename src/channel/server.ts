/**
 * The introspection tool's end of KVMI: like libkvmi, the tool listens (unix
 * socket, vsock or TCP) and device managers connect, one connection per VM.
 *
 * Per connection: read kvmi_qemu2introspector (struct_size first; larger
 * structs from newer peers are accepted and cut, shorter ones zero-filled),
 * answer kvmi_introspector2qemu {24, SHA-1(cookie)}, then GET_VERSION and
 * CONTROL_VM_EVENTS(UNHOOK) (v6), and only then announce the VM ('vm').
 * A failure before that is reported as 'rejected' ({ reason, error }) and the
 * connection is closed. The device manager checks the cookie hash and hangs up
 * on a mismatch, so a wrong cookie shows up here as the peer closing before
 * answering GET_VERSION: 'handshake rejected by the device manager (wrong cookie?)'.
 *
 * vsock: Node cannot drive AF_VSOCK fds, so that transport runs on raw fds
 * (./rawfd.ts); the connection logic takes any Duplex (see adopt()).
 *
 * Who may connect (unix): the socket file gets `mode` (0600) right after
 * bind, whatever the umask; every accepted peer's SO_PEERCRED uid must be in
 * `allowUids` (root and our euid), else it is closed before the handshake;
 * a VM whose UUID is already connected is refused before the cookie hash is
 * sent. The cookie is required: the handshake answer proves only knowledge of
 * SHA-1(cookie), so it must not be a value every install shares.
 *
 * TCP: the same handshake and cookie; there is no SO_PEERCRED for a TCP peer,
 * so `allowUids` cannot apply and giving it with a TCP address is a
 * UsageError. The host defaults to 127.0.0.1; anyone who can connect to the
 * port receives SHA-1(cookie) (see README "Who may connect"). Nagle is off
 * (one request, one reply). At most `maxHandshakes` connections may be in
 * the handshake at once, on any transport; more are closed at once.
 */
import { EventEmitter } from 'node:events';
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { debuglog } from 'node:util';
import {
  decodeQemu2Introspector, encodeIntrospector2Qemu, readStructSized, type KvmiProtocol, type Qemu2Introspector,
} from '../abi/kvmi.js';
import { cookieHash } from '../abi/cookie.js';
import { KvmmemError, UsageError } from '../errors.js';
import { peerCred } from '../sys/peercred.js';
import { ChannelLimitError, PeerRefusedError, ProtocolError, ServerClosedError, TimeoutError, VmGoneError } from './errors.js';
import { RawSocketListener } from './rawfd.js';
import { formatUuid, resolveLimits, Vm, type ChannelLimits } from './vm.js';

const debug = debuglog('kvmmem');

export type ListenAddress = { unix: string } | { vsock: number; cid?: number } | { tcp: { host?: string; port: number } };
export type BoundAddress = { unix: string } | { vsock: number; cid: number } | { tcp: { host: string; port: number } };

/** 'unix:PATH', 'vsock:PORT' (cid when not any), 'tcp:HOST:PORT': how the CLI writes addresses. */
export function formatAddress(a: BoundAddress | ListenAddress): string {
  if ('unix' in a) return `unix:${a.unix}`;
  if ('vsock' in a) return `vsock:${a.vsock}${a.cid === undefined || a.cid === 0xffffffff ? '' : ` (cid ${a.cid})`}`;
  const host = a.tcp.host ?? DEFAULT_TCP_HOST;
  return `tcp:${host.includes(':') ? `[${host}]` : host}:${a.tcp.port}`;
}

/** Where a TCP listener binds when no host is given: loopback only. */
export const DEFAULT_TCP_HOST = '127.0.0.1';

export interface IntrospectionServerOptions {
  /** Shared secret (required, non-empty); its SHA-1 goes into the handshake reply. */
  cookie: string | Uint8Array;
  /** Mode of the unix socket file, set right after bind whatever the umask (default 0o600). */
  mode?: number;
  /** uids (SO_PEERCRED) allowed to connect over unix (default [0, process.geteuid()]); not with TCP (UsageError). */
  allowUids?: readonly number[];
  /** Connections in the handshake at once, all transports (default 64); more are closed at once and reported 'rejected'. */
  maxHandshakes?: number;
  /** Per-connection bounds (see ChannelLimits). */
  limits?: Partial<ChannelLimits>;
  /** Message ids to speak (default 'v6'). */
  protocol?: KvmiProtocol;
  /** Time for the device manager to send its handshake struct (default 5000 ms). */
  handshakeTimeoutMs?: number;
  /** Per-request reply timeout (default 10000 ms). */
  requestTimeoutMs?: number;
  /** A partial frame stalled this long is a violation (default: requestTimeoutMs). */
  frameTimeoutMs?: number;
  /** Enable KVMI_EVENT_UNHOOK with CONTROL_VM_EVENTS on connect (v6; default true). */
  enableUnhookEvent?: boolean;
  /** Each Vm closes its socket after answering UNHOOK (default true). */
  autoCloseOnUnhook?: boolean;
}

export interface RejectedInfo {
  reason: string;
  /** A ProtocolError (handshake/framing), TimeoutError or the socket error. */
  error: Error;
  transport: string;
  /** Known once the handshake struct was read. */
  uuid?: string;
  name?: string;
}

export interface VmFilter { name?: string; uuid?: string }

export declare interface IntrospectionServer {
  on(event: 'vm', listener: (vm: Vm) => void): this;
  on(event: 'rejected', listener: (info: RejectedInfo) => void): this;
  on(event: 'error', listener: (err: Error) => void): this;
  once(event: 'vm', listener: (vm: Vm) => void): this;
  once(event: 'rejected', listener: (info: RejectedInfo) => void): this;
  once(event: 'error', listener: (err: Error) => void): this;
}

type Resolved = Required<Omit<IntrospectionServerOptions, 'cookie' | 'limits' | 'allowUids'>> & {
  /** Whether allowUids was given (it cannot apply to TCP). */
  allowUidsGiven: boolean;
  limits: Readonly<ChannelLimits>;
  allowUids: readonly number[];
};

export class IntrospectionServer extends EventEmitter {
  readonly options: Readonly<Resolved>;
  readonly #hash: Uint8Array;
  #address: BoundAddress | null = null;
  #net: net.Server | null = null;
  #raw: RawSocketListener | null = null;
  #unixIno: number | null = null;
  #closed = false;
  #handshaking = new Set<Duplex>();
  /** UUIDs of VMs past the handshake (initializing or announced) whose connection is open. */
  #uuids = new Set<string>();
  #initializing = new Set<Vm>();
  #vms = new Set<Vm>();
  #waiters = new Set<(vm: Vm | Error) => boolean>();

  private constructor(options: IntrospectionServerOptions) {
    super();
    if (options === null || typeof options !== 'object') throw new UsageError('IntrospectionServer options are required: { cookie, ... }');
    const cookie = options.cookie as unknown;
    if (cookie === undefined || cookie === null) {
      throw new UsageError('a cookie is required: pass { cookie } (the secret the device manager was configured with)',
        'there is no default: a shared default would let anyone who knows it pass the handshake');
    }
    if (typeof cookie !== 'string' && !(cookie instanceof Uint8Array)) throw new UsageError('cookie must be a string or a Uint8Array');
    if (cookie.length === 0) throw new UsageError('cookie must not be empty');
    const mode = options.mode ?? 0o600;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) throw new UsageError(`mode must be a file mode in 0..0o777, got ${String(mode)}`);
    const euid = process.geteuid?.() ?? 0;
    const allowUids = options.allowUids ?? [...new Set([0, euid])];
    if (!Array.isArray(allowUids) || allowUids.some((u) => !Number.isInteger(u) || u < 0 || u > 0xffffffff)) {
      throw new UsageError('allowUids must be an array of uids (non-negative integers)');
    }
    const protocol = options.protocol ?? 'v6';
    if (protocol !== 'v4' && protocol !== 'v6') throw new UsageError(`protocol must be 'v4' or 'v6', got ${JSON.stringify(protocol)}`);
    const requestTimeoutMs = checkMs('requestTimeoutMs', options.requestTimeoutMs ?? 10_000);
    this.options = Object.freeze({
      protocol,
      handshakeTimeoutMs: checkMs('handshakeTimeoutMs', options.handshakeTimeoutMs ?? 5000),
      requestTimeoutMs,
      frameTimeoutMs: checkMs('frameTimeoutMs', options.frameTimeoutMs ?? requestTimeoutMs),
      enableUnhookEvent: options.enableUnhookEvent ?? true,
      autoCloseOnUnhook: options.autoCloseOnUnhook ?? true,
      mode,
      allowUids: Object.freeze([...allowUids]),
      allowUidsGiven: options.allowUids !== undefined,
      maxHandshakes: checkCount('maxHandshakes', options.maxHandshakes ?? 64),
      limits: resolveLimits(options.limits, requestTimeoutMs),
    });
    this.#hash = cookieHash(cookie);
  }

  /**
   * Listens on a unix socket path, a vsock port (cid default VMADDR_CID_ANY;
   * port 0xffffffff = any) or a TCP port (host default 127.0.0.1; port 0 = any
   * free port, see `address`).
   */
  static async listen(address: ListenAddress, options: IntrospectionServerOptions): Promise<IntrospectionServer> {
    const server = new IntrospectionServer(options);
    if (address !== null && typeof address === 'object' && 'unix' in address && typeof address.unix === 'string') {
      await server.#listenUnix(address.unix);
    } else if (address !== null && typeof address === 'object' && 'vsock' in address && typeof address.vsock === 'number') {
      server.#listenVsock(address.vsock, address.cid);
    } else if (address !== null && typeof address === 'object' && 'tcp' in address && address.tcp !== null && typeof address.tcp === 'object') {
      if (server.options.allowUidsGiven) {
        throw new UsageError('allowUids cannot apply to a TCP listener: a TCP peer has no SO_PEERCRED credentials',
          'drop allowUids for TCP; who may connect is then whoever can reach the port (bind to 127.0.0.1, or firewall it) and knows the cookie');
      }
      await server.#listenTcp(address.tcp.host ?? DEFAULT_TCP_HOST, address.tcp.port);
    } else {
      throw new UsageError('listen address must be { unix: path }, { vsock: port, cid? } or { tcp: { host?, port } }');
    }
    return server;
  }

  /** A server without a listener: feed it connected streams with adopt() (custom transports, socat bridges, tests). */
  static create(options: IntrospectionServerOptions): IntrospectionServer {
    return new IntrospectionServer(options);
  }

  /** Where it listens; null for a server from create(). */
  get address(): BoundAddress | null {
    const a = this.#address;
    if (a === null) return null;
    return 'tcp' in a ? { tcp: { ...a.tcp } } : { ...a };
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Announced VMs whose connection is still open (connected or unhooking). */
  vms(): Vm[] {
    return [...this.#vms];
  }

  /**
   * Resolves with a connected VM matching the filter (all given fields must
   * match; uuid case-insensitively), one already connected included.
   */
  waitForVm(filter: VmFilter = {}, timeoutMs = 30_000): Promise<Vm> {
    const match = (vm: Vm) => vm.state === 'connected'
      && (filter.name === undefined || vm.name === filter.name)
      && (filter.uuid === undefined || vm.uuid === filter.uuid.toLowerCase());
    const found = this.vms().find(match);
    if (found !== undefined) return Promise.resolve(found);
    if (this.#closed) return Promise.reject(new ServerClosedError('waitForVm'));
    return new Promise<Vm>((resolve, reject) => {
      const waiter = (vm: Vm | Error): boolean => {
        if (vm instanceof Error) {
          done();
          reject(vm);
          return true;
        }
        if (!match(vm)) return false;
        done();
        resolve(vm);
        return true;
      };
      const timer = setTimeout(() => {
        done();
        const what = [filter.name === undefined ? '' : `name ${JSON.stringify(filter.name)}`, filter.uuid === undefined ? '' : `uuid ${filter.uuid}`].filter(Boolean).join(', ');
        reject(new TimeoutError(`waiting for a VM${what === '' ? '' : ` (${what})`}`, timeoutMs, {
          hint: 'no matching device manager connected: check that QEMU points at this socket and uses the same cookie (see the server\'s \'rejected\' events)',
        }));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.#waiters.delete(waiter);
      };
      this.#waiters.add(waiter);
    });
  }

  /**
   * Runs the tool side of the protocol on an already connected stream: the
   * handshake, then a Vm. `transport` only labels messages. Peer credentials
   * are checked only on this server's own unix listener: a caller adopting
   * a stream has decided who is on its other end.
   */
  adopt(stream: Duplex, transport = 'stream'): void {
    stream.on('error', (e: Error) => debug('%s connection: socket error %s', transport, e.message)); // never unhandled
    if (this.#closed) {
      stream.destroy();
      return;
    }
    const max = this.options.maxHandshakes;
    if (this.#handshaking.size >= max) {
      stream.destroy();
      const what = `${max} connections are already in the handshake (maxHandshakes)`;
      this.#rejected({ reason: what, transport, error: new ChannelLimitError('handshakes', max + 1, max, what) });
      return;
    }
    this.#handshake(stream, transport);
  }

  /** Stops listening, closes every connection (VMs get 'gone'), removes the unix socket file. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const err = new ServerClosedError('waitForVm');
    for (const w of [...this.#waiters]) w(err);
    for (const vm of [...this.#vms, ...this.#initializing]) vm.close('introspection server closed');
    for (const s of [...this.#handshaking]) s.destroy();
    if (this.#raw !== null) this.#raw.close();
    if (this.#net !== null) {
      const srv = this.#net;
      await new Promise<void>((resolve) => srv.close(() => resolve()));
      this.#unlinkOwnSocket();
    }
    debug('introspection server closed');
  }

  // ---- listening ----

  async #listenUnix(path: string): Promise<void> {
    await removeStaleSocket(path);
    const srv = net.createServer({ allowHalfOpen: false });
    await new Promise<void>((resolve, reject) => {
      const onError = (e: NodeJS.ErrnoException) => {
        reject(new KvmmemError(`listen ${path}: ${e.message}`, {
          code: e.code ?? 'EIO', ...(e.errno === undefined ? {} : { errno: e.errno }), syscall: 'listen', path, cause: e,
          ...(e.code === 'EACCES' ? { hint: 'no permission to create the socket there: choose a directory you own' } : {}),
        }));
      };
      srv.once('error', onError);
      srv.listen(path, () => {
        srv.off('error', onError);
        resolve();
      });
      // Node binds inside listen(), synchronously (`listening` is true on return
      // only if bind + listen succeeded; a failure is emitted as 'error' later):
      // set the mode now, before the event loop accepts anyone. Not atomic with
      // bind: a peer that connect()s in those microseconds passed the umask's
      // mode, and still meets the SO_PEERCRED check when accepted.
      if (srv.listening) {
        try {
          chmodSync(path, this.options.mode);
        } catch (e) {
          srv.off('error', onError);
          srv.close();
          onError(e as NodeJS.ErrnoException);
        }
      }
    });
    this.#net = srv;
    try {
      this.#unixIno = lstatSync(path).ino;
    } catch { /* removed behind our back */ }
    this.#address = { unix: path };
    srv.on('connection', (s: net.Socket) => {
      if (this.#peerAllowed(s)) this.adopt(s, 'unix');
    });
    srv.on('error', (e: Error) => this.#emitError(e));
    debug('introspection server listening on unix:%s', path);
  }

  async #listenTcp(host: unknown, port: unknown): Promise<void> {
    if (typeof host !== 'string' || host === '') throw new UsageError(`tcp.host must be a non-empty string, got ${String(host)}`);
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`tcp.port must be 0..65535 (0: any free port), got ${String(port)}`);
    const label = `tcp:${host.includes(':') ? `[${host}]` : host}:${port}`;
    const srv = net.createServer({ allowHalfOpen: false, noDelay: true });
    await new Promise<void>((resolve, reject) => {
      const onError = (e: NodeJS.ErrnoException) => {
        reject(new KvmmemError(`listen ${label}: ${e.message}`, {
          code: e.code ?? 'EIO', ...(e.errno === undefined ? {} : { errno: e.errno }), syscall: 'listen', cause: e,
          ...(e.code === 'EADDRINUSE' ? { hint: 'another process listens on that port: choose another (port 0 picks a free one)' } : {}),
          ...(e.code === 'EADDRNOTAVAIL' || e.code === 'ENOTFOUND' ? { hint: 'that host is not an address of this machine' } : {}),
          ...(e.code === 'EACCES' ? { hint: 'ports below 1024 need privileges' } : {}),
        }));
      };
      srv.once('error', onError);
      srv.listen({ host, port }, () => {
        srv.off('error', onError);
        resolve();
      });
    });
    this.#net = srv;
    const a = srv.address() as net.AddressInfo;
    this.#address = { tcp: { host: a.address, port: a.port } };
    srv.on('connection', (s: net.Socket) => {
      s.setNoDelay(true);
      this.adopt(s, 'tcp');
    });
    srv.on('error', (e: Error) => this.#emitError(e));
    debug('introspection server listening on tcp:%s:%d', a.address, a.port);
  }

  #listenVsock(port: number, cid?: number): void {
    const l = RawSocketListener.listenVsock(port, cid);
    this.#raw = l;
    const a = l.address as { port: number; cid: number };
    this.#address = { vsock: a.port, cid: a.cid };
    l.on('connection', (s: Duplex) => this.adopt(s, 'vsock'));
    l.on('error', (e: Error) => this.#emitError(e));
    debug('introspection server listening on vsock:%d (cid %d)', a.port, a.cid);
  }

  /** SO_PEERCRED against allowUids; a refused peer is closed at once (it never sees the cookie hash). */
  #peerAllowed(s: net.Socket): boolean {
    const fd = (s as unknown as { _handle?: { fd?: number } })._handle?.fd;
    let reason: string;
    try {
      if (typeof fd !== 'number' || fd < 0) throw new Error('no file descriptor');
      const cred = peerCred(fd);
      if (this.options.allowUids.includes(cred.uid)) return true;
      reason = `unix peer uid ${cred.uid} (pid ${cred.pid}) is not allowed to connect (allowUids: ${this.options.allowUids.join(', ')})`;
    } catch (e) {
      reason = `unix peer credentials unavailable (${(e as Error).message})`;
    }
    s.on('error', () => {});
    s.destroy();
    this.#rejected({
      reason, transport: 'unix',
      error: new PeerRefusedError(reason, 'EACCES', 'add the uid to the server\'s allowUids if it is a device manager you trust'),
    });
    return false;
  }

  #unlinkOwnSocket(): void {
    if (this.#address === null || !('unix' in this.#address)) return;
    const path = this.#address.unix;
    try {
      const st = lstatSync(path);
      if (st.isSocket() && (this.#unixIno === null || st.ino === this.#unixIno)) unlinkSync(path);
    } catch { /* already gone */ }
  }

  #emitError(e: Error): void {
    if (this.listenerCount('error') > 0) this.emit('error', e);
    else debug('introspection server error (no listener): %s', e.message);
  }

  // ---- per connection ----

  #handshake(stream: Duplex, transport: string): void {
    let buf: Buffer = Buffer.alloc(0);
    let done = false;
    this.#handshaking.add(stream);
    const cleanup = () => {
      done = true;
      this.#handshaking.delete(stream);
      clearTimeout(timer);
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('close', onEnd);
      stream.off('error', onError);
    };
    const fail = (reason: string, cause?: unknown) => {
      if (done) return;
      cleanup();
      stream.destroy();
      this.#rejected({ reason, error: new ProtocolError(reason, cause === undefined ? {} : { cause }), transport });
    };
    const expected = () => (buf.length >= 4 ? buf.readUInt32LE(0) : undefined);
    const onData = (chunk: Buffer) => {
      if (done) return;
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      let r: ReturnType<typeof readStructSized>;
      let hello: Qemu2Introspector;
      try {
        r = readStructSized(buf);
        if (r === null) return;
        hello = decodeQemu2Introspector(r.struct);
      } catch (e) {
        fail(`malformed handshake: ${(e as Error).message}`, e);
        return;
      }
      cleanup();
      if (hello.padding !== 0) debug('%s handshake: non-zero padding 0x%s ignored', transport, hello.padding.toString(16));
      const uuid = formatUuid(hello.uuid);
      if (this.#uuids.has(uuid)) {
        stream.destroy();
        const reason = `a VM with UUID ${uuid} is already connected`;
        this.#rejected({
          reason, transport, uuid, name: hello.name,
          error: new PeerRefusedError(reason, 'EEXIST', 'one connection per VM: the device manager must close the old one (or unhook) first'),
        });
        return;
      }
      this.#uuids.add(uuid);
      stream.write(encodeIntrospector2Qemu({ cookieHash: this.#hash }));
      void this.#initVm(stream, hello, transport, buf.subarray(r.consumed));
    };
    const onEnd = () => {
      const n = expected();
      fail(buf.length === 0 ? 'connection closed before the handshake'
        : `connection closed during the handshake (truncated kvmi_qemu2introspector: ${buf.length} of ${n === undefined ? 'at least 4' : n} bytes)`);
    };
    const onError = (e: Error) => fail(`socket error during the handshake: ${e.message}`, e);
    const timer = setTimeout(() => {
      fail(`handshake timed out after ${this.options.handshakeTimeoutMs} ms (received ${buf.length} bytes of kvmi_qemu2introspector)`);
    }, this.options.handshakeTimeoutMs);
    timer.unref();
    stream.on('data', onData);
    stream.on('end', onEnd);
    stream.on('close', onEnd);
    stream.on('error', onError);
  }

  async #initVm(stream: Duplex, hello: Qemu2Introspector, transport: string, leftover: Buffer): Promise<void> {
    const o = this.options;
    const vm = new Vm(stream, hello, {
      protocol: o.protocol, requestTimeoutMs: o.requestTimeoutMs, frameTimeoutMs: o.frameTimeoutMs,
      autoCloseOnUnhook: o.autoCloseOnUnhook, transport, limits: o.limits,
    }, leftover);
    // The UUID is free again once this connection is gone, whatever ends it.
    if (vm.state === 'gone') this.#uuids.delete(vm.uuid);
    else vm.once('gone', () => this.#uuids.delete(vm.uuid));
    this.#initializing.add(vm);
    try {
      if (vm.state !== 'connected') throw new VmGoneError(vm.goneInfo?.reason ?? 'closed');
      await vm._init({ enableUnhookEvent: o.enableUnhookEvent });
      if (vm.state !== 'connected') throw new VmGoneError(vm.goneInfo?.reason ?? 'closed');
    } catch (e) {
      vm.close(`initialisation failed: ${(e as Error).message}`);
      const info = vm.goneInfo;
      const reason = info?.reason ?? (e as Error).message;
      let error: Error = e as Error;
      if (info?.error instanceof ProtocolError) error = info.error;
      else if (!(error instanceof ProtocolError) && !(error instanceof TimeoutError)) error = new ProtocolError(reason, { cause: e });
      this.#rejected({ reason, error, transport, uuid: vm.uuid, name: vm.name });
      return;
    } finally {
      this.#initializing.delete(vm);
    }
    if (this.#closed) {
      vm.close('introspection server closed');
      return;
    }
    this.#vms.add(vm);
    vm.once('gone', () => this.#vms.delete(vm));
    debug('introspection server: VM %s (%s) ready, KVMI version %d', vm.name, vm.uuid, vm.version);
    for (const w of [...this.#waiters]) if (w(vm)) break;
    try {
      this.emit('vm', vm);
    } catch (e) {
      process.nextTick(() => { throw e; }); // a throwing 'vm' listener is the caller's bug: surface it
    }
  }

  #rejected(info: RejectedInfo): void {
    debug('introspection server: %s connection rejected: %s', info.transport, info.reason);
    if (this.#closed) return;
    this.emit('rejected', info);
  }
}

function checkCount(what: string, v: number): number {
  if (!Number.isSafeInteger(v) || v < 1) throw new UsageError(`${what} must be a positive integer, got ${String(v)}`);
  return v;
}

function checkMs(what: string, v: number): number {
  if (typeof v !== 'number' || Number.isNaN(v) || v <= 0) throw new UsageError(`${what} must be a positive number of milliseconds, got ${String(v)}`);
  return v;
}

/**
 * A leftover socket file from a previous run blocks listen(). Remove it only
 * if it is a socket nobody accepts on; a live one is an error (another tool
 * is serving there), anything else is never touched.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    throw new KvmmemError(`listen ${path}: the path exists and is not a socket`, {
      code: 'EADDRINUSE', errno: -98, syscall: 'listen', path, hint: 'choose another path or remove that file yourself',
    });
  }
  const live = await new Promise<boolean>((resolve) => {
    const c = net.connect(path);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
  if (live) {
    throw new KvmmemError(`listen ${path}: another process is accepting connections on this socket`, {
      code: 'EADDRINUSE', errno: -98, syscall: 'listen', path, hint: 'stop the other introspection tool or choose another path',
    });
  }
  try {
    unlinkSync(path);
    debug('removed stale socket %s', path);
  } catch { /* raced with someone else: listen() will tell */ }
}

