/**
 * The core calls: files and file descriptors (open, close, fcntl, memfd,
 * read, write, pipe2, poll) and ioctl(2).
 */
import { UsageError } from '../errors.js';
import { DataType, LIBC, errnoLive, errnoView, fail, load, type Errno } from './ffi.js';
import { checked, selfChecked, stager } from './memory.js';

const { I32, I64, U64, U8Array, String: Str } = DataType;

// ---- constants (Linux x86-64) ----
export const O_RDONLY = 0, O_WRONLY = 1, O_RDWR = 2, O_CREAT = 0o100, O_NONBLOCK = 0o4000, O_CLOEXEC = 0o2000000;
export const MFD_CLOEXEC = 1, MFD_ALLOW_SEALING = 2;
export const F_GETFD = 1, FD_CLOEXEC = 1;
export const F_ADD_SEALS = 1033, F_GET_SEALS = 1034, F_SEAL_SEAL = 1, F_SEAL_SHRINK = 2, F_SEAL_GROW = 4;
export const POLLIN = 0x1, POLLOUT = 0x4, POLLERR = 0x8, POLLHUP = 0x10, POLLNVAL = 0x20;
/** sizeof(struct pollfd) */
export const POLLFD_SIZE = 8;

// ---- files ----
/** open(2), always with O_CLOEXEC. Returns the fd. */
export function open(path: string, flags: number, mode = 0): number {
  const r = load({ library: LIBC, funcName: 'open', retType: I32, paramsType: [Str, I32, I32], paramsValue: [path, flags | O_CLOEXEC, mode], errno: true }) as Errno<number>;
  if (r.value < 0) fail('open', r.errnoCode, path);
  return r.value;
}

export function close(fd: number): void {
  const r = load({ library: LIBC, funcName: 'close', retType: I32, paramsType: [I32], paramsValue: [fd], errno: true }) as Errno<number>;
  if (r.value < 0) fail('close', r.errnoCode);
}

/** fcntl(fd, cmd, arg) for integer commands (F_GETFD ...). */
export function fcntl(fd: number, cmd: number, arg = 0): number {
  const r = load({ library: LIBC, funcName: 'fcntl', retType: I32, paramsType: [I32, I32, I32], paramsValue: [fd, cmd, arg], errno: true }) as Errno<number>;
  if (r.value < 0) fail('fcntl', r.errnoCode);
  return r.value;
}

export function ftruncate(fd: number, length: number): void {
  const r = load({ library: LIBC, funcName: 'ftruncate', retType: I32, paramsType: [I32, I64], paramsValue: [fd, length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('ftruncate', r.errnoCode);
}

/** memfd_create(2) with MFD_CLOEXEC: anonymous memory that can be mapped MAP_SHARED. */
export function memfdCreate(name: string, flags = 0): number {
  const r = load({ library: LIBC, funcName: 'memfd_create', retType: I32, paramsType: [Str, I32], paramsValue: [name, flags | MFD_CLOEXEC], errno: true }) as Errno<number>;
  if (r.value < 0) fail('memfd_create', r.errnoCode);
  return r.value;
}

/** close(2) returning 0 or -errno (for teardown paths that must not throw). */
export function closeRaw(fd: number): number {
  const r = load({ library: LIBC, funcName: 'close', retType: I32, paramsType: [I32], paramsValue: [fd], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** read(2) into buf[0, len): bytes read (0 = EOF) or -errno. */
export function readRaw(fd: number, buf: Uint8Array, len: number = buf.length): number {
  if (len > buf.length) throw new UsageError(`read: len ${len} exceeds the ${buf.length}-byte buffer`);
  const r = load({ library: LIBC, funcName: 'read', retType: I64, paramsType: [I32, U8Array, U64], paramsValue: [fd, buf, len], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** write(2) of buf[0, len): bytes written or -errno (Node ignores SIGPIPE, so a closed peer gives -EPIPE). */
export function writeRaw(fd: number, buf: Uint8Array, len: number = buf.length): number {
  if (len > buf.length) throw new UsageError(`write: len ${len} exceeds the ${buf.length}-byte buffer`);
  const r = load({ library: LIBC, funcName: 'write', retType: I64, paramsType: [I32, U8Array, U64], paramsValue: [fd, buf, len], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** pipe2(2) with O_CLOEXEC | flags: [readFd, writeFd]. */
export function pipe2(flags = 0): [number, number] {
  const fds = Buffer.alloc(8);
  const r = load({ library: LIBC, funcName: 'pipe2', retType: I32, paramsType: [U8Array, I32], paramsValue: [fds, flags | O_CLOEXEC], errno: true }) as Errno<number>;
  if (r.value < 0) fail('pipe2', r.errnoCode);
  return [fds.readInt32LE(0), fds.readInt32LE(4)];
}

/**
 * poll(2) over `nfds` struct pollfd {i32 fd; i16 events; i16 revents} in `fds`,
 * run on a libuv thread-pool thread (ffi-rs runInNewThread), so the event loop
 * never blocks: resolves with the number of ready fds or -errno; revents are
 * written into `fds` in place. The caller must keep `fds` referenced and
 * untouched until the promise settles.
 */
export async function pollRaw(fds: Buffer, nfds: number, timeoutMs: number): Promise<number> {
  if (nfds * POLLFD_SIZE > fds.length) throw new UsageError(`poll: ${nfds} pollfds do not fit in ${fds.length} bytes`);
  const r = await load({ library: LIBC, funcName: 'poll', retType: I32, paramsType: [U8Array, U64, I32], paramsValue: [fds, nfds, timeoutMs], errno: true, runInNewThread: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

// ---- ioctl ----
/**
 * ioctl(fd, request, arg) returning the result, or -errno on failure (no throw:
 * the device layer turns errno into an error that knows the request).
 * A Uint8Array arg is passed as a pointer to its bytes (zero-copy); a number or
 * bigint is passed as the argument value itself (as KVM_INTRO_MEM_UNMAP wants).
 */
export function ioctlRaw(fd: number, request: number, arg: Uint8Array | number | bigint): number {
  if (checked !== true) selfChecked();
  let v: number;
  if (errnoLive) {
    if (typeof arg === 'number') {
      v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, U64], paramsValue: [fd, request, arg] }) as number;
    } else if (typeof arg === 'bigint') {
      v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, DataType.BigInt], paramsValue: [fd, request, arg] }) as number;
    } else {
      const st = stager();
      const p = st.arg(arg, 0, arg.byteLength, true);
      if (p >= 0) {
        v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, U64], paramsValue: [fd, request, p] }) as number;
        const e = errnoView[0]!;
        st.done();
        return v < 0 ? -e : v;
      }
      v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, U8Array], paramsValue: [fd, request, arg] }) as number;
    }
    return v < 0 ? -errnoView[0]! : v;
  }
  const t = typeof arg === 'number' ? U64 : typeof arg === 'bigint' ? DataType.BigInt : U8Array;
  const r = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, t], paramsValue: [fd, request, arg], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** ioctl(2) that throws SyscallError (code, errno, syscall 'ioctl') instead of returning -errno. */
export function ioctl(fd: number, request: number, arg: Uint8Array | number | bigint): number {
  const r = ioctlRaw(fd, request, arg);
  if (r < 0) fail('ioctl', -r);
  return r;
}
