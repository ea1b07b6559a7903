/**
 * LinuxGuest: a running Linux kernel seen through guest-physical memory, with
 * no profile: the kernel's base (KASLR), its whole kallsyms table and its BTF
 * are read from its own memory, and every view below is computed from those
 * (member offsets from BTF, addresses from kallsyms).
 *
 * Everything is read live: a running guest changes its lists while they are
 * read. Every walk is bounded and checked; a structure that does not hold
 * together gives a LinuxStructureError naming it (walks retry a few times
 * first, since a list changing under the reader is the usual cause). For an
 * exact snapshot, stop the VM (QMP `stop`) around the call.
 */
import { hex, toAddress, type AddressLike } from '../../client/address.js';
import { UsageError } from '../../errors.js';
import { AddressSpace, PTE_ADDR_MASK, scan, type PhysicalReader } from '../../inspect/index.js';
import { baseFromCr3, findKallsyms, physicalBaseBySymbols, START_KERNEL_MAP } from './attach.js';
import { Btf, BtfKind } from './btf.js';
import { LinuxError, LinuxNoSuchError, LinuxNotFoundError, LinuxStructureError } from './errors.js';
import type { KernelSymbols } from './kallsyms.js';
import { KernelMemory, type KernelLayout } from './memory.js';
import { StructLayout, type StructView } from './struct.js';

export interface AttachOptions {
  /** CR3 of any vCPU of the guest (kernel or user half): the base is read from the page tables. */
  cr3?: AddressLike;
  /** 4 or 5: paging levels when known (default: found). */
  levels?: 4 | 5;
  /** One past the last guest-physical byte: needed to search without CR3. */
  end?: AddressLike;
}

/** What LinuxGuest.frozen needs of a QEMU monitor. */
export interface QemuMonitor {
  qmp(command: string, args?: object): Promise<unknown>;
}

export interface LinuxProcess {
  pid: number;
  tgid: number;
  ppid: number;
  /** The name as the kernel prints it in /proc/PID/stat (workqueue workers with their '+'/'-' label, long kthread names in full). */
  comm: string;
  /** The task's own comm[16]. */
  taskComm: string;
  /** The /proc state letter (R S D T t X Z P I). */
  state: string;
  uid: number;
  kthread: boolean;
  /** task_struct address. */
  task: bigint;
  /** mm_struct address (0 for kernel threads). */
  mm: bigint;
}

export interface LinuxModule {
  name: string;
  /** Bytes, as /proc/modules prints them (core + init). */
  size: number;
  /** Reference count (refcnt - 1). */
  refcount: number;
  /** Modules using this one ("-" on the line when none). */
  users: string[];
  state: 'Live' | 'Loading' | 'Unloading';
  base: bigint;
  /** Taint letters, e.g. "(OE)", or ''. */
  taints: string;
  /** The /proc/modules line. */
  line: string;
}

export interface LinuxVma {
  start: bigint;
  end: bigint;
  /** rwxp / rwxs */
  perms: string;
  offset: bigint;
  /** major:minor in hex, as /proc/PID/maps prints it. */
  dev: string;
  inode: bigint;
  /** File path, [heap], [stack], [vdso], [vvar], or ''. */
  path: string;
  /** The /proc/PID/maps line. */
  line: string;
}

export interface DmesgRecord {
  seq: bigint;
  /** Nanoseconds since boot. */
  tsNsec: bigint;
  level: number;
  facility: number;
  text: string;
}

export interface Uname {
  sysname: string; nodename: string; release: string; version: string; machine: string; domainname: string;
}

/** Upper bound of any list walked (tasks, modules, VMAs, use lists): a longer list is a cycle or garbage. */
const MAX_WALK = 1 << 17;
const WALK_RETRIES = 3;
const PF_WQ_WORKER = 0x20;
const PF_KTHREAD = 0x0020_0000;
const STATE_LETTERS = 'RSDTtXZPI';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Retries a walk a structure error interrupted (the guest changing a list under the reader). */
async function retrying<T>(body: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await body();
    } catch (e) {
      if (!(e instanceof LinuxStructureError) || attempt >= WALK_RETRIES) throw e;
      await sleep(2 * attempt);
    }
  }
}

export class LinuxGuest {
  readonly reader: PhysicalReader;
  readonly memory: KernelMemory;
  readonly symbols: KernelSymbols;
  readonly types: Btf;
  /** Where the pieces were found. */
  readonly base: Readonly<KernelLayout> & { btfGpa: bigint; btfBytes: number; how: 'cr3' | 'search' };
  readonly #layouts = new Map<string, StructLayout>();

  private constructor(reader: PhysicalReader, memory: KernelMemory, symbols: KernelSymbols, types: Btf, how: 'cr3' | 'search', btfGpa: bigint) {
    this.reader = reader;
    this.memory = memory;
    this.symbols = symbols;
    this.types = types;
    this.base = { ...memory.layout, btfGpa, btfBytes: types.data.length, how };
  }

