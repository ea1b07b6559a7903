/**
 * The model's host: KVM with the KVMI patches, as far as the introspector's
 * /dev/kvmmem needs it.
 *
 * - VMs (uuid, name, guest memory) and their VM ioctls KVM_INTROSPECTION_HOOK /
 *   UNHOOK / PREUNHOOK (seeds 000 and 004), with the kernel's order of checks.
 * - The KVMI connection of a hooked VM (kvmi-server.ts) hands out map tokens.
 * - hypercall(): KVM_HC_MEM_MAP / KVM_HC_MEM_UNMAP, with real effects on this
 *   process: MAP puts the target VM's page at the introspector page
 *   (mmap MAP_SHARED|MAP_FIXED of the VM's memory fd, then mlock again), so
 *   reads and writes through that address are the VM's memory, live both
 *   ways; UNMAP gives the address a fresh zeroed private page ("a new physical
 *   page is allocated for this gpa"), never a hole.
 *
 * Frame identity: userspace cannot see its guest-physical addresses, so the
 * "introspector gpa" of the hypercalls is the page's *virtual* address in this
 * process (the driver model passes the page address where the C driver
 * passes page_to_phys()). One host models one introspector VM: this process.
 *
 * Batches: between beginDeferral() and endDeferral() every hypercall is
 * validated and booked at once (token consumed, lists updated, results
 * final) but the page remaps are queued and done at the end, runs of adjacent
 * pages coalesced into one mmap+mlock. Nothing can observe memory in between
 * (one JS thread), so per-page semantics hold; a remap that fails at the end
 * is rolled back and reported per page.
 */
import { readFileSync } from 'node:fs';
import type * as net from 'node:net';
import { debuglog } from 'node:util';
import { parse as uuidParse, v4 as uuidV4, validate as uuidValidate } from 'uuid';
import * as libc from '../sys/libc.js';
import * as faults from '../sys/faults.js';
import { remapFresh } from '../sys/window.js';
import { ERRNO } from '../abi/errno.js';
import { KVM_EFAULT, KVM_ENOENT, KVM_ENOSYS, KVM_HC_MEM_MAP, KVM_HC_MEM_UNMAP } from '../abi/hypercall.js';
import {
  KVM_INTROSPECTION_HOOK, KVM_INTROSPECTION_PREUNHOOK, KVM_INTROSPECTION_UNHOOK, decodeIoctl, ioctlName,
} from '../abi/ioctl.js';
import type { KvmiProtocol } from '../abi/kvmi.js';
import { HOOK_SIZE, MEM_TOKEN_SIZE, PAGE_SIZE, decodeHook } from '../abi/structs.js';
import { ClosedError, DeviceError, KvmmemError, UsageError } from '../errors.js';
import { ModelDevice } from './model-device.js';
import { KvmiMemDriver } from './driver.js';
import { GuestMemory } from './memory.js';
import { KvmiConnection, type UnhookAck } from './kvmi-server.js';
import { sockfd_lookup } from './sockets.js';
import { TokenStore } from './tokens.js';
import { USER_LIMIT, copy_from_user, pageOf, pageState } from './uaccess.js';
import type { AttachOptions, Attachment, PreunhookOptions } from './device-manager.js';
import * as deviceManager from './device-manager.js';

const debug = debuglog('kvmmem');
const PS = PAGE_SIZE;
const MAX_SAFE = 9007199254740991n;
const { EAGAIN, EALREADY, EEXIST, EFAULT, EINVAL, ENODEV, ENOENT, ENOMEM, ENOTTY, EPERM } = ERRNO as Record<'EAGAIN' | 'EALREADY' | 'EEXIST' | 'EFAULT' | 'EINVAL' | 'ENODEV' | 'ENOENT' | 'ENOMEM' | 'ENOTTY' | 'EPERM', number>;

