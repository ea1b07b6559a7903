/**
 * The guest-side /dev/kvmmem misc driver of the KVMI patches, modelled line by
 * line on virt/kvm/kvmi_mem_guest.c (RFC v4 02/18, seed 003). Names follow the
 * C code (snake_case) so the two read side by side; `// C:` comments quote the
 * line each step models. docs/driver-model.md maps every behaviour to its line
 * here and to the test that pins it.
 *
 * What userspace stands in for:
 * - access_ok(addr, size): addr + size <= 0x7ffffffff000 (x86-64 TASK_SIZE_MAX).
 * - find_vma()/follow_page(): mincore() on the page: ENOMEM = no mapping there,
 *   resident bit 0 = no page present (never faulted in).
 * - page_to_phys(page): the page's virtual address (userspace cannot see
 *   guest-physical addresses; the model host uses the same frame identity).
 * - copy_from_user(): /proc/self/mem (fails instead of faulting).
 * - the mutex: JS runs one thread, so it can only be taken recursively by a
 *   bug; it is kept (and checked) to mirror the C critical sections.
 *
 * Deliberate difference: the list walk. map_list is an insertion-ordered Set
 * (list order) plus an index vaddr -> entries in list order, so MAP, UNMAP and
 * release are O(1) per page while UNMAP still takes the *first entry in list
 * order whose vaddr equals the argument exactly*, as the C loop does.
 */
import { debuglog } from 'node:util';
import * as libc from '../sys/libc.js';
import { ERRNO } from '../abi/errno.js';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP, decodeIoctl, IOC_WRITE } from '../abi/ioctl.js';
import { MEM_MAP_SIZE, PAGE_SIZE, decodeMemMap, type MemMap } from '../abi/structs.js';
import { DeviceError } from '../errors.js';
import type { IoctlArg } from '../device/device.js';
import type { ModelHost } from './host.js';
import { USER_LIMIT, access_ok, copy_from_user, pageOf, pageState, pageStates, type PageState } from './uaccess.js';

const debug = debuglog('kvmmem');
const { EFAULT, EINVAL, ENODEV, ENOENT, ENOTTY, EPERM } = ERRNO as Record<'EFAULT' | 'EINVAL' | 'ENODEV' | 'ENOENT' | 'ENOTTY' | 'EPERM', number>;
const MAX_SAFE_N = 9007199254740991n;
const hex = (v: bigint | number) => '0x' + v.toString(16).padStart(16, '0');

/** C: IS_ERR_VALUE(x) — a negative errno. */
const IS_ERR_VALUE = (x: number) => x < 0 && x >= -4095;

/**
 * The find_vma/follow_page answers for every page a MAP batch names, with one
 * mincore() per span of nearby pages instead of one per record. Valid for the
 * whole batch: its remaps are deferred to the end, so no page changes state
 * meanwhile. A span with a hole in it (ENOMEM) is left out: those pages are
 * looked up one by one, exactly as without the cache.
 */
function prefetchStates(args: Uint8Array, stride: number, count: number): Map<number, PageState> {
  const dv = new DataView(args.buffer, args.byteOffset, args.byteLength);
  const pages: number[] = [];
  for (let i = 0; i < count; i++) {
    const at = i * stride + 40; // kvmi_mem_map.gva
    if (at + 8 > args.length) break;
    const gva = dv.getBigUint64(at, true);
    if (access_ok(gva, PAGE_SIZE)) pages.push(pageOf(Number(gva)));
  }
  pages.sort((a, b) => a - b);
  const states = new Map<number, PageState>();
  const GAP = 16 * PAGE_SIZE, MAX_SPAN = 1 << 20; // pages
  let i = 0;
  while (i < pages.length) {
    let j = i;
    while (j + 1 < pages.length && pages[j + 1]! - pages[j]! <= GAP && (pages[j + 1]! - pages[i]!) / PAGE_SIZE < MAX_SPAN) j++;
    pageStates(pages[i]!, (pages[j]! - pages[i]!) / PAGE_SIZE + 1, states);
    i = j + 1;
  }
  return states;
}

/** struct page_map: one MAP of this file. */
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

class PageMapEntry implements PageMap {
  /** The gpa as passed: a number when exact (< 2^53), else the bigint. */
  g: number | bigint;
  /** Number(vaddr): entries only exist for vaddrs below the user limit (< 2^47). */
  key: number;
  /** The page's address (paddr); 0 for the quirk, where C leaves kmalloc garbage. */
  page = 0;
  constructor(gpa: number | bigint, vaddr: number) {
    this.g = gpa;
    this.key = vaddr;
  }
  get gpa(): bigint { return BigInt(this.g); }
  get vaddr(): bigint { return BigInt(this.key); }
  get paddr(): bigint { return BigInt(this.page); }
}

