/**
 * How KVM_INTROSPECTION_HOOK finds the socket behind the fd it is given.
 *
 * The kernel calls sockfd_lookup(fd) and takes its own reference to the
 * socket. Node cannot hand one fd to two net.Socket objects (both would read
 * it), so the model keeps a process-wide registry: the device manager (or a
 * test) `adoptSocket()`s its connected net.Socket, which records it under its
 * fd (`socket._handle.fd`, the libuv handle's descriptor) until it closes, and
 * the hook takes that very net.Socket over. An fd that is a socket but was not
 * adopted is dup'ed (fcntl F_DUPFD_CLOEXEC, the model's "reference") and
 * wrapped in a new net.Socket; the caller must then stop using its own copy.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as libc from '../sys/libc.js';

const F_DUPFD_CLOEXEC = 1030;
const registry = new Map<number, net.Socket>();

/** The OS descriptor of a connected net.Socket (unix or TCP), or -1. */
export function socketFd(socket: net.Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}

/**
 * Registers a connected socket so that `vm.hook({ fd })` can find it; returns
 * its fd. The entry goes away when the socket closes.
 */
export function adoptSocket(socket: net.Socket): number {
  const fd = socketFd(socket);
  if (fd < 0) throw new TypeError('adoptSocket: the socket has no file descriptor (not connected yet, or already closed)');
  registry.set(fd, socket);
  socket.once('close', () => {
    if (registry.get(fd) === socket) registry.delete(fd);
  });
  return fd;
}

/** fstat(fd) says socket (EBADF, a negative fd and the like say no). */
export function isSocketFd(fd: number): boolean {
  if (!Number.isInteger(fd) || fd < 0) return false;
  try {
    return fs.fstatSync(fd).isSocket();
  } catch {
    return false;
  }
}

/**
 * sockfd_lookup(): the net.Socket for `fd`, or null when fd is not an open
 * socket. Adopted sockets are returned as they are; others are dup'ed and
 * wrapped.
 */
export function sockfd_lookup(fd: number): net.Socket | null {
  if (!isSocketFd(fd)) return null;
  const known = registry.get(fd);
  if (known !== undefined && !known.destroyed && socketFd(known) === fd) return known;
  let dup: number;
  try {
    dup = libc.fcntl(fd, F_DUPFD_CLOEXEC, 0);
  } catch {
    return null;
  }
  try {
    return new net.Socket({ fd: dup, readable: true, writable: true });
  } catch {
    fs.closeSync(dup);
    return null;
  }
}
