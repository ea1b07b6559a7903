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
/** Cold free pages past this many: wholly free slabs are unmapped. */
const COLD_PAGES_MAX = 4096;

/** Local memory lent to one mapping (a single page, or a range's window). */
export interface Lease {
  readonly address: number;
  readonly length: number;
  /** The window of a range; null for a single page carved from a slab. */
  readonly window: Window | null;
  /** The slab of a single page. */
  readonly slab: Slab | null;
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

/**
 * A window of SLAB_PAGES single pages. Pages are never unmapped one by one (the
 * thread ledger records the slab as one mapping, and a hole could be reused by
 * another allocation): a page given back beyond the caps is unlocked and
 * dropped instead, and a slab is unmapped only when all its pages are free.
 */
interface Slab {
  readonly window: Window;
  /** One entry per page, reused as it moves between the free sets. */
  readonly pages: FreePage[];
  /** Pages of it in the free sets. */
  free: number;
}

interface FreePage {
  readonly address: number;
  readonly slab: Slab;
}

interface Held {
  readonly lease: Lease;
  readonly onCollected: (() => void) | undefined;
}

class LocalMemory {
  /** Free single pages, locked and ready. */
  readonly #warm = new Set<FreePage>();
  /** Free single pages unlocked and dropped (locked again when taken). */
  readonly #coldPages = new Set<FreePage>();
  readonly #slabs = new Set<Slab>();
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
    let p = first(this.#warm);
    if (p !== undefined) {
      this.#warm.delete(p);
    } else if ((p = first(this.#coldPages)) !== undefined) {
      this.#lockColdPage(p);
    } else {
      this.#growSlab();
      p = first(this.#warm)!;
      this.#warm.delete(p);
    }
    p.slab.free--;
    return { address: p.address, length: PAGE_SIZE, window: null, slab: p.slab, viewed: false, released: false, cold: false };
  }

  takeWindow(pages: number): Lease {
    const length = pages * PAGE_SIZE;
    let w = this.#windows.get(length)?.pop();
    if (w !== undefined) this.#cachedWindowBytes -= length;
    else w = this.#alloc(length);
    return { address: w.address, length, window: w, slab: null, viewed: false, released: false, cold: false };
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

  /** A view of a lease for copies inside the client; it must never escape (so the lease needs no quarantine). */
  internalView(lease: Lease): Buffer {
    const w = lease.window ?? lease.slab!.window;
    let v = this.#internal.get(w);
    if (v === undefined) this.#internal.set(w, (v = libc.view(w.address, w.length)));
    return lease.window !== null ? v : v.subarray(lease.address - w.address, lease.address - w.address + PAGE_SIZE);
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
    this.#trimPages(true);
    for (const list of this.#windows.values()) for (const w of list) this.#freeWindow(w, true);
    this.#windows.clear();
    this.#cachedWindowBytes = 0;
    this.#cool();
  }

  stats(): LocalMemoryStats {
    return {
      lockedBytes: this.#locked,
      limitBytes: this.#memlockLimit(),
      freePages: this.#warm.size,
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
    if (lease.slab !== null) {
      const p = lease.slab.pages[(lease.address - lease.slab.window.address) / PAGE_SIZE]!;
      lease.slab.free++;
      if (keep && (this.#warm.size + 1) * PAGE_SIZE <= this.#cap(FREE_PAGES_BYTES)) {
        this.#warm.add(p);
        return;
      }
      if (!lease.cold) this.#coolPage(p.address);
      this.#coldPages.add(p);
      if (this.#sessions === 0 || this.#coldPages.size > COLD_PAGES_MAX) this.#trimPages(false);
      return;
    }
    const w = lease.window!;
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
    const slab: Slab = { window: this.#alloc(SLAB_PAGES * PAGE_SIZE), pages: [], free: SLAB_PAGES };
    this.#slabs.add(slab);
    for (let i = 0; i < SLAB_PAGES; i++) {
      const p: FreePage = { address: slab.window.address + i * PAGE_SIZE, slab };
      slab.pages.push(p);
      this.#warm.add(p);
    }
  }

  /** A cold free page locked (and populated) again for use, within RLIMIT_MEMLOCK. */
  #lockColdPage(p: FreePage): void {
    if (this.#locked + PAGE_SIZE > this.#memlockLimit()) {
      this.reclaim();
      if (this.#locked + PAGE_SIZE > this.#memlockLimit()) throw this.#lockError(PAGE_SIZE, undefined);
    }
    this.#coldPages.delete(p); // before a reclaim could unmap its slab
    try {
      libc.mlock(p.address, PAGE_SIZE);
    } catch (e) {
      this.#coldPages.add(p);
      throw isLockFailure(e) ? this.#lockError(PAGE_SIZE, e) : e;
    }
    this.#locked += PAGE_SIZE;
  }

  #coolPage(address: number): void {
    this.#locked -= PAGE_SIZE;
    try {
      libc.munlock(address, PAGE_SIZE);
      libc.madvise(address, PAGE_SIZE, libc.MADV_DONTNEED);
    } catch (e) {
      debug('cooling a free page failed: %s', (e as Error).message);
    }
  }

  /**
   * Unmaps slabs whose pages are all free; with `all`, cools every warm free
   * page first (nothing stays locked for reuse).
   */
  #trimPages(all: boolean): void {
    if (all) {
      for (const p of this.#warm) { this.#coolPage(p.address); this.#coldPages.add(p); }
      this.#warm.clear();
    }
    for (const slab of this.#slabs) {
      if (slab.free !== SLAB_PAGES) continue;
      let warm = 0;
      for (const p of slab.pages) {
        if (this.#warm.delete(p)) warm++;
        else this.#coldPages.delete(p);
      }
      this.#slabs.delete(slab);
      this.#locked -= warm * PAGE_SIZE;
      this.#internal.delete(slab.window);
      slab.window.free();
    }
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

  #freeWindow(w: Window, locked: boolean): void {
    this.#internal.delete(w);
    w.free();
    if (locked) this.#locked -= w.length;
  }

  #cap(bytes: number): number {
    const limit = this.#memlockLimit();
    return limit === Infinity ? bytes : Math.min(bytes, Math.floor(limit / 4));
  }

  #memlockLimit(): number {
    return (this.#limit ??= readMemlockLimit());
  }
}

function first<T>(set: Set<T>): T | undefined {
  for (const x of set) return x;
  return undefined;
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