export interface ModelHostOptions {
  /** Shows in device paths ('model:<name>') and debug lines. Default 'kvmmem'. */
  name?: string;
  /** KVMI message ids and token rules: 'v6' (default) or 'v4'. */
  protocol?: KvmiProtocol;
  /** kvm.introspection=1 (default true); false: HOOK/UNHOOK/PREUNHOOK fail with EPERM. */
  introspection?: boolean;
  /** The introspector VM has KVM paravirt (default true); false: the kvmmem driver's init fails with EPERM. */
  paravirt?: boolean;
  /** Outstanding tokens per VM: v6 default 8, v4 unlimited. */
  tokenLimit?: number;
  /** Token lifetime in ms: v6 default 3000, v4 never expires. */
  tokenTtlMs?: number;
  /** Shared secret the device manager checks in the handshake (SHA-1 of it); none: not checked. */
  cookie?: string | Uint8Array;
  /** How long PREUNHOOK waits for the tool (device manager side). Default 3000 ms. */
  preunhookTimeoutMs?: number;
  /** Millisecond clock for token expiry (default Date.now). */
  now?: () => number;
  /**
   * The process's limit on mappings (VMAs), default /proc/sys/vm/max_map_count:
   * MAP fails with ENOMEM before this process gets within 10% of it (see vmas()).
   */
  maxMapCount?: number;
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

export interface CreateVmOptions {
  name: string;
  /** Guest memory, or a size in bytes for an anonymous (memfd) VM the host owns and closes. */
  memory: GuestMemory | bigint | number;
  /** RFC 9562 string; default a new v4 uuid. */
  uuid?: string;
}

export interface HostMapping {
  /** The introspector page (its virtual address in this process: the model's frame identity). */
  introspectorPage: bigint;
  vm: ModelVm;
  /** Target guest-physical page (the requested gpa rounded down to its page). */
  gpa: bigint;
}

export interface VmStats {
  uuid: string;
  name: string;
  hooked: boolean;
  mappings: number;
  tokensOutstanding: number;
}

/** Cumulative counters since the host was created (diagnostics, tests). */
export interface HostCounters {
  /** KVM_HC_MEM_MAP hypercalls received (whatever their result). */
  mapHypercalls: number;
  /** KVM_HC_MEM_UNMAP hypercalls received. */
  unmapHypercalls: number;
  /** mmap(MAP_FIXED)+mlock calls made for remaps (a coalesced run counts once). */
  remapCalls: number;
  /** Pages those calls covered. */
  remappedPages: number;
}

export interface HostStats {
  mappings: number;
  tokensOutstanding: number;
  vms: VmStats[];
}

/** What a KVM_INTROSPECTION_HOOK caller passes (struct kvm_introspection_hook). */
export interface HookArgs {
  fd: number;
  padding?: number;
  /** 16 bytes or a uuid string; default the VM's own uuid. */
  uuid?: Uint8Array | string;
}

/** One mapping of the host's list (what #mapGet() answers for an introspector page). */
interface MapRec {
  vm: ModelVm;
  /** Target gpa page: a number when exact (< 2^53), else the bigint. */
  gpa: number | bigint;
}

/**
 * The host's mapping index: introspector pages in chunks of CHUNK_PAGES
 * adjacent pages (2 MiB), keyed by address / 2 MiB (a small integer: < 2^26),
 * each chunk holding the VM and target gpa page of its mapped pages in arrays
 * indexed by page (no object per mapping).
 */
const CHUNK_PAGES = 512;
const CHUNK_BYTES = CHUNK_PAGES * PS;
interface Chunk {
  /** The VM a page is mapped from; undefined: not mapped. */
  readonly vm: (ModelVm | undefined)[];
  /** Target gpa page when exact (< 2^53); NaN: see #bigGpa. */
  readonly gpa: Float64Array;
  /** Mapped pages in the chunk (the chunk goes when it drops to 0). */
  n: number;
}

/**
 * The kind of a queued remap in the deferral log: a fresh page, else
 * fd * 4 + (guarded ? 2 : 0) + (writable ? 1 : 0) (see opOf).
 */
const OP_FRESH = -1;
/** A remap of `fd`: guarded pages are a guest RAM file that may shrink (libc.REMAP_GUARD). */
const opOf = (fd: number, writable: boolean, guard: boolean) => fd * 4 + (guard ? 2 : 0) + (writable ? 1 : 0);
const opFd = (op: number) => Math.floor(op / 4);
/** The libc remap kind of a shared op (REMAP_SHARED or _RO, | REMAP_GUARD). */
const gpaAdjacent = (a: number | bigint, b: number | bigint) =>
  (typeof a === 'number' && typeof b === 'number' ? a + PS === b : BigInt(a) + BigInt(PS) === BigInt(b));
let guardAvailable: boolean | undefined;
/** Batches begun in this process: a batch checks each guest RAM file's size once (GuestMemory._sizeAt). */
let batchStamps = 0;
const opKind = (op: number) => ((op & 1) === 1 ? libc.REMAP_SHARED : libc.REMAP_SHARED_RO) | ((op & 2) === 2 ? libc.REMAP_GUARD : 0);

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

const VM_HINTS = {
  EPERM: 'introspection is disabled on this host (kvm.introspection=0; here: new ModelHost({ introspection: true }))',
  PADDING: 'kvm_introspection_hook.padding must be 0',
  FD: 'fd must be a socket connected to the introspection tool (adoptSocket(socket) returns the fd of a connected net.Socket)',
  EEXIST: 'the VM is already introspected: KVM_INTROSPECTION_UNHOOK it first',
  PRE_EFAULT: 'the VM is not introspected yet (use KVM_INTROSPECTION_HOOK)',
  PRE_ENOENT: 'the socket had an error, or the tool did not subscribe to the UNHOOK event (KVMI_CONTROL_VM_EVENTS)',
  EFAULT: 'the kvm_introspection_hook struct could not be read (fewer than 24 bytes, or an unreadable pointer)',
} as const;

export class ModelHost {
  readonly name: string;
  readonly protocol: KvmiProtocol;
  readonly introspection: boolean;
  readonly paravirt: boolean;
  readonly cookie: string | Uint8Array | undefined;
  readonly preunhookTimeoutMs: number;
  /** @internal */
  readonly _tokens: TokenStore<ModelVm>;
  readonly #vms = new Set<ModelVm>();
  /** The host's list of mappings: see Chunk. */
  readonly #chunks = new Map<number, Chunk>();
  /** Target gpa pages >= 2^53, by introspector page. */
  readonly #bigGpa = new Map<number, bigint>();
  #mapCount = 0;
  /** The chunk looked up last (batches walk adjacent pages). */
  #lastKey = -1;
  #lastChunk: Chunk | undefined;
  /** The last chunk that emptied (single MAP/UNMAP pairs reuse it). */
  #spare: Chunk | undefined;
  /**
   * The remaps queued while deferring, in call order, in parallel typed arrays
   * (no object per page): introspector page, file offset, op (OP_FRESH or
   * fd * 2 + writable). #pendN is -1 when not deferring. A later op for the
   * same page replaces an earlier one.
   */
  #pendN = -1;
  #pendPage = new Float64Array(0);
  #pendOff = new Float64Array(0);
  #pendOp = new Int32Array(0);
  readonly #counters: HostCounters = { mapHypercalls: 0, unmapHypercalls: 0, remapCalls: 0, remappedPages: 0 };
  #driver: KvmiMemDriver | undefined;
  #closed = false;
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
  /** Stamp of the batch now running (file sizes are checked once per batch), or -1. */
  #sizeStamp = -1;
  /** The batch and memory of the last MAP refused past a shrunk file's end (reported once per batch). */
  #reportedStamp = -1;
  #reportedMem: GuestMemory | undefined;
  readonly #faultSource: faults.FaultSource = {
    resolve: (address) => this.#resolveFault(address),
    shrunk: (uuid) => this.#shrunk(uuid),
  };

