/**
 * The host's hypercalls KVM_HC_MEM_MAP / KVM_HC_MEM_UNMAP (RFC v6
 * kvmi_mem.c): the token checks (single use, bound to the VM that asked for
 * it, v6 limits in tokens.ts), the target page checks, the host's list of
 * mappings (v6: the same introspector page mapped twice is EALREADY), then the
 * page remapper (remapper.ts) makes it real. Results are final when a
 * hypercall returns, also in a batch (remaps deferred: see remapper.ts).
 */
import { ERRNO } from '../abi/errno.js';
import { KVM_EFAULT, KVM_ENOENT, KVM_ENOSYS, KVM_HC_MEM_MAP, KVM_HC_MEM_UNMAP } from '../abi/hypercall.js';
import { MEM_TOKEN_SIZE, PAGE_SIZE } from '../abi/structs.js';
import * as faults from '../sys/faults.js';
import type { GuestMemory } from './memory.js';
import type { MappingIndex } from './mapping-index.js';
import type { PageRemapper } from './remapper.js';
import type { TokenStore } from './tokens.js';
import { copy_from_user } from './uaccess.js';
import type { ModelVm } from './vm.js';

const PS = PAGE_SIZE;
const MAX_SAFE = 9007199254740991n;
const { EALREADY, ENOMEM } = ERRNO as Record<'EALREADY' | 'ENOMEM', number>;

/** Batches begun in this process: a batch checks each guest RAM file's size once (GuestMemory._sizeAt). */
let batchStamps = 0;

export class Hypercalls {
  /** KVM_HC_MEM_MAP / _UNMAP hypercalls received (whatever their result). */
  mapCount = 0;
  unmapCount = 0;
  /** The host closed: every hypercall is -KVM_ENOSYS. */
  closed = false;
  readonly #tokens: TokenStore<ModelVm>;
  readonly #idx: MappingIndex<ModelVm>;
  readonly #remap: PageRemapper;
  /** Stamp of the batch now running (file sizes are checked once per batch), or -1. */
  #sizeStamp = -1;
  /** The batch and memory of the last MAP refused past a shrunk file's end (reported once per batch). */
  #reportedStamp = -1;
  #reportedMem: GuestMemory | undefined;

  constructor(tokens: TokenStore<ModelVm>, index: MappingIndex<ModelVm>, remap: PageRemapper) {
    this.#tokens = tokens;
    this.#idx = index;
    this.#remap = remap;
  }

  /**
   * A hypercall from the introspector VM: 0 or a negative KVM_E* / errno value.
   * KVM_HC_MEM_MAP(a0 = token: its 32 bytes, or the address of them in this
   * process; a1 = target gpa; a2 = introspector page);
   * KVM_HC_MEM_UNMAP(a0 = introspector page). Anything else: -KVM_ENOSYS.
   */
  hypercall(nr: number, a0: bigint | number | Uint8Array, a1: bigint | number, a2: bigint | number): number {
    if (this.closed) return -KVM_ENOSYS;
    if (nr === KVM_HC_MEM_MAP) {
      let token: Uint8Array | null;
      if (a0 instanceof Uint8Array) token = a0.length >= MEM_TOKEN_SIZE ? a0.subarray(0, MEM_TOKEN_SIZE) : null;
      else token = copy_from_user(BigInt.asUintN(64, BigInt(a0)), MEM_TOKEN_SIZE);
      return this.map(token, BigInt.asUintN(64, BigInt(a1)), BigInt.asUintN(64, BigInt(a2)), false);
    }
    if (nr === KVM_HC_MEM_UNMAP) return a0 instanceof Uint8Array ? -KVM_ENOENT : this.unmap(BigInt.asUintN(64, BigInt(a0)));
    return -KVM_ENOSYS;
  }

