/**
 * What the kernel knows about a user address and userspace can find out too:
 * `access_ok` (the range lies below the x86-64 user limit), `find_vma` /
 * `follow_page` (is the page mapped at all / is a page present there: mincore),
 * `copy_from_user` (read our own memory without ever faulting, honouring
 * protections: process_vm_readv on ourselves, EFAULT for an unreadable byte).
 *
 * Process addresses are JS numbers inside (x86-64 user addresses are < 2^47).
 */
import * as fs from 'node:fs';
import * as libc from '../sys/libc.js';
import { PAGE_SIZE, X86_64_USER_LIMIT } from '../abi/structs.js';
import { ERRNO } from '../abi/errno.js';

export const USER_LIMIT = Number(X86_64_USER_LIMIT);

/** Page containing `addr` (addr < 2^47, so plain number arithmetic is exact). */
export function pageOf(addr: number): number {
  return addr - (addr % PAGE_SIZE);
}

/** x86-64 `access_ok(addr, size)`: [addr, addr + size) lies in user space. */
export function access_ok(addr: bigint, size: number): boolean {
  return addr >= 0n && addr + BigInt(size) <= X86_64_USER_LIMIT;
}

const vec1 = new Uint8Array(1);

export type PageState = 'unmapped' | 'absent' | 'present';

/**
 * The page at `page` (page-aligned, in user space): 'unmapped' when no
 * mapping covers it (find_vma() finds nothing there), 'absent' when mapped but
 * not resident (follow_page() returns NULL: never faulted in, or swapped),
 * 'present' otherwise. mincore() reports page-cache residency for file pages,
 * which is close to, not exactly, "present in this process's page table".
 */
export function pageState(page: number): PageState {
  if (!libc.mincore(page, PAGE_SIZE, vec1)) return 'unmapped';
  return (vec1[0]! & 1) === 1 ? 'present' : 'absent';
}

/**
 * pageState() for `pages` pages from `first` in one mincore(), written into
 * `into`; nothing is written when the span is not wholly mapped (the caller
 * then asks page by page).
 */
export function pageStates(first: number, pages: number, into: Map<number, PageState>): boolean {
  const vec = pages === 1 ? vec1 : new Uint8Array(pages);
  if (!libc.mincore(first, pages * PAGE_SIZE, vec)) return false;
  for (let k = 0; k < pages; k++) into.set(first + k * PAGE_SIZE, (vec[k]! & 1) === 1 ? 'present' : 'absent');
  return true;
}

/** Every page of [addr, addr + len) is mapped (mincore succeeds on the span). */
export function rangeMapped(addr: number, len: number): boolean {
  const start = pageOf(addr);
  const end = addr + len;
  const pages = Math.ceil((end - start) / PAGE_SIZE);
  const vec = pages === 1 ? vec1 : new Uint8Array(pages);
  return libc.mincore(start, pages * PAGE_SIZE, vec);
}

let selfMem: number | null | undefined;
function selfMemFd(): number | null {
  if (selfMem === undefined) {
    try {
      selfMem = fs.openSync('/proc/self/mem', 'r');
    } catch {
      selfMem = null;
    }
  }
  return selfMem;
}

/**
 * `copy_from_user`: `len` bytes at `addr` of this process, or null when any of
 * them is not readable user memory (the kernel would answer -EFAULT).
 */
export function copy_from_user(addr: bigint, len: number): Buffer | null {
  if (!access_ok(addr, len)) return null;
  const a = Number(addr);
  if (len <= 65536) {
    const r = libc.readSelfRaw(a, len);
    if (typeof r !== 'number') return r;
    if (r !== ERRNO.ENOSYS && r !== ERRNO.EPERM) return null; // EFAULT (or any other refusal): not readable
  }
  // No process_vm_readv (seccomp, old kernel) or a long range: the mapping check and /proc/self/mem.
  if (!rangeMapped(a, len)) return null;
  const fd = selfMemFd();
  const out = Buffer.alloc(len);
  if (fd !== null) {
    try {
      return fs.readSync(fd, out, 0, len, a) === len ? out : null;
    } catch {
      return null; // EIO: an otherwise unreadable page
    }
  }
  libc.view(a, len).copy(out);
  return out;
}
