/**
 * The guest-side /dev/kvmmem misc driver of the KVMI patches, modelled line by
 * line on virt/kvm/kvmi_mem_guest.c (RFC v4 02/18, "add memory map/unmap
 * support for VM introspection on the guest side"). Names follow the C code
 * (snake_case) and so does the order: struct file_map, kvm_dev_open,
 * _do_mapping, _do_unmapping, kvm_dev_ioctl_map, kvm_dev_ioctl_unmap,
 * kvm_dev_ioctl, kvm_dev_release, kvm_intro_guest_exit; kvm_intro_guest_init is
 * the constructor. `// C:` comments quote the line each step models. After them
 * comes what the model adds: batches (kvm_dev_ioctl_batch).
 * docs/driver-model.md maps every behaviour to its function here and to the
 * test that pins it.
 *
 * What userspace stands in for:
 * - access_ok(addr, size): addr + size <= 0x7ffffffff000 (x86-64 TASK_SIZE_MAX).
 * - find_vma()/follow_page(): mincore() on the page: ENOMEM = no mapping there,
 *   resident bit 0 = no page present (never faulted in).
 * - page_to_phys(page): the page's virtual address (userspace cannot see
 *   guest-physical addresses; the model host uses the same frame identity).
 * - copy_from_user(): process_vm_readv on this process (EFAULT for an unreadable byte, PROT_NONE included, instead of faulting).
 * - the mutex: JS runs one thread, so it can only be taken recursively by a
 *   bug; it is kept (and checked) to mirror the C critical sections.
 * - fmp->map_list: a MapList (map-list.ts), O(1) per entry where C walks the
 *   list, with the same answers.
 */
import { debuglog } from 'node:util';
import * as libc from '../sys/libc.js';
import { ERRNO, errnoName } from '../abi/errno.js';
import { KVM_ENOSYS } from '../abi/hypercall.js';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP, decodeIoctl, IOC_WRITE } from '../abi/ioctl.js';
import { MEM_MAP_SIZE } from '../abi/structs.js';
import { DeviceError } from '../errors.js';
import type { IoctlArg } from '../device/device.js';
import type { ModelHost } from './host.js';
import { MapList, NIL, type Slot } from './map-list.js';
import { accessOkGva, mapGpa, u64le, u64leBig } from './mem-map-record.js';
import { BatchPageStates } from './page-states.js';
import { copy_from_user, pageOf, pageState, type PageState } from './uaccess.js';

export type { PageMap } from './map-list.js';

const debug = debuglog('kvmmem');
/** A hypercall result's name for log lines (-KVM_E* are Linux errno values but for ENOSYS). */
const hcName = (r: number): string => (r === -KVM_ENOSYS ? 'KVM_ENOSYS' : errnoName(-r));
const { EFAULT, EINVAL, ENODEV, ENOENT, ENOTTY, EPERM } = ERRNO as Record<'EFAULT' | 'EINVAL' | 'ENODEV' | 'ENOENT' | 'ENOTTY' | 'EPERM', number>;
/** C: "%016lx" */
const hex016 = (v: bigint | number) => '0x' + v.toString(16).padStart(16, '0');

/** C: IS_ERR_VALUE(x) — a negative errno. */
const IS_ERR_VALUE = (x: number) => x < 0 && x >= -4095;

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
  /** C: fmp->map_list: this file's struct page_map entries, in list order. */
  readonly map_list = new MapList();
  /** C: fmp->lock */
  readonly lock = new Mutex();
  /** C: fmp->active: 1 while open, 0 from release on (teardown). */
  active = 1;

  /** @internal use KvmiMemDriver.kvm_dev_open() */
  constructor(file: unknown) {
    this.file = file;
  }
}

/**
 * One row of the dispatch table that stands in for the switch in
 * kvm_dev_ioctl() (the table-driven dispatch of Avi Kivity's "generic /
 * extensible ioctl dispatcher": request -> handler + argument size, decoded once).
 */
interface IoctlHandler {
  readonly cmd: number;
  readonly name: string;
  /** _IOC_DIR(cmd) and _IOC_SIZE(cmd), decoded when the table is built. */
  readonly dir: number;
  readonly size: number;
  /** The argument is a pointer to `size` bytes to copy in (MAP), not the value itself (UNMAP). */
  readonly copyIn: boolean;
  run(fmp: FileMap, arg: Uint8Array | bigint | number): number;
}

