/**
 * The host's list of mappings: introspector page -> (VM, target gpa page).
 *
 * A PageIndex (page-index.ts, shared with the driver's map_list) of 2 MiB
 * chunks, each holding the VM and target gpa page of its mapped pages in
 * arrays indexed by pageSlot() (no object per mapping). The page is a number:
 * a local virtual address (the model) or an introspector guest-physical
 * address (the lab); both are below 2^53.
 */
import { PAGE_SIZE } from '../abi/structs.js';
import { CHUNK_PAGES, PageIndex, pageSlot } from './page-index.js';

const PS = PAGE_SIZE;

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
}

export class MappingIndex<V extends MappedVm> {
  readonly #index = new PageIndex<Chunk<V>>(() => ({ vm: new Array<V | undefined>(CHUNK_PAGES).fill(undefined), gpa: new Float64Array(CHUNK_PAGES) }));
  /** Target gpa pages >= 2^53, by introspector page. */
  readonly #bigGpa = new Map<number, bigint>();

  /** Pages mapped now. */
  get size(): number { return this.#index.size; }

  /** `page` is mapped. */
  has(page: number): boolean {
    return this.#index.chunk(page)?.vm[pageSlot(page)] !== undefined;
  }

  /** The VM mapped at `page`, if any (no object made: the VMA accounting asks this per neighbour). */
  vmAt(page: number): V | undefined {
    return this.#index.chunk(page)?.vm[pageSlot(page)];
  }

  /** The gpa page mapped at `page`; only for a page vmAt() found mapped. */
  gpaAt(page: number): number | bigint {
    const g = this.#index.chunk(page)!.gpa[pageSlot(page)]!;
    return g === g ? g : this.#bigGpa.get(page)!;
  }

  /** The mapping at `page`, if any. */
  get(page: number): MapRec<V> | undefined {
    const c = this.#index.chunk(page);
    if (c === undefined) return undefined;
    const i = pageSlot(page);
    const vm = c.vm[i];
    if (vm === undefined) return undefined;
    const g = c.gpa[i]!;
    return { vm, gpa: g === g ? g : this.#bigGpa.get(page)! };
  }

  /** Lists a mapping at `page` (not mapped yet). */
  set(page: number, vm: V, gpaPage: number | bigint): void {
    const c = this.#index.add(page);
    const i = pageSlot(page);
    c.vm[i] = vm;
    if (typeof gpaPage === 'number') c.gpa[i] = gpaPage;
    else {
      c.gpa[i] = NaN;
      this.#bigGpa.set(page, gpaPage);
    }
    vm._mapped++;
  }

  /** Removes the mapping at `page`; false when there is none. */
  delete(page: number): boolean {
    const c = this.#index.chunk(page);
    if (c === undefined) return false;
    const i = pageSlot(page);
    const vm = c.vm[i];
    if (vm === undefined) return false;
    const g = c.gpa[i]!;
    c.vm[i] = undefined; // the cell is empty again before the index may hand the chunk on
    if (g !== g) this.#bigGpa.delete(page);
    this.#index.remove(page);
    vm._mapped--;
    return true;
  }

  /** Every mapped page (of `vm`, or all), in address order within each 2 MiB chunk. */
  pages(vm?: V): number[] {
    const out: number[] = [];
    for (const [base, c] of this.#index.chunks()) {
      for (let i = 0; i < CHUNK_PAGES; i++) {
        const v = c.vm[i];
        if (v !== undefined && (vm === undefined || v === vm)) out.push(base + i * PS);
      }
    }
    return out;
  }
}
