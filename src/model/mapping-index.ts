/**
 * The host's list of mappings: introspector page -> (VM, target gpa page).
 *
 * Pages are kept in chunks of CHUNK_PAGES adjacent pages (2 MiB), keyed by
 * page / 2 MiB (a small integer), each chunk holding the VM and target gpa
 * page of its mapped pages in arrays indexed by page (no object per mapping).
 * The page is a number: a local virtual address (the model) or an introspector
 * guest-physical address (the lab); both are below 2^53.
 */
import { PAGE_SIZE } from '../abi/structs.js';

const PS = PAGE_SIZE;
const CHUNK_PAGES = 512;
const CHUNK_BYTES = CHUNK_PAGES * PS;

/** What a mapped VM needs for the index: its count of mapped pages, kept here. */
export interface MappedVm { _mapped: number }

/** One mapping (what get() answers for an introspector page). */
export interface MapRec<V> {
  vm: V;
  /** Target gpa page: a number when exact (< 2^53), else the bigint. */
  gpa: number | bigint;
}

interface Chunk<V> {
  /** The VM a page is mapped from; undefined: not mapped. */
  readonly vm: (V | undefined)[];
  /** Target gpa page when exact (< 2^53); NaN: see MappingIndex.#bigGpa. */
  readonly gpa: Float64Array;
  /** Mapped pages in the chunk (the chunk goes when it drops to 0). */
  n: number;
}

export class MappingIndex<V extends MappedVm> {
  readonly #chunks = new Map<number, Chunk<V>>();
  /** Target gpa pages >= 2^53, by introspector page. */
  readonly #bigGpa = new Map<number, bigint>();
  #count = 0;
  /** The chunk looked up last (batches walk adjacent pages). */
  #lastKey = -1;
  #lastChunk: Chunk<V> | undefined;
  /** The last chunk that emptied (single MAP/UNMAP pairs reuse it). */
  #spare: Chunk<V> | undefined;

  /** Pages mapped now. */
  get size(): number { return this.#count; }

  /** `page` is mapped. */
  has(page: number): boolean {
    const c = this.#chunk(page);
    return c !== undefined && c.vm[(page % CHUNK_BYTES) / PS] !== undefined;
  }

  /** The VM mapped at `page`, if any (no object made: the VMA accounting asks this per neighbour). */
  vmAt(page: number): V | undefined {
    const c = this.#chunk(page);
    return c === undefined ? undefined : c.vm[(page % CHUNK_BYTES) / PS];
  }

  /** The gpa page mapped at `page`; only for a page vmAt() found mapped. */
  gpaAt(page: number): number | bigint {
    const g = this.#chunk(page)!.gpa[(page % CHUNK_BYTES) / PS]!;
    return g === g ? g : this.#bigGpa.get(page)!;
  }

  /** The mapping at `page`, if any. */
  get(page: number): MapRec<V> | undefined {
    const c = this.#chunk(page);
    if (c === undefined) return undefined;
    const i = (page % CHUNK_BYTES) / PS;
    const vm = c.vm[i];
    if (vm === undefined) return undefined;
    const g = c.gpa[i]!;
    return { vm, gpa: g === g ? g : this.#bigGpa.get(page)! };
  }

  /** Lists a mapping at `page` (not mapped yet). */
  set(page: number, vm: V, gpaPage: number | bigint): void {
    let c = this.#chunk(page);
    if (c === undefined) {
      const key = Math.floor(page / CHUNK_BYTES);
      c = this.#spare ?? { vm: new Array<V | undefined>(CHUNK_PAGES).fill(undefined), gpa: new Float64Array(CHUNK_PAGES), n: 0 };
      this.#spare = undefined;
      this.#chunks.set(key, c);
      this.#lastKey = key;
      this.#lastChunk = c;
    }
    const i = (page % CHUNK_BYTES) / PS;
    c.vm[i] = vm;
    if (typeof gpaPage === 'number') c.gpa[i] = gpaPage;
    else {
      c.gpa[i] = NaN;
      this.#bigGpa.set(page, gpaPage);
    }
    c.n++;
    this.#count++;
    vm._mapped++;
  }

  /** Removes the mapping at `page`; false when there is none. */
  delete(page: number): boolean {
    const c = this.#chunk(page);
    if (c === undefined) return false;
    const i = (page % CHUNK_BYTES) / PS;
    const vm = c.vm[i];
    if (vm === undefined) return false;
    const g = c.gpa[i]!;
    c.vm[i] = undefined;
    if (g !== g) this.#bigGpa.delete(page);
    if (--c.n === 0) {
      this.#chunks.delete(Math.floor(page / CHUNK_BYTES));
      this.#lastKey = -1;
      this.#lastChunk = undefined;
      this.#spare = c; // (empty: reused by the next new chunk)
    }
    this.#count--;
    vm._mapped--;
    return true;
  }

  /** Every mapped page (of `vm`, or all), in address order within each 2 MiB chunk. */
  pages(vm?: V): number[] {
    const out: number[] = [];
    for (const [key, c] of this.#chunks) {
      for (let i = 0; i < CHUNK_PAGES; i++) {
        const v = c.vm[i];
        if (v !== undefined && (vm === undefined || v === vm)) out.push(key * CHUNK_BYTES + i * PS);
      }
    }
    return out;
  }

  /** The chunk holding `page`, if it has any mapping. */
  #chunk(page: number): Chunk<V> | undefined {
    const key = Math.floor(page / CHUNK_BYTES);
    if (key === this.#lastKey) return this.#lastChunk;
    const c = this.#chunks.get(key);
    if (c !== undefined) {
      this.#lastKey = key;
      this.#lastChunk = c;
    }
    return c;
  }
}