/** The kvmmem misc device of one introspector VM (one model host). */
export class KvmiMemDriver {
  readonly host: ModelHost;
  /** C: static struct list_head file_list (open files, in open order). */
  readonly file_list = new Set<FileMap>();
  /** pmap->paddr as _do_mapping left it (0 for the quirks). */
  #paddr = 0;
  /** During a batch: the slot of the entry the last successful MAP hypercall listed (for the rollback). */
  #lastMapped: Slot = NIL;
  /** During a MAP batch: the page states looked up once for the whole batch. */
  #states: BatchPageStates | null = null;
  /** During a MAP batch: the index of the record being mapped. */
  #rec = 0;
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
    // C: the switch in kvm_dev_ioctl(), as a table: size and direction decoded once.
    const row = (cmd: number, name: string, copyIn: boolean, run: IoctlHandler['run']): [number, IoctlHandler] => {
      const f = decodeIoctl(cmd);
      return [cmd >>> 0, { cmd: cmd >>> 0, name, dir: f.dir, size: f.size, copyIn, run }];
    };
    this.#table = new Map([
      row(KVM_INTRO_MEM_MAP, 'KVM_INTRO_MEM_MAP', true, (fmp, a) => this.#kvm_dev_ioctl_map(fmp, a as Uint8Array, 0)),
      row(KVM_INTRO_MEM_UNMAP, 'KVM_INTRO_MEM_UNMAP', false, (fmp, a) => this.#kvm_dev_ioctl_unmap(fmp, a as bigint | number)),
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
   * C: static long _do_mapping(struct kvmi_mem_map *map_req, struct page_map *pmap)
   * `map_req` is the record at `off` of `args`; pmap->paddr is left in #paddr (0 for the quirks).
   */
  #_do_mapping(args: Uint8Array, off: number, gva: number, gpa: number | bigint): number {
    // C: if (!access_ok(VERIFY_READ, map_req->gva, PAGE_SIZE)) { pr_err(...); return -EINVAL; }  (checked by the caller: same check)
    // C: down_read(&current->mm->mmap_sem);  (nothing to take here)
    const page = pageOf(gva);
    this.#paddr = 0;
    let state: PageState | undefined;
    if (this.#states !== null) {
      state = this.#states.of(this.#rec);
    } else {
      // Outside batches: find_vma/follow_page and, only when a page is present there, the
      // whole MAP hypercall with its remap, in one native call (host._mapOneAt). The host
      // validates first without side effects; whenever it cannot (an error to report, a
      // batch, no native helper) it answers undefined and the steps below run one by one.
      const r = this.host._mapOneAt(args, off, gpa, page);
      if (r === libc.MAP_ONE_UNMAPPED) state = 'unmapped';
      else if (r === libc.MAP_ONE_ABSENT) state = 'absent';
      else if (r !== undefined && r !== libc.MAP_ONE_UNKNOWN) {
        this.#paddr = page;
        if (IS_ERR_VALUE(r)) debug('kvmi: HC failed with result %d (%s) for gpa 0x%s at gva 0x%s', r, hcName(r), gpa.toString(16), gva.toString(16));
        return r;
      }
    }
    state ??= pageState(page);
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
    this.#paddr = page;
    // C: result = kvmi_arch_map_hc(&map_req->token, map_req->gpa, paddr);  = kvm_hypercall3(KVM_HC_MEM_MAP, ...)
    // (the token is looked up where it lies: at off + KVMI_MEM_MAP_LAYOUT.fields.token.offset)
    const result = this.host._mapHcAt(args, off, gpa, page);
    if (IS_ERR_VALUE(result)) debug('kvmi: HC failed with result %d (%s) for gpa 0x%s at gva 0x%s', result, hcName(result), gpa.toString(16), gva.toString(16));
    // C: out: up_read(&current->mm->mmap_sem); return result;
    return result;
  }

  // C: static long _do_unmapping(unsigned long paddr)
  #_do_unmapping(paddr: number): number {
    // C: result = kvmi_arch_unmap_hc(paddr);  = kvm_hypercall1(KVM_HC_MEM_UNMAP, map_gpa)
    const result = this.host._unmapPage(paddr);
    // C: if (IS_ERR_VALUE(result)) pr_warn("kvmi: HC failed with result %ld\n", result);
    if (IS_ERR_VALUE(result)) debug('kvmi: unmap HC failed with result %d (%s) for page 0x%s', result, hcName(result), paddr.toString(16));
    return result;
  }

