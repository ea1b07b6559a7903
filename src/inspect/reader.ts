/**
 * PhysicalReader: reads of any guest-physical range through mapped pages,
 * with an LRU of live mapped pages.
 *
 * LibVMI keeps 512 *copied* pages aged out after 1 s; here the cache holds
 * zero-copy mappings (MappedPage / pages of a MappedRange), so a cached page
 * always shows what the guest has there now: no aging is needed, and a read
 * after the guest changed a cached page sees the change without a new map.
 *
 * Runs of two or more missing consecutive pages (a read that crosses pages,
 * or prefetch()) are mapped with one Session.mapRange (tokens pipelined, one
 * batched ioctl) instead of one Session.map each. The pages of such a range
 * are cached one by one; the range itself is unmapped when its last cached
 * page is evicted, so the host can hold more mapped pages than the cache
 * has entries (see stats.held).
 *
 * A guest RAM file that shrinks under the cache (model host): read(),
 * readU64/readU32 and readCString throw GuestMemoryShrunkError (code
 * 'ERR_GUEST_MEMORY_SHRUNK') and empty the cache (see sys/faults); a page()
 * view the caller holds reads zeros where the file was cut.
 */
import { ClosedError, UsageError } from '../errors.js';
import * as faults from '../sys/faults.js';
import { PAGE_SIZE, pageBase, toAddress, type AddressLike } from '../client/address.js';
import type { MappedPage, MappedRange, Session } from '../client/session.js';
import type { TargetVm } from '../client/target.js';

const PS = BigInt(PAGE_SIZE);

export interface PhysicalReaderOptions {
  /** Pages kept mapped (LRU). Default 512 (LibVMI's page cache size). */
  cachePages?: number;
  /** Longest run mapped as one range by read()/prefetch(); default min(256, cachePages). */
  maxRunPages?: number;
}

export interface PhysicalReaderStats {
  /** Page lookups served from the cache. */
  hits: number;
  /** Page lookups that had to map (or wait for a map already under way). */
  misses: number;
  /** Pages mapped (a range of n pages counts n). */
  maps: number;
  /** Pages unmapped. */
  unmaps: number;
  /** Pages evicted from the cache by the LRU. */
  evictions: number;
  /** mapRange calls made (runs of consecutive misses). */
  rangeMaps: number;
  /** Pages in the cache now. */
  cached: number;
  /** Pages this reader holds mapped on the host now (>= cached while a partly evicted range lives). */
  held: number;
}

/** Who holds the mapping behind a cache entry. */
type Owner =
  | { kind: 'page'; page: MappedPage }
  | { kind: 'range'; range: MappedRange; refs: number };

interface Entry {
  gpa: bigint; // page base
  buffer: Buffer; // live view of the page
  owner: Owner;
  /** Released its share of the mapping (out of the cache for good). */
  dead: boolean;
}

function ownerMapped(o: Owner): boolean {
  return o.kind === 'page' ? o.page.mapped : o.range.mapped;
}

export class PhysicalReader {
  readonly session: Session;
  readonly vm: TargetVm;
  readonly cachePages: number;
  readonly maxRunPages: number;
  /** Insertion order = LRU order (first = least recently used). */
  readonly #cache = new Map<bigint, Entry>();
  /** Maps under way, by page base. */
  readonly #inflight = new Map<bigint, Promise<Entry>>();
  #closed = false;
  #held = 0;
  readonly #watch: faults.FaultWatch;
  readonly #stats = { hits: 0, misses: 0, maps: 0, unmaps: 0, evictions: 0, rangeMaps: 0 };

  constructor(session: Session, vm: TargetVm, opts: PhysicalReaderOptions = {}) {
    const cachePages = opts.cachePages ?? 512;
    if (!Number.isSafeInteger(cachePages) || cachePages < 1) throw new UsageError(`PhysicalReader: cachePages must be a positive integer, got ${cachePages}`);
    const maxRunPages = opts.maxRunPages ?? Math.min(256, cachePages);
    if (!Number.isSafeInteger(maxRunPages) || maxRunPages < 1) throw new UsageError(`PhysicalReader: maxRunPages must be a positive integer, got ${maxRunPages}`);
    this.session = session;
    this.vm = vm;
    this.cachePages = cachePages;
    this.maxRunPages = Math.min(maxRunPages, cachePages);
    this.#watch = faults.watch(vm.uuid);
  }

