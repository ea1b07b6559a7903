/**
 * The local pages sessions hand to the driver, and the rule that keeps a stale
 * view from ever showing a mapping other than its own:
 *
 *   an address is reused only after every JS view of it has been collected.
 *
 * Each mapping gets a view of its own (its own ArrayBuffer). Every Buffer a
 * caller can derive from it (subarray, `.buffer`, a Uint8Array over it) keeps
 * that ArrayBuffer reachable, so a FinalizationRegistry on the ArrayBuffer tells
 * exactly when nothing can touch the address any more. Until then the address is
 * quarantined: after UNMAP it holds a fresh zeroed page (the host puts one back),
 * so a stale view reads zeros and its writes reach nobody. Only then does the
 * address go back to a free list, or get unmapped.
 *
 * Locked memory stays bounded: the free lists are capped and emptied when the
 * last session closes; quarantined pages past a cap are unlocked and dropped
 * (MADV_DONTNEED: they hold nothing); RLIMIT_MEMLOCK is checked before locking,
 * with a typed error when even a reclaim cannot make room.
 */
import { readFileSync } from 'node:fs';
import { debuglog } from 'node:util';
import { KvmmemError } from '../errors.js';
import * as libc from '../sys/libc.js';
import { Window } from '../sys/window.js';
import { PAGE_SIZE } from './address.js';
import { LockedMemoryError } from './errors.js';

const debug = debuglog('kvmmem');

/** Single pages are carved from slabs of this many pages (one mmap + lock each). */
const SLAB_PAGES = 64;
/** Caps on what is kept locked for reuse (lowered to a quarter of RLIMIT_MEMLOCK when that is smaller). */
const FREE_PAGES_BYTES = 4 << 20;
const CACHED_WINDOWS_BYTES = 32 << 20;
const QUARANTINE_LOCKED_BYTES = 16 << 20;

/** Local memory lent to one mapping (a single page, or a range's window). */
export interface Lease {
  readonly address: number;
  readonly length: number;
  /** The window of a range; null for a single page carved from a slab. */
  readonly window: Window | null;
  /** A view was handed out: the address waits for its collection. */
  viewed: boolean;
  /** No longer mapped: nothing of a guest is behind the address. */
  released: boolean;
  /** Unlocked and dropped while quarantined: unmapped when collected, never reused. */
  cold: boolean;
}

export interface LocalMemoryStats {
  /** Bytes kvmmem holds locked for local pages (mapped, free, cached, quarantined). */
  lockedBytes: number;
  /** The process's RLIMIT_MEMLOCK (Infinity when unlimited or with CAP_IPC_LOCK). */
  limitBytes: number;
  /** Single pages ready for reuse. */
  freePages: number;
  /** Bytes of range windows ready for reuse. */
  cachedWindowBytes: number;
  /** Unmapped pages/windows whose views are still reachable (their addresses are not reused). */
  quarantined: number;
  quarantinedBytes: number;
  /** Sessions open in this thread. */
  sessions: number;
}

interface Held {
  readonly lease: Lease;
  readonly onCollected: (() => void) | undefined;
}

class LocalMemory {
  #freePages: number[] = [];
  readonly #windows = new Map<number, Window[]>(); // cached windows by byte length
  #cachedWindowBytes = 0;
  readonly #quarantine = new Set<Lease>();
  #quarantinedBytes = 0;
  #quarantineLocked = 0;
  #locked = 0;
  #sessions = 0;
  #limit: number | undefined;
  /** Views used only inside the client (read/write copies): never handed out, so never quarantined. */
  readonly #internal = new WeakMap<Window, Buffer>();
  readonly #registry = new FinalizationRegistry<Held>((held) => this.#collected(held));

