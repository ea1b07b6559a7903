/**
 * SO_PEERCRED: who is on the other end of a connected AF_UNIX socket. The
 * kernel records the peer's pid/uid/gid at connect() time, so the answer
 * cannot be forged by the peer (only by the kernel's own credential rules:
 * a process that changes uid after connect() still shows the old one).
 */
import { SyscallError } from '../errors.js';
import { DataType, LIBC, load, type Errno } from './ffi.js';

const { I32, U8Array } = DataType;

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
/** struct ucred { pid_t pid; uid_t uid; gid_t gid; } */
const UCRED_SIZE = 12;

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

/** getsockopt(fd, SOL_SOCKET, SO_PEERCRED); throws SyscallError (ENOTSOCK, EBADF, ...). */
export function peerCred(fd: number): PeerCred {
  const cred = Buffer.alloc(UCRED_SIZE);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(UCRED_SIZE, 0);
  const r = load({
    library: LIBC, funcName: 'getsockopt', retType: I32, paramsType: [I32, I32, I32, U8Array, U8Array],
    paramsValue: [fd, SOL_SOCKET, SO_PEERCRED, cred, len], errno: true,
  }) as Errno<number>;
  if (r.value < 0) throw new SyscallError(r.errnoCode, 'getsockopt(SO_PEERCRED)');
  if (len.readUInt32LE(0) < UCRED_SIZE) throw new SyscallError(22, 'getsockopt(SO_PEERCRED)', { hint: 'short struct ucred' });
  return { pid: cred.readInt32LE(0), uid: cred.readUInt32LE(4), gid: cred.readUInt32LE(8) };
}
