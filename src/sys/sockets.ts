/**
 * Sockets on raw fds (the vsock transport). Node cannot drive an AF_VSOCK fd
 * (net.Socket({ fd }) throws ERR_INVALID_FD_TYPE), so src/channel does socket
 * I/O on raw fds: non-blocking, with readRaw/writeRaw/pollRaw (core.ts). Here:
 * the addresses, socket/bind/listen/getsockname (throw SyscallError) and
 * accept4Raw/shutdownRaw (-errno).
 */
import { UsageError } from '../errors.js';
import { DataType, LIBC, fail, load, type Errno } from './ffi.js';

const { I32, U64, U8Array } = DataType;

export const AF_UNIX = 1, AF_VSOCK = 40;
export const SOCK_STREAM = 1, SOCK_NONBLOCK = 0o4000, SOCK_CLOEXEC = 0o2000000;
export const SHUT_RD = 0, SHUT_WR = 1, SHUT_RDWR = 2;
export const VMADDR_CID_ANY = 0xffffffff, VMADDR_CID_LOCAL = 1, VMADDR_CID_HOST = 2, VMADDR_PORT_ANY = 0xffffffff;
export const SOCKADDR_VM_SIZE = 16, SOCKADDR_UN_SIZE = 110;

/** struct sockaddr_vm { u16 family; u16 reserved1; u32 port; u32 cid; u8 zero[4]; } (16 bytes). */
export function sockaddrVm(port: number, cid: number = VMADDR_CID_ANY): Buffer {
  if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) throw new UsageError(`vsock port must be a u32, got ${String(port)}`);
  if (!Number.isInteger(cid) || cid < 0 || cid > 0xffffffff) throw new UsageError(`vsock cid must be a u32, got ${String(cid)}`);
  const a = Buffer.alloc(SOCKADDR_VM_SIZE);
  a.writeUInt16LE(AF_VSOCK, 0);
  a.writeUInt32LE(port, 4);
  a.writeUInt32LE(cid, 8);
  return a;
}

/** struct sockaddr_un { u16 family; char path[108]; }; the path must fit with its NUL. */
export function sockaddrUn(path: string): Buffer {
  const p = Buffer.from(path, 'utf8');
  if (p.length === 0 || p.length > 107 || p.includes(0)) throw new UsageError(`unix socket path must be 1..107 bytes without NUL, got ${p.length} bytes`);
  const a = Buffer.alloc(SOCKADDR_UN_SIZE);
  a.writeUInt16LE(AF_UNIX, 0);
  p.copy(a, 2);
  return a;
}

/** socket(2); always add SOCK_CLOEXEC. Returns the fd. */
export function socket(domain: number, type: number, protocol = 0): number {
  const r = load({ library: LIBC, funcName: 'socket', retType: I32, paramsType: [I32, I32, I32], paramsValue: [domain, type | SOCK_CLOEXEC, protocol], errno: true }) as Errno<number>;
  if (r.value < 0) {
    fail('socket', r.errnoCode, undefined, r.errnoCode === 97 || r.errnoCode === 93
      ? 'this kernel has no support for that socket family (for vsock: load the vsock/vhost_vsock or vmw_vsock_virtio_transport module)'
      : undefined);
  }
  return r.value;
}

/** bind(2) to an address built by sockaddrVm/sockaddrUn. */
export function bind(fd: number, addr: Buffer): void {
  const r = load({ library: LIBC, funcName: 'bind', retType: I32, paramsType: [I32, U8Array, I32], paramsValue: [fd, addr, addr.length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('bind', r.errnoCode);
}

export function listen(fd: number, backlog: number): void {
  const r = load({ library: LIBC, funcName: 'listen', retType: I32, paramsType: [I32, I32], paramsValue: [fd, backlog], errno: true }) as Errno<number>;
  if (r.value < 0) fail('listen', r.errnoCode);
}

/** getsockname(2) into a buffer of `size` bytes (e.g. SOCKADDR_VM_SIZE). */
export function getsockname(fd: number, size: number): Buffer {
  const addr = Buffer.alloc(size);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(size, 0);
  const r = load({ library: LIBC, funcName: 'getsockname', retType: I32, paramsType: [I32, U8Array, U8Array], paramsValue: [fd, addr, len], errno: true }) as Errno<number>;
  if (r.value < 0) fail('getsockname', r.errnoCode);
  return addr.subarray(0, Math.min(size, len.readUInt32LE(0)));
}

/** accept4(fd, NULL, NULL, flags | SOCK_CLOEXEC): the new fd, or -errno (-EAGAIN on an idle non-blocking listener). */
export function accept4Raw(fd: number, flags = 0): number {
  const r = load({ library: LIBC, funcName: 'accept4', retType: I32, paramsType: [I32, U64, U64, I32], paramsValue: [fd, 0, 0, flags | SOCK_CLOEXEC], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** shutdown(2): 0 or -errno. */
export function shutdownRaw(fd: number, how: number): number {
  const r = load({ library: LIBC, funcName: 'shutdown', retType: I32, paramsType: [I32, I32], paramsValue: [fd, how], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}


/** connect(2) to an address built by sockaddrUn/sockaddrVm: 0 or -errno (EINTR retried). */
export function connectRaw(fd: number, addr: Buffer): number {
  for (;;) {
    const r = load({ library: LIBC, funcName: 'connect', retType: I32, paramsType: [I32, U8Array, I32], paramsValue: [fd, addr, addr.length], errno: true }) as Errno<number>;
    if (r.value === 0) return 0;
    if (r.errnoCode !== 4) return -r.errnoCode;
  }
}

export const SOL_SOCKET = 1, SO_RCVTIMEO = 20, SO_SNDTIMEO = 21;

/** setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO or SO_SNDTIMEO, struct timeval of `ms`). */
export function setSocketTimeout(fd: number, option: typeof SO_RCVTIMEO | typeof SO_SNDTIMEO, ms: number): void {
  const tv = Buffer.alloc(16); // struct timeval { i64 tv_sec; i64 tv_usec; }
  tv.writeBigInt64LE(BigInt(Math.floor(ms / 1000)), 0);
  tv.writeBigInt64LE(BigInt(Math.round(ms % 1000) * 1000), 8);
  const r = load({ library: LIBC, funcName: 'setsockopt', retType: I32, paramsType: [I32, I32, I32, U8Array, I32], paramsValue: [fd, SOL_SOCKET, option, tv, tv.length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('setsockopt', r.errnoCode);
}