  /** KVM_HC_MEM_MAP. `pageChecked`: the caller (the driver) has just seen the page present. */
  map(token: Uint8Array | null, gpa: bigint, mapGpa: bigint, pageChecked: boolean): number {
    if (this.closed) return -KVM_ENOSYS;
    this.mapCount++;
    // Look the token up and remove it: single use, even if a later check fails.
    if (token === null) return -KVM_ENOENT;
    const vm = this.#tokens.consume(token);
    if (vm === undefined) return -KVM_ENOENT;
    if (!vm.hooked || vm.removed) return -KVM_ENOENT;
    // Target page (gpa_to_gfn: the page holding gpa) must be RAM of that VM.
    const gpaPage = gpa - (gpa % BigInt(PS));
    const where = vm.memory.resolve(gpaPage, PS);
    if (where === null) return -KVM_EFAULT;
    // A guest RAM file that shrank no longer has the page: no memslot behind it.
    if (vm.memory.mayShrink && this.#pastEnd(vm, where.offset, gpaPage)) return -KVM_EFAULT;
    // The introspector page must exist (what that means is the remapper's: see mapPage()).
    const page = this.#remap.mapPage(mapGpa, pageChecked);
    if (page < 0) return -KVM_EFAULT;
    return this.#book(vm, gpaPage <= MAX_SAFE ? Number(gpaPage) : gpaPage, where.fd, where.offset, where.writable, page);
  }

  /**
   * map() for the driver's batch path: the token is the 32 bytes at `off` of
   * `buf` (looked up in place), `page` the introspector page the driver has
   * just seen present (below the user limit).
   */
  mapAt(buf: Uint8Array, off: number, gpa: number | bigint, page: number): number {
    if (this.closed) return -KVM_ENOSYS;
    this.mapCount++;
    const vm = this.#tokens.consumeAt(buf, off);
    if (vm === undefined) return -KVM_ENOENT;
    if (!vm.hooked || vm.removed) return -KVM_ENOENT;
    const mem = vm.memory;
    if (typeof gpa === 'number') {
      // (numbers all the way: no bigint, no ResolvedGpa object)
      const gpaPage = gpa - (gpa % PS);
      const offset = mem._offsetOfPage(gpaPage);
      if (offset >= 0) {
        if (mem.mayShrink && this.#pastEnd(vm, offset, gpaPage)) return -KVM_EFAULT;
        if (!this.#remap.validPage(page)) return -KVM_EFAULT;
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
    if (!this.#remap.validPage(page)) return -KVM_EFAULT;
    return this.#book(vm, gpaPage, where.fd, where.offset, where.writable, page);
  }

  /**
   * The driver's single (unbatched) MAP in one native call, when the remapper
   * has one (mapOne): validates everything mapAt() would check, without side
   * effects; when all of it passes, the remapper looks the page up (the
   * driver's find_vma/follow_page) and, only if a page is present, remaps it;
   * then the hypercall is booked (token consumed, mapping listed, counters)
   * exactly as mapAt() would. Returns the hypercall's 0 / -errno, or
   * libc.MAP_ONE_UNMAPPED / _ABSENT / _UNKNOWN when no page is present there
   * (nothing happened: the driver takes its quirk path or asks again), or
   * undefined when this fast path does not apply (a check fails, remaps are
   * deferred, no native helper): the caller then does the lookup and mapAt()
   * one by one, which reports any error in the usual order.
   */
  mapOneAt(buf: Uint8Array, off: number, gpa: number | bigint, page: number): number | undefined {
    const remap = this.#remap;
    if (this.closed || remap.mapOne === undefined || remap.deferring) return undefined;
    const tok = this.#tokens.peekAt(buf, off);
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
    if (where === null || !remap.validPage(page) || this.#idx.has(page)) return undefined;
    const mem = vm.memory;
    if (mem.mayShrink && mem._sizeAt(-1) < where.offset + PS) return undefined; // (reported on the slow path)
    const cost = remap.cost(page, vm, gpaPage);
    if (!remap.room(cost)) return undefined;
    const r = remap.mapOne(page, mem, where.fd, where.offset, where.writable);
    if (r === undefined || r > 0) return r; // no native helper, or no page there: no hypercall
    // The hypercall: the token is used, the page booked (remapped just now).
    this.mapCount++;
    this.#tokens.take(tok);
    if (r < 0) {
      remap.freshOrLog(page, 1);
      return r;
    }
    this.#list(page, vm, gpaPage, cost);
    return 0;
  }

  #book(vm: ModelVm, gpaPage: number | bigint, fd: number, offset: number, writable: boolean, page: number): number {
    const remap = this.#remap;
    // v6 remote mapping: the same introspector page mapped twice.
    if (this.#idx.has(page)) return -EALREADY;
    // The local remapper: each mapping is a VMA of this process (a real host changes EPT); fail
    // before the process reaches vm.max_map_count, where mmap fails and V8 aborts.
    const cost = remap.cost(page, vm, gpaPage);
    if (!remap.room(cost)) return -ENOMEM;
    this.#list(page, vm, gpaPage, cost);
    const r = remap.map(page, vm.memory, fd, offset, writable);
    if (r < 0) {
      this.drop(page);
      remap.freshOrLog(page, 1);
      return r;
    }
    return 0;
  }

  /** KVM_HC_MEM_UNMAP: find by introspector page, give it a fresh page, drop the entry whatever happens. */
  unmap(mapGpa: bigint): number {
    if (this.closed) return -KVM_ENOSYS;
    this.unmapCount++;
    const page = this.#remap.unmapPage(mapGpa);
    if (page < 0) return -KVM_ENOENT;
    return this.#unmapPage(page);
  }

  /** unmap() of an introspector page number the caller computed. */
  unmapPage(page: number): number {
    if (this.closed) return -KVM_ENOSYS;
    this.unmapCount++;
    return this.#unmapPage(page);
  }

  #unmapPage(page: number): number {
    if (!this.drop(page)) return -KVM_ENOENT;
    return this.#remap.fresh(page);
  }

  /** Revokes every page mapped from `vm` (each gets a fresh page), in one batch. */
  revoke(vm: ModelVm): number {
    if (vm._mapped === 0) return 0;
    const pages = this.#idx.pages(vm);
    const outer = !this.#remap.deferring;
    if (outer) this.begin();
    for (const p of pages) {
      this.drop(p);
      this.#remap.fresh(p);
    }
    if (outer) this.end();
    return pages.length;
  }

  #list(page: number, vm: ModelVm, gpaPage: number | bigint, cost: number): void {
    this.#remap.listed(cost);
    this.#idx.set(page, vm, gpaPage);
  }

  /** Removes the mapping at `page` from the host's list; false if there is none. */
  readonly drop = (page: number): boolean => {
    const idx = this.#idx;
    const vm = idx.vmAt(page);
    if (vm === undefined) return false;
    this.#remap.unlisted(page, vm, idx.gpaAt(page));
    return idx.delete(page);
  };

  // ---- batches ----

  get deferring(): boolean { return this.#remap.deferring; }

  begin(): void {
    this.#remap.begin();
    this.#sizeStamp = ++batchStamps;
  }

  end(): Map<number, number> {
    this.#sizeStamp = -1;
    return this.#remap.end();
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
}
