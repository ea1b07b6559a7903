/**
 * The model's host: KVM with the KVMI patches, as far as the introspector's
 * /dev/kvmmem needs it. Its parts:
 *
 * - here: the VM registry (uuid, name, guest memory), the introspector's
 *   kvmmem driver, diagnostics and teardown;
 * - vm.ts: a VM and its VM ioctls KVM_INTROSPECTION_HOOK / UNHOOK / PREUNHOOK,
 *   the KVMI connection of a hooked VM (kvmi-server.ts) handing out tokens;
 * - hypercalls.ts: KVM_HC_MEM_MAP / KVM_HC_MEM_UNMAP (token checks, v4/v6
 *   rules, the host's list of mappings in mapping-index.ts);
 * - remapper.ts: the page remapper that makes a MAP real. By default the
 *   LocalRemapper: MAP puts the target VM's page at the introspector page of
 *   this process (mmap MAP_SHARED|MAP_FIXED of the VM's memory fd, then mlock
 *   again), so reads and writes through that address are the VM's memory, live
 *   both ways; UNMAP gives the address a fresh zeroed private page ("a new
 *   physical page is allocated for this gpa"), never a hole. The lab plugs in
 *   another (ModelHostOptions.remapper): the QEMU agent's.
 *
 * Frame identity: with the local remapper the "introspector gpa" of the
 * hypercalls is the page's *virtual* address in this process (the driver model
 * passes the page address where the C driver passes page_to_phys()). One host
 * models one introspector VM.
 *
 * Batches: between _beginDeferral() and _endDeferral() every hypercall is
 * validated and booked at once (token consumed, lists updated, results final)
 * but the page remaps are queued and done at the end, runs of adjacent pages
 * coalesced into one remap. Nothing can observe memory in between (one JS
 * thread), so per-page semantics hold; a remap that fails at the end is rolled
 * back and reported per page.
 */
import { debuglog } from 'node:util';
import { v4 as uuidV4, validate as uuidValidate } from 'uuid';
import type { KvmiProtocol } from '../abi/kvmi.js';
import { ClosedError, UsageError } from '../errors.js';
import { ModelDevice } from './model-device.js';
import { KvmiMemDriver } from './driver.js';
import { GuestMemory } from './memory.js';
import { Hypercalls } from './hypercalls.js';
import { MappingIndex } from './mapping-index.js';
import { LocalRemapper, type PageRemapper, type RemapperFactory, type VmaStats } from './remapper.js';
import { TokenStore } from './tokens.js';
import { USER_LIMIT, pageOf } from './uaccess.js';
import { ModelVm, type VmStats } from './vm.js';

export { ModelVm } from './vm.js';
export type { HookArgs, VmStats } from './vm.js';
export type { VmaStats } from './remapper.js';

const debug = debuglog('kvmmem');

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
   * The local remapper's.
   */
  maxMapCount?: number;
  /** The page remapper (default: the LocalRemapper of this process, see remapper.ts). */
  remapper?: RemapperFactory;
}

export interface CreateVmOptions {
  name: string;
  /** Guest memory, or a size in bytes for an anonymous (memfd) VM the host owns and closes. */
  memory: GuestMemory | bigint | number;
  /** RFC 9562 string; default a new v4 uuid. */
  uuid?: string;
}

export interface HostMapping {
  /** The introspector page (the local remapper: its virtual address in this process; the lab's: its guest-physical address). */
  introspectorPage: bigint;
  vm: ModelVm;
  /** Target guest-physical page (the requested gpa rounded down to its page). */
  gpa: bigint;
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

export class ModelHost {
  readonly name: string;
  readonly protocol: KvmiProtocol;
  readonly introspection: boolean;
  readonly paravirt: boolean;
  readonly cookie: string | Uint8Array | undefined;
  readonly preunhookTimeoutMs: number;
  /** @internal */
  readonly _tokens: TokenStore<ModelVm>;
  /** @internal the page remapper (the lab reads its counters). */
  readonly _remapper: PageRemapper;
  readonly #vms = new Set<ModelVm>();
  /** The host's list of mappings. */
  readonly #index = new MappingIndex<ModelVm>();
  readonly #hc: Hypercalls;
  #driver: KvmiMemDriver | undefined;
  #closed = false;

