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
 * Deliberate difference: the list walk. map_list is a slab of entries in typed
 * arrays linked in list order (insertion order) plus an index page -> its
 * entries in list order (a chain searched for the exact vaddr), so
 * MAP, UNMAP and release are O(1) per page while UNMAP still takes the *first
 * entry in list order whose vaddr equals the argument exactly*, as the C loop
 * does.
 */
import { debuglog } from 'node:util';
import * as libc from '../sys/libc.js';
import { ERRNO } from '../abi/errno.js';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP, decodeIoctl, IOC_WRITE } from '../abi/ioctl.js';
import { KVMI_MEM_MAP_LAYOUT, MEM_MAP_SIZE, PAGE_SIZE } from '../abi/structs.js';
import { DeviceError } from '../errors.js';
import type { IoctlArg } from '../device/device.js';
import type { ModelHost } from './host.js';
import { USER_LIMIT, copy_from_user, pageOf, pageState, type PageState } from './uaccess.js';

/** kvmi_mem_map field offsets, from the ABI's layout (records are read in place). */
const MAP_GPA = KVMI_MEM_MAP_LAYOUT.fields.gpa.offset;
const MAP_GVA = KVMI_MEM_MAP_LAYOUT.fields.gva.offset;

const debug = debuglog('kvmmem');
const { EFAULT, EINVAL, ENODEV, ENOENT, ENOTTY, EPERM } = ERRNO as Record<'EFAULT' | 'EINVAL' | 'ENODEV' | 'ENOENT' | 'ENOTTY' | 'EPERM', number>;
const hex = (v: bigint | number) => '0x' + v.toString(16).padStart(16, '0');

/** Little-endian u32 at `off` of `b`. */
const u32 = (b: Uint8Array, off: number): number =>
  (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16)) + b[off + 3]! * 0x1000000;
/** Little-endian u64 at `off` of `b`, as a bigint. */
const u64big = (b: Uint8Array, off: number): bigint => (BigInt(u32(b, off + 4)) << 32n) | BigInt(u32(b, off));

/** C: IS_ERR_VALUE(x) — a negative errno. */
const IS_ERR_VALUE = (x: number) => x < 0 && x >= -4095;

/** Per-record page states of a MAP batch (prefetchStates): not looked up yet, absent, present. */
const ST_UNKNOWN = 0, ST_ABSENT = 2, ST_PRESENT = 3;

/**
 * The find_vma/follow_page answers for every page a MAP batch names, with one
 * mincore() per span of nearby pages instead of one per record, as one state
 * per record (ST_*). Valid for the whole batch: its remaps are deferred to the
 * end, so no page changes state meanwhile. A span with a hole in it (ENOMEM)
 * is left out (ST_UNKNOWN): those pages are looked up one by one, exactly as
 * without the cache.
 */
