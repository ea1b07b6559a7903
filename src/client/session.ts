/**
 * A session is one open of the device (one driver `file_map`): it maps guest
 * pages of introspected VMs into this process and mirrors the driver's per-file
 * list so that teardown can never leak. See README "Lifecycle".
 */
import { debuglog } from 'node:util';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../abi/ioctl.js';
import { ERRNO } from '../abi/errno.js';
import { KVMI_MEM_MAP_LAYOUT, MEM_MAP_SIZE, MEM_TOKEN_SIZE, encodeMemMap } from '../abi/structs.js';
import type { Device } from '../device/device.js';
import { ClosedError, KvmmemError, UsageError } from '../errors.js';
import * as libc from '../sys/libc.js';
import { onThreadExit } from '../sys/thread.js';
import { PAGE_SIZE, hex, pageBase, pageOffset, toAddress, type AddressLike } from './address.js';
import { RetryExhaustedError, UseAfterUnmapError } from './errors.js';
import { localMemory, type Lease } from './local-memory.js';
import { assertTargetVm, vmGoneError, type TargetVm } from './target.js';
import { leaveVm, vmShare, type VmShare } from './vm-share.js';

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
  /** Token requests the host refused (EAGAIN: over its outstanding limit, e.g. tokens held by another process). */
  tokensRefused: number;
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
  readonly lease: Lease;
  dead: Why | null;
}

/** Internal record of a range: one window, one page state per page. */
interface RangeRecord {
  readonly vm: TargetVm;
  readonly gpa: bigint; // page-aligned start
  readonly pages: number;
  readonly lease: Lease;
  readonly mapped: Uint8Array; // 1 = mapped now
  live: number;
  dead: Why | null;
}

interface VmIndex {
  pages: Set<PageRecord>;
  ranges: Set<RangeRecord>;
  share: VmShare;
  onEnd: () => void;
}

/**
 * A mapping lives as long as anything can reach it: its MappedPage/MappedRange
 * or any Buffer over it (they all keep the one view's ArrayBuffer). When the
 * view is collected while still mapped, this unmaps it (local-memory.ts then
 * recycles the address). It must not refer to the view.
 */
function unmapWhenCollected(session: WeakRef<Session>, rec: PageRecord | RangeRecord): () => void {
  return () => {
    const s = session.deref();
    if (!s || s.closed || rec.dead) return;
    debug('a %s of vm %s at gpa %s was garbage-collected while mapped: unmapping it (call unmap() or use `using`)',
      'pages' in rec ? 'range' : 'page', rec.vm.name, hex(rec.gpa));
    if ('pages' in rec) s._unmapRange(rec, 'unmapped');
    else s._unmapPage(rec, 'unmapped');
  };
}

/**
 * A MappedPage/MappedRange collected before anyone asked for its buffer: no view
 * exists, so nothing else keeps the mapping; unmap it (the address is then
 * reusable at once). Once a view exists, its own collection decides (above).
 */
const dropped = new FinalizationRegistry<{ session: WeakRef<Session>; rec: PageRecord | RangeRecord }>(({ session, rec }) => {
  if (!rec.lease.viewed) unmapWhenCollected(session, rec)();
});

const MAX_TOKENS_IN_FLIGHT = 4096;

/** Checks SessionOptions before anything is opened (KvmMem.open calls it first). */
export function validateSessionOptions(options: SessionOptions): Required<SessionOptions> {
  if (options === null || typeof options !== 'object') throw new UsageError(`options must be an object, got ${options === null ? 'null' : typeof options}`);
  const o = { ...DEFAULTS };
  for (const k of Object.keys(DEFAULTS) as (keyof SessionOptions)[]) if (options[k] !== undefined) o[k] = options[k]!;
  const int = (name: keyof SessionOptions, min: number, max: number): void => {
    const v = o[name];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      throw new UsageError(`options.${name} must be an integer in ${min}..${max}, got ${typeof v === 'number' ? v : JSON.stringify(v)}`);
    }
  };
  int('maxTokensInFlight', 1, MAX_TOKENS_IN_FLIGHT);
  int('retries', 1, 1_000_000);
  int('retryDelayMs', 0, 3_600_000);
  int('deadlineMs', 1, 86_400_000);
  return o;
}

/**
 * Whose pages a #mapItems call maps: one range's (its record says whether it
 * is still wanted and collects what is mapped), or a single page (still
 * wanted while `alive` says so).
 */
