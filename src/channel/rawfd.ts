/**
 * Socket I/O on raw file descriptors, for socket families Node cannot drive
 * itself (AF_VSOCK: `net.Socket({ fd })` throws ERR_INVALID_FD_TYPE).
 *
 * Design: every fd is non-blocking and read/written synchronously on the JS
 * thread (a few µs per call through ffi-rs). Readiness comes from ONE poll(2)
 * at a time over all registered fds plus a wake pipe, run on a libuv
 * thread-pool thread (ffi-rs `runInNewThread`). Blocking read()/accept() per
 * connection on the pool was measured to starve it: Node's pool has 4 threads,
 * and 6 blocked reads delayed an unrelated fs.readFile by a full second. Here
 * the transport holds at most one pool thread, however many connections.
 *
 * fds are closed only while no poll() is in flight (closing an fd another
 * thread is polling would let its number be reused under that poll).
 */
import { Duplex } from 'node:stream';
import { EventEmitter } from 'node:events';
import { debuglog } from 'node:util';
import * as libc from '../sys/libc.js';
import { ERRNO } from '../abi/errno.js';
import { SyscallError } from '../errors.js';

const debug = debuglog('kvmmem');

/** Longest a single poll() waits even without a wake-up (a safety net only). */
const POLL_MAX_WAIT_MS = 1000;

interface Registration {
  fd: number;
  events: number;
  onReady(revents: number): void;
}

/** The process-wide poller (one poll() in flight at most). */
class FdPoller {
  #regs = new Map<number, Registration>();
  #toClose: number[] = [];
  #running = false;
  #polling = false;
  #wake: [number, number] | null = null;
  #wakeByte = Buffer.from([1]);
  #drain = Buffer.alloc(64);

  /** For tests and diagnostics. */
  get registered(): number {
    return this.#regs.size;
  }

  get running(): boolean {
    return this.#running;
  }