  get closed(): boolean { return this.#closed; }

  get stats(): PhysicalReaderStats {
    return { ...this.#stats, cached: this.#cache.size, held: this.#held };
  }

  /** Is the page holding `gpa` in the cache now (no lookup counted, LRU order untouched)? */
  has(gpa: AddressLike): boolean {
    const e = this.#cache.get(pageBase(toAddress(gpa, 'gpa')));
    return e !== undefined && ownerMapped(e.owner);
  }

  /**
   * The live 4 KiB view of the guest page containing `gpa`. Valid until the
   * page is evicted (or the reader closed): copy what you need to keep.
   */
  async page(gpa: AddressLike): Promise<Buffer> {
    return this.#pageOf(pageBase(toAddress(gpa, 'gpa')), true);
  }

  /** A copy of `length` bytes at `gpa` (any alignment; crosses pages). */
  async read(gpa: AddressLike, length: number): Promise<Buffer> {
    const start = toAddress(gpa, 'gpa');
    if (!Number.isSafeInteger(length) || length < 0) throw new UsageError(`read: length must be a non-negative integer, got ${length}`);
    this.#checkOpen();
    if (!faults.guarded()) this.#checked(() => this.#watch.verify('read'));
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const cur = start + BigInt(done);
      const base = pageBase(cur);
      const off = Number(cur - base);
      const pages = Math.min(this.maxRunPages, Math.ceil((off + length - done) / PAGE_SIZE));
      if (pages === 1) {
        const buf = await this.page(cur);
        const n = Math.min(length - done, PAGE_SIZE - off);
        buf.copy(out, done, off, off + n); // synchronous: nothing can evict it before this
        done += n;
        continue;
      }
      // A group of pages: count the lookups, map the missing ones (runs as ranges), then copy.
      let missing = false;
      for (let k = 0; k < pages; k++) {
        const g = base + BigInt(k) * PS;
        const e = this.#cache.get(g);
        if (e !== undefined && ownerMapped(e.owner)) {
          this.#stats.hits++;
          this.#cache.delete(g);
          this.#cache.set(g, e);
        } else {
          this.#stats.misses++;
          missing = true;
        }
      }
      if (missing) await this.#mapRuns(base, pages);
      let o = off;
      for (let k = 0; k < pages && done < length; k++) {
        const g = base + BigInt(k) * PS;
        const e = this.#cache.get(g);
        const buf = e !== undefined && ownerMapped(e.owner) ? e.buffer : (await this.#pageOf(g, false));
        const n = Math.min(length - done, PAGE_SIZE - o);
        buf.copy(out, done, o, o + n);
        done += n;
        o = 0;
      }
    }
    this.#checked(() => this.#watch.check('read'));
    return out;
  }

  async readU64(gpa: AddressLike): Promise<bigint> {
    const g = toAddress(gpa, 'gpa');
    const off = Number(g & 0xfffn);
    if (off > PAGE_SIZE - 8) return (await this.read(g, 8)).readBigUInt64LE(0);
    const v = (await this.page(g)).readBigUInt64LE(off);
    this.#checked(() => this.#watch.check('read'));
    return v;
  }

  async readU32(gpa: AddressLike): Promise<number> {
    const g = toAddress(gpa, 'gpa');
    const off = Number(g & 0xfffn);
    if (off > PAGE_SIZE - 4) return (await this.read(g, 4)).readUInt32LE(0);
    const v = (await this.page(g)).readUInt32LE(off);
    this.#checked(() => this.#watch.check('read'));
    return v;
  }

  /** A NUL-terminated latin1 string of at most `max` bytes (without the NUL), read page by page. */
  async readCString(gpa: AddressLike, max = 256): Promise<string> {
    const start = toAddress(gpa, 'gpa');
    if (!Number.isSafeInteger(max) || max < 0) throw new UsageError(`readCString: max must be a non-negative integer, got ${max}`);
    const parts: Buffer[] = [];
    let got = 0;
    while (got < max) {
      const cur = start + BigInt(got);
      const buf = await this.page(cur);
      const off = Number(cur & 0xfffn);
      const n = Math.min(max - got, PAGE_SIZE - off);
      const nul = buf.indexOf(0, off);
      if (nul >= 0 && nul < off + n) {
        parts.push(Buffer.from(buf.subarray(off, nul)));
        break;
      }
      parts.push(Buffer.from(buf.subarray(off, off + n)));
      got += n;
    }
    this.#checked(() => this.#watch.check('read'));
    return Buffer.concat(parts).toString('latin1');
  }

  /**
   * Maps the pages covering [gpa, gpa+length) that are not cached yet, runs
   * of consecutive missing pages with one mapRange each (at most maxRunPages
   * pages per run, and at most cachePages pages in all). Counts no lookups.
   */
  async prefetch(gpa: AddressLike, length: number): Promise<void> {
    const start = toAddress(gpa, 'gpa');
    if (!Number.isSafeInteger(length) || length < 0) throw new UsageError(`prefetch: length must be a non-negative integer, got ${length}`);
    if (length === 0) return;
    const base = pageBase(start);
    const pages = Math.min(this.cachePages, Math.ceil((Number(start - base) + length) / PAGE_SIZE));
    for (let i = 0; i < pages; i += this.maxRunPages) {
      await this.#mapRuns(base + BigInt(i) * PS, Math.min(this.maxRunPages, pages - i));
    }
  }

  /** Drops the page holding `gpa` from the cache (unmapping it unless a range still needs it). */
  evict(gpa: AddressLike): boolean {
    const e = this.#cache.get(pageBase(toAddress(gpa, 'gpa')));
    if (e === undefined) return false;
    this.#drop(e);
    return true;
  }

  /** Unmaps everything the reader holds. Idempotent; the reader cannot be used afterwards. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    let first: unknown;
    for (const e of [...this.#cache.values()]) {
      try { this.#drop(e); } catch (err) { first ??= err; }
    }
    this.#cache.clear();
    // Maps still under way are unmapped when they land (see #insert).
    if (first !== undefined) throw first;
  }

  [Symbol.dispose](): void { this.close(); }

  // ---- internals

  #checkOpen(): void {
    if (this.#closed) throw new ClosedError('PhysicalReader', 'read');
  }

  /** A failed map's error, or GuestMemoryShrunkError when the host refused it because the RAM file shrank. */
  #whyMapFailed(err: unknown): unknown {
    try {
      this.#checked(() => this.#watch.check('read'));
    } catch (shrunk) {
      return shrunk;
    }
    return err;
  }

  /**
   * Runs a fault check; when it throws (the RAM file shrank), empties the cache
   * first: a page that faulted now reads zeros, and no later read may return them.
   */
  #checked(check: () => void): void {
    try {
      check();
    } catch (e) {
      for (const entry of [...this.#cache.values()]) {
        try { this.#drop(entry); } catch { /* the shrink is what to report */ }
      }
      throw e;
    }
  }

  async #pageOf(base: bigint, count: boolean): Promise<Buffer> {
    for (;;) {
      const e = await this.#lookup(base, count);
      if (!e.dead && ownerMapped(e.owner)) return e.buffer;
      // evicted (or revoked) between the map and now: look again, uncounted
      this.#drop(e);
      count = false;
    }
  }

  /** Cache lookup with LRU touch; a miss maps the page (or joins a map under way). */
  async #lookup(base: bigint, count: boolean): Promise<Entry> {
    this.#checkOpen();
    const hit = this.#cache.get(base);
    if (hit !== undefined) {
      if (ownerMapped(hit.owner)) {
        if (count) this.#stats.hits++;
        this.#cache.delete(base);
        this.#cache.set(base, hit);
        return hit;
      }
      this.#drop(hit); // revoked (VM unhooked) or session closed: map again (which will say why it cannot)
    }
    if (count) this.#stats.misses++;
    const pending = this.#inflight.get(base);
    if (pending !== undefined) return pending;
    return this.#mapOne(base);
  }