  constructor(opts: ModelHostOptions = {}) {
    this.name = opts.name ?? 'kvmmem';
    this.protocol = opts.protocol ?? 'v6';
    if (this.protocol !== 'v4' && this.protocol !== 'v6') throw new UsageError(`protocol must be 'v4' or 'v6', got ${String(this.protocol)}`);
    this.introspection = opts.introspection ?? true;
    this.paravirt = opts.paravirt ?? true;
    this.cookie = opts.cookie;
    this.preunhookTimeoutMs = opts.preunhookTimeoutMs ?? 3000;
    const v4 = this.protocol === 'v4';
    const ctx = {
      name: this.name,
      index: this.#index,
      drop: (page: number) => { this.#hc.drop(page); },
      findVm: (uuid: string) => this.findVm(uuid),
    };
    const remapper = opts.remapper === undefined ? new LocalRemapper(ctx, opts.maxMapCount) : opts.remapper(ctx);
    this._tokens = new TokenStore<ModelVm>({
      limit: opts.tokenLimit ?? (v4 ? Infinity : 8),
      ttlMs: opts.tokenTtlMs ?? (v4 ? Infinity : 3000),
      ...(opts.now === undefined ? {} : { now: opts.now }),
    });
    this._remapper = remapper;
    this.#hc = new Hypercalls(this._tokens, this.#index, remapper);
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
    this._remapper.addVm(vm);
    debug('host %s: VM %s (%s) created, %s bytes of RAM', this.name, vm.name, vm.uuid, String(memory.size));
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

  // ---- hypercalls (hypercalls.ts) ----

  /**
   * A hypercall from the introspector VM. Returns 0 or a negative KVM_E* /
   * errno value. KVM_HC_MEM_MAP(a0 = token: its 32 bytes, or the address of
   * them in this process; a1 = target gpa; a2 = introspector page);
   * KVM_HC_MEM_UNMAP(a0 = introspector page). Anything else: -KVM_ENOSYS.
   */
  hypercall(nr: number, a0: bigint | number | Uint8Array = 0n, a1: bigint | number = 0n, a2: bigint | number = 0n, _a3: bigint | number = 0n): number {
    return this.#hc.hypercall(nr, a0, a1, a2);
  }

  /**
   * @internal KVM_HC_MEM_MAP. `pageChecked`: the caller (the driver) has just
   * seen the page present, so the host skips its own lookup of it.
   */
  _mapHc(token: Uint8Array | null, gpa: bigint, mapGpa: bigint, pageChecked: boolean): number {
    return this.#hc.map(token, gpa, mapGpa, pageChecked);
  }

  /** @internal _mapHc() for the driver's batch path (see Hypercalls.mapAt). */
  _mapHcAt(buf: Uint8Array, off: number, gpa: number | bigint, page: number): number {
    return this.#hc.mapAt(buf, off, gpa, page);
  }

  /** @internal The driver's single MAP in one native call (see Hypercalls.mapOneAt). */
  _mapOneAt(buf: Uint8Array, off: number, gpa: number | bigint, page: number): number | undefined {
    return this.#hc.mapOneAt(buf, off, gpa, page);
  }

  /** @internal KVM_HC_MEM_UNMAP: find by introspector page, give it a fresh page, drop the entry whatever happens. */
  _unmapHc(mapGpa: bigint): number {
    return this.#hc.unmap(mapGpa);
  }

  /** @internal _unmapHc() of an introspector page number (below the user limit). */
  _unmapPage(page: number): number {
    return this.#hc.unmapPage(page);
  }

  // ---- batches ----

  /** @internal remaps are being queued (a batch is running). */
  get _deferring(): boolean { return this.#hc.deferring; }

  /** @internal Start queueing page remaps (see the module comment). */
  _beginDeferral(): void {
    this.#hc.begin();
  }

  /**
   * @internal Do the queued remaps, coalescing runs of adjacent pages. Returns
   * the MAP pages whose remap failed (already rolled back here) -> -errno.
   */
  _endDeferral(): Map<number, number> {
    return this.#hc.end();
  }

  // ---- diagnostics ----

  stats(): HostStats {
    const vms = [...this.#vms].map((vm) => vm.stats());
    return {
      mappings: this.#index.size,
      tokensOutstanding: this._tokens.outstanding(),
      vms,
    };
  }

  /**
   * How close this process is to vm.max_map_count. Local remapper only: every
   * mapping it makes is a VMA of this process (a real host changes the EPT, not
   * the introspector's VMAs), so MAP fails with ENOMEM once the estimate would
   * pass `threshold` (the limit less 10%), before mmap itself fails (and V8
   * aborts on its next allocation). Map ranges (adjacent pages of adjacent gpas
   * share one VMA) or raise the limit: `sysctl -w vm.max_map_count=262144`.
   */
  vmas(): VmaStats {
    const r = this._remapper;
    if (r.vmas === undefined) throw new UsageError(`vmas(): the ${r.kind} page remapper makes no mappings in this process`);
    return r.vmas();
  }

  /** Cumulative hypercall and remap counters (a copy). */
  counters(): HostCounters {
    const r = this._remapper.counters();
    return { mapHypercalls: this.#hc.mapCount, unmapHypercalls: this.#hc.unmapCount, remapCalls: r.remapCalls, remappedPages: r.remappedPages };
  }

  /** The host's {introspector page, VM, gpa} list. */
  mappings(): HostMapping[] {
    return this.#index.pages().map((page) => {
      const r = this.#index.get(page)!;
      return { introspectorPage: BigInt(page), vm: r.vm, gpa: BigInt(r.gpa) };
    });
  }

  /** The mapping at an introspector page, if any. */
  mappingAt(introspectorPage: bigint): HostMapping | undefined {
    if (introspectorPage < 0n || introspectorPage >= BigInt(USER_LIMIT)) return undefined;
    const page = pageOf(Number(introspectorPage));
    const r = this.#index.get(page);
    return r && { introspectorPage: BigInt(page), vm: r.vm, gpa: BigInt(r.gpa) };
  }

  /**
   * @internal Revokes every page mapped from `vm` (each gets a fresh page).
   * The host keeps only a count per VM, so this walks the host's whole list
   * (O(mappings) per unhook), in address order within each 2 MiB chunk.
   */
  _revoke(vm: ModelVm): number {
    const n = this.#hc.revoke(vm);
    if (n > 0) debug('host %s: revoked %d pages of VM %s', this.name, n, vm.name);
    return n;
  }

  /** Releases every open device file, removes every VM, stops the token sweep. */
  close(): void {
    if (this.#closed) return;
    this.#driver?.kvm_intro_guest_exit();
    for (const vm of [...this.#vms]) this.removeVm(vm);
    this._tokens.close();
    this._remapper.close();
    this.#hc.closed = true;
    this.#closed = true;
  }

  #checkOpen(what: string): void {
    if (this.#closed) throw new ClosedError(`model host ${this.name}`, what);
  }
}