  takePage(): Lease {
    if (this.#freePages.length === 0) this.#growSlab();
    return { address: this.#freePages.pop()!, length: PAGE_SIZE, window: null, viewed: false, released: false, cold: false };
  }

  takeWindow(pages: number): Lease {
    const length = pages * PAGE_SIZE;
    let w = this.#windows.get(length)?.pop();
    if (w !== undefined) this.#cachedWindowBytes -= length;
    else w = this.#alloc(length);
    return { address: w.address, length, window: w, viewed: false, released: false, cold: false };
  }

  /**
   * The one view of a lease that may leave the client. `onCollected` runs when
   * it has been collected (before the address is recycled): the session unmaps
   * a mapping that was dropped without unmap(). It must not refer to the view.
   */
  view(lease: Lease, onCollected?: () => void): Buffer {
    if (lease.viewed || lease.released) throw new Error('local memory: a lease gets one view, while leased');
    lease.viewed = true;
    const v = libc.view(lease.address, lease.length);
    this.#registry.register(v.buffer, { lease, onCollected });
    return v;
  }

  /** A view of a range's window for copies inside the client; it must never escape. */
  internalView(lease: Lease): Buffer {
    const w = lease.window!;
    let v = this.#internal.get(w);
    if (v === undefined) this.#internal.set(w, (v = libc.view(w.address, w.length)));
    return v;
  }

  /** The mapping behind a lease is gone (UNMAP, close, revocation, or it never mapped). */
  release(lease: Lease): void {
    if (lease.released) return;
    lease.released = true;
    if (!lease.viewed) {
      this.#recycle(lease);
      return;
    }
    this.#quarantine.add(lease);
    this.#quarantinedBytes += lease.length;
    this.#quarantineLocked += lease.length;
    if (this.#quarantineLocked > this.#cap(QUARANTINE_LOCKED_BYTES)) this.#cool();
  }

  sessionOpened(): void { this.#sessions++; }

  /** When the last session closes, nothing stays locked for reuse. */
  sessionClosed(): void {
    if (--this.#sessions <= 0) {
      this.#sessions = 0;
      this.reclaim();
    }
  }

  /** Gives back everything not in use: free pages and windows unmapped, quarantined ones unlocked. */
  reclaim(): void {
    this.#unmapFreePages();
    for (const list of this.#windows.values()) for (const w of list) this.#freeWindow(w, true);
    this.#windows.clear();
    this.#cachedWindowBytes = 0;
    this.#cool();
  }

  stats(): LocalMemoryStats {
    return {
      lockedBytes: this.#locked,
      limitBytes: this.#memlockLimit(),
      freePages: this.#freePages.length,
      cachedWindowBytes: this.#cachedWindowBytes,
      quarantined: this.#quarantine.size,
      quarantinedBytes: this.#quarantinedBytes,
      sessions: this.#sessions,
    };
  }

  #collected({ lease, onCollected }: Held): void {
    try {
      onCollected?.();
    } catch (e) {
      debug('unmap of a collected mapping failed: %s', (e as Error).message);
    }
    // Still mapped (its session was dropped without close()): the driver holds the
    // address, so it is never reused.
    if (!lease.released) return;
    if (this.#quarantine.delete(lease)) {
      this.#quarantinedBytes -= lease.length;
      if (!lease.cold) this.#quarantineLocked -= lease.length;
    }
    this.#recycle(lease);
  }

  #recycle(lease: Lease): void {
    const keep = !lease.cold && this.#sessions > 0;
    if (lease.window === null) {
      if (keep && (this.#freePages.length + 1) * PAGE_SIZE <= this.#cap(FREE_PAGES_BYTES)) {
        this.#freePages.push(lease.address);
      } else {
        this.#munmap(lease.address, PAGE_SIZE, !lease.cold);
      }
      return;
    }
    const w = lease.window;
    if (keep && this.#cachedWindowBytes + w.length <= this.#cap(CACHED_WINDOWS_BYTES)) {
      let list = this.#windows.get(w.length);
      if (!list) this.#windows.set(w.length, (list = []));
      list.push(w);
      this.#cachedWindowBytes += w.length;
    } else {
      this.#freeWindow(w, !lease.cold);
    }
  }

  /** Quarantined memory holds no guest data: unlock it and let the kernel drop it. */
  #cool(): void {
    for (const lease of this.#quarantine) {
      if (lease.cold) continue;
      lease.cold = true;
      this.#quarantineLocked -= lease.length;
      this.#locked -= lease.length;
      try {
        libc.munlock(lease.address, lease.length);
        libc.madvise(lease.address, lease.length, libc.MADV_DONTNEED);
      } catch (e) {
        debug('cooling a quarantined page failed: %s', (e as Error).message);
      }
    }
  }

  #growSlab(): void {
    const w = this.#alloc(SLAB_PAGES * PAGE_SIZE);
    // Pushed high to low, so pop() hands out the lowest address first.
    for (let i = SLAB_PAGES - 1; i >= 0; i--) this.#freePages.push(w.address + i * PAGE_SIZE);
  }

  /** A new locked window, within RLIMIT_MEMLOCK (reclaiming first when needed). */
  #alloc(length: number): Window {
    const limit = this.#memlockLimit();
    if (this.#locked + length > limit) {
      this.reclaim();
      if (this.#locked + length > limit) throw this.#lockError(length, undefined);
    }
    let w: Window;
    try {
      w = Window.alloc(length, { view: false });
    } catch (e) {
      if (!isLockFailure(e)) throw e;
      this.reclaim(); // the limit counts other locked memory of the process too
      try {
        w = Window.alloc(length, { view: false });
      } catch (e2) {
        throw isLockFailure(e2) ? this.#lockError(length, e2) : e2;
      }
    }
    this.#locked += length;
    return w;
  }

  #lockError(length: number, cause: unknown): LockedMemoryError {
    return new LockedMemoryError(length, this.#locked, this.#memlockLimit(), this.#quarantinedBytes, cause);
  }

  #unmapFreePages(): void {
    if (this.#freePages.length === 0) return;
    // Adjacent free pages (most of a slab) go in one munmap.
    const a = this.#freePages.sort((x, y) => x - y);
    let start = a[0]!, end = start + PAGE_SIZE;
    for (let i = 1; i <= a.length; i++) {
      const p = a[i];
      if (p === end) { end += PAGE_SIZE; continue; }
      this.#munmap(start, end - start, true);
      if (p !== undefined) { start = p; end = p + PAGE_SIZE; }
    }
    this.#freePages = [];
  }

  #freeWindow(w: Window, locked: boolean): void {
    this.#internal.delete(w);
    w.free();
    if (locked) this.#locked -= w.length;
  }

  #munmap(address: number, length: number, locked: boolean): void {
    try {
      libc.munmap(address, length);
    } catch (e) {
      debug('munmap of local pages failed: %s', (e as Error).message);
    }
    if (locked) this.#locked -= length;
  }

