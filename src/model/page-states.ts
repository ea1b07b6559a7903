/**
 * The find_vma()/follow_page() answers for every page a MAP batch names,
 * looked up before the batch runs with one mincore() per span of nearby pages
 * instead of one per record. Valid for the whole batch: its remaps are deferred
 * to the end (host.ts), so no page changes state meanwhile. A span with a hole
 * in it (mincore fails with ENOMEM) gets no answer: its records are looked up
 * one by one, exactly as without the prefetch.
 */
import * as libc from '../sys/libc.js';
import { PAGE_SIZE } from '../abi/structs.js';
import { MAP_GVA, accessOkGva } from './mem-map-record.js';
import { pageOf, type PageState } from './uaccess.js';

// One byte per record: whether it was looked up, and mincore's resident bit.
const NOT_LOOKED_UP = 0, LOOKED_UP = 2, RESIDENT = 1;
/** Pages this close together share a mincore() call (the gap between them is asked about too). */
const SPAN_GAP = 16 * PAGE_SIZE;
/** At most this many pages per mincore() call. */
const SPAN_MAX_PAGES = 1 << 20;

export class BatchPageStates {
  /** Per record: NOT_LOOKED_UP, or LOOKED_UP with RESIDENT when a page is present. */
  readonly #codes: Uint8Array;

  private constructor(codes: Uint8Array) {
    this.#codes = codes;
  }

  /** The page states of `count` kvmi_mem_map records of `stride` bytes at the start of `args`. */
  static prefetch(args: Uint8Array, stride: number, count: number): BatchPageStates {
    return new BatchPageStates(lookUp(args, stride, count));
  }

  /** The state of record `rec`'s page: 'present' or 'absent'; undefined when it was not looked up. */
  of(rec: number): PageState | undefined {
    const c = this.#codes[rec];
    if (c === LOOKED_UP) return 'absent';
    if (c === (LOOKED_UP | RESIDENT)) return 'present';
    return undefined;
  }
}

/** One code per record; records that fail access_ok (or lie past the end of `args`) are not looked up. */
function lookUp(args: Uint8Array, stride: number, count: number): Uint8Array {
  const codes = new Uint8Array(count);
  // The records' pages, in record order (-1: not looked up) and in page order.
  const recPage = new Float64Array(count).fill(-1);
  const pages = new Float64Array(count);
  let m = 0, ordered = true;
  for (let i = 0; i < count; i++) {
    if (i * stride + MAP_GVA + 8 > args.length) break; // (the record's gva is cut off: so are the rest)
    const gva = accessOkGva(args, i * stride);
    if (gva < 0) continue;
    const page = pageOf(gva);
    recPage[i] = page;
    if (m > 0 && page < pages[m - 1]!) ordered = false;
    pages[m++] = page;
  }
  const sorted = ordered ? pages.subarray(0, m) : pages.subarray(0, m).sort();
  const sortedCode = new Uint8Array(m);
  let i = 0;
  while (i < m) {
    let j = i;
    while (j + 1 < m && sorted[j + 1]! - sorted[j]! <= SPAN_GAP && (sorted[j + 1]! - sorted[i]!) / PAGE_SIZE < SPAN_MAX_PAGES) j++;
    const first = sorted[i]!, n = (sorted[j]! - first) / PAGE_SIZE + 1;
    const vec = new Uint8Array(n);
    if (libc.mincore(first, n * PAGE_SIZE, vec)) {
      for (let k = i; k <= j; k++) sortedCode[k] = LOOKED_UP | (vec[(sorted[k]! - first) / PAGE_SIZE]! & RESIDENT);
    }
    i = j + 1;
  }
  // Back to record order: the same positions when the records were in page order, else a binary search.
  let k = 0;
  for (let r = 0; r < count; r++) {
    const page = recPage[r]!;
    if (page < 0) continue;
    if (ordered) {
      codes[r] = sortedCode[k++]!;
      continue;
    }
    let lo = 0, hi = m - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (sorted[mid]! < page) lo = mid + 1;
      else hi = mid;
    }
    codes[r] = sortedCode[lo]!;
  }
  return codes;
}
