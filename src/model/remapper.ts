/**
 * The page remapper: what makes a MAP real. The host decides (tokens, checks,
 * its list of mappings, results); the remapper then puts the target VM's page
 * behind the introspector page, or a fresh zeroed page after an UNMAP.
 *
 * Two exist: LocalRemapper (here, the model's default) remaps pages of this
 * process (mmap MAP_SHARED|MAP_FIXED of the VM's memory fd, then mlock), with
 * the introspector page named by its virtual address here; the lab's
 * AgentRemapper (src/lab/agent-remapper.ts) asks the QEMU agent to remap a
 * guest-physical page of the introspector VM.
 *
 * Batches: between begin() and end() the host books every hypercall at once
 * (results final) and the remapper may queue the remaps, doing them at end(),
 * runs of adjacent pages coalesced. A remap that fails there is rolled back
 * (ctx.drop(), a fresh page) and reported per page.
 */
import { readFileSync } from 'node:fs';
import { debuglog } from 'node:util';
import * as libc from '../sys/libc.js';
import * as faults from '../sys/faults.js';
import { remapFresh } from '../sys/window.js';
import { PAGE_SIZE } from '../abi/structs.js';
import { UsageError } from '../errors.js';
import type { GuestMemory } from './memory.js';
import type { MappingIndex } from './mapping-index.js';
import { USER_LIMIT, pageOf, pageState } from './uaccess.js';
import type { ModelVm } from './vm.js';

const debug = debuglog('kvmmem');
const PS = PAGE_SIZE;

/** What a remapper is given by its host. */
export interface RemapperContext {
  /** The host's name (debug lines). */
  readonly name: string;
  /** The host's list of mappings (read only: the host changes it). */
  readonly index: MappingIndex<ModelVm>;
  /** Drops the mapping at `page` from the host's list (a queued remap failed). */
  drop(page: number): void;
  /** The host's VM of that uuid. */
  findVm(uuid: string): ModelVm | undefined;
}

/** Remap counters (HostCounters.remapCalls / remappedPages). */
export interface RemapCounters {
  /** Remap calls made (a coalesced run counts once). */
  remapCalls: number;
  /** Pages those calls covered. */
  remappedPages: number;
}

/** How close the model host lets this process get to vm.max_map_count (see ModelHost.vmas()). */
export interface VmaStats {
  /** vm.max_map_count (or the maxMapCount option). */
  limit: number;
  /** MAPs that would take the estimate above this fail with ENOMEM: limit - 10%. */
  threshold: number;
  /** Estimated VMAs of this process now: the last count of /proc/self/maps plus what MAPs added since. */
  estimate: number;
  /** The host's mappings' share of the estimate: one per run of pages that cannot merge with its neighbour, one per window piece split off after a run. */
  mappings: number;
  /** Times /proc/self/maps was counted. */
  measurements: number;
}