  #cap(bytes: number): number {
    const limit = this.#memlockLimit();
    return limit === Infinity ? bytes : Math.min(bytes, Math.floor(limit / 4));
  }

  #memlockLimit(): number {
    return (this.#limit ??= readMemlockLimit());
  }
}

function isLockFailure(e: unknown): boolean {
  return e instanceof KvmmemError && e.syscall === 'mlock' && (e.code === 'ENOMEM' || e.code === 'EAGAIN' || e.code === 'EPERM');
}

/** RLIMIT_MEMLOCK's soft limit from /proc (Infinity when unlimited, with CAP_IPC_LOCK, or unknown). */
function readMemlockLimit(): number {
  try {
    const capEff = /^CapEff:\s*([0-9a-f]+)$/im.exec(readFileSync('/proc/self/status', 'latin1'));
    if (capEff && (BigInt('0x' + capEff[1]) >> 14n) & 1n) return Infinity; // CAP_IPC_LOCK ignores the limit
    const m = /^Max locked memory\s+(\S+)/m.exec(readFileSync('/proc/self/limits', 'latin1'));
    if (!m || m[1] === 'unlimited') return Infinity;
    const n = Number(m[1]);
    return Number.isFinite(n) ? n : Infinity;
  } catch {
    return Infinity;
  }
}

/** One per thread: windows outlive sessions (see above). */
export const localMemory = new LocalMemory();

/** What kvmmem holds of this process's memory for local pages (see README "Stale views"). */
export function localMemoryStats(): LocalMemoryStats {
  return localMemory.stats();
}