  /** Finds the kernel, its symbols and its types in the guest behind `reader`. */
  static async attach(reader: PhysicalReader, opts: AttachOptions = {}): Promise<LinuxGuest> {
    if (opts.levels !== undefined && opts.levels !== 4 && opts.levels !== 5) throw new UsageError(`levels must be 4 or 5, got ${String(opts.levels)}`);
    let pgd: bigint, levels: 4 | 5, textPa: bigint, symbols: KernelSymbols, how: 'cr3' | 'search';
    if (opts.cr3 !== undefined) {
      const b = await baseFromCr3(reader, toAddress(opts.cr3, 'cr3'), opts.levels);
      symbols = await findKallsyms(reader, b.textPa, b.textPa + b.mappedBytes);
      const text = symbols.address('_text');
      if (text !== b.textVa) {
        throw new LinuxNotFoundError(`the kernel map starts at ${hex(b.textVa)} (gpa ${hex(b.textPa)}) but kallsyms found there says _text = ${hex(text)}`);
      }
      ({ pgd, levels, textPa } = b);
      how = 'cr3';
    } else {
      if (opts.end === undefined) throw new UsageError('LinuxGuest.attach: give { cr3 } (any vCPU\'s CR3), or { end } (the guest RAM size) to search all of it');
      const end = toAddress(opts.end, 'end');
      symbols = await findKallsyms(reader, 0n, end);
      const hint = symbols.location.tokenTable; // inside the image: its 2 MiB block is a good first candidate... not the base
      void hint;
      ({ pgd, levels, textPa } = await physicalBaseBySymbols(reader, symbols, end));
      how = 'search';
    }
    const textVa = symbols.address('_text');
    const endVa = symbols.address('_end');
    if (endVa <= textVa || endVa - textVa > (1n << 30n)) throw new LinuxNotFoundError(`kallsyms gives _text ${hex(textVa)} and _end ${hex(endVa)}: not a kernel image`);
    const pa = (va: bigint) => textPa + (va - textVa);
    // 5-level paging: the kernel's own flag decides where it exists
    const l5sym = symbols.lookup('__pgtable_l5_enabled');
    if (l5sym !== undefined) {
      const l5 = (await reader.readU32(pa(l5sym))) === 1;
      if (l5 !== (levels === 5)) throw new LinuxNotFoundError(`the page tables were walked with ${levels} levels but __pgtable_l5_enabled is ${l5 ? 1 : 0}`);
    }
    const pobSym = symbols.lookup('page_offset_base');
    const pageOffset = pobSym !== undefined ? await reader.readU64(pa(pobSym)) : (levels === 5 ? 0xff11_0000_0000_0000n : 0xffff_8880_0000_0000n);
    const memory = new KernelMemory(reader, { pgd, levels, textVa, textPa, endVa, pageOffset });
    if (!memory.isKernelPointer(pageOffset)) throw new LinuxNotFoundError(`page_offset_base = ${hex(pageOffset)} is not a kernel address`);
    const { btf, gpa } = await LinuxGuest.#findBtf(reader, symbols, textVa, textPa, endVa);
    return new LinuxGuest(reader, memory, symbols, btf, how, gpa);
  }

