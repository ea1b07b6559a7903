/**
 * fmp->map_list of the RFC v4 driver (kvmi_mem_guest.c): one open file's
 * struct page_map entries in list order (the order of the MAPs that made
 * them), as an ordered multimap vaddr -> entries:
 *
 * - a slab of entries in parallel typed arrays (no JS object per entry),
 *   doubly linked through #next/#prev in list order, freed slots kept on a free
 *   list (threaded through #next) for the next list_add_tail;
 * - a PageIndex page -> the first entry in list order whose vaddr lies in that
 *   page; every further entry of the same page (quirk and stale entries with the
 *   same vaddr, or another unaligned vaddr of the page) is chained after it
 *   through #same, in list order.
 *
 * So the C loop of kvm_dev_ioctl_unmap, "the first entry in list order whose
 * vaddr equals the argument exactly", is one chunk lookup and a walk of that
 * page's chain (normally one entry): MAP, UNMAP and release are O(1) per entry
 * where C walks the list (docs/driver-model.md, deviation 4).
 */
import { PageIndex, CHUNK_PAGES, pageSlot } from './page-index.js';

/** struct page_map: one MAP of this file (a copy, for diagnostics and tests). */
export interface PageMap {
  /** C: pmp->gpa = map->gpa (as passed). */
  readonly gpa: bigint;
  /** C: pmp->vaddr = map->gva (exactly as passed: no page rounding). */
  readonly vaddr: bigint;
  /**
   * C: pmp->paddr = page_to_phys(page): here the page's virtual address.
   * 0n for the find_vma/follow_page quirk, where C leaves kmalloc garbage.
   */
  readonly paddr: bigint;
}

/** An entry of the list: its slab slot (valid while it is listed). */
export type Slot = number;
/** No slot: the end of a chain or of the list, an empty page of the index. */
export const NIL = -1;
/** #prev of a slot on the free list (not listed). */
const FREE = -2;
/** vaddrs below this are exact numbers; no entry has a larger one (entries are below the user limit). */
const EXACT = 0x20000000000000n;

export class MapList {
  /** pmp->vaddr (< 2^47: entries only exist for vaddrs below the user limit). */
  #vaddr = new Float64Array(0);
  /** pmp->paddr: the page's address; 0 for the quirk, where C leaves kmalloc garbage. */
  #paddr = new Float64Array(0);
  /** pmp->gpa as passed when exact (< 2^53); NaN: see #bigGpa. */
  #gpa = new Float64Array(0);
  #next = new Int32Array(0);
  #prev = new Int32Array(0);
  /** The next entry in list order whose vaddr lies in the same page. */
  #same = new Int32Array(0);
  readonly #bigGpa = new Map<Slot, bigint>();
  /** Page of a vaddr -> the first slot in list order whose vaddr lies in that page (then #same). */
  readonly #byPage = new PageIndex<Int32Array>(() => new Int32Array(CHUNK_PAGES).fill(NIL));
  #head: Slot = NIL;
  #tail: Slot = NIL;
  #free: Slot = NIL;
  /** Slots ever used (the slab's high-water mark). */
  #top = 0;