  /**
   * C: static long kvm_dev_ioctl_map(struct file_map *fmp, struct kvmi_mem_map *map)
   * `map` is the 48-byte struct kvmi_mem_map at `off` of `args`, read in place.
   */
  #kvm_dev_ioctl_map(fmp: FileMap, args: Uint8Array, off: number): number {
    // C: if (!access_ok(VERIFY_READ, map->gva, PAGE_SIZE)) return -EINVAL;
    // C: if (!access_ok(VERIFY_WRITE, map->gva, PAGE_SIZE)) return -EINVAL;  (same range check on x86)
    const gva = accessOkGva(args, off);
    if (gva < 0) return -EINVAL;
    // C: pmp = kmalloc(sizeof(struct page_map), GFP_KERNEL); pmp->gpa = map->gpa; pmp->vaddr = map->gva;
    // (the entry takes its slab slot at list_add_tail; an error path has nothing to free)
    const gpa = mapGpa(args, off);
    // C: mutex_lock(&fmp->lock);
    fmp.lock.lock();
    try {
      // C: if (!fmp->active) { result = -ENODEV; pr_warn("kvmi: unable to map, file is being closed\n"); goto out_err; }
      if (!fmp.active) {
        debug('kvmi: unable to map, file is being closed');
        return -ENODEV; // C: out_err: kfree(pmp);
      }
      // C: result = _do_mapping(map, pmp); if (IS_ERR_VALUE(result)) goto out_err;
      const result = this.#_do_mapping(args, off, gva, gpa);
      if (IS_ERR_VALUE(result)) return result;
      // C: list_add_tail(&pmp->map_list, &fmp->map_list);
      const slot = fmp.map_list.list_add_tail(gpa, gva, this.#paddr);
      if (this.#paddr !== 0) this.#lastMapped = slot;
      // C: result = 0; goto out_finalize;
      return 0;
    } finally {
      // C: out_finalize: mutex_unlock(&fmp->lock);
      fmp.lock.unlock();
    }
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
    const pmp = typeof vaddr === 'number' ? fmp.map_list.findExact(vaddr) : fmp.map_list.find(vaddr);
    // C: if (!found) { mutex_unlock(&fmp->lock); pr_err("kvmi: address %016lx not mapped\n", vaddr); return -ENOENT; }
    if (pmp === NIL) {
      fmp.lock.unlock();
      debug('kvmi: address %s not mapped', hex016(vaddr));
      return -ENOENT;
    }
    const paddr = fmp.map_list.paddrOf(pmp);
    // C: list_del(&pmp->map_list); mutex_unlock(&fmp->lock);
    fmp.map_list.list_del(pmp);
    fmp.lock.unlock();
    // C: _do_unmapping(pmp->paddr);  /* unmap & ignore result */
    this.#_do_unmapping(paddr);
    // C: kfree(pmp); return 0;
    return 0;
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
      debug('kvmi: ioctl %s not implemented', hex016(ioctl >>> 0));
      return -ENOTTY;
    }
    let a: Uint8Array | bigint | number;
    if (h.copyIn) {
      // C: result = -EFAULT; if (copy_from_user(&map, argp, sizeof(map))) break;
      // (a buffer is read in place: the handler reads its first `size` bytes)
      const bytes = arg instanceof Uint8Array
        ? (arg.length >= h.size ? arg : null)
        : copy_from_user(BigInt.asUintN(64, BigInt(arg)), h.size);
      if (bytes === null) return -EFAULT;
      a = bytes;
    } else if (typeof arg === 'number' && arg >= 0 && Number.isSafeInteger(arg)) {
      // C: unsigned long vaddr = (unsigned long) arg;  (an exact number stays a number)
      a = arg;
    } else {
      // (a buffer passes its address, as ioctl(2) would)
      a = arg instanceof Uint8Array ? BigInt(libc.addressOf(arg)) : BigInt.asUintN(64, BigInt(arg));
    }
    const result = h.run(fmp, a);
    // C: if (IS_ERR_VALUE(result)) break; result = 0;
    return IS_ERR_VALUE(result) ? result : 0;
  }