  /** vmlinux's BTF: __start_BTF..__stop_BTF; without those symbols, the largest blob with task_struct (module blobs are split BTF, smaller). */
  static async #findBtf(reader: PhysicalReader, symbols: KernelSymbols, textVa: bigint, textPa: bigint, endVa: bigint): Promise<{ btf: Btf; gpa: bigint }> {
    const start = symbols.lookup('__start_BTF');
    const stop = symbols.lookup('__stop_BTF');
    if (start !== undefined && stop !== undefined && stop > start && stop - start < (64n << 20n)) {
      const gpa = textPa + (start - textVa);
      return { btf: Btf.parse(await reader.read(gpa, Number(stop - start)), gpa), gpa };
    }
    const magic = Buffer.from([0x9f, 0xeb, 0x01, 0x00, 0x18, 0x00, 0x00, 0x00]);
    const to = textPa + (endVa - textVa);
    const hits = await scan(reader.session, reader.vm, magic, { from: textPa, to, maxMatches: 4096 });
    let best: { gpa: bigint; size: number } | undefined;
    for (const h of hits.matches) {
      const size = Btf.sizeFromHeader(await reader.read(h, 24));
      if (size === null || size > 64 << 20 || h + BigInt(size) > to) continue;
      if (best === undefined || size > best.size) best = { gpa: h, size };
    }
    if (best === undefined) throw new LinuxNotFoundError(`no BTF in the kernel image (no __start_BTF symbol, no blob among ${hits.matches.length} header matches): CONFIG_DEBUG_INFO_BTF is needed`);
    const btf = Btf.parse(await reader.read(best.gpa, best.size), best.gpa);
    if (btf.byName('task_struct', BtfKind.STRUCT).length === 0) throw new LinuxNotFoundError(`the largest BTF blob (gpa ${hex(best.gpa)}, ${best.size} bytes) has no struct task_struct: not vmlinux's`);
    return { btf, gpa: best.gpa };
  }

  /**
   * Runs `body` with the VM paused: an exact snapshot instead of lists that
   * change while they are read. `monitor` is the VM's QEMU monitor (QMP; the
   * live target's and the lab's qmp()); the VM runs again however body ends.
   */
  static async frozen<T>(monitor: QemuMonitor, body: () => Promise<T>): Promise<T> {
    await monitor.qmp('stop');
    try {
      return await body();
    } finally {
      await monitor.qmp('cont');
    }
  }

  // ---------------------------------------------------------------- helpers

  /** A struct layout for the members a view reads (cached per member list). */
  layout(struct: string, members: readonly string[]): StructLayout {
    const key = `${struct}:${members.join(',')}`;
    let l = this.#layouts.get(key);
    if (l === undefined) { l = new StructLayout(this.types, struct, members); this.#layouts.set(key, l); }
    return l;
  }

  /** The first of `names` the struct has (members renamed between kernels: __state/state, ...). */
  #pick(struct: string, names: readonly string[]): string {
    for (const n of names) if (this.types.hasMember(struct, n)) return n;
    throw new LinuxNoSuchError(`struct ${struct} has none of ${names.join(', ')} (kernel BTF)`);
  }

  /**
   * Walks a circular list_head from `head` (its address), yielding each
   * container (entry address = node - offset). Bounded; a node whose next
   * does not point back to it (prev) or a repeated node is a broken list.
   */
  async *listEntries(head: bigint, offset: number, what: string): AsyncGenerator<bigint> {
    const seen = new Set<bigint>();
    let node = head;
    for (let n = 0; ; n++) {
      if (n > MAX_WALK) throw new LinuxStructureError(what, head, `list longer than ${MAX_WALK} entries`);
      const nb = await this.memory.read(node, 16, `list_head of ${what}`);
      const next = nb.readBigUInt64LE(0);
      this.memory.checkPointer(next, `list_head of ${what}`, node, 'next');
      if (next === head) return;
      if (seen.has(next)) throw new LinuxStructureError(what, next, `list cycles back to an entry already visited (after ${n + 1} entries)`);
      seen.add(next);
      const back = await this.memory.u64(next + 8n, `list_head of ${what}`);
      if (back !== node) throw new LinuxStructureError(what, next - BigInt(offset), `list entry's prev ${hex(back)} does not point back to ${hex(node)}`);
      yield next - BigInt(offset);
      node = next;
    }
  }

  // ---------------------------------------------------------------- processes

  #taskLayout(): StructLayout {
    const state = this.#pick('task_struct', ['__state', 'state']);
    const members = ['tasks', 'pid', 'tgid', 'comm', 'real_parent', state, 'exit_state', 'flags', 'cred', 'mm'];
    if (this.types.hasMember('task_struct', 'worker_private')) members.push('worker_private');
    else if (this.types.hasMember('task_struct', 'set_child_tid')) members.push('set_child_tid');
    return this.layout('task_struct', members);
  }

  /** Every process (thread-group leader) on init_task's list, as /proc lists them. */
  async processes(): Promise<LinuxProcess[]> {
    return retrying(async () => {
      const L = this.#taskLayout();
      const init = this.symbols.address('init_task');
      const out: LinuxProcess[] = [];
      for await (const task of this.listEntries(init + BigInt(L.offset('tasks')), L.offset('tasks'), 'task_struct')) {
        out.push(await this.#process(L, await L.read(this.memory, task)));
      }
      return out;
    });
  }

  async #process(L: StructLayout, v: StructView): Promise<LinuxProcess> {
    const mem = this.memory;
    const stateName = L.members.has('__state') ? '__state' : 'state';
    const flags = v.num('flags');
    const parent = v.ptr(mem, 'real_parent');
    const ppidTgid = await this.#read(parent, 'task_struct', 'tgid');
    const pid = v.i32('pid');
    // /proc prints 0 as the ppid of pid 1 and of kthreadd (their parent is the idle task)
    const cred = v.ptr(mem, 'cred');
    const uid = await this.#read(cred, 'cred', 'uid.val');
    const taskComm = v.chars('comm');
    const tsk = v.num(stateName) >>> 0;
    const exitState = v.num('exit_state') >>> 0;
    let state = (tsk | exitState) & 0x7f; // TASK_REPORT
    if ((tsk & 0x402) === 0x402) state = 0x80; // TASK_IDLE -> TASK_REPORT_IDLE
    if (tsk & 0x1000) state = 2; // TASK_RTLOCK_WAIT shows as D
    return {
      pid, tgid: v.i32('tgid'), ppid: Number(ppidTgid) | 0,
      comm: await this.#commOf(v, flags, taskComm), taskComm,
      state: STATE_LETTERS[state === 0 ? 0 : 32 - Math.clz32(state)] ?? '?',
      uid: Number(uid), kthread: (flags & PF_KTHREAD) !== 0, task: v.address, mm: v.ptr(mem, 'mm', true),
    };
  }

  /** One integer member of the struct at `addr`. */
  async #read(addr: bigint, struct: string, member: string): Promise<bigint> {
    const L = this.layout(struct, [member]);
    return (await L.read(this.memory, addr)).big(member);
  }

  /** proc_task_name(): workers get their workqueue label, kthreads their full name; 63 characters at most. */
  async #commOf(v: StructView, flags: number, comm: string): Promise<string> {
    const mem = this.memory;
    const kth = v.layout.members.has('worker_private') ? 'worker_private' : v.layout.members.has('set_child_tid') ? 'set_child_tid' : undefined;
    if (!(flags & (PF_WQ_WORKER | PF_KTHREAD)) || kth === undefined) return comm;
    const kthread = v.ptr(mem, kth, true);
    if (kthread === 0n) return comm;
    if (flags & PF_WQ_WORKER) {
      const K = this.layout('kthread', ['data']);
      const worker = (await K.read(mem, kthread)).ptr(mem, 'data', true);
      if (worker === 0n) return comm;
      const W = this.layout('worker', ['pool', 'desc', 'current_work']);
      const w = await W.read(mem, worker);
      if (w.ptr(mem, 'pool', true) === 0n) return comm;
      const desc = w.chars('desc');
      if (desc === '') return comm;
      return (comm + (w.big('current_work') !== 0n ? '+' : '-') + desc).slice(0, 63);
    }
    if (!this.types.hasMember('kthread', 'full_name')) return comm;
    const K = this.layout('kthread', ['full_name']);
    const full = (await K.read(mem, kthread)).ptr(mem, 'full_name', true);
    if (full === 0n) return comm;
    return (await mem.cstring(full, 63, 'kthread full_name')).slice(0, 63);
  }

  /** The process whose pid (tgid) is `pid`. */
  async process(pid: number): Promise<LinuxProcessView> {
    if (!Number.isSafeInteger(pid) || pid < 0) throw new UsageError(`process: pid must be a non-negative integer, got ${pid}`);
    const p = (await this.processes()).find((x) => x.pid === pid);
    if (p === undefined) throw new LinuxNoSuchError(`no process with pid ${pid} on the task list`);
    return new LinuxProcessView(this, p);
  }

  // ---------------------------------------------------------------- modules

  /** Every module on the `modules` list, as /proc/modules shows it (unformed ones skipped, as there). */
  async modules(): Promise<LinuxModule[]> {
    return retrying(async () => {
      const t = this.types;
      const newLayout = t.hasMember('module', 'mem'); // 6.4+: mem[MOD_MEM_NUM_TYPES]
      const members = ['list', 'name', 'state', 'refcnt', 'source_list', 'taints'];
      if (newLayout) members.push('mem');
      else {
        members.push('core_layout.size', 'core_layout.base', 'init_layout.size');
        if (t.hasMember('module', 'data_layout')) members.push('data_layout.size');
      }
      if (t.hasMember('module', 'init')) members.push('init');
      if (t.hasMember('module', 'exit')) members.push('exit');
      const L = this.layout('module', members);
      const states = {
        unformed: t.enumValue('MODULE_STATE_UNFORMED'), going: t.enumValue('MODULE_STATE_GOING'), coming: t.enumValue('MODULE_STATE_COMING'),
      };
      const head = this.symbols.address('modules');
      const listOff = L.offset('list');
      const useOff = t.offsetOf('module_use', 'source_list');
      const out: LinuxModule[] = [];
      for await (const mod of this.listEntries(head, listOff, 'module')) {
        const v = await L.read(this.memory, mod);
        const state = v.big('state');
        if (state === states.unformed) continue;
        let size: number, base: bigint;
        if (newLayout) {
          const memM = L.members.get('mem')!;
          const arr = t.resolve(memM.type);
          const n = t.arrayLength(arr);
          const el = t.target(arr);
          const es = t.sizeOf(el);
          const sizeOff = t.offsetOf(t.resolve(el), 'size'), baseOff = t.offsetOf(t.resolve(el), 'base');
          const b = await this.memory.read(mod + BigInt(memM.offset), n * es, 'struct module mem[]');
          size = 0;
          for (let i = 0; i < n; i++) size += b.readUInt32LE(i * es + sizeOff);
          base = b.readBigUInt64LE(baseOff); // mem[MOD_TEXT]
        } else {
          size = v.num('core_layout.size') + v.num('init_layout.size') + (L.members.has('data_layout.size') ? v.num('data_layout.size') : 0);
          base = v.big('core_layout.base');
        }
        const users: string[] = [];
        const M = this.layout('module_use', ['source']);
        for await (const use of this.listEntries(v.addr('source_list'), useOff, 'module_use')) {
          const src = (await M.read(this.memory, use)).ptr(this.memory, 'source');
          users.push(await this.memory.cstring(src + BigInt(L.offset('name')), 56, 'module name'));
        }
        const permanent = L.members.has('init') && L.members.has('exit') && v.big('init') !== 0n && v.big('exit') === 0n;
        const refcount = (v.num('refcnt') | 0) - 1; // MODULE_REF_BASE
        const st: LinuxModule['state'] = state === states.going ? 'Unloading' : state === states.coming ? 'Loading' : 'Live';
        const taints = moduleTaints(v.big('taints'), st);
        const name = v.chars('name');
        const usersText = users.map((u) => `${u},`).join('') + (permanent ? '[permanent],' : '');
        const line = `${name} ${size} ${refcount} ${usersText || '-'} ${st} 0x${base.toString(16).padStart(16, '0')}${taints ? ` ${taints}` : ''}`;
        out.push({ name, size, refcount, users, state: st, base, taints, line });
      }
      return out;
    });
  }

  // ---------------------------------------------------------------- uname, uptime, dmesg

  /** init_uts_ns: what uname(2) returns in the initial namespace. */
  async uname(): Promise<Uname> {
    const fields = ['sysname', 'nodename', 'release', 'version', 'machine', 'domainname'] as const;
    const L = this.layout('uts_namespace', fields.map((f) => `name.${f}`));
    const v = await L.read(this.memory, this.symbols.address('init_uts_ns'));
    return Object.fromEntries(fields.map((f) => [f, v.chars(`name.${f}`)])) as unknown as Uname;
  }

  /**
   * Seconds since boot (CLOCK_BOOTTIME as of the last timekeeping update: a
   * tick or so behind /proc/uptime, more while the guest idles tickless):
   * tk_core.timekeeper's tkr_mono (base + xtime_nsec >> shift) + offs_boot.
   */
  async uptime(): Promise<number> {
    const t = this.types;
    const tk = this.symbols.address('tk_core');
    // tk_core is an anonymous struct { seq; struct timekeeper timekeeper; }: find the member's offset by its type
    const tkType = t.structId('timekeeper');
    let off = -1;
    for (let id = 1; id <= t.count && off < 0; id++) {
      if (t.kind(id) !== BtfKind.STRUCT || t.name(id) !== '') continue;
      const m = t.members(id).find((x) => x.name === 'timekeeper' && t.resolve(x.type) === tkType);
      if (m !== undefined && t.members(id).some((x) => x.name === 'seq')) off = m.bitOffset / 8;
    }
    if (off < 0) throw new LinuxNoSuchError('no anonymous struct with a timekeeper member (tk_core) in the kernel BTF');
    const L = this.layout('timekeeper', ['tkr_mono.base', 'tkr_mono.xtime_nsec', 'tkr_mono.shift', 'offs_boot']);
    const v = await L.read(this.memory, tk + BigInt(off));
    const shift = v.big('tkr_mono.shift');
    if (shift > 63n) throw new LinuxStructureError('timekeeper', tk + BigInt(off), `tkr_mono.shift = ${shift}`);
    // CLOCK_MONOTONIC at the last update = base + (xtime_nsec >> shift); boot time adds offs_boot (suspend)
    const ns = v.big('tkr_mono.base') + (v.big('tkr_mono.xtime_nsec') >> shift) + v.big('offs_boot');
    return Number(BigInt.asIntN(64, ns)) / 1e9;
  }

  /** The printk ring buffer (5.10+ lockless `prb`), oldest record first. */
  async dmesg(): Promise<DmesgRecord[]> {
    return retrying(async () => {
      const mem = this.memory;
      const prbPtr = await mem.u64(this.symbols.address('prb'), 'prb');
      mem.checkPointer(prbPtr, 'printk_ringbuffer', this.symbols.address('prb'), 'prb');
      const R = this.layout('printk_ringbuffer', [
        'desc_ring.count_bits', 'desc_ring.descs', 'desc_ring.infos', 'desc_ring.head_id', 'desc_ring.tail_id',
        'text_data_ring.size_bits', 'text_data_ring.data',
      ]);
      const r = await R.read(mem, prbPtr);
      const countBits = r.num('desc_ring.count_bits'), sizeBits = r.num('text_data_ring.size_bits');
      if (countBits < 1 || countBits > 24 || sizeBits < 1 || sizeBits > 31) throw new LinuxStructureError('printk_ringbuffer', prbPtr, `count_bits ${countBits}, size_bits ${sizeBits}`);
      const descs = r.ptr(mem, 'desc_ring.descs'), infos = r.ptr(mem, 'desc_ring.infos'), data = r.ptr(mem, 'text_data_ring.data');
      const head = r.big('desc_ring.head_id'), tail = r.big('desc_ring.tail_id');
      const count = 1n << BigInt(countBits), size = 1n << BigInt(sizeBits);
      const D = this.layout('prb_desc', ['state_var', 'text_blk_lpos.begin', 'text_blk_lpos.next']);
      const I = this.layout('printk_info', ['seq', 'ts_nsec', 'text_len', 'facility', 'level']);
      const descSize = BigInt(D.size), infoSize = BigInt(I.size);
      const idMask = (1n << 62n) - 1n; // the state_var's top two bits are the state
      const dataBuf = await mem.read(data, Number(size), 'printk text data ring');
      const out: DmesgRecord[] = [];
      const n = Number((head - tail) & ((1n << 64n) - 1n)) + 1;
      if (n < 1 || BigInt(n) > count) throw new LinuxStructureError('printk_ringbuffer', prbPtr, `head_id ${head} and tail_id ${tail} span ${n} descriptors of ${count}`);
      for (let k = 0; k < n; k++) {
        const id = (tail + BigInt(k)) & ((1n << 64n) - 1n);
        const idx = id & (count - 1n);
        const d = await D.read(mem, descs + idx * descSize);
        const sv = d.big('state_var');
        const st = sv >> 62n;
        if ((sv & idMask) !== (id & idMask) || (st !== 1n && st !== 2n)) continue; // reserved, reusable or overwritten: dmesg skips it too
        const info = await I.read(mem, infos + idx * infoSize);
        const begin = d.big('text_blk_lpos.begin'), next = d.big('text_blk_lpos.next');
        if ((begin & 1n) || (next & 1n)) continue; // data-less
        let off: number, len: number;
        if (begin >> BigInt(sizeBits) === next >> BigInt(sizeBits) && begin < next) { off = Number(begin & (size - 1n)); len = Number(next - begin); }
        else if ((begin + size) >> BigInt(sizeBits) === next >> BigInt(sizeBits)) { off = 0; len = Number(next & (size - 1n)); }
        else continue;
        if (len < 8 || off + len > dataBuf.length) continue;
        const textLen = Math.min(info.num('text_len'), len - 8);
        out.push({
          seq: info.big('seq'), tsNsec: info.big('ts_nsec'), level: info.num('level'), facility: info.num('facility'),
          text: dataBuf.toString('latin1', off + 8, off + 8 + textLen),
        });
      }
      out.sort((a, b) => (a.seq < b.seq ? -1 : a.seq > b.seq ? 1 : 0));
      return out;
    });
  }

  /** dmesg's lines: `[%5lu.%06lu] text`, one per line of a record's text. */
  static dmesgLines(records: readonly DmesgRecord[]): string[] {
    const out: string[] = [];
    for (const r of records) {
      const sec = r.tsNsec / 1_000_000_000n, usec = (r.tsNsec % 1_000_000_000n) / 1000n;
      const prefix = `[${String(sec).padStart(5, ' ')}.${String(usec).padStart(6, '0')}] `;
      for (const l of r.text.split('\n')) out.push(prefix + l);
    }
    return out;
  }
}