  constructor(opts: ModelHostOptions = {}) {
    this.name = opts.name ?? 'kvmmem';
    this.protocol = opts.protocol ?? 'v6';
    if (this.protocol !== 'v4' && this.protocol !== 'v6') throw new UsageError(`protocol must be 'v4' or 'v6', got ${String(this.protocol)}`);
    this.introspection = opts.introspection ?? true;
    this.paravirt = opts.paravirt ?? true;
    this.cookie = opts.cookie;
    this.preunhookTimeoutMs = opts.preunhookTimeoutMs ?? 3000;
    const v4 = this.protocol === 'v4';
    this._tokens = new TokenStore<ModelVm>({
      limit: opts.tokenLimit ?? (v4 ? Infinity : 8),
      ttlMs: opts.tokenTtlMs ?? (v4 ? Infinity : 3000),
      ...(opts.now === undefined ? {} : { now: opts.now }),
    });
    const limit = opts.maxMapCount ?? systemMaxMapCount();
    if (!Number.isSafeInteger(limit) || limit < 64) throw new UsageError(`maxMapCount must be an integer >= 64, got ${String(limit)}`);
    this.#vmaLimit = limit;
    this.#vmaThreshold = limit - Math.ceil(limit / 10);
    this.#vmaStep = Math.max(16, Math.floor(limit / 40));
  }