type MapOwner = { kind: 'range'; rec: RangeRecord } | { kind: 'page'; alive: (vm: TargetVm) => boolean };

/** One #mapItems call: what it maps, and the state of every item. */
interface MapJob {
  readonly vm: TargetVm;
  readonly gpa0: bigint;
  readonly addr0: number;
  readonly count: number;
  /** The range being mapped (its page states are updated as MAPs land), or null for a single page. */
  readonly range: RangeRecord | null;
  /** Still wanted? (checked after every await) */
  readonly alive: (vm: TargetVm) => boolean;
  readonly gpaHi: number;
  readonly gpaLo: number;
  /** Per item: MAP attempts, and ENOENT_RETRIED | DONE. */
  readonly tries: Uint32Array;
  readonly flags: Uint8Array;
  readonly t0: number;
  /** Tokens per round trip now (shrinks when the host refuses some). */
  budget: number;
  readonly share: VmShare;
  lastTransient: Error | null;
}

/** One token request of a #mapItems call: its items, the reply, and what it holds of the VM's budget. */
interface Batch {
  readonly chunk: Int32Array;
  readonly got: Promise<(Uint8Array | Error)[]>;
  grant: number;
  /** Tokens of this VM that other batches of ours held when this one got its turn. */
  readonly others: number;
}

/** Names the page item i of a job failed at: `gpa` on the error, and at the head of its message. */
function failedAt<E extends Error>(e: E, job: MapJob, i: number): E {
  if (e instanceof KvmmemError && e.gpa === undefined) {
    const gpa = job.gpa0 + BigInt(i * PAGE_SIZE);
    Object.defineProperty(e, 'gpa', { value: gpa, enumerable: true });
    e.message = `gpa ${hex(gpa)} of vm ${job.vm.name}: ${e.message}`;
  }
  return e;
}

function giveBack(job: MapJob, b: Batch): void {
  if (b.grant > 0) {
    job.share.release(b.grant);
    b.grant = 0;
  }
}

