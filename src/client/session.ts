/**
 * A session is one open of the device (one driver `file_map`): it maps guest
 * pages of introspected VMs into this process and mirrors the driver's per-file
 * list so that teardown can never leak. See README "Lifecycle".
 */
import { debuglog } from 'node:util';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../abi/ioctl.js';
import { ERRNO } from '../abi/errno.js';
import { MEM_MAP_SIZE, MEM_TOKEN_SIZE, encodeMemMap } from '../abi/structs.js';
import type { Device } from '../device/device.js';
import { ClosedError, KvmmemError, UsageError } from '../errors.js';
import * as libc from '../sys/libc.js';
import { Window } from '../sys/window.js';
import { PAGE_SIZE, hex, pageBase, pageOffset, toAddress, type AddressLike } from './address.js';
import { RetryExhaustedError, UseAfterUnmapError } from './errors.js';
import { pagePool, type PageSlot } from './pool.js';
import { vmGoneError, type TargetVm } from './target.js';

const debug = debuglog('kvmmem');

export interface SessionOptions {
  /** Tokens requested per round trip; keep within the host's outstanding limit (v6: 8). */
  maxTokensInFlight?: number;
  /** Tries for a MAP that fails with EAGAIN/EBUSY (libkvmi: 30). */
  retries?: number;
  /** Longest wait between two tries, ms (libkvmi: 1000; we back off from 1 ms up to this). */
  retryDelayMs?: number;
  /** Give up on EAGAIN/EBUSY after this long, ms. */
  deadlineMs?: number;
}

/** Smallest batch worth a second round trip in flight (below it, fewer, larger batches win). */
const PIPELINE_MIN = 32;

const noop = (): void => {};

const DEFAULTS: Required<SessionOptions> = { maxTokensInFlight: 8, retries: 30, retryDelayMs: 1000, deadlineMs: 30_000 };

export interface SessionStats {
  /** Pages mapped now (single pages + pages of ranges). */
  live: number;
  maps: number;
  unmaps: number;
  tokens: number;
  tokenRoundTrips: number;
  retries: number;
  revoked: number;
}

export interface MappingInfo {
  kind: 'page' | 'range-page';
  vm: string;
  gpa: bigint;
  address: bigint;
}

type Why = 'unmapped' | 'session closed' | 'vm unhooked';

/** Internal record of one single-page mapping: what the session mirrors of the driver's list. */
interface PageRecord {
  readonly vm: TargetVm;
  readonly gpa: bigint;
  readonly slot: PageSlot;
  dead: Why | null;
}

/** Internal record of a range: one window, one page state per page. */
interface RangeRecord {
  readonly vm: TargetVm;
  readonly gpa: bigint; // page-aligned start
  readonly pages: number;
  readonly window: Window;
  readonly mapped: Uint8Array; // 1 = mapped now
  live: number;
  dead: Why | null;
}

interface VmIndex {
  pages: Set<PageRecord>;
  ranges: Set<RangeRecord>;
  onEnd: () => void;
}

/** Windows of released ranges, by page count: never unmapped (stale views stay safe), reused. */
const rangeWindows = new Map<number, Window[]>();
function takeRangeWindow(pages: number): Window {
  const w = rangeWindows.get(pages)?.pop();
  return w ?? Window.alloc(pages * PAGE_SIZE);
}
function giveRangeWindow(w: Window): void {
  const pages = w.length / PAGE_SIZE;
  let list = rangeWindows.get(pages);
  if (!list) rangeWindows.set(pages, (list = []));
  list.push(w);
}

// Pages and ranges dropped without unmap() are unmapped when collected.
const finalizer = new FinalizationRegistry<{ session: WeakRef<Session>; rec: PageRecord | RangeRecord }>(({ session, rec }) => {
  const s = session.deref();
  if (!s || s.closed || rec.dead) return;
  debug('a %s of vm %s at gpa %s was garbage-collected while mapped: unmapping it (call unmap() or use `using`)',
    'window' in rec ? 'range' : 'page', rec.vm.name, hex(rec.gpa));
  try {
    if ('window' in rec) s._unmapRange(rec, 'unmapped');
    else s._unmapPage(rec, 'unmapped');
  } catch (e) {
    debug('finalizer unmap failed: %s', (e as Error).message);
  }
});

