/**
 * A blocking unix stream socket client, for request/response protocols that a
 * synchronous caller must finish before it returns (the lab host's page
 * remapper asks the QEMU agent from inside a hypercall). Every read and write
 * blocks the calling thread, bounded by SO_RCVTIMEO / SO_SNDTIMEO, so a hung
 * peer costs the timeout, never a hang.
 */
import { SyscallError } from '../errors.js';
import * as libc from './libc.js';

const EINTR = 4, EBADF = 9, EAGAIN = 11, ETIMEDOUT = 110, ECONNRESET = 104;

export class BlockingSocket {
  readonly path: string;
  readonly timeoutMs: number;
  #fd: number;

  private constructor(fd: number, path: string, timeoutMs: number) {
    this.#fd = fd;
    this.path = path;
    this.timeoutMs = timeoutMs;
  }

  /** Connects to the unix socket at `path`; each later read or write gives up after `timeoutMs`. Throws SyscallError. */
  static connect(path: string, timeoutMs: number): BlockingSocket {
    const addr = libc.sockaddrUn(path);
    const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM);
    try {
      libc.setSocketTimeout(fd, libc.SO_RCVTIMEO, timeoutMs);
      libc.setSocketTimeout(fd, libc.SO_SNDTIMEO, timeoutMs);
      const r = libc.connectRaw(fd, addr);
      if (r < 0) throw new SyscallError(-r, 'connect', { path });
    } catch (e) {
      libc.closeRaw(fd);
      throw e;
    }
    return new BlockingSocket(fd, path, timeoutMs);
  }

  get closed(): boolean { return this.#fd < 0; }

  /** Writes all of buf[0, len): 0, or -errno (-ETIMEDOUT when the peer stopped reading). */
  writeAll(buf: Uint8Array, len: number = buf.length): number {
    let done = 0;
    while (done < len) {
      if (this.#fd < 0) return -EBADF;
      const r = libc.writeRaw(this.#fd, done === 0 ? buf : buf.subarray(done), len - done);
      if (r === -EINTR) continue;
      if (r === -EAGAIN) return -ETIMEDOUT; // SO_SNDTIMEO expired
      if (r < 0) return r;
      done += r;
    }
    return 0;
  }

  /** Reads exactly `len` bytes into buf: 0, or -errno (-ECONNRESET at EOF, -ETIMEDOUT when nothing came in time). */
  readExact(buf: Uint8Array, len: number = buf.length): number {
    let done = 0;
    while (done < len) {
      if (this.#fd < 0) return -EBADF;
      const r = libc.readRaw(this.#fd, done === 0 ? buf : buf.subarray(done), len - done);
      if (r === -EINTR) continue;
      if (r === -EAGAIN) return -ETIMEDOUT; // SO_RCVTIMEO expired
      if (r < 0) return r;
      if (r === 0) return -ECONNRESET;
      done += r;
    }
    return 0;
  }

  close(): void {
    if (this.#fd < 0) return;
    libc.closeRaw(this.#fd);
    this.#fd = -1;
  }
}