  get closed(): boolean { return this.#closed; }

  // ---- VMs ----

  createVm(opts: CreateVmOptions): ModelVm {
    this.#checkOpen('createVm');
    const uuid = opts.uuid ?? uuidV4();
    if (typeof uuid !== 'string' || !uuidValidate(uuid)) throw new UsageError(`createVm: ${String(uuid)} is not a valid UUID`);
    for (const vm of this.#vms) {
      if (vm.uuid === uuid.toLowerCase()) throw new UsageError(`createVm: a VM with uuid ${uuid} already exists on this host`);
    }
    const owned = !(opts.memory instanceof GuestMemory);
    const memory = opts.memory instanceof GuestMemory ? opts.memory : GuestMemory.anonymous(opts.memory, { name: `kvmmem-${opts.name}` });
    const vm = new ModelVm(this, uuid.toLowerCase(), opts.name, memory, owned);
    this.#vms.add(vm);
    if (memory.mayShrink) faults.addFaultSource(this.#faultSource);
    debug('host %s: VM %s (%s) created, %d bytes of RAM', this.name, vm.name, vm.uuid, memory.size);
    return vm;
  }

  /**
   * kvm_destroy_vm(): unhooks (revoking every page mapped from it and dropping
   * its tokens: v4 leaked both) and forgets the VM. Memory the host created is closed.
   */
  removeVm(vm: ModelVm): void {
    if (!this.#vms.has(vm)) return;
    vm._teardown();
    this.#vms.delete(vm);
    vm._removed = true;
    if (vm._ownsMemory) vm.memory.close();
    debug('host %s: VM %s removed', this.name, vm.name);
  }

  vms(): ModelVm[] { return [...this.#vms]; }

  findVm(uuid: string): ModelVm | undefined {
    const u = uuid.toLowerCase();
    for (const vm of this.#vms) if (vm.uuid === u) return vm;
    return undefined;
  }

  // ---- the introspector's kvmmem device ----

  /** The introspector's /dev/kvmmem driver (module init on first use: EPERM without paravirt). */
  get driver(): KvmiMemDriver {
    this.#checkOpen('driver');
    this.#driver ??= new KvmiMemDriver(this);
    return this.#driver;
  }

  /** One open() of /dev/kvmmem. */
  openDevice(): ModelDevice {
    return ModelDevice.open(this);
  }

  // ---- hypercalls ----

  /**
   * A hypercall from the introspector VM. Returns 0 or a negative KVM_E* /
   * errno value. KVM_HC_MEM_MAP(a0 = token: its 32 bytes, or the address of
   * them in this process; a1 = target gpa; a2 = introspector page address);
   * KVM_HC_MEM_UNMAP(a0 = introspector page address). Anything else: -KVM_ENOSYS.
   */
  hypercall(nr: number, a0: bigint | number | Uint8Array = 0n, a1: bigint | number = 0n, a2: bigint | number = 0n, _a3: bigint | number = 0n): number {
    if (this.#closed) return -KVM_ENOSYS;
    if (nr === KVM_HC_MEM_MAP) {
      let token: Uint8Array | null;
      if (a0 instanceof Uint8Array) token = a0.length >= MEM_TOKEN_SIZE ? a0.subarray(0, MEM_TOKEN_SIZE) : null;
      else token = copy_from_user(BigInt.asUintN(64, BigInt(a0)), MEM_TOKEN_SIZE);
      return this._mapHc(token, BigInt.asUintN(64, BigInt(a1)), BigInt.asUintN(64, BigInt(a2)), false);
    }
    if (nr === KVM_HC_MEM_UNMAP) return a0 instanceof Uint8Array ? -KVM_ENOENT : this._unmapHc(BigInt.asUintN(64, BigInt(a0)));
    return -KVM_ENOSYS;
  }

  /**
   * @internal KVM_HC_MEM_MAP. `pageChecked`: the caller (the driver) has just
   * seen the page present, so the host skips its own lookup of it.
   */
  _mapHc(token: Uint8Array | null, gpa: bigint, mapGpa: bigint, pageChecked: boolean): number {
    if (this.#closed) return -KVM_ENOSYS;
    this.#counters.mapHypercalls++;
    // Look the token up and remove it: single use, even if a later check fails.
    if (token === null) return -KVM_ENOENT;
    const vm = this._tokens.consume(token);
    if (vm === undefined) return -KVM_ENOENT;
    if (!vm.hooked || vm.removed) return -KVM_ENOENT;
    // Target page (gpa_to_gfn: the page holding gpa) must be RAM of that VM.
    const gpaPage = gpa - (gpa % BigInt(PS));
    const where = vm.memory.resolve(gpaPage, PS);
    if (where === null) return -KVM_EFAULT;
    // A guest RAM file that shrank no longer has the page: no memslot behind it.
    if (vm.memory.mayShrink && this.#pastEnd(vm, where.offset, gpaPage)) return -KVM_EFAULT;
    // Introspector page (its "gpa" is its address here) must exist.
    if (mapGpa >= BigInt(USER_LIMIT)) return -KVM_EFAULT;
    const page = pageOf(Number(mapGpa));
    if (page === 0 || page + PS > USER_LIMIT) return -KVM_EFAULT;
    if (!pageChecked && pageState(page) === 'unmapped') return -KVM_EFAULT;
    return this.#book(vm, gpaPage <= MAX_SAFE ? Number(gpaPage) : gpaPage, where.fd, where.offset, where.writable, page);
  }

  /**
   * @internal _mapHc() for the driver's batch path: the token is the 32 bytes
   * at `off` of `buf` (looked up in place), `page` the introspector page the
   * driver has just seen present (below the user limit).
   */
  _mapHcAt(buf: Uint8Array, off: number, gpa: number | bigint, page: number): number {
    if (this.#closed) return -KVM_ENOSYS;
    this.#counters.mapHypercalls++;
    const vm = this._tokens.consumeAt(buf, off);
    if (vm === undefined) return -KVM_ENOENT;
    if (!vm.hooked || vm.removed) return -KVM_ENOENT;
    const mem = vm.memory;
    if (typeof gpa === 'number') {
      // (numbers all the way: no bigint, no ResolvedGpa object)
      const gpaPage = gpa - (gpa % PS);
      const offset = mem._offsetOfPage(gpaPage);
      if (offset >= 0) {
        if (mem.mayShrink && this.#pastEnd(vm, offset, gpaPage)) return -KVM_EFAULT;
        if (page === 0 || page + PS > USER_LIMIT) return -KVM_EFAULT;
        return this.#book(vm, gpaPage, mem.fd, offset, mem.writable, page);
      }
      if (offset === -1) return -KVM_EFAULT;
    }
    let gpaPage: number | bigint, where;
    if (typeof gpa === 'number') {
      gpaPage = gpa - (gpa % PS);
      where = mem.resolve(BigInt(gpaPage), PS);
    } else {
      const p = gpa - (gpa % BigInt(PS));
      gpaPage = p <= MAX_SAFE ? Number(p) : p;
      where = mem.resolve(p, PS);
    }
    if (where === null) return -KVM_EFAULT;
    if (mem.mayShrink && this.#pastEnd(vm, where.offset, gpaPage)) return -KVM_EFAULT;
    if (page === 0 || page + PS > USER_LIMIT) return -KVM_EFAULT;
    return this.#book(vm, gpaPage, where.fd, where.offset, where.writable, page);
  }

  /**
   * @internal The driver's single (unbatched) MAP in one native call: validates
   * everything _mapHcAt() would check, without side effects; when all of it
   * passes, libc.mapOne() looks the page up (the driver's find_vma/follow_page)
   * and, only if a page is present, remaps it; then the hypercall is booked
   * (token consumed, mapping listed, counters) exactly as _mapHcAt() would.
   * Returns the hypercall's 0 / -errno, or libc.MAP_ONE_UNMAPPED / _ABSENT /
   * _UNKNOWN when no page is present there (nothing happened: the driver takes
   * its quirk path or asks again), or undefined when this fast path does not
   * apply (a check fails, remaps are deferred, no native helper): the caller
   * then does the lookup and _mapHcAt() one by one, which reports any error in
   * the usual order.
   */
  _mapOneAt(buf: Uint8Array, off: number, gpa: number | bigint, page: number): number | undefined {
    if (this.#closed || this.#pendN >= 0 || !libc.mapOneNative()) return undefined;
    const tok = this._tokens.peekAt(buf, off);
    if (tok === undefined) return undefined;
    const vm = tok.vm;
    if (!vm.hooked || vm.removed) return undefined;
    let gpaPage: number | bigint, where;
    if (typeof gpa === 'number') {
      gpaPage = gpa - (gpa % PS);
      where = vm.memory.resolve(BigInt(gpaPage), PS);
    } else {
      const p = gpa - (gpa % BigInt(PS));
      gpaPage = p <= MAX_SAFE ? Number(p) : p;
      where = vm.memory.resolve(p, PS);
    }
    if (where === null || page === 0 || page + PS > USER_LIMIT || this.#mapHas(page)) return undefined;
    const mem = vm.memory;
    if (mem.mayShrink && mem._sizeAt(-1) < where.offset + PS) return undefined; // (reported on the slow path)
    const dv = this.#vmaDelta(page, vm, gpaPage);
    if (!this.#vmaRoom(dv)) return undefined;
    const r = libc.mapOne(opKind(opOf(where.fd, where.writable, this.#guards(mem))), page, PS, where.fd, where.offset);
    if (r > 0) return r; // no page there: no hypercall
    // The hypercall: the token is used, the page booked (remapped just now).
    this.#counters.mapHypercalls++;
    this._tokens.take(tok);
    this.#counters.remapCalls++;
    this.#counters.remappedPages++;
    if (r < 0) {
      this.#freshOrLog(page, 1);
      return r;
    }
    this.#mapSet(page, vm, gpaPage, dv);
    return 0;
  }

  #book(vm: ModelVm, gpaPage: number | bigint, fd: number, offset: number, writable: boolean, page: number): number {
    // v6 remote mapping: the same introspector page mapped twice.
    if (this.#mapHas(page)) return -EALREADY;
    // Model only: each mapping is a VMA of this process (a real host changes EPT); fail
    // before the process reaches vm.max_map_count, where mmap fails and V8 aborts.
    const dv = this.#vmaDelta(page, vm, gpaPage);
    if (!this.#vmaRoom(dv)) return -ENOMEM;
    this.#mapSet(page, vm, gpaPage, dv);
    const op = opOf(fd, writable, this.#guards(vm.memory));
    if (this.#pendN >= 0) {
      this.#queue(page, offset, op);
      return 0;
    }
    const r = this.#remapRun(op, page, 1, offset);
    if (r < 0) {
      this.#dropMapping(page);
      this.#freshOrLog(page, 1);
      return r;
    }
    return 0;
  }

  /** @internal KVM_HC_MEM_UNMAP: find by introspector page, give it a fresh page, drop the entry whatever happens. */
  _unmapHc(mapGpa: bigint): number {
    if (this.#closed) return -KVM_ENOSYS;
    this.#counters.unmapHypercalls++;
    if (mapGpa >= BigInt(USER_LIMIT)) return -KVM_ENOENT;
    return this.#unmapPage(pageOf(Number(mapGpa)));
  }

  /** @internal _unmapHc() of an introspector page address (a number below the user limit). */
  _unmapPage(page: number): number {
    if (this.#closed) return -KVM_ENOSYS;
    this.#counters.unmapHypercalls++;
    return this.#unmapPage(page);
  }

  #unmapPage(page: number): number {
    if (!this.#dropMapping(page)) return -KVM_ENOENT;
    return this.#fresh(page);
  }

  /** Removes the mapping at `page` from the host's list; false if there is none. */
  #dropMapping(page: number): boolean {
    const c = this.#chunk(page);
    if (c === undefined) return false;
    const i = (page % CHUNK_BYTES) / PS;
    const vm = c.vm[i];
    if (vm === undefined) return false;
    const g = c.gpa[i]!;
    this.#vmaMine -= this.#vmaDelta(page, vm, g === g ? g : this.#bigGpa.get(page)!);
    c.vm[i] = undefined;
    if (g !== g) this.#bigGpa.delete(page);
    if (--c.n === 0) {
      this.#chunks.delete(Math.floor(page / CHUNK_BYTES));
      this.#lastKey = -1;
      this.#lastChunk = undefined;
      this.#spare = c; // (empty: reused by the next new chunk)
    }
    this.#mapCount--;
    vm._mapped--;
    return true;
  }

  /** The chunk holding `page`, if it has any mapping. */
  #chunk(page: number): Chunk | undefined {
    const key = Math.floor(page / CHUNK_BYTES);
    if (key === this.#lastKey) return this.#lastChunk;
    const c = this.#chunks.get(key);
    if (c !== undefined) {
      this.#lastKey = key;
      this.#lastChunk = c;
    }
    return c;
  }

  /** `page` is mapped. */
  #mapHas(page: number): boolean {
    const c = this.#chunk(page);
    return c !== undefined && c.vm[(page % CHUNK_BYTES) / PS] !== undefined;
  }

  /** The mapping at `page`, if any. */
  #mapGet(page: number): MapRec | undefined {
    const c = this.#chunk(page);
    if (c === undefined) return undefined;
    const i = (page % CHUNK_BYTES) / PS;
    const vm = c.vm[i];
    if (vm === undefined) return undefined;
    const g = c.gpa[i]!;
    return { vm, gpa: g === g ? g : this.#bigGpa.get(page)! };
  }

  /** Lists a mapping at `page` (not mapped yet); `dv`: its #vmaDelta(). */
  #mapSet(page: number, vm: ModelVm, gpaPage: number | bigint, dv: number): void {
    this.#vmaMine += dv;
    let c = this.#chunk(page);
    if (c === undefined) {
      const key = Math.floor(page / CHUNK_BYTES);
      c = this.#spare ?? { vm: new Array<ModelVm | undefined>(CHUNK_PAGES).fill(undefined), gpa: new Float64Array(CHUNK_PAGES), n: 0 };
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
    this.#mapCount++;
    vm._mapped++;
  }

  /** Every mapped introspector page (of `vm`, or all), in address order within each 2 MiB chunk. */
  #mappedPages(vm?: ModelVm): number[] {
    const out: number[] = [];
    for (const [key, c] of this.#chunks) {
      for (let i = 0; i < CHUNK_PAGES; i++) {
        const v = c.vm[i];
        if (v !== undefined && (vm === undefined || v === vm)) out.push(key * CHUNK_BYTES + i * PS);
      }
    }
    return out;
  }

  /** A fresh zeroed page at `page` now, or queued in a batch. */
  #fresh(page: number): number {
    if (this.#pendN >= 0) {
      this.#queue(page, 0, OP_FRESH);
      return 0;
    }
    return this.#remapRun(OP_FRESH, page, 1, 0);
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

  #freshOrLog(page: number, pages: number): void {
    this.#counters.remapCalls++;
    this.#counters.remappedPages += pages;
    const r = remapFresh(page, pages * PS);
    if (r < 0) debug('host %s: could not give 0x%s (%d pages) a fresh page: errno %d', this.name, page.toString(16), pages, -r);
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

  /**
   * Whether [offset, offset + PS) is past the end of vm's RAM file now (it
   * shrank): then reported to sys/faults. One fstat per batch, or per single MAP.
   */
  #pastEnd(vm: ModelVm, offset: number, gpaPage: number | bigint): boolean {
    const mem = vm.memory;
    const stamp = this.#sizeStamp;
    const size = mem._sizeAt(stamp);
    if (offset + PS <= size) return false;
    // One report per file and batch: the first gpa past the end is the one to name.
    if (stamp >= 0 && this.#reportedStamp === stamp && this.#reportedMem === mem) return true;
    this.#reportedStamp = stamp;
    this.#reportedMem = mem;
    faults.reportShrink({ uuid: vm.uuid, vm: vm.name, path: mem.path ?? mem.name, fileSize: Number(mem.fileSize), size: Math.max(0, size), gpa: BigInt(gpaPage) });
    return true;
  }

  /** sys/faults: the guest page behind a guarded introspector page that faulted. */
  #resolveFault(address: number): faults.GuestMemoryFault | undefined {
    if (!(address > 0 && address < USER_LIMIT)) return undefined;
    const r = this.#mapGet(pageOf(address));
    if (r === undefined || !r.vm.memory.mayShrink) return undefined;
    const mem = r.vm.memory;
    return { uuid: r.vm.uuid, vm: r.vm.name, path: mem.path ?? mem.name, fileSize: Number(mem.fileSize), size: Math.max(0, mem._sizeAt(-1)), gpa: BigInt(r.gpa) };
  }

  /** sys/faults: VM `uuid` of this host, when its RAM file is smaller now than when it was opened. */
  #shrunk(uuid: string): faults.GuestMemoryFault | undefined {
    const vm = this.findVm(uuid);
    if (vm === undefined || !vm.memory.mayShrink || vm.memory.closed) return undefined;
    const mem = vm.memory;
    const size = mem._sizeAt(-1);
    if (size >= Number(mem.fileSize)) return undefined;
    return { uuid: vm.uuid, vm: vm.name, path: mem.path ?? mem.name, fileSize: Number(mem.fileSize), size };
  }

  // ---- VMA accounting (model only) ----

  /**
   * VMAs a mapping at `page` of (vm, gpaPage) adds to this process (negative:
   * removes), from its neighbours: it starts a VMA unless the page before holds
   * the previous gpa of the same VM (a file mapping with contiguous offsets
   * merges), and splits a window piece off after it unless the page after is
   * mapped too. The same before and after the page is listed (it never looks at
   * the page itself). An upper bound: fresh pages merge back into their window.
   */
  #vmaDelta(page: number, vm: ModelVm, gpaPage: number | bigint): number {
    const left = page - PS, right = page + PS;
    const lc = this.#chunk(left);
    const li = (left % CHUNK_BYTES) / PS;
    const lvm = lc?.vm[li];
    const rc = this.#chunk(right);
    const ri = (right % CHUNK_BYTES) / PS;
    const rvm = rc?.vm[ri];
    let d = 0;
    // Left: nothing mapped there: a new VMA (+1); mapped, not contiguous: a new VMA in
    // place of the window piece that followed it (0); contiguous: the run grows, and its
    // trailing window piece moves after this page (-1, the +1 below adds it back).
    if (lvm === undefined) d++;
    else if (lvm === vm && gpaAdjacent(this.#gpaAt(lc!, li, left), gpaPage)) d--;
    // Right: nothing mapped there: a window piece after it (+1); a contiguous run: merges (-1).
    if (rvm === undefined) d++;
    else if (rvm === vm && gpaAdjacent(gpaPage, this.#gpaAt(rc!, ri, right))) d--;
    return d;
  }

  /** The gpa page mapped at `page` (index i of chunk c). */
  #gpaAt(c: Chunk, i: number, page: number): number | bigint {
    const g = c.gpa[i]!;
    return g === g ? g : this.#bigGpa.get(page)!;
  }

  /**
   * Whether a MAP that adds `d` VMAs leaves this process below the threshold.
   * The estimate is /proc/self/maps as last counted plus what the host's
   * mappings changed since; past the threshold it is counted again (at most once
   * per #vmaStep VMAs the host adds, and not again after a refusal until the
   * host has unmapped something), so the refusal rests on a real count.
   */
  #vmaRoom(d: number): boolean {
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
      this.name, this.#vmaBase + this.#vmaMine, this.#vmaMine, this.#vmaLimit, this.#vmaThreshold);
    return false;
  }

  #vmaMeasure(): void {
    this.#vmaMeasurements++;
    this.#vmaBase = countVmas() - this.#vmaMine;
  }


  // ---- batches ----

  /** @internal remaps are being queued (a batch is running). */
  get _deferring(): boolean { return this.#pendN >= 0; }

  /** @internal Start queueing page remaps (see the module comment). */
  _beginDeferral(): void {
    if (this.#pendN >= 0) throw new Error('ModelHost: remaps are already being deferred');
    this.#pendN = 0;
    this.#sizeStamp = ++batchStamps;
  }

  /**
   * @internal Do the queued remaps, coalescing runs of adjacent pages. Returns
   * the MAP pages whose remap failed (already rolled back here) -> -errno.
   */
  _endDeferral(): Map<number, number> {
    const n = this.#pendN;
    this.#pendN = -1;
    this.#sizeStamp = -1;
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
          this.#dropMapping(p);
          failures.set(p, res[i]!);
        }
        this.#freshOrLog(run.page, run.pages);
      }
    }
    if (fresh.length > 0) {
      const res = this.#doRuns(fresh, OP_FRESH);
      for (let i = 0; i < fresh.length; i++) {
        if (res[i]! < 0) this.#freshOrLog(fresh[i]!.page, fresh[i]!.pages); // retry once; log if it fails again
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

  // ---- diagnostics ----

  stats(): HostStats {
    const vms = [...this.#vms].map((vm) => vm.stats());
    return {
      mappings: this.#mapCount,
      tokensOutstanding: this._tokens.outstanding(),
      vms,
    };
  }

  /**
   * How close this process is to vm.max_map_count. Model only: every mapping
   * the model makes is a VMA of this process (a real host changes the EPT, not
   * the introspector's VMAs), so MAP fails with ENOMEM once the estimate would
   * pass `threshold` (the limit less 10%), before mmap itself fails (and V8
   * aborts on its next allocation). Map ranges (adjacent pages of adjacent gpas
   * share one VMA) or raise the limit: `sysctl -w vm.max_map_count=262144`.
   */
  vmas(): VmaStats {
    if (this.#vmaBase < 0) this.#vmaMeasure();
    return {
      limit: this.#vmaLimit, threshold: this.#vmaThreshold, estimate: this.#vmaBase + this.#vmaMine,
      mappings: this.#vmaMine, measurements: this.#vmaMeasurements,
    };
  }

  /** Cumulative hypercall and remap counters (a copy). */
  counters(): HostCounters {
    return { ...this.#counters };
  }

  /** The host's {introspector page, VM, gpa} list. */
  mappings(): HostMapping[] {
    return this.#mappedPages().map((page) => {
      const r = this.#mapGet(page)!;
      return { introspectorPage: BigInt(page), vm: r.vm, gpa: BigInt(r.gpa) };
    });
  }

  /** The mapping at an introspector page, if any. */
  mappingAt(introspectorPage: bigint): HostMapping | undefined {
    if (introspectorPage < 0n || introspectorPage >= BigInt(USER_LIMIT)) return undefined;
    const page = pageOf(Number(introspectorPage));
    const r = this.#mapGet(page);
    return r && { introspectorPage: BigInt(page), vm: r.vm, gpa: BigInt(r.gpa) };
  }

  /**
   * @internal Revokes every page mapped from `vm` (each gets a fresh page).
   * The host keeps only a count per VM, so this walks the host's whole list
   * (O(mappings) per unhook), in address order within each 2 MiB chunk.
   */
  _revoke(vm: ModelVm): number {
    if (vm._mapped === 0) return 0;
    const pages = this.#mappedPages(vm);
    const outer = this.#pendN < 0;
    if (outer) this._beginDeferral();
    for (const p of pages) {
      this.#dropMapping(p);
      this.#fresh(p);
    }
    if (outer) this._endDeferral();
    debug('host %s: revoked %d pages of VM %s', this.name, pages.length, vm.name);
    return pages.length;
  }

  /** Releases every open device file, removes every VM, stops the token sweep. */
  close(): void {
    if (this.#closed) return;
    this.#driver?.kvm_intro_guest_exit();
    for (const vm of [...this.#vms]) this.removeVm(vm);
    this._tokens.close();
    faults.removeFaultSource(this.#faultSource);
    this.#closed = true;
  }

  #checkOpen(what: string): void {
    if (this.#closed) throw new ClosedError(`model host ${this.name}`, what);
  }
}

interface Run { page: number; pages: number; offset: number; op: number }

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

/** VM ioctl table (seed 002 style): request -> expected argument size, handler. */
interface VmIoctl {
  name: string;
  size: number;
  run(vm: ModelVm, arg: Uint8Array | null): number;
}

/**
 * A VM on the model host: its memory, and the KVM side of introspection
 * (the VM fd's KVM_INTROSPECTION_* ioctls and its KVMI connection).
 */
export class ModelVm {
  readonly host: ModelHost;
  /** Lower-case RFC 9562 string. */
  readonly uuid: string;
  readonly name: string;
  readonly memory: GuestMemory;
  /** When the VM was created (the handshake's start_time, in seconds). */
  readonly startTime: bigint;
  /** @internal */ readonly _ownsMemory: boolean;
  /** @internal how many introspector pages are currently mapped from this VM (the host's list has them). */
  _mapped = 0;
  /** @internal */ _removed = false;
  #conn: KvmiConnection | null = null;
  #hooked = false;
  #hookUuid: Uint8Array | null = null;

  /** @internal use host.createVm() */
  constructor(host: ModelHost, uuid: string, name: string, memory: GuestMemory, ownsMemory: boolean) {
    this.host = host;
    this.uuid = uuid;
    this.name = name;
    this.memory = memory;
    this._ownsMemory = ownsMemory;
    this.startTime = BigInt(Math.floor(Date.now() / 1000));
  }

  /** The uuid as 16 bytes. */
  get uuidBytes(): Uint8Array { return uuidParse(this.uuid); }
  /** kvm->kvmi is set (between a successful HOOK and UNHOOK). */
  get hooked(): boolean { return this.#hooked; }
  get removed(): boolean { return this._removed; }
  /** The uuid given with KVM_INTROSPECTION_HOOK (used in messages), when hooked. */
  get hookUuid(): Uint8Array | null { return this.#hookUuid; }
  /** The live KVMI connection, when hooked. */
  get connection(): KvmiConnection | null { return this.#conn; }
  get label(): string { return `VM ${this.name} (${this.uuid})`; }

  stats(): VmStats {
    return {
      uuid: this.uuid,
      name: this.name,
      hooked: this.#hooked,
      mappings: this._mapped,
      tokensOutstanding: this.host._tokens.outstanding(this),
    };
  }

  // ---- VM fd ioctls ----

  static readonly #ioctls: ReadonlyMap<number, VmIoctl> = new Map<number, VmIoctl>([
    [KVM_INTROSPECTION_HOOK, { name: 'KVM_INTROSPECTION_HOOK', size: decodeIoctl(KVM_INTROSPECTION_HOOK).size, run: (vm, a) => vm.#ioctlHook(a!) }],
    [KVM_INTROSPECTION_UNHOOK, { name: 'KVM_INTROSPECTION_UNHOOK', size: 0, run: (vm) => vm.#ioctlUnhook() }],
    [KVM_INTROSPECTION_PREUNHOOK, { name: 'KVM_INTROSPECTION_PREUNHOOK', size: 0, run: (vm) => vm.#ioctlPreunhook() }],
  ]);

  /**
   * ioctl(vm_fd, request, arg) for the introspection requests (kvm_vm_ioctl):
   * HOOK takes the 24-byte struct (bytes, or a pointer in this process);
   * UNHOOK and PREUNHOOK take nothing. Returns 0 or throws a DeviceError;
   * any other request: ENOTTY.
   */
  ioctl(request: number, arg: Uint8Array | bigint | number = 0): number {
    const h = ModelVm.#ioctls.get(request >>> 0);
    if (h === undefined) throw new DeviceError(-ENOTTY, ioctlName(request), { path: this.#path() });
    let bytes: Uint8Array | null = null;
    if (h.size > 0) {
      // EPERM comes first: kvm_vm_ioctl checks enable_introspection before copy_from_user.
      if (!this.host.introspection) throw this.#err(EPERM, h.name, VM_HINTS.EPERM);
      bytes = arg instanceof Uint8Array
        ? (arg.length >= h.size ? arg.subarray(0, h.size) : null)
        : copy_from_user(BigInt.asUintN(64, BigInt(arg)), h.size);
      if (bytes === null) throw this.#err(EFAULT, h.name, VM_HINTS.EFAULT);
    }
    return h.run(this, bytes);
  }

  /** KVM_INTROSPECTION_HOOK with a struct built from `args`. Returns 0 or throws. */
  hook(args: HookArgs): number {
    const uuid = args.uuid === undefined ? this.uuidBytes : typeof args.uuid === 'string' ? uuidParse(args.uuid) : args.uuid;
    if (uuid.length !== 16) throw new UsageError('hook: uuid must be 16 bytes');
    const buf = Buffer.alloc(HOOK_SIZE);
    buf.writeInt32LE(args.fd | 0, 0);
    buf.writeUInt32LE((args.padding ?? 0) >>> 0, 4);
    buf.set(uuid, 8);
    return this.ioctl(KVM_INTROSPECTION_HOOK, buf);
  }

  /** KVM_INTROSPECTION_UNHOOK: revoke mappings, drop tokens, close the connection. 0, or EPERM. */
  unhook(): number {
    return this.ioctl(KVM_INTROSPECTION_UNHOOK);
  }

  /**
   * The device manager's pre-unhook (seed 004): KVM_INTROSPECTION_PREUNHOOK
   * (EPERM / EFAULT not hooked / ENOENT socket error or UNHOOK event not
   * enabled; otherwise the UNHOOK event is sent), then wait for the tool to
   * reply or close the socket, or for the timeout, then UNHOOK.
   */
  preunhook(opts: PreunhookOptions = {}): Promise<UnhookAck> {
    return deviceManager.preunhook(this, opts);
  }

  /** The device manager's connect + handshake + HOOK (QEMU's role). */
  attach(opts: AttachOptions): Promise<Attachment> {
    return deviceManager.attach(this, opts);
  }

  /**
   * What this VM's KVMI connection answers to KVMI_GET_MAP_TOKEN: a fresh
   * token, or a DeviceError EAGAIN over the limit; the VM must be hooked.
   */
  getMapToken(): Uint8Array {
    if (!this.#hooked || this._removed || this.host.closed) {
      throw new KvmmemError(`KVMI_GET_MAP_TOKEN: ${this.label} is not hooked`, {
        code: 'ENOTCONN', errno: -107, syscall: 'KVMI_GET_MAP_TOKEN',
        hint: 'tokens come from the KVMI connection of a hooked VM: attach() the VM to the tool first',
      });
    }
    const t = this.host._tokens.issue(this);
    if (t === null) {
      throw new DeviceError(-EAGAIN, 'KVMI_GET_MAP_TOKEN', {
        path: this.#path(),
        hint: `too many tokens have accumulated (at most ${this.host._tokens.limit} unused per VM): use or let some expire`,
      });
    }
    return t;
  }

  /** @internal the device manager waits for the tool after PREUNHOOK. */
  _waitUnhookAck(timeoutMs: number): Promise<UnhookAck> {
    return this.#conn === null ? Promise.resolve('closed') : this.#conn.waitUnhookAck(timeoutMs);
  }

  /** @internal kvmi_destroy_vm(): unhook whatever the introspection setting. */
  _teardown(): void {
    this.#unhookNow();
  }

  // kvmi_ioctl_hook() + kvmi_hook() (seed 000), in the kernel's order.
  #ioctlHook(arg: Uint8Array): number {
    const NAME = 'KVM_INTROSPECTION_HOOK';
    const hook = decodeHook(arg);
    if (hook.padding !== 0) throw this.#err(EINVAL, NAME, VM_HINTS.PADDING); // kvmi_ioctl_hook
    if (this.#hooked) throw this.#err(EEXIST, NAME, VM_HINTS.EEXIST); // kvm->kvmi set
    if (this._removed || this.host.closed) throw this.#err(ENODEV, NAME, 'the VM was removed');
    const sock: net.Socket | null = sockfd_lookup(hook.fd); // __kvmi_hook -> kvmi_sock_get
    if (sock === null) throw this.#err(EINVAL, NAME, VM_HINTS.FD);
    this.#hooked = true;
    this.#hookUuid = hook.uuid;
    this.#conn = new KvmiConnection(sock, {
      protocol: this.host.protocol,
      label: this.label,
      memory: this.memory,
      issueToken: () => (this.#hooked && !this._removed ? this.host._tokens.issue(this) : null),
      issueTokenInto: (out, offset) => this.#hooked && !this._removed && this.host._tokens.issueInto(this, out, offset),
      onDisconnect: (c) => {
        debug('%s: KVMI connection closed%s', this.label, c.errored ? ' after a socket error' : '');
      },
    });
    debug('%s: hooked (fd %d)', this.label, hook.fd);
    return 0;
  }

  #ioctlUnhook(): number {
    if (!this.host.introspection) throw this.#err(EPERM, 'KVM_INTROSPECTION_UNHOOK', VM_HINTS.EPERM);
    this.#unhookNow();
    return 0;
  }

  // kvmi_ioctl_preunhook() (seed 004).
  #ioctlPreunhook(): number {
    const NAME = 'KVM_INTROSPECTION_PREUNHOOK';
    if (!this.host.introspection) throw this.#err(EPERM, NAME, VM_HINTS.EPERM);
    if (!this.#hooked || this.#conn === null) throw this.#err(EFAULT, NAME, VM_HINTS.PRE_EFAULT);
    // kvmi_unhook_event(): only a tool that enabled the event gets it; a dead socket cannot.
    if (!this.#conn.unhookEventEnabled || !this.#conn.sendUnhookEvent()) throw this.#err(ENOENT, NAME, VM_HINTS.PRE_ENOENT);
    return 0;
  }

  /** kvmi_unhook(): stop the receive side, free everything. Idempotent. */
  #unhookNow(): void {
    const conn = this.#conn;
    const was = this.#hooked;
    this.#hooked = false;
    this.#conn = null;
    this.#hookUuid = null;
    // Model improvement over v4: pages and tokens of the VM do not outlive the hook.
    this.host._revoke(this);
    this.host._tokens.dropVm(this);
    conn?.shutdown();
    if (was) debug('%s: unhooked', this.label);
  }

  #path(): string {
    return `model:${this.host.name}/vm/${this.name}`;
  }

  #err(errno: number, syscall: string, hint: string): DeviceError {
    return new DeviceError(-errno, syscall, { path: this.#path(), hint });
  }
}