  // C: static int kvm_dev_release(struct inode *inodep, struct file *filp)
  kvm_dev_release(fmp: FileMap): number {
    if (!this.file_list.has(fmp)) return 0; // already released (the model keeps the object alive)
    // C: mutex_lock(&fmp->lock);
    fmp.lock.lock();
    // C: fmp->active = 0;  /* mark for teardown */
    fmp.active = 0;
    const n = fmp.map_list.size;
    // Model: the fresh-page remaps of the whole teardown are coalesced (see host.ts).
    const outer = this.#defer();
    try {
      // C: list_for_each_safe(cur, next, &fmp->map_list) { _do_unmapping(pmp->paddr); list_del(&pmp->map_list); kfree(pmp); }
      for (const paddr of fmp.map_list.paddrsInOrder()) this.#_do_unmapping(paddr);
      fmp.map_list.clear();
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
   * Model only: release every file still open (the introspector VM goes away
   * with the host). C's kvm_intro_guest_exit() only deregisters the device.
   */
  kvm_intro_guest_exit(): void {
    for (const fmp of [...this.file_list]) this.kvm_dev_release(fmp);
  }

  // ---- model only: batches ----

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
    if (!isMap && !isUnmap) {
      // Any other request: one by one through kvm_dev_ioctl, records as buffers, values as bigints.
      const argOf = (i: number): IoctlArg => stride > 0
        ? args.subarray(i * stride, Math.min(args.length, i * stride + Math.max(stride, MEM_MAP_SIZE)))
        : u64leBig(args, i * 8);
      let ok = 0;
      for (let i = 0; i < count; i++) {
        results[i] = this.kvm_dev_ioctl(fmp, req, argOf(i));
        if (results[i]! >= 0) ok++;
      }
      return ok;
    }
    // The slot each record's MAP listed with a hypercall made (NIL: none), for the rollback.
    const created = isMap ? new Int32Array(count).fill(NIL) : null;
    const outer = this.#defer();
    let failures = new Map<number, number>();
    if (isMap && outer) this.#states = BatchPageStates.prefetch(args, stride, count);
    try {
      if (created !== null) {
        for (let i = 0; i < count; i++) {
          this.#lastMapped = NIL;
          this.#rec = i;
          const off = i * stride;
          // Records cut short by the end of the buffer: copy_from_user fails (-EFAULT).
          results[i] = off + MEM_MAP_SIZE <= args.length ? this.#kvm_dev_ioctl_map(fmp, args, off) : -EFAULT;
          if (results[i] === 0) created[i] = this.#lastMapped;
        }
      } else {
        for (let i = 0; i < count; i++) {
          // kvm_dev_ioctl(UNMAP) of the i-th value
          const r = this.#kvm_dev_ioctl_unmap(fmp, u64le(args, i * 8));
          results[i] = IS_ERR_VALUE(r) ? r : 0;
        }
      }
    } finally {
      this.#lastMapped = NIL;
      this.#states = null;
      if (outer) failures = this.host._endDeferral();
    }
    if (failures.size > 0 && created !== null) {
      // (no entry was freed during the MAP batch, so the slots still hold its entries)
      for (let i = 0; i < count; i++) {
        const slot = created[i]!;
        if (slot === NIL) continue;
        const err = failures.get(fmp.map_list.paddrOf(slot));
        if (err === undefined) continue;
        // The host rolled its side back; the driver frees the entry, as its error path would have.
        fmp.map_list.list_del(slot);
        results[i] = err;
      }
    }
    let ok = 0;
    for (let i = 0; i < count; i++) if (results[i]! >= 0) ok++;
    return ok;
  }

  /** Starts deferring host remaps unless a batch is already doing so; true if we started it. */
  #defer(): boolean {
    if (this.host._deferring) return false;
    this.host._beginDeferral();
    return true;
  }
}