  /** Maps one page, registered as under way so concurrent lookups join it. */
  async #mapOne(base: bigint): Promise<Entry> {
    const p = (async () => {
      const page = await this.session.map(this.vm, base).catch((err: unknown) => { throw this.#whyMapFailed(err); });
      this.#stats.maps++;
      this.#held++;
      const e: Entry = { gpa: base, buffer: page.buffer, owner: { kind: 'page', page }, dead: false };
      this.#insert(e);
      return e;
    })();
    this.#inflight.set(base, p);
    try {
      return await p;
    } finally {
      if (this.#inflight.get(base) === p) this.#inflight.delete(base);
    }
  }

  /** Maps the missing pages among `pages` pages from `base`: runs of >= 2 as ranges, single ones alone. */
  async #mapRuns(base: bigint, pages: number): Promise<void> {
    this.#checkOpen();
    let i = 0;
    while (i < pages) {
      const g = base + BigInt(i) * PS;
      if (this.#cache.has(g) || this.#inflight.has(g)) { i++; continue; }
      let n = 1;
      while (i + n < pages) {
        const h = base + BigInt(i + n) * PS;
        if (this.#cache.has(h) || this.#inflight.has(h)) break;
        n++;
      }
      if (n === 1) await this.#mapOne(g);
      else await this.#mapRange(g, n);
      i += n;
    }
  }

  /** Maps n consecutive pages with one mapRange; each page becomes its own cache entry. */
  async #mapRange(first: bigint, n: number): Promise<void> {
    const waiters: { resolve: (e: Entry) => void; reject: (err: unknown) => void; promise: Promise<Entry> }[] = [];
    for (let k = 0; k < n; k++) {
      let resolve!: (e: Entry) => void;
      let reject!: (err: unknown) => void;
      const promise = new Promise<Entry>((res, rej) => { resolve = res; reject = rej; });
      promise.catch(() => { /* whoever joined sees it; nobody may have */ });
      waiters.push({ resolve, reject, promise });
      this.#inflight.set(first + BigInt(k) * PS, promise);
    }
    try {
      const range = await this.session.mapRange(this.vm, first, n * PAGE_SIZE);
      this.#stats.maps += n;
      this.#stats.rangeMaps++;
      this.#held += n;
      const owner: Owner = { kind: 'range', range, refs: n };
      const entries: Entry[] = [];
      for (let k = 0; k < n; k++) entries.push({ gpa: first + BigInt(k) * PS, buffer: range.page(k), owner, dead: false });
      // Insert all synchronously, in page order, before anyone awaiting a page resumes.
      for (const e of entries) this.#insert(e);
      for (let k = 0; k < n; k++) waiters[k]!.resolve(entries[k]!);
    } catch (e) {
      const err = this.#whyMapFailed(e);
      for (const w of waiters) w.reject(err);
      throw err;
    } finally {
      for (let k = 0; k < n; k++) {
        const g = first + BigInt(k) * PS;
        if (this.#inflight.get(g) === waiters[k]!.promise) this.#inflight.delete(g);
      }
    }
  }

  /** Puts a freshly mapped page in the cache, evicting the least recently used beyond capacity. */
  #insert(e: Entry): void {
    if (this.#closed) {
      // closed while the map was under way: give it back at once
      this.#drop(e);
      return;
    }
    const old = this.#cache.get(e.gpa);
    if (old !== undefined) this.#drop(old);
    this.#cache.set(e.gpa, e);
    while (this.#cache.size > this.cachePages) {
      const lru = this.#cache.values().next().value as Entry;
      this.#stats.evictions++;
      this.#drop(lru);
    }
  }

  /** Removes an entry from the cache and releases its share of the mapping (once). */
  #drop(e: Entry): void {
    if (this.#cache.get(e.gpa) === e) this.#cache.delete(e.gpa);
    if (e.dead) return;
    e.dead = true;
    const o = e.owner;
    if (o.kind === 'page') {
      this.#held--;
      if (o.page.mapped) {
        o.page[Symbol.dispose]();
        this.#stats.unmaps++;
      }
      return;
    }
    if (--o.refs > 0) return;
    this.#held -= o.range.pages;
    if (o.range.mapped) {
      o.range[Symbol.dispose]();
      this.#stats.unmaps += o.range.pages;
    }
  }
}

