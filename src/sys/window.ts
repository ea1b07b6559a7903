/**
 * Page-aligned anonymous windows: the local pages a client hands to the driver.
 * Allocated private+anonymous, pre-faulted for write (so the driver's
 * follow_page() finds a real page, never the zero page or nothing) and locked
 * (so it stays there), with a live Buffer over them and their numeric address.
 */
import * as libc from './libc.js';
import { recordMapping, release, type LedgerEntry } from './thread.js';
import { UsageError } from '../errors.js';

export interface WindowOptions {
  /** mlock the window (default true). */
  lock?: boolean;
  /**
   * Keep a live view of the whole window in `buffer` (default true). Off for the
   * client's local pages: their views are handed out one per mapping, so that a
   * stale view can be tracked to its collection (src/client/local-memory.ts).
   */
  view?: boolean;
}

export class Window {
  readonly address: number;
  readonly length: number;
  /** Live view of the whole window (absent above 4 GiB or with { view: false }: use view()). */
  readonly buffer: Buffer | undefined;
  readonly locked: boolean;
  /** In the process-wide ledger, so a terminated worker's windows are unmapped by the thread that reaps it. */
  readonly #ledger: LedgerEntry;
  #freed = false;

  private constructor(address: number, length: number, locked: boolean, withView: boolean) {
    this.address = address;
    this.length = length;
    this.locked = locked;
    this.buffer = withView && length <= libc.MAX_VIEW_BYTES ? libc.view(address, length) : undefined;
    this.#ledger = recordMapping(address, length);
  }

  static alloc(length: number, opts: WindowOptions = {}): Window {
    const ps = libc.pageSize();
    if (!Number.isSafeInteger(length) || length <= 0 || length % ps !== 0) {
      throw new UsageError(`Window.alloc: length ${length} must be a positive multiple of the page size ${ps}`);
    }
    const address = libc.mmap(0, length, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
    try {
      prefault(address, length);
      const lock = opts.lock ?? true;
      if (lock) libc.mlock(address, length);
      return new Window(address, length, lock, opts.view ?? true);
    } catch (e) {
      libc.munmap(address, length);
      throw e;
    }
  }

  get freed(): boolean { return this.#freed; }

  /** A live view of part of the window. */
  view(offset: number, length: number): Buffer {
    if (offset < 0 || length <= 0 || offset + length > this.length) {
      throw new UsageError(`Window.view: [${offset}, ${offset + length}) is outside the window of ${this.length} bytes`);
    }
    return libc.view(this.address + offset, length);
  }

  /** Unmaps the window. Views over it must not be used afterwards. */
  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    release(this.#ledger); // before the munmap: a reaper must never unmap an address reused since
    libc.munmap(this.address, this.length);
  }
}

/** Fault every page in for write: MADV_POPULATE_WRITE (Linux 5.14+), else touch each page. */
export function prefault(address: number, length: number): void {
  try {
    libc.madvise(address, length, libc.MADV_POPULATE_WRITE);
  } catch {
    const ps = libc.pageSize();
    for (let off = 0; off < length; off += ps) libc.memsetAt(address + off, 0, 1);
  }
}

/**
 * Put a fresh, zeroed, locked private page (or run of pages) at address. Returns 0 or -errno.
 * One native call with the batch helper (mmap + mlock in C), else mmap then mlock.
 */
export function remapFreshRaw(address: number, length: number): number {
  return libc.remapOneRaw(libc.REMAP_FRESH, address, length, -1, 0);
}

/** @deprecated use remapFreshRaw (transitional, for src/model/host.ts) */
export const remapFresh = remapFreshRaw;

/** Put `length` bytes of fd at `offset` at address (MAP_SHARED|MAP_FIXED), locked. Returns 0 or -errno. */
export function remapSharedRaw(address: number, length: number, fd: number, offset: number, writable = true): number {
  return libc.remapOneRaw(writable ? libc.REMAP_SHARED : libc.REMAP_SHARED_RO, address, length, fd, offset);
}