function prefetchStates(args: Uint8Array, stride: number, count: number): Uint8Array {
  const states = new Uint8Array(count);
  const recPage = new Float64Array(count).fill(-1);
  const pages = new Float64Array(count);
  let m = 0, ordered = true;
  for (let i = 0; i < count; i++) {
    const at = i * stride + MAP_GVA;
    if (at + 8 > args.length) break;
    const hi = u32(args, at + 4);
    if (hi >= 0x8000) continue; // access_ok fails (>= 2^47)
    const gva = hi * 0x100000000 + u32(args, at);
    if (gva + PAGE_SIZE > USER_LIMIT) continue;
    const page = pageOf(gva);
    recPage[i] = page;
    if (m > 0 && page < pages[m - 1]!) ordered = false;
    pages[m++] = page;
  }
  const sorted = ordered ? pages.subarray(0, m) : pages.subarray(0, m).sort();
  const sortedState = new Uint8Array(m);
  const GAP = 16 * PAGE_SIZE, MAX_SPAN = 1 << 20; // pages
  let i = 0;
  while (i < m) {
    let j = i;
    while (j + 1 < m && sorted[j + 1]! - sorted[j]! <= GAP && (sorted[j + 1]! - sorted[i]!) / PAGE_SIZE < MAX_SPAN) j++;
    const first = sorted[i]!, n = (sorted[j]! - first) / PAGE_SIZE + 1;
    const vec = new Uint8Array(n);
    if (libc.mincore(first, n * PAGE_SIZE, vec) === 0) {
      for (let k = i; k <= j; k++) sortedState[k] = (vec[(sorted[k]! - first) / PAGE_SIZE]! & 1) === 1 ? ST_PRESENT : ST_ABSENT;
    }
    i = j + 1;
  }
  // Back to record order: the same positions when the records were in page order, else a binary search.
  let k = 0;
  for (let r = 0; r < count; r++) {
    const page = recPage[r]!;
    if (page < 0) continue;
    if (ordered) {
      states[r] = sortedState[k++]!;
      continue;
    }
    let lo = 0, hi = m - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (sorted[mid]! < page) lo = mid + 1;
      else hi = mid;
    }
    states[r] = sortedState[lo]!;
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

/** A MAP entry of a FileMap's slab: its slot index (valid while it is listed). */
type Slot = number;
const NIL = -1;
/** #prev of a slot on the free list (not in map_list). */
const FREE = -2;
/** FileMap's vaddr index: chunks of CHUNK_PAGES pages (2 MiB), keyed by vaddr / 2 MiB (< 2^26). */
const CHUNK_PAGES = 512;
const CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE;

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

/**
 * struct file_map: the state of one open file of /dev/kvmmem.
 *
 * map_list is a slab of struct page_map entries in parallel typed arrays (no JS
 * object per entry): a doubly linked list through #next/#prev in list order
 * (insertion order), freed slots kept on a free list. The index #byVaddr holds,
 * for each page, the first slot in list order whose vaddr lies in that page;
 * every further slot in the same page (quirk and stale entries, or another
 * unaligned vaddr) is chained after it through #same, in list order, so UNMAP's
 * "first entry in list order whose vaddr equals the argument" is one chunk
 * lookup and a walk of that page's chain (normally one entry). Pages are
 * grouped in 2 MiB chunks (Int32Array per chunk, keyed by vaddr / 2 MiB: a
 * small integer), so nothing is allocated per entry.
 */
export class FileMap {
  /** C: fmp->file (the open file; here whatever the opener passed). */
  readonly file: unknown;
  /** C: fmp->lock */
  readonly lock = new Mutex();
  /** C: fmp->active: 1 while open, 0 from release on (teardown). */
  active = 1;
  /** pmp->vaddr (< 2^47: entries only exist for vaddrs below the user limit). */
  #vaddr = new Float64Array(0);
  /** pmp->paddr: the page's address; 0 for the quirk, where C leaves kmalloc garbage. */
  #page = new Float64Array(0);
  /** pmp->gpa as passed when exact (< 2^53); NaN: see #bigGpa. */
  #gpa = new Float64Array(0);
  #next = new Int32Array(0);
  #prev = new Int32Array(0);
  #same = new Int32Array(0);
  readonly #bigGpa = new Map<Slot, bigint>();
  /** vaddr -> the first slot in list order with that vaddr. */
  readonly #byVaddr = new Map<number, Int32Array>();
  /** The #byVaddr chunk looked up last (batches walk adjacent pages). */
  #lastKey = -1;
  #lastChunk: Int32Array | undefined;
  /** The last chunk that emptied (single MAP/UNMAP pairs reuse it). */
  #spare: Int32Array | undefined;
  #head: Slot = NIL;
  #tail: Slot = NIL;
  #free: Slot = NIL;
  #top = 0;
  #size = 0;

  /** @internal use KvmiMemDriver.kvm_dev_open() */
  constructor(file: unknown) {
    this.file = file;
  }

  /** C: fmp->map_list, in list order (a snapshot of copies). */
  get map_list(): ReadonlySet<PageMap> { return new Set(this.entries()); }
  get size(): number { return this.#size; }

  /** Copies of the entries in list order. */
  entries(): PageMap[] {
    const out: PageMap[] = [];
    for (let s = this.#head; s !== NIL; s = this.#next[s]!) {
      out.push({ gpa: this._gpaOf(s), vaddr: BigInt(this.#vaddr[s]!), paddr: BigInt(this.#page[s]!) });
    }
    return out;
  }

  /** @internal pmp->gpa of a listed slot. */
  _gpaOf(s: Slot): bigint {
    const g = this.#gpa[s]!;
    return g === g ? BigInt(g) : this.#bigGpa.get(s)!;
  }

  /** @internal pmp->paddr of a listed slot, as a number (0 for the quirk). */
  _pageOf(s: Slot): number {
    return this.#page[s]!;
  }

  /**
   * @internal C: pmp = kmalloc(...); pmp->gpa = gpa; pmp->vaddr = vaddr; pmp->paddr = page;
   * list_add_tail(&pmp->map_list, &fmp->map_list). Returns the entry's slot.
   */
  _list_add_tail(gpa: number | bigint, vaddr: number, page: number): Slot {
    let s = this.#free;
    if (s !== NIL) this.#free = this.#next[s]!;
    else {
      if (this.#top === this.#vaddr.length) this.#grow();
      s = this.#top++;
    }
    this.#vaddr[s] = vaddr;
    this.#page[s] = page;
    if (typeof gpa === 'number') this.#gpa[s] = gpa;
    else {
      this.#gpa[s] = NaN;
      this.#bigGpa.set(s, gpa);
    }
    this.#next[s] = NIL;
    this.#prev[s] = this.#tail;
    if (this.#tail === NIL) this.#head = s;
    else this.#next[this.#tail] = s;
    this.#tail = s;
    this.#same[s] = NIL;
    let c = this.#chunkOf(vaddr);
    if (c === undefined) {
      const key = Math.floor(vaddr / CHUNK_BYTES);
      c = this.#spare ?? new Int32Array(CHUNK_PAGES + 1).fill(NIL);
      this.#spare = undefined;
      c[CHUNK_PAGES] = 0;
      this.#byVaddr.set(key, c);
      this.#lastKey = key;
      this.#lastChunk = c;
    }
    const i = Math.floor((vaddr % CHUNK_BYTES) / PAGE_SIZE);
    const first = c[i]!;
    if (first === NIL) c[i] = s;
    else {
      let t = first;
      while (this.#same[t] !== NIL) t = this.#same[t]!;
      this.#same[t] = s;
    }
    c[CHUNK_PAGES]!++;
    this.#size++;
    return s;
  }

  /** @internal C: list_del(&pmp->map_list); kfree(pmp). A slot not listed is ignored. */
  _list_del(s: Slot): void {
    if (s < 0 || s >= this.#top || this.#prev[s] === FREE) return;
    const prev = this.#prev[s]!, next = this.#next[s]!;
    if (prev === NIL) this.#head = next;
    else this.#next[prev] = next;
    if (next === NIL) this.#tail = prev;
    else this.#prev[next] = prev;
    const vaddr = this.#vaddr[s]!;
    const c = this.#chunkOf(vaddr)!;
    const i = Math.floor((vaddr % CHUNK_BYTES) / PAGE_SIZE);
    const first = c[i]!;
    if (first === s) c[i] = this.#same[s]!;
    else {
      let t = first;
      while (this.#same[t] !== s) t = this.#same[t]!;
      this.#same[t] = this.#same[s]!;
    }
    if (--c[CHUNK_PAGES]! === 0) {
      this.#byVaddr.delete(Math.floor(vaddr / CHUNK_BYTES));
      this.#lastKey = -1;
      this.#lastChunk = undefined;
      this.#spare = c; // (every page's chain is empty: reused by the next new chunk)
    }
    if (this.#gpa[s] !== this.#gpa[s]) this.#bigGpa.delete(s);
    this.#prev[s] = FREE;
    this.#next[s] = this.#free;
    this.#free = s;
    this.#size--;
  }

  /**
   * @internal C: list_for_each(cur, &fmp->map_list) { if (pmp->vaddr == vaddr) { found } }
   * — the first entry in list order with exactly this vaddr, in O(1); -1 if none.
   */
  _find(vaddr: bigint): Slot {
    if (vaddr >= 0x20000000000000n) return NIL; // no entry has such a vaddr
    return this._findN(Number(vaddr));
  }

  /** @internal _find() of an exact number vaddr (< 2^53). */
  _findN(vaddr: number): Slot {
    const c = this.#chunkOf(vaddr);
    if (c === undefined) return NIL;
    // the page's chain is in list order: its first entry with exactly this vaddr
    for (let t = c[Math.floor((vaddr % CHUNK_BYTES) / PAGE_SIZE)]!; t !== NIL; t = this.#same[t]!) {
      if (this.#vaddr[t] === vaddr) return t;
    }
    return NIL;
  }

  /** The #byVaddr chunk holding `vaddr`, if it has entries. */
  #chunkOf(vaddr: number): Int32Array | undefined {
    const key = Math.floor(vaddr / CHUNK_BYTES);
    if (key === this.#lastKey) return this.#lastChunk;
    const c = this.#byVaddr.get(key);
    if (c !== undefined) {
      this.#lastKey = key;
      this.#lastChunk = c;
    }
    return c;
  }

  /** @internal the listed slots in list order, for release. */
  *_entries(): IterableIterator<Slot> {
    for (let s = this.#head; s !== NIL; s = this.#next[s]!) yield s;
  }

  /** @internal the paddr of every entry in list order (release: one array, no generator). */
  _pagesInOrder(): number[] {
    const out = new Array<number>(this.#size);
    let i = 0;
    for (let s = this.#head; s !== NIL; s = this.#next[s]!) out[i++] = this.#page[s]!;
    return out;
  }

  /** @internal drop every entry (and the slab). */
  _clear(): void {
    this.#byVaddr.clear();
    this.#lastKey = -1;
    this.#lastChunk = undefined;
    this.#bigGpa.clear();
    this.#vaddr = new Float64Array(0);
    this.#page = new Float64Array(0);
    this.#gpa = new Float64Array(0);
    this.#next = new Int32Array(0);
    this.#prev = new Int32Array(0);
    this.#same = new Int32Array(0);
    this.#head = this.#tail = this.#free = NIL;
    this.#top = this.#size = 0;
  }

  #grow(): void {
    const cap = Math.max(64, this.#vaddr.length * 2);
    const f64 = (a: Float64Array) => { const b = new Float64Array(cap); b.set(a); return b; };
    const i32 = (a: Int32Array) => { const b = new Int32Array(cap); b.set(a); return b; };
    this.#vaddr = f64(this.#vaddr);
    this.#page = f64(this.#page);
    this.#gpa = f64(this.#gpa);
    this.#next = i32(this.#next);
    this.#prev = i32(this.#prev);
    this.#same = i32(this.#same);
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
  run(fmp: FileMap, arg: Uint8Array | bigint | number): number;
}

/** The kvmmem misc device of one introspector VM (one model host). */
export class KvmiMemDriver {
  readonly host: ModelHost;
  /** C: static struct list_head file_list (open files, in open order). */
  readonly file_list = new Set<FileMap>();
  /** @internal the slot of the entry the last successful MAP hypercall added (batch bookkeeping). */
  #lastMapped: Slot = NIL;
  /** pmap->paddr as _do_mapping left it (0 for the quirks). */
  #paddr = 0;
  /** During a MAP batch: page states looked up once for the whole batch, per record (see prefetchStates). */
  #states: Uint8Array | null = null;
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
    // C: the switch in kvm_dev_ioctl(), as a table (seed 002): size and direction decoded once.
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

  /**
   * C: static long kvm_dev_ioctl_map(struct file_map *fmp, struct kvmi_mem_map *map)
   * `map` is the 48-byte struct kvmi_mem_map at `off` of `args`, read in place
   * (fields at KVMI_MEM_MAP_LAYOUT's offsets, little-endian).
   */
  #kvm_dev_ioctl_map(fmp: FileMap, args: Uint8Array, off: number): number {
    const gvaHi = u32(args, off + MAP_GVA + 4);
    // C: if (!access_ok(VERIFY_READ, map->gva, PAGE_SIZE)) return -EINVAL;
    // C: if (!access_ok(VERIFY_WRITE, map->gva, PAGE_SIZE)) return -EINVAL;  (same range check on x86)
    if (gvaHi >= 0x8000) return -EINVAL;
    const gva = gvaHi * 0x100000000 + u32(args, off + MAP_GVA);
    if (gva + PAGE_SIZE > USER_LIMIT) return -EINVAL;
    // C: pmp = kmalloc(sizeof(struct page_map), GFP_KERNEL); pmp->gpa = map->gpa; pmp->vaddr = map->gva;
    // (the entry takes its slab slot at list_add_tail; an error path has nothing to free)
    const gpaHi = u32(args, off + MAP_GPA + 4);
    const gpa = gpaHi < 0x200000 ? gpaHi * 0x100000000 + u32(args, off + MAP_GPA) : u64big(args, off + MAP_GPA);
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
      const slot = fmp._list_add_tail(gpa, gva, this.#paddr);
      if (this.#paddr !== 0) this.#lastMapped = slot;
      // C: result = 0; goto out_finalize;
      return 0;
    } finally {
      // C: out_finalize: mutex_unlock(&fmp->lock);
      fmp.lock.unlock();
    }
  }

  /**
   * C: static long _do_mapping(struct kvmi_mem_map *map_req, struct page_map *pmap)
   * pmap->paddr is left in #paddr (0 for the quirks).
   */
  #_do_mapping(args: Uint8Array, off: number, gva: number, gpa: number | bigint): number {
    // C: if (!access_ok(VERIFY_READ, map_req->gva, PAGE_SIZE)) { pr_err(...); return -EINVAL; }  (checked by the caller: same check)
    // C: down_read(&current->mm->mmap_sem);  (nothing to take here)
    const page = pageOf(gva);
    this.#paddr = 0;
    let state: PageState | undefined;
    if (this.#states !== null) {
      const st = this.#states[this.#rec];
      if (st === ST_PRESENT) state = 'present';
      else if (st === ST_ABSENT) state = 'absent';
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
        if (IS_ERR_VALUE(r)) debug('kvmi: HC failed with result %d', r);
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
    if (pmp < 0) {
      fmp.lock.unlock();
      debug('kvmi: address %s not mapped', hex(vaddr));
      return -ENOENT;
    }
    const paddr = fmp._pageOf(pmp);
    // C: list_del(&pmp->map_list); mutex_unlock(&fmp->lock);
    fmp._list_del(pmp);
    fmp.lock.unlock();
    // C: _do_unmapping(pmp->paddr);  /* unmap & ignore result */
    this.#_do_unmapping(paddr);
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
      for (const paddr of fmp._pagesInOrder()) this.#_do_unmapping(paddr);
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
    const argOf = (i: number): IoctlArg => stride > 0
      ? args.subarray(i * stride, Math.min(args.length, i * stride + Math.max(stride, 48)))
      : u64big(args, i * 8);
    if (!isMap && !isUnmap) {
      let ok = 0;
      for (let i = 0; i < count; i++) {
        results[i] = this.kvm_dev_ioctl(fmp, req, argOf(i));
        if (results[i]! >= 0) ok++;
      }
      return ok;
    }
    const created = isMap ? new Int32Array(count).fill(NIL) : null;
    const outer = this.#defer();
    let failures = new Map<number, number>();
    if (isMap && outer) this.#states = prefetchStates(args, stride, count);
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
        for (let i = 0; i < count; i++) results[i] = this.#unmapValue(fmp, args, i * 8);
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
        if (slot < 0) continue;
        const err = failures.get(fmp._pageOf(slot));
        if (err === undefined) continue;
        // The host rolled its side back; the driver frees the entry, as its error path would have.
        fmp._list_del(slot);
        results[i] = err;
      }
    }
    let ok = 0;
    for (let i = 0; i < count; i++) if (results[i]! >= 0) ok++;
    return ok;
  }

  /** kvm_dev_ioctl(UNMAP) of the u64 at `off`: #kvm_dev_ioctl_unmap with a number vaddr when it is exact. */
  #unmapValue(fmp: FileMap, args: Uint8Array, off: number): number {
    const hi = u32(args, off + 4);
    const r = this.#kvm_dev_ioctl_unmap(fmp, hi < 0x200000 ? hi * 0x100000000 + u32(args, off) : u64big(args, off));
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