/** Per-page flags of one #mapItems call. */
const ENOENT_RETRIED = 1;
const DONE = 2;
const TWO32 = 0x1_0000_0000;

export class Session {
  readonly device: Device;
  readonly options: Required<SessionOptions>;
  readonly #pages = new Map<number, PageRecord>(); // local address -> record (O(1), unlike the driver's list)
  readonly #ranges = new Set<RangeRecord>();
  readonly #byVm = new Map<TargetVm, VmIndex>();
  readonly #ref = new WeakRef(this);
  #records = Buffer.alloc(0);
  #use = new Int32Array(0);
  /** map()'s liveness check (a single page has no record until mapped). */
  readonly #pageAlive = (vm: TargetVm): boolean => !this.#closed && vm.state === 'connected';
  #results = new Int32Array(0);
  #unmapValues = Buffer.alloc(0);
  #unmapResults = new Int32Array(0);
  #closed = false;
  readonly #stats: SessionStats = { live: 0, maps: 0, unmaps: 0, tokens: 0, tokenRoundTrips: 0, retries: 0, revoked: 0 };

  constructor(device: Device, options: SessionOptions = {}) {
    this.device = device;
    this.options = { ...DEFAULTS, ...options };
    const o = this.options;
    if (!Number.isInteger(o.maxTokensInFlight) || o.maxTokensInFlight < 1) throw new UsageError(`maxTokensInFlight must be a positive integer, got ${o.maxTokensInFlight}`);
    if (!Number.isInteger(o.retries) || o.retries < 1) throw new UsageError(`retries must be a positive integer, got ${o.retries}`);
  }