  register(fd: number, onReady: (revents: number) => void): Registration {
    if (this.#regs.has(fd)) throw new Error(`fd ${fd} is already registered with the poller`);
    const reg: Registration = { fd, events: 0, onReady };
    this.#regs.set(fd, reg);
    return reg;
  }

  setEvents(reg: Registration, events: number): void {
    if (reg.events === events || this.#regs.get(reg.fd) !== reg) return;
    reg.events = events;
    this.#kick();
  }

  /** Stops watching `reg`; closes its fd now or, while a poll() is in flight, right after it returns. */
  unregister(reg: Registration, closeFd: boolean): void {
    if (this.#regs.get(reg.fd) === reg) this.#regs.delete(reg.fd);
    reg.events = 0;
    if (closeFd) {
      if (this.#polling) this.#toClose.push(reg.fd);
      else libc.closeRaw(reg.fd);
    }
    this.#kick();
  }

  #kick(): void {
    if (this.#polling && this.#wake !== null) libc.write(this.#wake[1], this.#wakeByte, 1);
    else if (!this.#running && this.#regs.size > 0) void this.#loop();
  }

  async #loop(): Promise<void> {
    this.#running = true;
    try {
      if (this.#wake === null) this.#wake = libc.pipe2(libc.O_NONBLOCK);
      for (;;) {
        for (const fd of this.#toClose.splice(0)) libc.closeRaw(fd);
        if (this.#regs.size === 0) break;
        const active = [...this.#regs.values()].filter((r) => r.events !== 0);
        const fds = Buffer.alloc(libc.POLLFD_SIZE * (active.length + 1));
        fds.writeInt32LE(this.#wake[0], 0);
        fds.writeInt16LE(libc.POLLIN, 4);
        active.forEach((r, i) => {
          fds.writeInt32LE(r.fd, (i + 1) * libc.POLLFD_SIZE);
          fds.writeInt16LE(r.events, (i + 1) * libc.POLLFD_SIZE + 4);
        });
        this.#polling = true;
        let n: number;
        try {
          n = await libc.poll(fds, active.length + 1, POLL_MAX_WAIT_MS);
        } finally {
          this.#polling = false;
        }
        for (const fd of this.#toClose.splice(0)) libc.closeRaw(fd);
        if (n < 0) {
          if (n === -ERRNO.EINTR! || n === -ERRNO.EAGAIN!) continue;
          throw new SyscallError(-n, 'poll');
        }
        if (fds.readInt16LE(6) !== 0) while (libc.read(this.#wake[0], this.#drain) > 0) { /* drain */ }
        active.forEach((r, i) => {
          const revents = fds.readUInt16LE((i + 1) * libc.POLLFD_SIZE + 6);
          if (revents === 0 || this.#regs.get(r.fd) !== r) return;
          try {
            r.onReady(revents);
          } catch (e) {
            debug('raw fd %d: readiness handler threw: %s', r.fd, (e as Error).message);
          }
        });
      }
    } catch (e) {
      // poll() itself failed (ENOMEM, ...): fail every registration, they cannot make progress.
      debug('raw fd poller failed: %s', (e as Error).message);
      for (const r of [...this.#regs.values()]) {
        this.#regs.delete(r.fd);
        try {
          r.onReady(libc.POLLERR | libc.POLLNVAL);
        } catch { /* reported by the handler */ }
      }
    } finally {
      this.#running = false;
    }
    // Registrations made while the loop was winding down.
    if (this.#regs.size > 0) void this.#loop();
  }
}

/** @internal The shared poller; exported for tests. */
export const poller = new FdPoller();

const READ_CHUNK = 64 * 1024;

/**
 * A node:stream Duplex over a connected, non-blocking socket fd. Owns the fd:
 * destroy() closes it. Half-close: end() sends shutdown(SHUT_WR).
 */
export class RawFdDuplex extends Duplex {
  readonly fd: number;
  #reg: Registration;
  #readWanted = false;
  #pending: { buf: Buffer; off: number; cb: (err?: Error | null) => void } | null = null;
  #scratch = Buffer.allocUnsafe(READ_CHUNK);

  /** `fd` must be a connected stream socket in non-blocking mode (SOCK_NONBLOCK). */
  constructor(fd: number) {
    super({ allowHalfOpen: false });
    this.fd = fd;
    this.#reg = poller.register(fd, (rev) => this.#onReady(rev));
  }

  #updateEvents(): void {
    if (this.destroyed) return;
    poller.setEvents(this.#reg, (this.#readWanted ? libc.POLLIN : 0) | (this.#pending !== null ? libc.POLLOUT : 0));
  }

  #onReady(revents: number): void {
    if (revents & libc.POLLNVAL) {
      this.destroy(new SyscallError(ERRNO.EBADF!, 'poll'));
      return;
    }
    if (this.#readWanted) this.#doRead();
    if (this.#pending !== null) this.#flush();
    this.#updateEvents();
  }

  #doRead(): void {
    while (this.#readWanted && !this.destroyed) {
      const n = libc.read(this.fd, this.#scratch, READ_CHUNK);
      if (n > 0) {
        if (!this.push(Buffer.from(this.#scratch.subarray(0, n)))) this.#readWanted = false;
      } else if (n === 0) {
        this.#readWanted = false;
        this.push(null);
      } else if (n === -ERRNO.EAGAIN!) {
        return;
      } else if (n !== -ERRNO.EINTR!) {
        this.#readWanted = false;
        this.destroy(new SyscallError(-n, 'read'));
      }
    }
  }

  override _read(): void {
    if (this.#readWanted) return;
    this.#readWanted = true;
    this.#doRead();
    this.#updateEvents();
  }

  /** Writes as much of `#pending` as the socket takes; completes it when all is written. */
  #flush(): void {
    const p = this.#pending;
    if (p === null) return;
    while (p.off < p.buf.length) {
      const n = libc.write(this.fd, p.buf.subarray(p.off));
      if (n > 0) p.off += n;
      else if (n === -ERRNO.EAGAIN!) return; // wait for POLLOUT
      else if (n !== -ERRNO.EINTR! && n !== 0) {
        this.#pending = null;
        p.cb(new SyscallError(-n, 'write'));
        return;
      }
    }
    this.#pending = null;
    p.cb();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.#pending = { buf: chunk, off: 0, cb };
    this.#flush();
    this.#updateEvents();
  }

  override _final(cb: (err?: Error | null) => void): void {
    const r = libc.shutdown(this.fd, libc.SHUT_WR);
    // ENOTCONN: the peer is already gone; nothing left to half-close.
    cb(r < 0 && r !== -ERRNO.ENOTCONN! ? new SyscallError(-r, 'shutdown') : null);
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    const p = this.#pending;
    this.#pending = null;
    this.#readWanted = false;
    poller.unregister(this.#reg, true);
    if (p !== null) p.cb(err ?? new SyscallError(ERRNO.EPIPE!, 'write'));
    cb(err);
  }
}

export type RawListenerAddress =
  | { family: 'vsock'; port: number; cid: number }
  | { family: 'unix'; path: string };

/**
 * A listening socket on a raw fd; emits 'connection' (RawFdDuplex) for every
 * accepted connection and 'error' (SyscallError) for accept failures other
 * than the transient ones.
 */
export class RawSocketListener extends EventEmitter {
  readonly fd: number;
  readonly address: RawListenerAddress;
  #reg: Registration;
  #closed = false;
  #backoff: NodeJS.Timeout | null = null;

  private constructor(fd: number, address: RawListenerAddress) {
    super();
    this.fd = fd;
    this.address = address;
    this.#reg = poller.register(fd, () => this.#accept());
    poller.setEvents(this.#reg, libc.POLLIN);
  }

  /**
   * socket(AF_VSOCK) + bind + listen. `port` VMADDR_PORT_ANY (0xffffffff) lets
   * the kernel choose (see `address.port`); `cid` defaults to VMADDR_CID_ANY.
   */
  static listenVsock(port: number, cid: number = libc.VMADDR_CID_ANY, backlog = 64): RawSocketListener {
    const fd = libc.socket(libc.AF_VSOCK, libc.SOCK_STREAM | libc.SOCK_NONBLOCK);
    try {
      libc.bind(fd, libc.sockaddrVm(port, cid));
      libc.listen(fd, backlog);
      const a = libc.getsockname(fd, libc.SOCKADDR_VM_SIZE);
      return new RawSocketListener(fd, { family: 'vsock', port: a.readUInt32LE(4), cid: a.readUInt32LE(8) });
    } catch (e) {
      libc.closeRaw(fd);
      throw e;
    }
  }

  /** socket(AF_UNIX) + bind + listen through the same raw-fd path (used to test this transport). */
  static listenUnix(path: string, backlog = 64): RawSocketListener {
    const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK);
    try {
      libc.bind(fd, libc.sockaddrUn(path));
      libc.listen(fd, backlog);
      return new RawSocketListener(fd, { family: 'unix', path });
    } catch (e) {
      libc.closeRaw(fd);
      throw e;
    }
  }

  get closed(): boolean {
    return this.#closed;
  }

  #accept(): void {
    while (!this.#closed) {
      const fd = libc.accept4(this.fd, libc.SOCK_NONBLOCK);
      if (fd >= 0) {
        debug('raw listener %d: accepted fd %d', this.fd, fd);
        this.emit('connection', new RawFdDuplex(fd));
        continue;
      }
      if (fd === -ERRNO.EAGAIN!) return;
      if (fd === -ERRNO.EINTR! || fd === -ERRNO.ECONNABORTED! || fd === -ERRNO.EPROTO!) continue;
      // EMFILE/ENFILE/ENOBUFS/ENOMEM...: the level-triggered poll would spin; back off.
      const err = new SyscallError(-fd, 'accept4', fd === -ERRNO.EMFILE! || fd === -ERRNO.ENFILE!
        ? { hint: 'out of file descriptors: raise `ulimit -n` or close idle connections' } : {});
      poller.setEvents(this.#reg, 0);
      this.#backoff = setTimeout(() => {
        this.#backoff = null;
        if (!this.#closed) poller.setEvents(this.#reg, libc.POLLIN);
      }, 100);
      this.#backoff.unref();
      if (this.listenerCount('error') > 0) this.emit('error', err);
      else debug('raw listener %d: %s', this.fd, err.message);
      return;
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#backoff !== null) clearTimeout(this.#backoff);
    poller.unregister(this.#reg, true);
  }
}