export interface PageRemapper {
  /** 'local' (this process) or the name of another kind ('agent'). */
  readonly kind: string;
  /**
   * The introspector page a MAP names (a2), or -1 when that is no page of the
   * introspector (-KVM_EFAULT). `present`: the caller has just seen it present.
   */
  mapPage(mapGpa: bigint, present: boolean): number;
  /** Whether `page` (a page number from the driver's batch path) can be an introspector page. */
  validPage(page: number): boolean;
  /** The introspector page an UNMAP names (a0), or -1 when it cannot be one (-KVM_ENOENT). */
  unmapPage(mapGpa: bigint): number;
  /** What listing (vm, gpaPage) at `page` costs (the local remapper: VMAs); pass it to room() and listed(). */
  cost(page: number, vm: ModelVm, gpaPage: number | bigint): number;
  /** Whether a mapping of that cost fits (false: MAP fails -ENOMEM). */
  room(cost: number): boolean;
  /** The host listed a mapping of that cost. */
  listed(cost: number): void;
  /** The host dropped the mapping (vm, gpa) at `page` (the list no longer has it). */
  unlisted(page: number, vm: ModelVm, gpa: number | bigint): void;
  /** The VM's target page: now (0 or -errno), or queued while deferring (0). */
  map(page: number, mem: GuestMemory, fd: number, offset: number, writable: boolean): number;
  /** A fresh zeroed page at `page`: now (0 or -errno), or queued while deferring (0). */
  fresh(page: number): number;
  /** A fresh page now, after a failed remap; failures are only logged (the page has no mapping to keep). */
  freshOrLog(page: number, pages: number): void;
  /** Queue remaps until end(). */
  begin(): void;
  /** Does the queued remaps; returns the MAP pages whose remap failed (dropped via ctx.drop()) -> -errno. */
  end(): Map<number, number>;
  readonly deferring: boolean;
  /**
   * Optional fast path of the driver's single MAP (the local remapper): look
   * the page up and remap it in one native call. undefined: not available;
   * > 0: no page present (libc.MAP_ONE_*); 0 or -errno: the remap's result.
   */
  mapOne?(page: number, mem: GuestMemory, fd: number, offset: number, writable: boolean): number | undefined;
  /** A new VM of the host (its memory may need watching). */
  addVm(vm: ModelVm): void;
  counters(): RemapCounters;
  /** The local remapper's VMA accounting; others have none. */
  vmas?(): VmaStats;
  close(): void;
}

/** Makes the host's remapper (ModelHostOptions.remapper). */
export type RemapperFactory = (ctx: RemapperContext) => PageRemapper;

// ---------------------------------------------------------------- the local remapper

/**
 * The kind of a queued remap in the deferral log: a fresh page, else
 * fd * 4 + (guarded ? 2 : 0) + (writable ? 1 : 0) (see opOf).
 */
const OP_FRESH = -1;
/** A remap of `fd`: guarded pages are a guest RAM file that may shrink (libc.REMAP_GUARD). */
const opOf = (fd: number, writable: boolean, guard: boolean) => fd * 4 + (guard ? 2 : 0) + (writable ? 1 : 0);
const opFd = (op: number) => Math.floor(op / 4);
/** The libc remap kind of a shared op (REMAP_SHARED or _RO, | REMAP_GUARD). */
const opKind = (op: number) => ((op & 1) === 1 ? libc.REMAP_SHARED : libc.REMAP_SHARED_RO) | ((op & 2) === 2 ? libc.REMAP_GUARD : 0);
const gpaAdjacent = (a: number | bigint, b: number | bigint) =>
  (typeof a === 'number' && typeof b === 'number' ? a + PS === b : BigInt(a) + BigInt(PS) === BigInt(b));
let guardAvailable: boolean | undefined;

/** vm.max_map_count, read once per process. */
let sysMaxMapCount: number | undefined;
function systemMaxMapCount(): number {
  if (sysMaxMapCount === undefined) {
    try {
      const v = Number(readFileSync('/proc/sys/vm/max_map_count', 'latin1').trim());
      sysMaxMapCount = Number.isSafeInteger(v) && v > 0 ? v : 65530;
    } catch {
      sysMaxMapCount = 65530; // the kernel's default (DEFAULT_MAX_MAP_COUNT)
    }
  }
  return sysMaxMapCount;
}

/** The VMAs of this process now: the lines of /proc/self/maps. */
function countVmas(): number {
  const b = readFileSync('/proc/self/maps');
  let n = 0;
  for (let i = b.indexOf(10); i >= 0; i = b.indexOf(10, i + 1)) n++;
  return n;
}

interface Run { page: number; pages: number; offset: number; op: number }

/**
 * The model's remapper: the introspector page is its virtual address in this
 * process (userspace cannot see its guest-physical addresses; the driver model
 * passes the page address where the C driver passes page_to_phys()). MAP is
 * mmap(MAP_SHARED|MAP_FIXED) of the VM's memory fd + mlock; a fresh page is a
 * private anonymous one. Guest RAM files that may shrink get SIGBUS guards
 * (sys/faults). Every mapping is a VMA of this process: see vmas().
 */