  get closed(): boolean { return this.#closed; }
  get stats(): SessionStats { return { ...this.#stats }; }

  /** Maps the guest page containing `gpa` of `vm` at a fresh local page. */
  async map(vm: TargetVm, gpa: AddressLike): Promise<MappedPage> {
    const base = pageBase(toAddress(gpa, 'gpa'));
    this.#check(vm);
    const slot = pagePool.take();
    try {
      await this.#mapItems(vm, base, slot.address, 1, this.#pageAlive);
    } catch (e) {
      pagePool.give(slot);
      throw e;
    }
    // No mlock here: the page stays locked. A real host changes its EPT, not our page
    // table; the model host re-locks every page it puts in with MAP_FIXED (host.ts).
    const rec: PageRecord = { vm, gpa: base, slot, dead: null };
    this.#pages.set(slot.address, rec);
    this.#index(vm).pages.add(rec);
    this.#stats.live++;
    const page = new MappedPage(this, rec);
    finalizer.register(page, { session: this.#ref, rec }, rec);
    if (debug.enabled) debug('map vm=%s gpa=%s -> %s', vm.name, hex(base), hex(slot.address));
    return page;
  }

  /**
   * Maps every page covering [gpa, gpa+length) into ONE contiguous local window,
   * each page with its own token and MAP (batched and pipelined). All or nothing:
   * on failure every page already mapped is unmapped again.
   */
  async mapRange(vm: TargetVm, gpa: AddressLike, length: number): Promise<MappedRange> {
    const start = toAddress(gpa, 'gpa');
    if (!Number.isSafeInteger(length) || length <= 0) throw new UsageError(`mapRange: length must be a positive integer, got ${length}`);
    const first = pageBase(start);
    const pages = Math.ceil((pageOffset(start) + length) / PAGE_SIZE);
    if (pages * PAGE_SIZE > libc.MAX_VIEW_BYTES) throw new UsageError(`mapRange: ${pages} pages exceed one 4 GiB view`, 'map the range in pieces of at most 4 GiB');
    this.#check(vm);
    const window = takeRangeWindow(pages);
    const rec: RangeRecord = { vm, gpa: first, pages, window, mapped: new Uint8Array(pages), live: 0, dead: null };
    // Registered before the first await, so an unhook or close in the middle finds it.
    this.#ranges.add(rec);
    this.#index(vm).ranges.add(rec);
    try {
      await this.#mapItems(vm, first, window.address, pages, rec);
    } catch (e) {
      if (rec.dead === null) this._unmapRange(rec, 'unmapped');
      else this.#forgetRange(rec);
      throw e;
    }
    // (No mlock of the window again: see map().)
    const range = new MappedRange(this, rec, pageOffset(start), length);
    finalizer.register(range, { session: this.#ref, rec }, rec);
    if (debug.enabled) debug('mapRange vm=%s gpa=%s pages=%d -> %s', vm.name, hex(first), pages, hex(window.address));
    return range;
  }

  /** Copies `length` bytes of guest memory at `gpa` (any alignment, page crossings handled). */
  async read(vm: TargetVm, gpa: AddressLike, length: number): Promise<Buffer> {
    const r = await this.mapRange(vm, gpa, length);
    try {
      return Buffer.from(r.buffer);
    } finally {
      r.unmap();
    }
  }

  /** Writes `data` into guest memory at `gpa` (any alignment, page crossings handled). */
  async write(vm: TargetVm, gpa: AddressLike, data: Uint8Array): Promise<void> {
    if (data.length === 0) return;
    const r = await this.mapRange(vm, gpa, data.length);
    try {
      r.buffer.set(data);
    } finally {
      r.unmap();
    }
  }

  /** The session's mirror of the driver's per-file list. */
  mappings(): MappingInfo[] {
    const out: MappingInfo[] = [];
    for (const [address, rec] of this.#pages) out.push({ kind: 'page', vm: rec.vm.uuid, gpa: rec.gpa, address: BigInt(address) });
    for (const rec of this.#ranges) {
      for (let i = 0; i < rec.pages; i++) {
        if (rec.mapped[i]) out.push({ kind: 'range-page', vm: rec.vm.uuid, gpa: rec.gpa + BigInt(i * PAGE_SIZE), address: BigInt(rec.window.address + i * PAGE_SIZE) });
      }
    }
    return out;
  }

  /**
   * Closes the device: the driver's release() unmaps everything this file
   * mapped. Every page and range of the session becomes unusable.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.device.close();
    } finally {
      for (const rec of this.#pages.values()) { rec.dead = 'session closed'; pagePool.give(rec.slot); finalizer.unregister(rec); }
      for (const rec of this.#ranges) { rec.dead = 'session closed'; rec.mapped.fill(0); rec.live = 0; giveRangeWindow(rec.window); finalizer.unregister(rec); }
      this.#pages.clear();
      this.#ranges.clear();
      for (const [vm, idx] of this.#byVm) this.#unwatch(vm, idx);
      this.#byVm.clear();
      this.#stats.live = 0;
      debug('session closed');
    }
  }

  [Symbol.dispose](): void { this.close(); }

  // ---- internals (underscored ones are for MappedPage/MappedRange) ----

  _unmapPage(rec: PageRecord, why: Why): void {
    if (rec.dead) return;
    if (this.#closed) throw new ClosedError('session');
    const r = this.#unmapOne(rec.slot.address);
    rec.dead = why;
    this.#pages.delete(rec.slot.address);
    this.#byVm.get(rec.vm)?.pages.delete(rec);
    this.#stats.live--;
    finalizer.unregister(rec);
    pagePool.give(rec.slot);
    if (r < 0 && r !== -ERRNO.ENOENT) throw this.device.error(KVM_INTRO_MEM_UNMAP, r);
  }

  _unmapRange(rec: RangeRecord, why: Why): void {
    if (rec.dead) return;
    if (this.#closed) throw new ClosedError('session');
    let firstError = 0;
    if (rec.live > 0) {
      const { values, results } = this.#unmapScratch(rec.live);
      let n = 0;
      const base = rec.window.address;
      for (let i = 0; i < rec.pages; i++) {
        if (rec.mapped[i]) {
          const a = base + i * PAGE_SIZE; // < 2^47: two exact u32 halves
          values.writeUInt32LE(a % 0x1_0000_0000, 8 * n);
          values.writeUInt32LE(Math.floor(a / 0x1_0000_0000), 8 * n + 4);
          n++;
        }
      }
      this.device.ioctlBatch(KVM_INTRO_MEM_UNMAP, values, 0, n, results);
      this.#stats.unmaps += n;
      for (let k = 0; k < n; k++) {
        if (results[k]! < 0 && results[k] !== -ERRNO.ENOENT && firstError === 0) firstError = results[k]!;
      }
      this.#stats.live -= rec.live;
      rec.mapped.fill(0);
      rec.live = 0;
    }
    rec.dead = why;
    this.#forgetRange(rec);
    if (firstError < 0) throw this.device.error(KVM_INTRO_MEM_UNMAP, firstError);
  }

  #forgetRange(rec: RangeRecord): void {
    rec.dead ??= 'unmapped';
    if (!this.#ranges.delete(rec)) return;
    this.#byVm.get(rec.vm)?.ranges.delete(rec);
    finalizer.unregister(rec);
    giveRangeWindow(rec.window);
  }

  #unmapOne(address: number): number {
    this.#stats.unmaps++;
    try {
      return this.device.ioctl(KVM_INTRO_MEM_UNMAP, address);
    } catch (e) {
      if (e instanceof KvmmemError && e.errno !== undefined) return e.errno;
      throw e;
    }
  }

  #check(vm: TargetVm): void {
    if (this.#closed) throw new ClosedError('session');
    if (vm.state !== 'connected') throw vmGoneError(vm);
  }

  #index(vm: TargetVm): VmIndex {
    let idx = this.#byVm.get(vm);
    if (!idx) {
      // UNHOOK (or the connection ending): unmap every page of that VM, synchronously,
      // before the channel replies and closes the socket (seed 004).
      const onEnd = () => this.#revokeVm(vm);
      idx = { pages: new Set(), ranges: new Set(), onEnd };
      vm.on('unhook', onEnd);
      vm.on('gone', onEnd);
      this.#byVm.set(vm, idx);
    }
    return idx;
  }

  #unwatch(vm: TargetVm, idx: VmIndex): void {
    vm.off('unhook', idx.onEnd);
    vm.off('gone', idx.onEnd);
  }

  #revokeVm(vm: TargetVm): void {
    const idx = this.#byVm.get(vm);
    if (!idx || this.#closed) return;
    let n = 0;
    for (const rec of [...idx.pages]) {
      try { this._unmapPage(rec, 'vm unhooked'); } catch (e) { debug('revoke: %s', (e as Error).message); }
      n++;
    }
    for (const rec of [...idx.ranges]) {
      n += rec.live;
      try { this._unmapRange(rec, 'vm unhooked'); } catch (e) { debug('revoke: %s', (e as Error).message); }
    }
    this.#stats.revoked += n;
    this.#unwatch(vm, idx);
    this.#byVm.delete(vm);
    debug('vm %s unhooked: %d pages unmapped', vm.name, n);
  }

  /**
   * Maps items with tokens fetched in pipelined batches and one batched ioctl per
   * batch. ENOENT (token lost or expired) is retried once with a fresh token,
   * EAGAIN/EBUSY with bounded backoff. On any other failure everything this call
   * mapped is unmapped again and a typed error is thrown.
   *
   * Pipelining: when the token budget (maxTokensInFlight) holds two batches of at
   * least PIPELINE_MIN tokens, two token requests are kept in flight: batch k+1's
   * round trip overlaps batch k's MAPs, and a new request is sent only after a
   * batch's MAPs consumed its tokens, so the host never holds more than the
   * budget unconsumed. Below that (v6: 8 tokens), one full batch per round trip.
   */
  async #mapItems(vm: TargetVm, gpa0: bigint, addr0: number, count: number, target: RangeRecord | ((vm: TargetVm) => boolean)): Promise<void> {
    const o = this.options;
    const t0 = Date.now();
    const range = typeof target === 'function' ? null : target;
    const alive = range === null ? target as (vm: TargetVm) => boolean : () => range.dead === null;
    // gpa of page i = gpaHi * 2^32 + gpaLo + i * PAGE_SIZE, in exact numbers (no bigint per page)
    const gpaHi = Number(gpa0 / BigInt(TWO32));
    const gpaLo = Number(gpa0 % BigInt(TWO32));
    const tries = new Uint32Array(count);
    const flags = new Uint8Array(count);
    let pending = new Int32Array(count);
    for (let i = 0; i < count; i++) pending[i] = i;
    let budget = o.maxTokensInFlight;
    let delay = 1;
    let lastTransient: Error | null = null;
    const rollback = (err: unknown): unknown => this.#rollback(count, flags, addr0, err);
    while (pending.length > 0) {
      const next: number[] = [];
      let transient = false;
      const depth = budget >= 2 * PIPELINE_MIN && pending.length > budget ? 2 : 1;
      const size = depth === 2 ? Math.ceil(budget / 2) : budget;
      let off = 0;
      const inflight: { chunk: Int32Array; got: Promise<(Uint8Array | Error)[]> }[] = [];
      const issue = () => {
        if (off >= pending.length) return;
        const chunk = pending.subarray(off, off + size);
        off += chunk.length;
        let got: Promise<(Uint8Array | Error)[]>;
        try {
          got = vm.getMapTokensSettled(chunk.length);
        } catch (e) {
          got = Promise.reject(e); // a TargetVm that throws instead of rejecting: handled where awaited
        }
        got.catch(noop); // awaited below; never an unhandled rejection if this call throws first
        inflight.push({ chunk, got });
      };
      for (let d = 0; d < depth; d++) issue();
      while (inflight.length > 0) {
        const { chunk, got: gotP } = inflight.shift()!;
        let got: (Uint8Array | Error)[];
        try {
          got = await gotP;
        } catch (e) {
          this.#aliveOrThrow(vm, alive);
          throw rollback(e);
        }
        this.#stats.tokenRoundTrips++;
        this.#aliveOrThrow(vm, alive);
        // Use every token that came back; requests the host refused (EAGAIN: over its
        // outstanding limit) go round again with a smaller batch.
        const { records, results, use } = this.#scratch(chunk.length);
        let n = 0;
        for (let k = 0; k < chunk.length; k++) {
          const g = got[k]!;
          const i = chunk[k]!;
          if (g instanceof Uint8Array) {
            const at = n * MEM_MAP_SIZE;
            const x = gpaLo + i * PAGE_SIZE;
            const hi = gpaHi + Math.floor(x / TWO32);
            if (hi >= TWO32 || g.length !== MEM_TOKEN_SIZE) {
              // not a token, or past 2^64: encodeMemMap throws its typed error
              encodeMemMap({ token: g, gpa: gpa0 + BigInt(i * PAGE_SIZE), gva: BigInt(addr0 + i * PAGE_SIZE) }, records, at);
            }
            records.set(g, at);
            records.writeUInt32LE(x >>> 0, at + 32);
            records.writeUInt32LE(hi, at + 36);
            const a = addr0 + i * PAGE_SIZE; // < 2^47: two exact u32 halves
            records.writeUInt32LE(a >>> 0, at + 40);
            records.writeUInt32LE(Math.floor(a / TWO32), at + 44);
            tries[i]!++;
            use[n++] = i;
          } else if (g instanceof KvmmemError && g.code === 'EAGAIN') {
            next.push(i);
            transient = true;
            lastTransient = g;
          } else {
            throw rollback(g);
          }
        }
        got.length = 0;
        if (n < chunk.length && budget > 1) {
          // Over the host's limit (someone else holds tokens of this VM too): shrink, and
          // stop issuing in this pass (what is in flight is still used; the rest goes round again).
          budget = Math.max(1, n);
          for (let k = off; k < pending.length; k++) next.push(pending[k]!);
          off = pending.length;
        }
        this.#stats.tokens += n;
        if (n > 0) {
          this.device.ioctlBatch(KVM_INTRO_MEM_MAP, records, MEM_MAP_SIZE, n, results);
          records.fill(0, 0, n * MEM_MAP_SIZE); // tokens are single-use secrets: don't keep them around
        }
        // Record every success of the batch before acting on a failure, so rollback sees them all.
        let fatal: unknown = null;
        let mapped = 0;
        for (let k = 0; k < n; k++) {
          const i = use[k]!;
          const r = results[k]!;
          if (r >= 0) {
            flags[i]! |= DONE;
            mapped++;
            if (range !== null) range.mapped[i] = 1;
          } else if (r === -ERRNO.ENOENT && (flags[i]! & ENOENT_RETRIED) === 0 && vm.state === 'connected') {
            flags[i]! |= ENOENT_RETRIED;
            this.#stats.retries++;
            next.push(i);
          } else if ((r === -ERRNO.EAGAIN || r === -ERRNO.EBUSY) && tries[i]! < o.retries && Date.now() - t0 < o.deadlineMs) {
            this.#stats.retries++;
            transient = true;
            next.push(i);
          } else {
            fatal ??= (r === -ERRNO.EAGAIN || r === -ERRNO.EBUSY)
              ? new RetryExhaustedError(r === -ERRNO.EAGAIN ? 'EAGAIN' : 'EBUSY', r, tries[i]!, Date.now() - t0, this.device.error(KVM_INTRO_MEM_MAP, r))
              : vm.state !== 'connected' ? vmGoneError(vm) : this.device.error(KVM_INTRO_MEM_MAP, r);
          }
        }
        this.#stats.maps += mapped;
        if (range !== null) {
          range.live += mapped;
          this.#stats.live += mapped;
        }
        if (fatal !== null) throw rollback(fatal);
        // The MAPs consumed this batch's tokens: room for the next request.
        issue();
      }
      pending = Int32Array.from(next);
      if (pending.length > 0 && transient) {
        if (Date.now() - t0 >= o.deadlineMs && lastTransient !== null) throw rollback(lastTransient);
        await new Promise((res) => setTimeout(res, delay));
        delay = Math.min(delay * 2, o.retryDelayMs);
        if (!this.#aliveOrThrow(vm, alive)) break;
      }
    }
  }

  /**
   * The session's MAP records and results for a batch of n, reused across
   * batches (and pinned, so the native batch call takes their addresses). Safe to
   * share: each batch encodes, issues and reads them with no await in between.
   */
  #unmapScratch(n: number): { values: Buffer; results: Int32Array } {
    if (this.#unmapValues.length < 8 * n) {
      this.#unmapValues = Buffer.alloc(8 * n);
      this.#unmapResults = new Int32Array(n);
      libc.pin(this.#unmapValues);
      libc.pin(this.#unmapResults);
    }
    return { values: this.#unmapValues, results: this.#unmapResults };
  }

  #scratch(n: number): { records: Buffer; results: Int32Array; use: Int32Array } {
    if (this.#records.length < n * MEM_MAP_SIZE) {
      this.#records = Buffer.alloc(n * MEM_MAP_SIZE);
      this.#results = new Int32Array(n);
      this.#use = new Int32Array(n);
      libc.pin(this.#records);
      libc.pin(this.#results);
    }
    return { records: this.#records, results: this.#results, use: this.#use };
  }

  /** After an await: is the mapping still wanted? Throws the right error when not. */
  #aliveOrThrow(vm: TargetVm, alive: (vm: TargetVm) => boolean): boolean {
    if (this.#closed) throw new ClosedError('session');
    if (vm.state !== 'connected' || !alive(vm)) throw vmGoneError(vm);
    return true;
  }

  /** Unmaps what a #mapItems call mapped so far (single-page calls; ranges unmap through their record). */
  #rollback(count: number, flags: Uint8Array, addr0: number, err: unknown): unknown {
    if (count === 1 && (flags[0]! & DONE) !== 0 && !this.#closed) {
      this.#unmapOne(addr0);
      flags[0]! &= ~DONE;
    }
    return err;
  }
}

/** One mapped guest page: `buffer` is a live view of it (reads and writes are the guest's). */
export class MappedPage implements Disposable {
  readonly #session: Session;
  readonly #rec: PageRecord;

  /** @internal */
  constructor(session: Session, rec: PageRecord) {
    this.#session = session;
    this.#rec = rec;
  }

  get vm(): TargetVm { return this.#rec.vm; }
  get gpa(): bigint { return this.#rec.gpa; }
  get address(): bigint { this.#live(); return BigInt(this.#rec.slot.address); }
  get mapped(): boolean { return this.#rec.dead === null; }
  /** Live 4 KiB view of the guest page. */
  get buffer(): Buffer { this.#live(); return this.#rec.slot.buffer; }

  /** Copies bytes out of the page. */
  read(offset = 0, length = PAGE_SIZE - offset): Buffer {
    this.#live();
    if (offset < 0 || length < 0 || offset + length > PAGE_SIZE) throw new RangeError(`read: [${offset}, ${offset + length}) is outside the page`);
    return Buffer.from(this.#rec.slot.buffer.subarray(offset, offset + length));
  }

  unmap(): void {
    if (this.#rec.dead) throw new UseAfterUnmapError(this.#what(), this.#rec.dead);
    this.#session._unmapPage(this.#rec, 'unmapped');
  }

  [Symbol.dispose](): void {
    if (!this.#rec.dead) this.#session._unmapPage(this.#rec, 'unmapped');
  }

  #live(): void {
    if (this.#rec.dead) throw new UseAfterUnmapError(this.#what(), this.#rec.dead);
  }

  #what(): string { return `page gpa ${hex(this.#rec.gpa)} of vm ${this.#rec.vm.name}`; }
}

/** Consecutive guest pages mapped into one contiguous local window. */
export class MappedRange implements Disposable {
  readonly #session: Session;
  readonly #rec: RangeRecord;
  readonly #offset: number;
  readonly #length: number;
  #view: Buffer | undefined;

  /** @internal */
  constructor(session: Session, rec: RangeRecord, offset: number, length: number) {
    this.#session = session;
    this.#rec = rec;
    this.#offset = offset;
    this.#length = length;
  }

  get vm(): TargetVm { return this.#rec.vm; }
  /** The gpa asked for (not rounded). */
  get gpa(): bigint { return this.#rec.gpa + BigInt(this.#offset); }
  get length(): number { return this.#length; }
  get pages(): number { return this.#rec.pages; }
  get mapped(): boolean { return this.#rec.dead === null; }
  /** Local address of the first byte asked for. */
  get address(): bigint { this.#live(); return BigInt(this.#rec.window.address + this.#offset); }
  /** Live view of exactly [gpa, gpa + length). */
  get buffer(): Buffer {
    this.#live();
    return (this.#view ??= this.#rec.window.buffer!.subarray(this.#offset, this.#offset + this.#length));
  }

  /** Live view of the i-th whole page of the range. */
  page(i: number): Buffer {
    this.#live();
    if (!Number.isInteger(i) || i < 0 || i >= this.#rec.pages) throw new RangeError(`page ${i} is outside 0..${this.#rec.pages - 1}`);
    return this.#rec.window.buffer!.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
  }

  unmap(): void {
    if (this.#rec.dead) throw new UseAfterUnmapError(this.#what(), this.#rec.dead);
    this.#session._unmapRange(this.#rec, 'unmapped');
  }

  [Symbol.dispose](): void {
    if (!this.#rec.dead) this.#session._unmapRange(this.#rec, 'unmapped');
  }

  #live(): void {
    if (this.#rec.dead) throw new UseAfterUnmapError(this.#what(), this.#rec.dead);
  }

  #what(): string { return `range gpa ${hex(this.#rec.gpa + BigInt(this.#offset))}+${this.#length} of vm ${this.#rec.vm.name}`; }
}
