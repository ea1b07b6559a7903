/**
 * Local pages for single-page mappings. Pages come from windows that are never
 * unmapped: after UNMAP (or revocation) an address holds a fresh zeroed page and
 * goes back here, so a stale Buffer can never fault the process. FIFO reuse
 * keeps a just-released page out of circulation as long as possible.
 */
import { Window } from '../sys/window.js';
import { PAGE_SIZE } from './address.js';

const PAGES_PER_WINDOW = 64;

export interface PageSlot {
  readonly address: number;
  readonly buffer: Buffer;
}

export class PagePool {
  #free: PageSlot[] = [];
  #head = 0;
  #windows = 0;

  take(): PageSlot {
    if (this.#head === this.#free.length) this.#grow();
    const slot = this.#free[this.#head++]!;
    if (this.#head > 1024 && this.#head * 2 > this.#free.length) {
      this.#free = this.#free.slice(this.#head);
      this.#head = 0;
    }
    return slot;
  }

  give(slot: PageSlot): void {
    this.#free.push(slot);
  }

  get stats(): { windows: number; pages: number; free: number } {
    return { windows: this.#windows, pages: this.#windows * PAGES_PER_WINDOW, free: this.#free.length - this.#head };
  }

  #grow(): void {
    const w = Window.alloc(PAGES_PER_WINDOW * PAGE_SIZE);
    this.#windows++;
    for (let i = 0; i < PAGES_PER_WINDOW; i++) {
      this.#free.push({ address: w.address + i * PAGE_SIZE, buffer: w.buffer!.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE) });
    }
  }
}

/** One pool per process: windows outlive sessions (see above). */
export const pagePool = new PagePool();