export class LocalRemapper implements PageRemapper {
  readonly kind = 'local';
  readonly #ctx: RemapperContext;
  readonly #idx: MappingIndex<ModelVm>;
  readonly #counters: RemapCounters = { remapCalls: 0, remappedPages: 0 };
  /**
   * The remaps queued while deferring, in call order, in parallel typed arrays
   * (no object per page): introspector page, file offset, op (OP_FRESH or
   * opOf()). #pendN is -1 when not deferring. A later op for the same page
   * replaces an earlier one.
   */
  #pendN = -1;
  #pendPage = new Float64Array(0);
  #pendOff = new Float64Array(0);
  #pendOp = new Int32Array(0);
  /**
   * VMA accounting (see vmas()): every run of mapped pages that cannot merge
   * with the page before it is a VMA of its own, and so is the piece of window
   * split off after a run. #vmaMine is that count for the host's mappings now;
   * #vmaBase the rest of the process, from the last count of /proc/self/maps.
   */
  readonly #vmaLimit: number;
  readonly #vmaThreshold: number;
  /** Slack granted after a count found room: the next count comes this many VMAs later, not at every MAP. */
  readonly #vmaStep: number;
  #vmaMine = 0;
  #vmaBase = -1;
  /** MAPs are let through without a count up to this #vmaMine (a count found room). */
  #vmaSlackTo = -1;
  /** #vmaMine when a count refused a MAP (no count again until it drops). */
  #vmaRefusedAt = Infinity;
  #vmaMeasurements = 0;
  readonly #faultSource: faults.FaultSource = {
    resolve: (address) => this.#resolveFault(address),
    shrunk: (uuid) => this.#shrunk(uuid),
  };

  /** `maxMapCount`: the process's limit on mappings (default /proc/sys/vm/max_map_count). */
  constructor(ctx: RemapperContext, maxMapCount?: number) {
    this.#ctx = ctx;
    this.#idx = ctx.index;
    const limit = maxMapCount ?? systemMaxMapCount();
    if (!Number.isSafeInteger(limit) || limit < 64) throw new UsageError(`maxMapCount must be an integer >= 64, got ${String(limit)}`);
    this.#vmaLimit = limit;
    this.#vmaThreshold = limit - Math.ceil(limit / 10);
    this.#vmaStep = Math.max(16, Math.floor(limit / 40));
  }

  // ---- introspector page identity: a virtual address of this process ----

  mapPage(mapGpa: bigint, present: boolean): number {
    if (mapGpa >= BigInt(USER_LIMIT)) return -1;
    const page = pageOf(Number(mapGpa));
    if (page === 0 || page + PS > USER_LIMIT) return -1;
    if (!present && pageState(page) === 'unmapped') return -1;
    return page;
  }

  validPage(page: number): boolean {
    return page !== 0 && page + PS <= USER_LIMIT;
  }

  unmapPage(mapGpa: bigint): number {
    return mapGpa >= BigInt(USER_LIMIT) ? -1 : pageOf(Number(mapGpa));
  }

  // ---- remaps ----

  get deferring(): boolean { return this.#pendN >= 0; }

  map(page: number, mem: GuestMemory, fd: number, offset: number, writable: boolean): number {
    const op = opOf(fd, writable, this.#guards(mem));
    if (this.#pendN >= 0) {
      this.#queue(page, offset, op);
      return 0;
    }
    return this.#remapRun(op, page, 1, offset);
  }

  fresh(page: number): number {
    if (this.#pendN >= 0) {
      this.#queue(page, 0, OP_FRESH);
      return 0;
    }
    return this.#remapRun(OP_FRESH, page, 1, 0);
  }

  freshOrLog(page: number, pages: number): void {
    this.#counters.remapCalls++;
    this.#counters.remappedPages += pages;
    const r = remapFresh(page, pages * PS);
    if (r < 0) debug('host %s: could not give 0x%s (%d pages) a fresh page: errno %d', this.#ctx.name, page.toString(16), pages, -r);
  }

  mapOne(page: number, mem: GuestMemory, fd: number, offset: number, writable: boolean): number | undefined {
    if (this.#pendN >= 0 || !libc.mapOneNative()) return undefined;
    const r = libc.mapOne(opKind(opOf(fd, writable, this.#guards(mem))), page, PS, fd, offset);
    if (r <= 0) {
      this.#counters.remapCalls++;
      this.#counters.remappedPages++;
    }
    return r;
  }

  addVm(vm: ModelVm): void {
    if (vm.memory.mayShrink) faults.addFaultSource(this.#faultSource);
  }

  counters(): RemapCounters { return { ...this.#counters }; }

  close(): void {
    faults.removeFaultSource(this.#faultSource);
  }

  /** Appends a remap to the deferral log. */
  #queue(page: number, offset: number, op: number): void {
    const n = this.#pendN;
    if (n === this.#pendPage.length) {
      const cap = Math.max(256, n * 2);
      const p = new Float64Array(cap), o = new Float64Array(cap), k = new Int32Array(cap);
      p.set(this.#pendPage);
      o.set(this.#pendOff);
      k.set(this.#pendOp);
      this.#pendPage = p;
      this.#pendOff = o;
      this.#pendOp = k;
    }
    this.#pendPage[n] = page;
    this.#pendOff[n] = offset;
    this.#pendOp[n] = op;
    this.#pendN = n + 1;
  }

  /** One mmap(+mlock) for `pages` adjacent pages (op: OP_FRESH or opOf()). 0 or -errno. */
  #remapRun(op: number, page: number, pages: number, offset: number): number {
    this.#counters.remapCalls++;
    this.#counters.remappedPages += pages;
    if (op === OP_FRESH) return remapFresh(page, pages * PS);
    return libc.remapOne(opKind(op), page, pages * PS, opFd(op), offset);
  }

  /** Pages of `mem` are guarded against SIGBUS: its file may shrink and the helper can guard (see sys/faults). */
  #guards(mem: GuestMemory): boolean {
    return mem.mayShrink && (guardAvailable ??= libc.faultGuardAvailable());
  }

  begin(): void {
    if (this.#pendN >= 0) throw new Error('ModelHost: remaps are already being deferred');
    this.#pendN = 0;
  }

  end(): Map<number, number> {
    const n = this.#pendN;
    this.#pendN = -1;
    const failures = new Map<number, number>();
    if (n <= 0) return failures;
    const P = this.#pendPage, O = this.#pendOff, K = this.#pendOp;
    // The log in page order, one op per page (the last one queued for it). A batch
    // over a window in address order is already strictly increasing: no sort.
    let order: Int32Array | null = null;
    for (let i = 1; i < n; i++) {
      if (P[i]! <= P[i - 1]!) {
        order = pageOrder(P, n);
        break;
      }
    }
    const m = order === null ? n : order.length;
    // Runs of adjacent pages with the same op (and adjacent offsets for shared ones).
    const shared: Run[] = [], fresh: Run[] = [];
    let cur: Run | undefined, curOp = 0;
    for (let k = 0; k < m; k++) {
      const i = order === null ? k : order[k]!;
      const page = P[i]!, op = K[i]!, offset = op === OP_FRESH ? 0 : O[i]!;
      if (cur !== undefined && op === curOp && page === cur.page + cur.pages * PS && (op === OP_FRESH || offset === cur.offset + cur.pages * PS)) {
        cur.pages++;
        continue;
      }
      cur = { page, pages: 1, offset, op };
      curOp = op;
      (op === OP_FRESH ? fresh : shared).push(cur);
    }
    // Shared runs grouped by (fd, writable), in the order the groups first appear.
    let rest = shared;
    while (rest.length > 0) {
      const op = rest[0]!.op;
      const runs = rest.filter((r) => r.op === op);
      rest = runs.length === rest.length ? [] : rest.filter((r) => r.op !== op);
      const res = this.#doRuns(runs, op);
      for (let i = 0; i < runs.length; i++) {
        if (res[i]! >= 0) continue;
        const run = runs[i]!;
        for (let k = 0; k < run.pages; k++) {
          const p = run.page + k * PS;
          this.#ctx.drop(p);
          failures.set(p, res[i]!);
        }
        this.freshOrLog(run.page, run.pages);
      }
    }
    if (fresh.length > 0) {
      const res = this.#doRuns(fresh, OP_FRESH);
      for (let i = 0; i < fresh.length; i++) {
        if (res[i]! < 0) this.freshOrLog(fresh[i]!.page, fresh[i]!.pages); // retry once; log if it fails again
      }
    }
    return failures;
  }

  /** The remaps of `runs`, all of one op (OP_FRESH or opOf()): 0 or -errno each. */
  #doRuns(runs: Run[], op: number): Int32Array {
    const res = new Int32Array(runs.length);
    this.#counters.remapCalls += runs.length;
    for (const r of runs) this.#counters.remappedPages += r.pages;
    const fresh = op === OP_FRESH, fd = fresh ? -1 : opFd(op), kind = fresh ? libc.REMAP_FRESH : opKind(op);
    // (read-only runs without a guard go one by one: remapMany of them needs ABI 2)
    if ((fresh || (op & 3) !== 0) && libc.batchAvailable()) {
      const n = runs.length;
      const addrs = new BigUint64Array(n), lens = new BigUint64Array(n), offs = new BigInt64Array(n);
      for (let i = 0; i < n; i++) {
        addrs[i] = BigInt(runs[i]!.page);
        lens[i] = BigInt(runs[i]!.pages * PS);
        offs[i] = BigInt(runs[i]!.offset);
      }
      libc.remapMany(kind, addrs, lens, fd, offs, n, res);
      return res;
    }
    for (let i = 0; i < runs.length; i++) {
      const r = runs[i]!;
      res[i] = fresh ? remapFresh(r.page, r.pages * PS) : libc.remapOne(kind, r.page, r.pages * PS, fd, r.offset);
    }
    return res;
  }

  // ---- SIGBUS guards (sys/faults) ----

  /** sys/faults: the guest page behind a guarded introspector page that faulted. */
  #resolveFault(address: number): faults.GuestMemoryFault | undefined {
    if (!(address > 0 && address < USER_LIMIT)) return undefined;
    const r = this.#idx.get(pageOf(address));
    if (r === undefined || !r.vm.memory.mayShrink) return undefined;
    const mem = r.vm.memory;
    return { uuid: r.vm.uuid, vm: r.vm.name, path: mem.path ?? mem.name, fileSize: Number(mem.fileSize), size: Math.max(0, mem._sizeAt(-1)), gpa: BigInt(r.gpa) };
  }

  /** sys/faults: VM `uuid` of this host, when its RAM file is smaller now than when it was opened. */
  #shrunk(uuid: string): faults.GuestMemoryFault | undefined {
    const vm = this.#ctx.findVm(uuid);
    if (vm === undefined || !vm.memory.mayShrink || vm.memory.closed) return undefined;
    const mem = vm.memory;
    const size = mem._sizeAt(-1);
    if (size >= Number(mem.fileSize)) return undefined;
    return { uuid: vm.uuid, vm: vm.name, path: mem.path ?? mem.name, fileSize: Number(mem.fileSize), size };
  }

  // ---- VMA accounting (model only) ----

  /**
   * How close this process is to vm.max_map_count: every mapping the model
   * makes is a VMA of this process (a real host changes the EPT, not the
   * introspector's VMAs), so MAP fails with ENOMEM once the estimate would pass
   * `threshold` (the limit less 10%), before mmap itself fails (and V8 aborts
   * on its next allocation).
   */
  vmas(): VmaStats {
    if (this.#vmaBase < 0) this.#vmaMeasure();
    return {
      limit: this.#vmaLimit, threshold: this.#vmaThreshold, estimate: this.#vmaBase + this.#vmaMine,
      mappings: this.#vmaMine, measurements: this.#vmaMeasurements,
    };
  }

  /**
   * VMAs a mapping at `page` of (vm, gpaPage) adds to this process (negative:
   * removes), from its neighbours: it starts a VMA unless the page before holds
   * the previous gpa of the same VM (a file mapping with contiguous offsets
   * merges), and splits a window piece off after it unless the page after is
   * mapped too. The same before and after the page is listed (it never looks at
   * the page itself). An upper bound: fresh pages merge back into their window.
   */
  cost(page: number, vm: ModelVm, gpaPage: number | bigint): number {
    const idx = this.#idx;
    const left = page - PS, right = page + PS;
    const lvm = idx.vmAt(left);
    const rvm = idx.vmAt(right);
    let d = 0;
    // Left: nothing mapped there: a new VMA (+1); mapped, not contiguous: a new VMA in
    // place of the window piece that followed it (0); contiguous: the run grows, and its
    // trailing window piece moves after this page (-1, the +1 below adds it back).
    if (lvm === undefined) d++;
    else if (lvm === vm && gpaAdjacent(idx.gpaAt(left), gpaPage)) d--;
    // Right: nothing mapped there: a window piece after it (+1); a contiguous run: merges (-1).
    if (rvm === undefined) d++;
    else if (rvm === vm && gpaAdjacent(gpaPage, idx.gpaAt(right))) d--;
    return d;
  }

  listed(cost: number): void { this.#vmaMine += cost; }

  unlisted(page: number, vm: ModelVm, gpa: number | bigint): void {
    this.#vmaMine -= this.cost(page, vm, gpa);
  }

  /**
   * Whether a MAP that adds `d` VMAs leaves this process below the threshold.
   * The estimate is /proc/self/maps as last counted plus what the host's
   * mappings changed since; past the threshold it is counted again (at most once
   * per #vmaStep VMAs the host adds, and not again after a refusal until the
   * host has unmapped something), so the refusal rests on a real count.
   */
  room(d: number): boolean {
    if (d <= 0) return true;
    if (this.#vmaBase < 0) this.#vmaMeasure(); // the process's own VMAs, once
    const mine = this.#vmaMine + d;
    if (this.#vmaBase + mine <= this.#vmaThreshold || mine <= this.#vmaSlackTo) return true;
    if (this.#vmaMine >= this.#vmaRefusedAt) return false;
    this.#vmaMeasure();
    if (this.#vmaBase + mine <= this.#vmaThreshold) {
      this.#vmaSlackTo = mine + this.#vmaStep;
      this.#vmaRefusedAt = Infinity;
      return true;
    }
    this.#vmaRefusedAt = this.#vmaMine;
    debug('host %s: MAP refused with ENOMEM: %d VMAs in this process (the host\'s mappings: ~%d), vm.max_map_count %d, refusing above %d',
      this.#ctx.name, this.#vmaBase + this.#vmaMine, this.#vmaMine, this.#vmaLimit, this.#vmaThreshold);
    return false;
  }

  #vmaMeasure(): void {
    this.#vmaMeasurements++;
    this.#vmaBase = countVmas() - this.#vmaMine;
  }
}

/**
 * The indexes of the first `n` entries of `pages` sorted by page, keeping for
 * each page only its last entry (the op queued last wins, as a Map.set would).
 */
function pageOrder(pages: Float64Array, n: number): Int32Array {
  const idx = new Int32Array(n);
  for (let i = 0; i < n; i++) idx[i] = i;
  idx.sort((a, b) => pages[a]! - pages[b]! || a - b);
  let m = 0;
  for (let k = 0; k < n; k++) {
    if (k + 1 < n && pages[idx[k + 1]!] === pages[idx[k]!]) continue; // a later op for this page follows
    idx[m++] = idx[k]!;
  }
  return idx.subarray(0, m);
}