/** kvmi_mem_map field offsets, from the ABI's layout (the records are written in place). */
const MAP_TOKEN = KVMI_MEM_MAP_LAYOUT.fields.token.offset;
const MAP_GPA = KVMI_MEM_MAP_LAYOUT.fields.gpa.offset;
const MAP_GVA = KVMI_MEM_MAP_LAYOUT.fields.gva.offset;

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
  #noExitHook: () => void;
  readonly #stats: SessionStats = { live: 0, maps: 0, unmaps: 0, tokens: 0, tokenRoundTrips: 0, tokensRefused: 0, retries: 0, revoked: 0 };

  constructor(device: Device, options: SessionOptions = {}) {
    this.options = validateSessionOptions(options);
    this.device = device;
    localMemory.sessionOpened();
    // A worker's exit (or process.exit) closes the device like the driver's release() would.
    this.#noExitHook = onThreadExit(() => this.close());
  }

  get closed(): boolean { return this.#closed; }
  get stats(): SessionStats { return { ...this.#stats }; }

  /** Maps the guest page containing `gpa` of `vm` at a fresh local page. */
  async map(vm: TargetVm, gpa: AddressLike): Promise<MappedPage> {
    assertTargetVm(vm, 'map');
    const want = toAddress(gpa, 'gpa');
    const base = pageBase(want);
    this.#check(vm);
    const idx = this.#index(vm);
    const lease = localMemory.takePage();
    try {
      await this.#mapItems(vm, base, lease.address, 1, { kind: 'page', alive: this.#pageAlive });
    } catch (e) {
      localMemory.release(lease); // never viewed: reusable at once
      throw e;
    }
    // No mlock here: the page stays locked. A real host changes its EPT, not our page
    // table; the model host re-locks every page it puts in with MAP_FIXED (host.ts).
    const rec: PageRecord = { vm, gpa: base, lease, dead: null };
    this.#pages.set(lease.address, rec);
    idx.pages.add(rec);
    this.#stats.live++;
    const page = new MappedPage(this, rec, this.#ref, pageOffset(want));
    dropped.register(page, { session: this.#ref, rec });
    if (debug.enabled) debug('map vm=%s gpa=%s -> %s', vm.name, hex(base), hex(lease.address));
    return page;
  }

  /**
   * Maps every page covering [gpa, gpa+length) into ONE contiguous local window,
   * each page with its own token and MAP (batched and pipelined). All or nothing:
   * on failure every page already mapped is unmapped again.
   */
  async mapRange(vm: TargetVm, gpa: AddressLike, length: number): Promise<MappedRange> {
    assertTargetVm(vm, 'mapRange');
    const start = toAddress(gpa, 'gpa');
    checkLength('mapRange', start, length, false);
    const rec = await this.#mapRangeRecord(vm, start, length);
    const range = new MappedRange(this, rec, this.#ref, pageOffset(start), length);
    dropped.register(range, { session: this.#ref, rec });
    if (debug.enabled) debug('mapRange vm=%s gpa=%s pages=%d -> %s', vm.name, hex(rec.gpa), rec.pages, hex(rec.lease.address));
    return range;
  }

  /** Copies `length` bytes of guest memory at `gpa` (any alignment, page crossings handled); 0 bytes: an empty Buffer. */
  async read(vm: TargetVm, gpa: AddressLike, length: number): Promise<Buffer> {
    assertTargetVm(vm, 'read');
    const start = toAddress(gpa, 'gpa');
    checkLength('read', start, length, true);
    if (length === 0) return Buffer.alloc(0);
    // The copy goes through a view that never leaves the session, so the window is reused at once.
    const rec = await this.#mapRangeRecord(vm, start, length);
    try {
      const off = pageOffset(start);
      return Buffer.from(localMemory.internalView(rec.lease).subarray(off, off + length));
    } finally {
      this._unmapRange(rec, 'unmapped');
    }
  }

  /**
   * Reads guest memory at `gpa` into `target` as far as it can be read, as
   * LibVMI's `bytes_read`: resolves to how many bytes were copied (from the
   * start, up to the first page that could not be mapped) and that page's
   * error (its `gpa` set), or null when all of `target` was filled. Never
   * rejects for an unreadable page; bad arguments still throw.
   */
  async readInto(vm: TargetVm, gpa: AddressLike, target: Uint8Array): Promise<{ bytesRead: number; error: KvmmemError | null }> {
    assertTargetVm(vm, 'readInto');
    const start = toAddress(gpa, 'gpa');
    if (!(target instanceof Uint8Array)) throw new UsageError(`readInto: target must be a Buffer or Uint8Array, got ${target === null ? 'null' : typeof target}`);
    checkLength('readInto', start, target.length, true);
    let want = target.length;
    let error: KvmmemError | null = null;
    // Map it all; on a failure at page p, read up to p (which may fail lower down: go again).
    while (want > 0) {
      try {
        const rec = await this.#mapRangeRecord(vm, start, want);
        try {
          const off = pageOffset(start);
          target.set(localMemory.internalView(rec.lease).subarray(off, off + want));
        } finally {
          this._unmapRange(rec, 'unmapped');
        }
        return { bytesRead: want, error };
      } catch (e) {
        if (!(e instanceof KvmmemError)) throw e;
        error = e;
        const at = e.gpa;
        if (at === undefined || at <= start) return { bytesRead: 0, error };
        const upTo = Number(at - start);
        if (upTo >= want) return { bytesRead: 0, error };
        want = upTo;
      }
    }
    return { bytesRead: 0, error };
  }

  /** Writes `data` (a Buffer or any Uint8Array; not a string) into guest memory at `gpa` (any alignment, page crossings handled). */
  async write(vm: TargetVm, gpa: AddressLike, data: Uint8Array): Promise<void> {
    assertTargetVm(vm, 'write');
    const start = toAddress(gpa, 'gpa');
    if (!(data instanceof Uint8Array)) {
      throw new UsageError(`write: data must be a Buffer or Uint8Array, got ${data === null ? 'null' : typeof data}`, typeof data === 'string' ? 'encode text first, e.g. Buffer.from(text, \'latin1\')' : undefined);
    }
    checkLength('write', start, data.length, true);
    if (data.length === 0) return;
    const rec = await this.#mapRangeRecord(vm, start, data.length);
    try {
      const off = pageOffset(start);
      localMemory.internalView(rec.lease).set(data, off);
    } finally {
      this._unmapRange(rec, 'unmapped');
    }
  }

  /** Maps every page covering [start, start+length) into one window; all or nothing. */
  async #mapRangeRecord(vm: TargetVm, start: bigint, length: number): Promise<RangeRecord> {
    const first = pageBase(start);
    const pages = Math.ceil((pageOffset(start) + length) / PAGE_SIZE);
    this.#check(vm);
    const idx = this.#index(vm);
    const lease = localMemory.takeWindow(pages);
    const rec: RangeRecord = { vm, gpa: first, pages, lease, mapped: new Uint8Array(pages), live: 0, dead: null };
    // Registered before the first await, so an unhook or close in the middle finds it.
    this.#ranges.add(rec);
    idx.ranges.add(rec);
    try {
      await this.#mapItems(vm, first, lease.address, pages, { kind: 'range', rec });
    } catch (e) {
      if (rec.dead === null && !this.#closed) this._unmapRange(rec, 'unmapped');
      else this.#forgetRange(rec);
      throw e;
    }
    // (No mlock of the window again: see map().)
    return rec;
  }

  /** The session's mirror of the driver's per-file list. */
  mappings(): MappingInfo[] {
    const out: MappingInfo[] = [];
    for (const [address, rec] of this.#pages) out.push({ kind: 'page', vm: rec.vm.uuid, gpa: rec.gpa, address: BigInt(address) });
    for (const rec of this.#ranges) {
      for (let i = 0; i < rec.pages; i++) {
        if (rec.mapped[i]) out.push({ kind: 'range-page', vm: rec.vm.uuid, gpa: rec.gpa + BigInt(i * PAGE_SIZE), address: BigInt(rec.lease.address + i * PAGE_SIZE) });
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
    this.#noExitHook();
    try {
      this.device.close();
    } finally {
      // The driver's release() unmapped everything; the addresses wait for their views.
      for (const rec of this.#pages.values()) { rec.dead = 'session closed'; localMemory.release(rec.lease); }
      for (const rec of this.#ranges) { rec.dead = 'session closed'; rec.mapped.fill(0); rec.live = 0; localMemory.release(rec.lease); }
      this.#pages.clear();
      this.#ranges.clear();
      for (const [vm, idx] of this.#byVm) this.#unwatch(vm, idx);
      this.#byVm.clear();
      this.#stats.live = 0;
      localMemory.sessionClosed();
      debug('session closed');
    }
  }

  [Symbol.dispose](): void { this.close(); }

  // ---- internals (underscored ones are for MappedPage/MappedRange) ----

  /** @internal */
  _unmapPage(rec: PageRecord, why: Why): void {
    if (rec.dead) return;
    if (this.#closed) throw new ClosedError('session');
    const r = this.#unmapOne(rec.lease.address);
    if (debug.enabled) debug('unmap vm=%s gpa=%s (%s)%s', rec.vm.name, hex(rec.gpa), why, r < 0 ? ` -> errno ${-r}` : '');
    rec.dead = why;
    this.#pages.delete(rec.lease.address);
    this.#byVm.get(rec.vm)?.pages.delete(rec);
    this.#stats.live--;
    localMemory.release(rec.lease);
    if (r < 0 && r !== -ERRNO.ENOENT) throw this.device.error(KVM_INTRO_MEM_UNMAP, r);
  }

  /** @internal */
  _unmapRange(rec: RangeRecord, why: Why): void {
    if (rec.dead) return;
    if (this.#closed) throw new ClosedError('session');
    if (debug.enabled) debug('unmap vm=%s gpa=%s pages=%d (%s)', rec.vm.name, hex(rec.gpa), rec.live, why);
    let firstError = 0;
    if (rec.live > 0) {
      const { values, results } = this.#unmapScratch(rec.live);
      let n = 0;
      const base = rec.lease.address;
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
    localMemory.release(rec.lease);
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
      // before the channel replies and closes the socket (KVM_INTROSPECTION_PREUNHOOK: the
      // device manager waits for exactly that).
      const onEnd = () => this.#revokeVm(vm);
      const share = vmShare(vm);
      share.join(onEnd, this.options.maxTokensInFlight);
      idx = { pages: new Set(), ranges: new Set(), share, onEnd };
      this.#byVm.set(vm, idx);
    }
    return idx;
  }

  #unwatch(vm: TargetVm, idx: VmIndex): void {
    leaveVm(vm, idx.onEnd);
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
   * Maps `count` consecutive guest pages at consecutive local pages: tokens
   * fetched in batches (pipelined), one batched MAP ioctl per batch. ENOENT (a
   * token lost or expired) is retried once with a fresh token, EAGAIN/EBUSY with
   * bounded back-off. On any other failure what this call mapped is unmapped
   * again (single pages here; a range through its record) and a typed error is
   * thrown.
   */
  async #mapItems(vm: TargetVm, gpa0: bigint, addr0: number, count: number, owner: MapOwner): Promise<void> {
    const range = owner.kind === 'range' ? owner.rec : null;
    const job: MapJob = {
      vm, gpa0, addr0, count, range,
      alive: owner.kind === 'page' ? owner.alive : () => owner.rec.dead === null,
      // gpa of page i = gpaHi * 2^32 + gpaLo + i * PAGE_SIZE, in exact numbers (no bigint per page)
      gpaHi: Number(gpa0 / BigInt(TWO32)),
      gpaLo: Number(gpa0 % BigInt(TWO32)),
      tries: new Uint32Array(count),
      flags: new Uint8Array(count),
      t0: Date.now(),
      budget: 0,
      share: this.#index(vm).share,
      lastTransient: null,
    };
    job.budget = job.share.budgetFor(this.options.maxTokensInFlight);
    let pending = new Int32Array(count);
    for (let i = 0; i < count; i++) pending[i] = i;
    let delay = 1;
    while (pending.length > 0) {
      const { retry, transient } = await this.#mapPass(job, pending);
      pending = Int32Array.from(retry);
      if (pending.length > 0 && transient) {
        if (Date.now() - job.t0 >= this.options.deadlineMs && job.lastTransient !== null) throw this.#rollback(job, job.lastTransient);
        await new Promise((res) => setTimeout(res, delay));
        delay = Math.min(Math.max(1, delay * 2), this.options.retryDelayMs);
        this.#aliveOrThrow(vm, job.alive);
      }
    }
  }

  /**
   * One pass over the items still pending: their tokens requested in batches,
   * each batch MAPped as its tokens arrive. Returns the items to try again.
   *
   * Pipelining: when the token budget holds two batches of at least PIPELINE_MIN
   * tokens, two requests are kept in flight: batch k+1's round trip overlaps
   * batch k's MAPs, and a new request goes out only after a batch's MAPs consumed
   * its tokens, so the host never holds more than the budget unused. Below that
   * (v6: 8 tokens), one full batch per round trip. Every batch also waits for its
   * turn in the VM's budget shared with the other sessions (vm-share.ts).
   */
  async #mapPass(job: MapJob, pending: Int32Array): Promise<{ retry: number[]; transient: boolean }> {
    const retry: number[] = [];
    const pass = { transient: false };
    const depth = job.budget >= 2 * PIPELINE_MIN && pending.length > job.budget ? 2 : 1;
    const size = depth === 2 ? Math.floor(job.budget / 2) : job.budget;
    let off = 0;
    const inflight: Batch[] = [];
    const issue = (): void => {
      if (off >= pending.length) return;
      const b = this.#requestTokens(job, pending.subarray(off, off + size));
      off += b.chunk.length;
      inflight.push(b);
    };
    try {
      for (let d = 0; d < depth; d++) issue();
      while (inflight.length > 0) {
        const batch = inflight[0]!;
        let got: (Uint8Array | Error)[];
        try {
          got = await batch.got;
        } catch (e) {
          giveBack(job, batch);
          this.#aliveOrThrow(job.vm, job.alive);
          throw this.#rollback(job, e);
        }
        this.#stats.tokenRoundTrips++;
        this.#aliveOrThrow(job.vm, job.alive);
        const n = this.#encodeRecords(job, batch.chunk, got, retry, pass);
        if (n < batch.chunk.length && job.budget > 1) {
          // Over the host's limit (or someone else holds tokens of this VM too): shrink to the
          // limit measured, and stop issuing in this pass (what is in flight is still used; the
          // rest goes round again).
          const limit = job.share.refused(batch.others, n, batch.chunk.length, this.options.maxTokensInFlight);
          job.budget = Math.max(1, Math.min(job.budget, Number.isFinite(limit) ? limit : n));
          for (let k = off; k < pending.length; k++) retry.push(pending[k]!);
          off = pending.length;
        }
        const { records, results } = this.#scratch(n);
        if (n > 0) {
          this.device.ioctlBatch(KVM_INTRO_MEM_MAP, records, MEM_MAP_SIZE, n, results);
          records.fill(0, 0, n * MEM_MAP_SIZE); // tokens are single-use secrets: don't keep them around
        }
        inflight.shift();
        giveBack(job, batch); // used by the MAPs (or refused by the host): no longer outstanding
        const fatal = this.#applyResults(job, n, retry, pass);
        if (fatal !== null) throw this.#rollback(job, fatal);
        issue(); // the MAPs consumed this batch's tokens: room for the next request
      }
    } finally {
      // Batches still in flight when this pass gave up: their tokens stay outstanding on
      // the host until the reply comes (then they are dropped unused).
      for (const b of inflight) if (b.grant > 0) b.got.then(() => giveBack(job, b), () => giveBack(job, b));
    }
    return { retry, transient: pass.transient };
  }

  /** Waits for the batch's turn in the VM's budget, then asks for its tokens (one write, pipelined replies). */
  #requestTokens(job: MapJob, chunk: Int32Array): Batch {
    let others = 0;
    // A TargetVm that throws instead of rejecting lands in the same rejection.
    const got = job.share.acquire(chunk.length).then((held) => {
      others = held;
      this.#aliveOrThrow(job.vm, job.alive);
      return job.vm.getMapTokensSettled(chunk.length);
    });
    got.catch(noop); // awaited by the pass; never an unhandled rejection if it throws first
    return { chunk, got, grant: chunk.length, get others() { return others; } };
  }

  /**
   * Encodes one kvmi_mem_map record per token that came back, into the scratch
   * records (job.use lists their items). Requests the host refused (EAGAIN: over
   * its outstanding limit) go to `retry`; any other error is fatal. Returns the
   * number of records.
   */
  #encodeRecords(job: MapJob, chunk: Int32Array, got: (Uint8Array | Error)[], retry: number[], pass: { transient: boolean }): number {
    const { records, use } = this.#scratch(chunk.length);
    let n = 0;
    for (let k = 0; k < chunk.length; k++) {
      const g = got[k]!;
      const i = chunk[k]!;
      if (g instanceof Uint8Array) {
        const at = n * MEM_MAP_SIZE;
        const x = job.gpaLo + i * PAGE_SIZE;
        const hi = job.gpaHi + Math.floor(x / TWO32);
        const a = job.addr0 + i * PAGE_SIZE; // < 2^47: two exact u32 halves
        if (hi >= TWO32 || g.length !== MEM_TOKEN_SIZE) {
          // not a token, or past 2^64: encodeMemMap throws its typed error
          encodeMemMap({ token: g, gpa: job.gpa0 + BigInt(i * PAGE_SIZE), gva: BigInt(a) }, records, at);
        }
        records.set(g, at + MAP_TOKEN);
        records.writeUInt32LE(x >>> 0, at + MAP_GPA);
        records.writeUInt32LE(hi, at + MAP_GPA + 4);
        records.writeUInt32LE(a >>> 0, at + MAP_GVA);
        records.writeUInt32LE(Math.floor(a / TWO32), at + MAP_GVA + 4);
        job.tries[i]!++;
        use[n++] = i;
      } else if (g instanceof KvmmemError && g.code === 'EAGAIN') {
        this.#stats.tokensRefused++;
        retry.push(i);
        pass.transient = true;
        job.lastTransient = g;
      } else {
        throw this.#rollback(job, g);
      }
    }
    got.length = 0;
    this.#stats.tokens += n;
    return n;
  }

  /**
   * Reads the batch's MAP results: successes recorded (every one before acting on
   * a failure, so a rollback sees them all), retryable failures queued, and the
   * first fatal one returned as its typed error.
   */
  #applyResults(job: MapJob, n: number, retry: number[], pass: { transient: boolean }): unknown {
    const { results, use } = this.#scratch(n);
    const o = this.options;
    const range = job.range;
    let fatal: unknown = null;
    let mapped = 0;
    for (let k = 0; k < n; k++) {
      const i = use[k]!;
      const r = results[k]!;
      if (r >= 0) {
        job.flags[i]! |= DONE;
        mapped++;
        if (range !== null) range.mapped[i] = 1;
      } else if (r === -ERRNO.ENOENT && (job.flags[i]! & ENOENT_RETRIED) === 0 && job.vm.state === 'connected') {
        job.flags[i]! |= ENOENT_RETRIED;
        this.#stats.retries++;
        retry.push(i);
      } else if ((r === -ERRNO.EAGAIN || r === -ERRNO.EBUSY) && job.tries[i]! < o.retries && Date.now() - job.t0 < o.deadlineMs) {
        this.#stats.retries++;
        pass.transient = true;
        retry.push(i);
      } else {
        fatal ??= (r === -ERRNO.EAGAIN || r === -ERRNO.EBUSY)
          ? failedAt(new RetryExhaustedError(r === -ERRNO.EAGAIN ? 'EAGAIN' : 'EBUSY', r, job.tries[i]!, Date.now() - job.t0, this.device.error(KVM_INTRO_MEM_MAP, r)), job, i)
          : job.vm.state !== 'connected' ? vmGoneError(job.vm) : failedAt(this.device.error(KVM_INTRO_MEM_MAP, r), job, i);
      }
    }
    this.#stats.maps += mapped;
    if (range !== null) {
      range.live += mapped;
      this.#stats.live += mapped;
    }
    return fatal;
  }

  /** The UNMAP values and results for n pages of a range, reused and pinned as #scratch's. */
  #unmapScratch(n: number): { values: Buffer; results: Int32Array } {
    if (this.#unmapValues.length < 8 * n) {
      this.#unmapValues = Buffer.alloc(8 * n);
      this.#unmapResults = new Int32Array(n);
      libc.pin(this.#unmapValues);
      libc.pin(this.#unmapResults);
    }
    return { values: this.#unmapValues, results: this.#unmapResults };
  }

  /**
   * The session's MAP records and results for a batch of n (and which item each
   * record maps), reused across batches and pinned, so the native batch call
   * takes their addresses. Safe to share: each batch encodes, issues and reads
   * them with no await in between.
   */
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
  #rollback(job: MapJob, err: unknown): unknown {
    if (job.count === 1 && (job.flags[0]! & DONE) !== 0 && !this.#closed) {
      this.#unmapOne(job.addr0);
      job.flags[0]! &= ~DONE;
    }
    return err;
  }
}

/**
 * What pages and ranges share: liveness, and an unmap that is idempotent (as
 * Node's `destroy()` and `session.close()` are): a second unmap(), or one after
 * close or an unhook, does nothing. Everything else throws USE_AFTER_UNMAP
 * once the mapping is gone.
 */
abstract class Mapping implements Disposable {
  /** @internal */
  protected readonly session: Session;
  /** @internal */
  protected readonly rec: PageRecord | RangeRecord;

  /** @internal */
  protected constructor(session: Session, rec: PageRecord | RangeRecord) {
    this.session = session;
    this.rec = rec;
  }

  get vm(): TargetVm { return this.rec.vm; }
  get mapped(): boolean { return this.rec.dead === null; }

  /** KVM_INTRO_MEM_UNMAP of every page of it; nothing when it is already gone. */
  unmap(): void {
    if (this.rec.dead === null) this.unmapNow();
  }

  [Symbol.dispose](): void { this.unmap(); }

  /** @internal */
  protected abstract unmapNow(): void;
  /** @internal */
  protected abstract what(): string;

  /** @internal */
  protected live(): void {
    if (this.rec.dead) throw new UseAfterUnmapError(this.what(), this.rec.dead);
  }
}

/** One mapped guest page: `buffer` is a live view of it (reads and writes are the guest's). */
export class MappedPage extends Mapping {
  readonly #rec: PageRecord;
  readonly #ref: WeakRef<Session>;
  #view: Buffer | null = null;
  readonly #offset: number;

  /** @internal */
  constructor(session: Session, rec: PageRecord, ref: WeakRef<Session>, offset: number) {
    super(session, rec);
    this.#rec = rec;
    this.#ref = ref;
    this.#offset = offset;
  }

  /** The gpa given to map() (not rounded), as MappedRange.gpa. */
  get gpa(): bigint { return this.#rec.gpa + BigInt(this.#offset); }
  /** The gpa of the page's first byte (gpa rounded down to the page). */
  get pageGpa(): bigint { return this.#rec.gpa; }
  /** Where gpa lies in the page: buffer[offset] is the byte at gpa. */
  get offset(): number { return this.#offset; }
  get address(): bigint { this.live(); return BigInt(this.#rec.lease.address); }
  /**
   * Live 4 KiB view of the guest page. Kept after unmap() it reads zeros and
   * writes reach nobody; its address is not reused while the Buffer is reachable.
   */
  get buffer(): Buffer {
    this.live();
    // Made on first use: a page whose buffer was never asked for has no view to wait for.
    return (this.#view ??= localMemory.view(this.#rec.lease, unmapWhenCollected(this.#ref, this.#rec)));
  }
  /** @internal The whole page, live, for code of this library that keeps no reference (scan): see MappedRange._peek(). */
  _peek(): Buffer {
    this.live();
    return localMemory.internalView(this.#rec.lease);
  }

  /** Copies bytes out of the page. */
  read(offset = 0, length = PAGE_SIZE - offset): Buffer {
    this.live();
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > PAGE_SIZE) {
      throw new UsageError(`read: [${offset}, ${offset + length}) is not inside the page (0..${PAGE_SIZE})`);
    }
    return Buffer.from(localMemory.internalView(this.#rec.lease).subarray(offset, offset + length));
  }

  /** @internal */
  protected unmapNow(): void { this.session._unmapPage(this.#rec, 'unmapped'); }
  /** @internal */
  protected what(): string { return `page gpa ${hex(this.gpa)} of vm ${this.#rec.vm.name}`; }
}

/** Consecutive guest pages mapped into one contiguous local window. */
export class MappedRange extends Mapping {
  readonly #rec: RangeRecord;
  readonly #ref: WeakRef<Session>;
  #view: Buffer | null = null;
  readonly #offset: number;
  readonly #length: number;

  /** @internal */
  constructor(session: Session, rec: RangeRecord, ref: WeakRef<Session>, offset: number, length: number) {
    super(session, rec);
    this.#rec = rec;
    this.#ref = ref;
    this.#offset = offset;
    this.#length = length;
  }

  /** The window's one view, made on first use (see MappedPage.buffer). */
  get #window(): Buffer {
    return (this.#view ??= localMemory.view(this.#rec.lease, unmapWhenCollected(this.#ref, this.#rec)));
  }

  /** The gpa asked for (not rounded). */
  get gpa(): bigint { return this.#rec.gpa + BigInt(this.#offset); }
  /** The gpa of the first page's first byte (gpa rounded down to the page). */
  get pageGpa(): bigint { return this.#rec.gpa; }
  /** Where gpa lies in the first page (buffer starts there). */
  get offset(): number { return this.#offset; }
  get length(): number { return this.#length; }
  get pages(): number { return this.#rec.pages; }
  /** Local address of the first byte asked for. */
  get address(): bigint { this.live(); return BigInt(this.#rec.lease.address + this.#offset); }
  /** Live view of exactly [gpa, gpa + length) (stale after unmap: zeros, as MappedPage.buffer). */
  get buffer(): Buffer {
    this.live();
    return this.#window.subarray(this.#offset, this.#offset + this.#length);
  }

  /**
   * @internal A live view of [gpa, gpa + length) for code of this library that
   * reads it synchronously and keeps no reference (scan): no view is handed
   * out, so the window is reused at once after unmap.
   */
  _peek(): Buffer {
    this.live();
    return localMemory.internalView(this.#rec.lease).subarray(this.#offset, this.#offset + this.#length);
  }

  /** Live view of the i-th whole page of the range. */
  page(i: number): Buffer {
    this.live();
    if (!Number.isInteger(i) || i < 0 || i >= this.#rec.pages) throw new UsageError(`page: index ${i} is outside 0..${this.#rec.pages - 1}`);
    return this.#window.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
  }

  /** @internal */
  protected unmapNow(): void { this.session._unmapRange(this.#rec, 'unmapped'); }
  /** @internal */
  protected what(): string { return `range gpa ${hex(this.gpa)}+${this.#length} of vm ${this.#rec.vm.name}`; }
}

/** A length for mapRange/read/write: an integer, the range inside 2^64 and one 4 GiB view. */
function checkLength(what: string, start: bigint, length: number, zeroOk: boolean): void {
  if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < (zeroOk ? 0 : 1)) {
    throw new UsageError(`${what}: length must be ${zeroOk ? 'a non-negative' : 'a positive'} integer, got ${typeof length === 'number' ? length : JSON.stringify(length)}`);
  }
  if (start + BigInt(length) > 1n << 64n) throw new UsageError(`${what}: [${hex(start)}, +${length}) runs past the end of the 64-bit guest-physical space`);
  const pages = Math.ceil((pageOffset(start) + length) / PAGE_SIZE);
  if (pages * PAGE_SIZE > libc.MAX_VIEW_BYTES) throw new UsageError(`${what}: ${pages} pages exceed one 4 GiB view`, 'map the range in pieces of at most 4 GiB');
}