/** struct mutex, as far as one JS thread can use it. */
class Mutex {
  #held = false;
  get held(): boolean { return this.#held; }
  lock(): void {
    if (this.#held) throw new Error('kvmmem model: mutex_lock() on a held mutex (would deadlock in C)');
    this.#held = true;
  }
  unlock(): void {
    this.#held = false;
  }
}

/** struct file_map: the state of one open file of /dev/kvmmem. */
export class FileMap {
  /** C: fmp->file (the open file; here whatever the opener passed). */
  readonly file: unknown;
  /** C: fmp->lock */
  readonly lock = new Mutex();
  /** C: fmp->active: 1 while open, 0 from release on (teardown). */
  active = 1;
  readonly #list = new Set<PageMapEntry>();
  /** vaddr -> its entry, or its entries in list order when there are several. */
  readonly #byVaddr = new Map<number, PageMapEntry | PageMapEntry[]>();

  /** @internal use KvmiMemDriver.kvm_dev_open() */
  constructor(file: unknown) {
    this.file = file;
  }

  /** C: fmp->map_list, in list order (read-only view). */
  get map_list(): ReadonlySet<PageMap> { return this.#list; }
  get size(): number { return this.#list.size; }

  /** Copies of the entries in list order. */
  entries(): PageMap[] {
    return [...this.#list].map((e) => ({ gpa: e.gpa, vaddr: e.vaddr, paddr: e.paddr }));
  }

  /** @internal C: list_add_tail(&pmp->map_list, &fmp->map_list) */
  _list_add_tail(pmp: PageMapEntry): void {
    this.#list.add(pmp);
    const same = this.#byVaddr.get(pmp.key);
    if (same === undefined) this.#byVaddr.set(pmp.key, pmp);
    else if (same instanceof PageMapEntry) this.#byVaddr.set(pmp.key, [same, pmp]);
    else same.push(pmp);
  }

  /** @internal C: list_del(&pmp->map_list) */
  _list_del(pmp: PageMapEntry): void {
    if (!this.#list.delete(pmp)) return;
    const same = this.#byVaddr.get(pmp.key)!;
    if (same === pmp) this.#byVaddr.delete(pmp.key);
    else {
      const arr = same as PageMapEntry[];
      arr.splice(arr.indexOf(pmp), 1);
      if (arr.length === 1) this.#byVaddr.set(pmp.key, arr[0]!);
    }
  }

  /**
   * @internal C: list_for_each(cur, &fmp->map_list) { if (pmp->vaddr == vaddr) { found } }
   * — the first entry in list order with exactly this vaddr, in O(1).
   */
  _find(vaddr: bigint): PageMapEntry | undefined {
    if (vaddr >= 0x20000000000000n) return undefined; // no entry has such a vaddr
    return this._findN(Number(vaddr));
  }

  /** @internal _find() of an exact number vaddr (< 2^53). */
  _findN(vaddr: number): PageMapEntry | undefined {
    const same = this.#byVaddr.get(vaddr);
    return same === undefined || same instanceof PageMapEntry ? same : same[0];
  }

  /** @internal list order, for release. */
  _entries(): IterableIterator<PageMapEntry> {
    return this.#list.values();
  }

  /** @internal */
  _clear(): void {
    this.#list.clear();
    this.#byVaddr.clear();
  }
}

/** One row of the dispatch table (seed 002: request -> handler + argument size, decoded once). */
interface IoctlHandler {
  readonly cmd: number;
  readonly name: string;
  /** _IOC_DIR(cmd) and _IOC_SIZE(cmd), decoded when the table is built. */
  readonly dir: number;
  readonly size: number;
  /** The argument is a pointer to `size` bytes to copy in (MAP), not the value itself (UNMAP). */
  readonly copyIn: boolean;
  run(fmp: FileMap, arg: Uint8Array | bigint): number;
}

/** The kvmmem misc device of one introspector VM (one model host). */
export class KvmiMemDriver {
  readonly host: ModelHost;
  /** C: static struct list_head file_list (open files, in open order). */
  readonly file_list = new Set<FileMap>();
  /** @internal the entry the last successful MAP hypercall added (batch bookkeeping). */
  #lastMapped: PageMapEntry | null = null;
  /** During a MAP batch: page states looked up once for the whole batch (see prefetchStates). */
  #states: Map<number, PageState> | null = null;
  readonly #table: ReadonlyMap<number, IoctlHandler>;

  /** C: kvm_intro_guest_init() — -EPERM when paravirt is not available. */
  constructor(host: ModelHost) {
    this.host = host;
    // C: if (!kvm_para_available()) { pr_err("kvmi: paravirt not available\n"); return -EPERM; }
    if (!host.paravirt || host.closed) {
      throw new DeviceError(-EPERM, 'kvm_intro_guest_init', {
        path: `model:${host.name}`,
        hint: 'paravirt not available: the model host was created with { paravirt: false } (or is closed)',
      });
    }
    // C: the switch in kvm_dev_ioctl(), as a table (seed 002): size and direction decoded once.
    const row = (cmd: number, name: string, copyIn: boolean, run: IoctlHandler['run']): [number, IoctlHandler] => {
      const f = decodeIoctl(cmd);
      return [cmd >>> 0, { cmd: cmd >>> 0, name, dir: f.dir, size: f.size, copyIn, run }];
    };
    this.#table = new Map([
      row(KVM_INTRO_MEM_MAP, 'KVM_INTRO_MEM_MAP', true, (fmp, a) => this.#kvm_dev_ioctl_map(fmp, decodeMemMap(a as Uint8Array))),
      row(KVM_INTRO_MEM_UNMAP, 'KVM_INTRO_MEM_UNMAP', false, (fmp, a) => this.#kvm_dev_ioctl_unmap(fmp, a as bigint)),
    ]);
    for (const h of this.#table.values()) {
      if (h.copyIn && !(h.dir & IOC_WRITE)) throw new Error(`${h.name}: a copy-in handler must be _IOW`);
    }
    debug('kvmi: guest introspection device created (model host %s)', host.name);
  }

  /** The dispatch table, for diagnostics. */
  get ioctls(): readonly { cmd: number; name: string; dir: number; size: number; copyIn: boolean }[] {
    return [...this.#table.values()].map(({ cmd, name, dir, size, copyIn }) => ({ cmd, name, dir, size, copyIn }));
  }

  // C: static int kvm_dev_open(struct inode *inodep, struct file *filp)
  kvm_dev_open(file: unknown = null): FileMap {
    // C: fmp = kmalloc(...); INIT_LIST_HEAD(&fmp->map_list); mutex_init(&fmp->lock); fmp->active = 1;
    const fmp = new FileMap(file);
    // C: spin_lock(&file_lock); list_add_tail(&fmp->file_list, &file_list); spin_unlock(&file_lock);
    this.file_list.add(fmp);
    debug('kvmi: file opened (%d open)', this.file_list.size);
    return fmp;
  }

  /**
   * C: static long kvm_dev_ioctl(struct file *filp, unsigned int ioctl, unsigned long arg)
   * Returns 0 or -errno. A Uint8Array argument is "a pointer to these bytes";
   * a number/bigint is the unsigned long itself (for MAP: a pointer into this
   * process, read with copy_from_user).
   */
  kvm_dev_ioctl(fmp: FileMap, ioctl: number, arg: IoctlArg): number {
    const h = this.#table.get(ioctl >>> 0);
    // C: default: pr_err("kvmi: ioctl %d not implemented\n", ioctl); result = -ENOTTY;
    if (h === undefined) {
      debug('kvmi: ioctl %s not implemented', hex(ioctl >>> 0));
      return -ENOTTY;
    }
    let a: Uint8Array | bigint;
    if (h.copyIn) {
      // C: result = -EFAULT; if (copy_from_user(&map, argp, sizeof(map))) break;
      const bytes = arg instanceof Uint8Array
        ? (arg.length >= h.size ? arg.subarray(0, h.size) : null)
        : copy_from_user(BigInt.asUintN(64, BigInt(arg)), h.size);
      if (bytes === null) return -EFAULT;
      a = bytes;
    } else {
      // C: unsigned long vaddr = (unsigned long) arg;  (a buffer passes its address, as ioctl(2) would)
      a = arg instanceof Uint8Array ? BigInt(libc.addressOf(arg)) : BigInt.asUintN(64, BigInt(arg));
    }
    const result = h.run(fmp, a);
    // C: if (IS_ERR_VALUE(result)) break; result = 0;
    return IS_ERR_VALUE(result) ? result : 0;
  }

  // C: static long kvm_dev_ioctl_map(struct file_map *fmp, struct kvmi_mem_map *map)
  #kvm_dev_ioctl_map(fmp: FileMap, map: MemMap): number {
    // C: if (!access_ok(VERIFY_READ, map->gva, PAGE_SIZE)) return -EINVAL;
    if (!access_ok(map.gva, PAGE_SIZE)) return -EINVAL;
    // C: if (!access_ok(VERIFY_WRITE, map->gva, PAGE_SIZE)) return -EINVAL;  (same range check on x86)
    if (!access_ok(map.gva, PAGE_SIZE)) return -EINVAL;
    // C: pmp = kmalloc(sizeof(struct page_map), GFP_KERNEL); pmp->gpa = map->gpa; pmp->vaddr = map->gva;
    const pmp = new PageMapEntry(map.gpa <= MAX_SAFE_N ? Number(map.gpa) : map.gpa, Number(map.gva));
    let result: number;
    // C: mutex_lock(&fmp->lock);
    fmp.lock.lock();
    try {
      // C: if (!fmp->active) { result = -ENODEV; pr_warn("kvmi: unable to map, file is being closed\n"); goto out_err; }
      if (!fmp.active) {
        debug('kvmi: unable to map, file is being closed');
        return -ENODEV; // C: out_err: kfree(pmp);
      }
      // C: result = _do_mapping(map, pmp); if (IS_ERR_VALUE(result)) goto out_err;
      result = this.#_do_mapping(map, pmp);
      if (IS_ERR_VALUE(result)) return result;
      // C: list_add_tail(&pmp->map_list, &fmp->map_list);
      fmp._list_add_tail(pmp);
      if (pmp.page !== 0) this.#lastMapped = pmp;
      // C: result = 0; goto out_finalize;
      return 0;
    } finally {
      // C: out_finalize: mutex_unlock(&fmp->lock);
      fmp.lock.unlock();
    }
  }

  // C: static long _do_mapping(struct kvmi_mem_map *map_req, struct page_map *pmap)
  #_do_mapping(map_req: MemMap, pmap: PageMapEntry): number {
    // C: if (!access_ok(VERIFY_READ, map_req->gva, PAGE_SIZE)) { pr_err(...); return -EINVAL; }
    if (!access_ok(map_req.gva, PAGE_SIZE)) return -EINVAL;
    // C: down_read(&current->mm->mmap_sem);  (nothing to take here)
    const page = pageOf(Number(map_req.gva));
    const state = this.#states?.get(page) ?? pageState(page);
    // C: vma = find_vma(current->mm, map_req->gva); if (IS_ERR_OR_NULL(vma)) { result = PTR_ERR(vma); goto out; }
    // QUIRK: PTR_ERR(NULL) == 0, so "no mapping here" is success, with no hypercall.
    // (find_vma returns the next vma above a hole, then follow_page finds no page: also 0.)
    if (state === 'unmapped') {
      debug('kvmi: find_vma() failed with result 0 (no mapping at the gva): entry kept without a hypercall');
      return 0;
    }
    // C: page = follow_page(vma, map_req->gva, 0); if (IS_ERR_OR_NULL(page)) { result = PTR_ERR(page); goto out; }
    // QUIRK: a page never faulted in gives NULL too: success, no hypercall.
    if (state === 'absent') {
      debug('kvmi: follow_page() failed with result 0 (page not present): entry kept without a hypercall');
      return 0;
    }
    // C: WARN(is_zero_pfn(page_to_pfn(page)), "zero-page still mapped");  (not visible from userspace)
    // C: paddr = page_to_phys(page); pmap->paddr = paddr;
    pmap.page = page;
    // C: result = kvmi_arch_map_hc(&map_req->token, map_req->gpa, paddr);  = kvm_hypercall3(KVM_HC_MEM_MAP, ...)
    const result = this.host._mapHc(map_req.token, map_req.gpa, BigInt(page), true);
    if (IS_ERR_VALUE(result)) debug('kvmi: HC failed with result %d', result);
    // C: out: up_read(&current->mm->mmap_sem); return result;
    return result;
  }

  // C: static long _do_unmapping(unsigned long paddr)
  #_do_unmapping(paddr: number): number {
    // C: result = kvmi_arch_unmap_hc(paddr);  = kvm_hypercall1(KVM_HC_MEM_UNMAP, map_gpa)
    const result = this.host._unmapPage(paddr);
    // C: if (IS_ERR_VALUE(result)) pr_warn("kvmi: HC failed with result %ld\n", result);
    if (IS_ERR_VALUE(result)) debug('kvmi: unmap HC failed with result %d', result);
    return result;
  }

  // C: static long kvm_dev_ioctl_unmap(struct file_map *fmp, unsigned long vaddr)
  #kvm_dev_ioctl_unmap(fmp: FileMap, vaddr: bigint | number): number {
    // C: mutex_lock(&fmp->lock);
    fmp.lock.lock();
    // C: if (!fmp->active) { mutex_unlock(&fmp->lock); pr_warn(...); return -ENODEV; }
    if (!fmp.active) {
      fmp.lock.unlock();
      debug('kvmi: unable to unmap, file is being closed');
      return -ENODEV;
    }
    // C: list_for_each(cur, &fmp->map_list) { ...; if (pmp->vaddr == vaddr) { found = true; break; } }
    const pmp = typeof vaddr === 'number' ? fmp._findN(vaddr) : fmp._find(vaddr);
    // C: if (!found) { mutex_unlock(&fmp->lock); pr_err("kvmi: address %016lx not mapped\n", vaddr); return -ENOENT; }
    if (pmp === undefined) {
      fmp.lock.unlock();
      debug('kvmi: address %s not mapped', hex(vaddr));
      return -ENOENT;
    }
    // C: list_del(&pmp->map_list); mutex_unlock(&fmp->lock);
    fmp._list_del(pmp);
    fmp.lock.unlock();
    // C: _do_unmapping(pmp->paddr);  /* unmap & ignore result */
    this.#_do_unmapping(pmp.page);
    // C: kfree(pmp); return 0;
    return 0;
  }

  // C: static int kvm_dev_release(struct inode *inodep, struct file *filp)
  kvm_dev_release(fmp: FileMap): number {
    if (!this.file_list.has(fmp)) return 0; // already released (the model keeps the object alive)
    // C: mutex_lock(&fmp->lock);
    fmp.lock.lock();
    // C: fmp->active = 0;  /* mark for teardown */
    fmp.active = 0;
    const n = fmp.size;
    // Model: the fresh-page remaps of the whole teardown are coalesced (see host.ts).
    const outer = this.#defer();
    try {
      // C: list_for_each_safe(cur, next, &fmp->map_list) { _do_unmapping(pmp->paddr); list_del(&pmp->map_list); kfree(pmp); }
      for (const pmp of fmp._entries()) this.#_do_unmapping(pmp.page);
      fmp._clear();
    } finally {
      if (outer) this.host._endDeferral();
      // C: mutex_unlock(&fmp->lock);
      fmp.lock.unlock();
    }
    // C: spin_lock(&file_lock); list_del(&fmp->file_list); spin_unlock(&file_lock); kfree(fmp);
    this.file_list.delete(fmp);
    debug('kvmi: file closed, %d mappings released', n);
    // C: return 0;
    return 0;
  }

  /**
   * Many ioctls of one request on one file, each exactly as kvm_dev_ioctl()
   * (same checks, same order, same per-record result), with the host's page
   * remaps deferred to the end and coalesced. `args`: `count` records of
   * `stride` bytes (pointer arguments), or `count` little-endian u64 values
   * when stride is 0. Returns how many succeeded.
   */
  kvm_dev_ioctl_batch(fmp: FileMap, ioctl: number, args: Uint8Array, stride: number, count: number, results: Int32Array): number {
    const req = ioctl >>> 0;
    const isMap = req === KVM_INTRO_MEM_MAP && stride > 0;
    const isUnmap = req === KVM_INTRO_MEM_UNMAP && stride === 0;
    const dv = new DataView(args.buffer, args.byteOffset, args.byteLength);
    const argOf = (i: number): IoctlArg => stride > 0
      ? args.subarray(i * stride, Math.min(args.length, i * stride + Math.max(stride, 48)))
      : dv.getBigUint64(i * 8, true);
    if (!isMap && !isUnmap) {
      let ok = 0;
      for (let i = 0; i < count; i++) {
        results[i] = this.kvm_dev_ioctl(fmp, req, argOf(i));
        if (results[i]! >= 0) ok++;
      }
      return ok;
    }
    const created: (PageMapEntry | null)[] = isMap ? new Array<PageMapEntry | null>(count).fill(null) : [];
    const outer = this.#defer();
    let failures = new Map<number, number>();
    if (isMap && outer) this.#states = prefetchStates(args, stride, count);
    try {
      if (isMap) {
        for (let i = 0; i < count; i++) {
          this.#lastMapped = null;
          const off = i * stride;
          // Records cut short by the end of the buffer: copy_from_user fails (-EFAULT).
          results[i] = off + MEM_MAP_SIZE <= args.length ? this.#mapRecord(fmp, args, dv, off) : -EFAULT;
          if (results[i] === 0) created[i] = this.#lastMapped;
        }
      } else {
        for (let i = 0; i < count; i++) results[i] = this.#unmapValue(fmp, dv, i * 8);
      }
    } finally {
      this.#lastMapped = null;
      this.#states = null;
      if (outer) failures = this.host._endDeferral();
    }
    if (failures.size > 0) {
      for (let i = 0; i < count; i++) {
        const pmp = created[i];
        if (pmp == null) continue;
        const err = failures.get(pmp.page);
        if (err === undefined) continue;
        // The host rolled its side back; the driver frees the entry, as its error path would have.
        fmp._list_del(pmp);
        results[i] = err;
      }
    }
    let ok = 0;
    for (let i = 0; i < count; i++) if (results[i]! >= 0) ok++;
    return ok;
  }

  /**
   * kvm_dev_ioctl(MAP) of the 48-byte record at `off` of `args`, read in place:
   * the same checks in the same order as #kvm_dev_ioctl_map + #_do_mapping,
   * with the gva as a number (access_ok bounds it below 2^47) and the token
   * looked up where it lies.
   */
  #mapRecord(fmp: FileMap, args: Uint8Array, dv: DataView, off: number): number {
    const gvaHi = dv.getUint32(off + 44, true);
    // C: access_ok(VERIFY_READ/VERIFY_WRITE, map->gva, PAGE_SIZE) (twice, same check)
    if (gvaHi >= 0x8000) return -EINVAL;
    const gva = gvaHi * 0x100000000 + dv.getUint32(off + 40, true);
    if (gva + PAGE_SIZE > USER_LIMIT) return -EINVAL;
    const gpaHi = dv.getUint32(off + 36, true);
    const gpa = gpaHi < 0x200000 ? gpaHi * 0x100000000 + dv.getUint32(off + 32, true) : dv.getBigUint64(off + 32, true);
    const pmp = new PageMapEntry(gpa, gva);
    fmp.lock.lock();
    try {
      if (!fmp.active) {
        debug('kvmi: unable to map, file is being closed');
        return -ENODEV;
      }
      // _do_mapping(): access_ok again (passed above), find_vma/follow_page.
      const page = pageOf(gva);
      const state = this.#states?.get(page) ?? pageState(page);
      if (state === 'present') {
        pmp.page = page;
        const result = this.host._mapHcAt(args, off, gpa, page);
        if (IS_ERR_VALUE(result)) {
          debug('kvmi: HC failed with result %d', result);
          return result;
        }
        fmp._list_add_tail(pmp);
        this.#lastMapped = pmp;
        return IS_ERR_VALUE(result) ? result : 0;
      }
      debug(state === 'unmapped'
        ? 'kvmi: find_vma() failed with result 0 (no mapping at the gva): entry kept without a hypercall'
        : 'kvmi: follow_page() failed with result 0 (page not present): entry kept without a hypercall');
      fmp._list_add_tail(pmp);
      return 0;
    } finally {
      fmp.lock.unlock();
    }
  }

  /** kvm_dev_ioctl(UNMAP) of the u64 at `off`: #kvm_dev_ioctl_unmap with a number vaddr when it is exact. */
  #unmapValue(fmp: FileMap, dv: DataView, off: number): number {
    const hi = dv.getUint32(off + 4, true);
    const r = this.#kvm_dev_ioctl_unmap(fmp, hi < 0x200000 ? hi * 0x100000000 + dv.getUint32(off, true) : dv.getBigUint64(off, true));
    return IS_ERR_VALUE(r) ? r : 0;
  }

  /**
   * Model only: release every file still open (the introspector VM goes away
   * with the host). C's kvm_intro_guest_exit() only deregisters the device.
   */
  kvm_intro_guest_exit(): void {
    for (const fmp of [...this.file_list]) this.kvm_dev_release(fmp);
  }

  /** Starts deferring host remaps unless a batch is already doing so; true if we started it. */
  #defer(): boolean {
    if (this.host._deferring) return false;
    this.host._beginDeferral();
    return true;
  }
}