/** The taint letters /proc/modules prints (module_flags with the state), e.g. "(OE)". */
function moduleTaints(taints: bigint, state: LinuxModule['state']): string {
  // taint_flags[] entries that apply to modules: bit -> letter
  const letters: [number, string][] = [[0, 'P'], [1, 'F'], [10, 'C'], [12, 'O'], [13, 'E'], [15, 'K'], [16, 'X'], [17, 'T']];
  let s = '';
  for (const [bit, c] of letters) if ((taints >> BigInt(bit)) & 1n) s += c;
  if (state === 'Loading') s += '+';
  if (state === 'Unloading') s += '-';
  return s === '' ? '' : `(${s})`;
}

/** One process's memory, through its own page table (mm->pgd). */
export class LinuxProcessView {
  readonly guest: LinuxGuest;
  readonly info: LinuxProcess;
  #space: AddressSpace | undefined;

  constructor(guest: LinuxGuest, info: LinuxProcess) {
    this.guest = guest;
    this.info = info;
  }

  get pid(): number { return this.info.pid; }

  #mmLayout(): StructLayout {
    return this.guest.layout('mm_struct', ['pgd', 'arg_start', 'arg_end', 'env_start', 'env_end', 'start_brk', 'brk', 'start_stack']);
  }

  async #mm(): Promise<StructView> {
    if (this.info.mm === 0n) throw new LinuxNoSuchError(`pid ${this.info.pid} (${this.info.comm}) is a kernel thread: it has no user memory`);
    return this.#mmLayout().read(this.guest.memory, this.info.mm);
  }

  /** The process's address space (its PGD is mm->pgd, a direct-map address). */
  async space(): Promise<AddressSpace> {
    if (this.#space === undefined) {
      const mm = await this.#mm();
      const pgd = mm.ptr(this.guest.memory, 'pgd');
      const gpa = await this.guest.memory.gpa(pgd);
      if ((gpa & ~PTE_ADDR_MASK) !== 0n) throw new LinuxStructureError('mm_struct', this.info.mm, `pgd ${hex(pgd)} is not page-aligned`);
      this.#space = new AddressSpace(this.guest.reader, gpa, { levels: this.guest.memory.layout.levels });
    }
    return this.#space;
  }

  /** `length` bytes of the process's memory at `va` (TranslationError for a page not present: paged out or never touched). */
  async read(va: AddressLike, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(length) || length < 0 || length > 1 << 30) throw new UsageError(`read: length must be an integer in 0..1 GiB, got ${length}`);
    return (await this.space()).read(toAddress(va, 'va'), length);
  }

  async #range(startM: string, endM: string): Promise<Buffer> {
    const mm = await this.#mm();
    const s = mm.big(startM), e = mm.big(endM);
    if (e < s || e - s > 1n << 24n) throw new LinuxStructureError('mm_struct', this.info.mm, `${startM}..${endM} = ${hex(s)}..${hex(e)}`);
    return this.read(s, Number(e - s));
  }

  /** argv: the bytes arg_start..arg_end, split at NULs (the kernel's /proc/PID/cmdline without setproctitle games). */
  async cmdline(): Promise<string[]> {
    return splitNul(await this.#range('arg_start', 'arg_end'));
  }

  /** The raw bytes of /proc/PID/cmdline's source range. */
  async cmdlineBytes(): Promise<Buffer> { return this.#range('arg_start', 'arg_end'); }

  async environ(): Promise<string[]> { return splitNul(await this.#range('env_start', 'env_end')); }
  async environBytes(): Promise<Buffer> { return this.#range('env_start', 'env_end'); }

  /** The VMAs, as /proc/PID/maps lists them. */
  async maps(): Promise<LinuxVma[]> {
    const g = this.guest;
    const t = g.types;
    const mm = await this.#mm();
    const vmas = t.hasMember('mm_struct', 'mm_mt') ? await this.#mapleVmas() : await this.#listVmas();
    const V = g.layout('vm_area_struct', ['vm_start', 'vm_end', 'vm_flags', 'vm_pgoff', 'vm_file', 'vm_mm', 'vm_ops', 'vm_private_data']);
    const out: LinuxVma[] = [];
    const special = [g.symbols.lookup('special_mapping_vmops'), g.symbols.lookup('legacy_special_mapping_vmops')].filter((x) => x !== undefined);
    for (const a of vmas) {
      const v = await V.read(g.memory, a);
      if (v.big('vm_mm') !== this.info.mm) continue; // a stale slot
      const start = v.big('vm_start'), end = v.big('vm_end');
      if (start >= end || (start & 0xfffn) || (end & 0xfffn)) throw new LinuxStructureError('vm_area_struct', a, `vm_start ${hex(start)}, vm_end ${hex(end)}`);
      const flags = v.big('vm_flags');
      const perms = `${flags & 1n ? 'r' : '-'}${flags & 2n ? 'w' : '-'}${flags & 4n ? 'x' : '-'}${flags & 0x80n ? 's' : 'p'}`;
      const file = v.ptr(g.memory, 'vm_file', true);
      let dev = '00:00', inode = 0n, path = '';
      const offset = file !== 0n ? v.big('vm_pgoff') << 12n : 0n;
      if (file !== 0n) ({ dev, inode, path } = await this.#fileInfo(file));
      else if (start <= mm.big('brk') && end >= mm.big('start_brk')) path = '[heap]';
      else if (start <= mm.big('start_stack') && end >= mm.big('start_stack')) path = '[stack]';
      else if (special.includes(v.big('vm_ops'))) {
        const sm = v.ptr(g.memory, 'vm_private_data', true);
        if (sm !== 0n) {
          const nameP = await g.memory.u64(sm + BigInt(t.offsetOf('vm_special_mapping', 'name')), 'vm_special_mapping');
          if (g.memory.isKernelPointer(nameP)) path = await g.memory.cstring(nameP, 64, 'vm_special_mapping name');
        }
      }
      const head = `${start.toString(16).padStart(8, '0')}-${end.toString(16).padStart(8, '0')} ${perms} ${offset.toString(16).padStart(8, '0')} ${dev} ${inode} `;
      out.push({ start, end, perms, offset, dev, inode, path, line: path ? head.padEnd(73, ' ') + path : head });
    }
    out.sort((x, y) => (x.start < y.start ? -1 : 1));
    return out;
  }

  async #listVmas(): Promise<bigint[]> {
    const g = this.guest;
    const first = await g.memory.u64(this.info.mm + BigInt(g.types.offsetOf('mm_struct', 'mmap')), 'mm_struct');
    const nextOff = BigInt(g.types.offsetOf('vm_area_struct', 'vm_next'));
    const out: bigint[] = [];
    for (let v = first; v !== 0n; v = await g.memory.u64(v + nextOff, 'vm_area_struct')) {
      g.memory.checkPointer(v, 'vm_area_struct', this.info.mm, 'vm_next');
      if (out.length > MAX_WALK) throw new LinuxStructureError('mm_struct', this.info.mm, 'VMA list longer than any process has');
      out.push(v);
    }
    return out;
  }

  /** Every entry of the mm's maple tree (6.1+): nodes are 256-byte aligned, their type in bits 3..6 of the pointer. */
  async #mapleVmas(): Promise<bigint[]> {
    const g = this.guest;
    const t = g.types;
    const rootAt = this.info.mm + BigInt(t.offsetOf('mm_struct', 'mm_mt')) + BigInt(t.offsetOf('maple_tree', 'ma_root'));
    const root = await g.memory.u64(rootAt, 'maple_tree');
    const types = { leaf64: t.enumValue('maple_leaf_64'), range64: t.enumValue('maple_range_64'), arange64: t.enumValue('maple_arange_64') };
    const slotsOf = (struct: string) => {
      const m = t.member(struct, 'slot');
      return { off: m.offset, n: t.arrayLength(t.resolve(m.type)) };
    };
    const range = slotsOf('maple_range_64'), arange = slotsOf('maple_arange_64');
    const out: bigint[] = [];
    const seen = new Set<bigint>();
    const isNode = (e: bigint) => (e & 3n) === 2n && e > 4096n;
    if (!isNode(root)) { if (root !== 0n) out.push(root); return out; }
    const stack: { enode: bigint; depth: number }[] = [{ enode: root, depth: 0 }];
    while (stack.length > 0) {
      const { enode, depth } = stack.pop()!;
      const node = enode & ~0xffn;
      if (depth > 32 || seen.has(node)) throw new LinuxStructureError('maple_node', node, depth > 32 ? 'tree deeper than 32 levels' : 'node reached twice (a cycle)');
      seen.add(node);
      if (seen.size > MAX_WALK) throw new LinuxStructureError('maple_tree', rootAt, 'more nodes than any process has');
      g.memory.checkPointer(node, 'maple_node', rootAt, 'node');
      const type = (enode >> 3n) & 0xfn;
      const lay = type === types.arange64 ? arange : range;
      const slots = await g.memory.read(node + BigInt(lay.off), 8 * lay.n, 'maple_node');
      for (let i = 0; i < lay.n; i++) {
        const e = slots.readBigUInt64LE(8 * i);
        if (e === 0n) continue;
        if (type === types.leaf64 || type < types.leaf64) { if (g.memory.isKernelPointer(e)) out.push(e); }
        else if (isNode(e)) stack.push({ enode: e, depth: depth + 1 });
      }
    }
    return [...new Set(out)];
  }

  /** dev, inode and path of a struct file (the path through mounts to the root). */
  async #fileInfo(file: bigint): Promise<{ dev: string; inode: bigint; path: string }> {
    const g = this.guest;
    const mem = g.memory;
    const F = g.layout('file', ['f_path.dentry', 'f_path.mnt', 'f_inode']);
    const f = await F.read(mem, file);
    const inodeP = f.ptr(mem, 'f_inode');
    const I = g.layout('inode', ['i_ino', 'i_sb']);
    const ino = await I.read(mem, inodeP);
    const sDev = await mem.u32(ino.ptr(mem, 'i_sb') + BigInt(g.types.offsetOf('super_block', 's_dev')), 'super_block');
    const dev = `${(sDev >>> 20).toString(16).padStart(2, '0')}:${(sDev & 0xfffff).toString(16).padStart(2, '0')}`;
    const D = g.layout('dentry', ['d_parent', 'd_name.name']);
    const M = g.layout('mount', ['mnt_parent', 'mnt_mountpoint', 'mnt.mnt_root']);
    const mntOff = BigInt(g.types.offsetOf('mount', 'mnt'));
    let dentry = f.ptr(mem, 'f_path.dentry');
    let mount = f.ptr(mem, 'f_path.mnt') - mntOff;
    const parts: string[] = [];
    for (let i = 0; i < 256; i++) {
      const m = await M.read(mem, mount);
      if (dentry === m.big('mnt.mnt_root')) {
        const parent = m.ptr(mem, 'mnt_parent');
        if (parent === mount) break; // the root of the namespace
        dentry = m.ptr(mem, 'mnt_mountpoint');
        mount = parent;
        continue;
      }
      const d = await D.read(mem, dentry);
      const parentD = d.ptr(mem, 'd_parent');
      if (parentD === dentry) break;
      parts.push(await mem.cstring(d.ptr(mem, 'd_name.name'), 256, 'dentry name'));
      dentry = parentD;
      if (i === 255) throw new LinuxStructureError('dentry', dentry, 'path deeper than 256 components');
    }
    return { dev, inode: ino.big('i_ino'), path: '/' + parts.reverse().join('/') };
  }
}

function splitNul(b: Buffer): string[] {
  const s = b.toString('latin1');
  const parts = s.split('\0');
  if (parts.length > 0 && parts[parts.length - 1] === '') parts.pop();
  return parts;
}

export { LinuxError, START_KERNEL_MAP };