  /** Entries listed. */
  get size(): number { return this.#byPage.size; }

  /** Copies of the entries in list order. */
  entries(): PageMap[] {
    const out: PageMap[] = [];
    for (let s = this.#head; s !== NIL; s = this.#next[s]!) {
      out.push({ gpa: this.gpaOf(s), vaddr: BigInt(this.#vaddr[s]!), paddr: BigInt(this.#paddr[s]!) });
    }
    return out;
  }

  /**
   * @internal C: pmp->gpa = gpa; pmp->vaddr = vaddr; pmp->paddr = paddr;
   * list_add_tail(&pmp->map_list, &fmp->map_list). `vaddr` < 2^47. Returns the entry's slot.
   */
  list_add_tail(gpa: number | bigint, vaddr: number, paddr: number): Slot {
    let s = this.#free;
    if (s !== NIL) this.#free = this.#next[s]!;
    else {
      if (this.#top === this.#vaddr.length) this.#grow();
      s = this.#top++;
    }
    this.#vaddr[s] = vaddr;
    this.#paddr[s] = paddr;
    if (typeof gpa === 'number') this.#gpa[s] = gpa;
    else {
      this.#gpa[s] = NaN;
      this.#bigGpa.set(s, gpa);
    }
    this.#next[s] = NIL;
    this.#prev[s] = this.#tail;
    if (this.#tail === NIL) this.#head = s;
    else this.#next[this.#tail] = s;
    this.#tail = s;
    this.#same[s] = NIL;
    const heads = this.#byPage.add(vaddr);
    const i = pageSlot(vaddr);
    const first = heads[i]!;
    if (first === NIL) heads[i] = s;
    else {
      let t = first;
      while (this.#same[t] !== NIL) t = this.#same[t]!;
      this.#same[t] = s;
    }
    return s;
  }

  /** @internal C: list_del(&pmp->map_list); kfree(pmp). A slot not listed is ignored. */
  list_del(s: Slot): void {
    if (s < 0 || s >= this.#top || this.#prev[s] === FREE) return;
    const prev = this.#prev[s]!, next = this.#next[s]!;
    if (prev === NIL) this.#head = next;
    else this.#next[prev] = next;
    if (next === NIL) this.#tail = prev;
    else this.#prev[next] = prev;
    const vaddr = this.#vaddr[s]!;
    const heads = this.#byPage.chunk(vaddr)!;
    const i = pageSlot(vaddr);
    const first = heads[i]!;
    if (first === s) heads[i] = this.#same[s]!;
    else {
      let t = first;
      while (this.#same[t] !== s) t = this.#same[t]!;
      this.#same[t] = this.#same[s]!;
    }
    this.#byPage.remove(vaddr); // (when it was the chunk's last entry, every head in it is NIL again)
    if (this.#gpa[s] !== this.#gpa[s]) this.#bigGpa.delete(s);
    this.#prev[s] = FREE;
    this.#next[s] = this.#free;
    this.#free = s;
  }

  /**
   * @internal C: list_for_each(cur, &fmp->map_list) { if (pmp->vaddr == vaddr) { found } }
   * — the first entry in list order with exactly this vaddr, in O(1); NIL if none.
   */
  find(vaddr: bigint): Slot {
    if (vaddr >= EXACT) return NIL;
    return this.findExact(Number(vaddr));
  }

  /** @internal find() of a vaddr that is an exact number (< 2^53). */
  findExact(vaddr: number): Slot {
    const heads = this.#byPage.chunk(vaddr);
    if (heads === undefined) return NIL;
    // the page's chain is in list order: its first entry with exactly this vaddr
    for (let t = heads[pageSlot(vaddr)]!; t !== NIL; t = this.#same[t]!) {
      if (this.#vaddr[t] === vaddr) return t;
    }
    return NIL;
  }

  /** @internal pmp->gpa of a listed slot. */
  gpaOf(s: Slot): bigint {
    const g = this.#gpa[s]!;
    return g === g ? BigInt(g) : this.#bigGpa.get(s)!;
  }

  /** @internal pmp->paddr of a listed slot, as a number (0 for the quirk). */
  paddrOf(s: Slot): number {
    return this.#paddr[s]!;
  }

  /** @internal pmp->paddr of every entry in list order (release: one array, no generator). */
  paddrsInOrder(): number[] {
    const out = new Array<number>(this.size);
    let i = 0;
    for (let s = this.#head; s !== NIL; s = this.#next[s]!) out[i++] = this.#paddr[s]!;
    return out;
  }

  /** @internal drop every entry (and the slab). */
  clear(): void {
    this.#byPage.clear();
    this.#bigGpa.clear();
    this.#vaddr = new Float64Array(0);
    this.#paddr = new Float64Array(0);
    this.#gpa = new Float64Array(0);
    this.#next = new Int32Array(0);
    this.#prev = new Int32Array(0);
    this.#same = new Int32Array(0);
    this.#head = this.#tail = this.#free = NIL;
    this.#top = 0;
  }

  #grow(): void {
    const cap = Math.max(64, this.#vaddr.length * 2);
    const f64 = (a: Float64Array) => { const b = new Float64Array(cap); b.set(a); return b; };
    const i32 = (a: Int32Array) => { const b = new Int32Array(cap); b.set(a); return b; };
    this.#vaddr = f64(this.#vaddr);
    this.#paddr = f64(this.#paddr);
    this.#gpa = f64(this.#gpa);
    this.#next = i32(this.#next);
    this.#prev = i32(this.#prev);
    this.#same = i32(this.#same);
  }
}
