/**
 * A sparse index over the page addresses of this process, in 2 MiB chunks:
 * what the driver's map_list (vaddr page -> its entries) and the host's list of
 * mappings (introspector page -> VM and gpa) both need, with no object per
 * page. Each chunk covers CHUNK_PAGES adjacent pages and is keyed by
 * address / 2 MiB (< 2^26 for user addresses), so a lookup is one integer Map
 * probe, or none when it hits the chunk looked up last (batches walk adjacent
 * pages). What a chunk holds is the owner's: typed arrays indexed by
 * pageSlot(). The index only counts the entries the owner puts in each chunk,
 * drops a chunk when its count returns to 0, and hands the last chunk that
 * emptied to the next new one (a MAP/UNMAP pair on a fresh 2 MiB allocates
 * nothing).
 *
 * Contract: the owner calls add() once per entry it puts in a chunk and
 * remove() once per entry it takes out, and leaves a chunk as `newChunk()`
 * made it (every cell empty) by the time its last entry goes, because that
 * chunk is reused as is.
 */
import { PAGE_SIZE } from '../abi/structs.js';

/** Pages per chunk (2 MiB: the span a batch over a window tends to stay in). */
export const CHUNK_PAGES = 512;
export const CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE;

/** The index of the page holding `addr` within its chunk: 0..CHUNK_PAGES-1. */
export function pageSlot(addr: number): number {
  return Math.floor((addr % CHUNK_BYTES) / PAGE_SIZE);
}

interface Held<C> {
  readonly chunk: C;
  /** Entries the owner counted in the chunk. */
  n: number;
}

export class PageIndex<C> {
  readonly #newChunk: () => C;
  readonly #chunks = new Map<number, Held<C>>();
  /** The chunk looked up last, and its key. */
  #lastKey = -1;
  #last: Held<C> | undefined;
  /** The last chunk that emptied, reused by the next new one. */
  #spare: Held<C> | undefined;
  #size = 0;

  /** `newChunk`: a chunk with every cell empty. */
  constructor(newChunk: () => C) {
    this.#newChunk = newChunk;
  }

  /** Entries counted over all chunks. */
  get size(): number { return this.#size; }

  /** The chunk holding `addr` (addr >= 0), if it holds any entry. */
  chunk(addr: number): C | undefined {
    return this.#held(addr)?.chunk;
  }

  /** Counts one more entry in the chunk of `addr`, which is created (or the spare reused) if it held none; returns it. */
  add(addr: number): C {
    let h = this.#held(addr);
    if (h === undefined) {
      const key = Math.floor(addr / CHUNK_BYTES);
      h = this.#spare ?? { chunk: this.#newChunk(), n: 0 };
      this.#spare = undefined;
      this.#chunks.set(key, h);
      this.#lastKey = key;
      this.#last = h;
    }
    h.n++;
    this.#size++;
    return h.chunk;
  }

  /** Counts one entry fewer in the chunk of `addr`; the chunk goes when it holds none (the owner has emptied its cells). */
  remove(addr: number): void {
    const h = this.#held(addr);
    // (an owner bug: the model's bookkeeping no longer matches, nothing to recover)
    if (h === undefined) throw new Error(`PageIndex.remove: no entry is counted in the chunk of 0x${addr.toString(16)}`);
    this.#size--;
    if (--h.n > 0) return;
    this.#chunks.delete(Math.floor(addr / CHUNK_BYTES));
    this.#lastKey = -1;
    this.#last = undefined;
    this.#spare = h;
  }

  /** Every chunk holding an entry, with the address of its first page, in the order the chunks were created. */
  *chunks(): IterableIterator<[base: number, chunk: C]> {
    for (const [key, h] of this.#chunks) yield [key * CHUNK_BYTES, h.chunk];
  }

  /** Forgets every chunk (the owner drops their contents too). */
  clear(): void {
    this.#chunks.clear();
    this.#lastKey = -1;
    this.#last = undefined;
    this.#spare = undefined;
    this.#size = 0;
  }

  #held(addr: number): Held<C> | undefined {
    const key = Math.floor(addr / CHUNK_BYTES);
    if (key === this.#lastKey) return this.#last;
    const h = this.#chunks.get(key);
    if (h !== undefined) {
      this.#lastKey = key;
      this.#last = h;
    }
    return h;
  }
}
