/**
 * A synthetic Linux kernel for unit tests and the model: on top of the
 * synthetic x86-64 guest of src/inspect (page tables, a 2 MiB-page kernel
 * image at a random physical base), it writes what LinuxGuest reads: kallsyms
 * tables in the 6.1 layout (with or without kallsyms_seqs_of_names), a BTF
 * blob describing its own structures (at offsets unlike the real kernel's,
 * some members inside anonymous structs), a task list in the direct map, a
 * module list with users, init_uts_ns and one process with argv, environment
 * and a VMA. Returns the truth, and the writers tests use to corrupt it.
 */
import { UsageError } from '../../errors.js';
import { buildSyntheticGuest, KERNEL_VIRTUAL_BASE, PAGE_OFFSET, USER_VA, type SyntheticMemory, type SyntheticTruth } from '../../inspect/index.js';
import { BTF_MAGIC, BtfKind } from './btf.js';

// ---------------------------------------------------------------- a small BTF writer

type Member = [name: string, type: number, bitOffset: number, bitSize?: number];

export class BtfWriter {
  readonly #strs: string[] = [''];
  readonly #strOff = new Map<string, number>([['', 0]]);
  #strLen = 1;
  readonly #types: (Buffer | null)[] = [];

  str(s: string): number {
    let o = this.#strOff.get(s);
    if (o === undefined) {
      o = this.#strLen;
      this.#strOff.set(s, o);
      this.#strs.push(s);
      this.#strLen += Buffer.byteLength(s, 'latin1') + 1;
    }
    return o;
  }

  /** Reserves the next id (for a struct referred to before it is written). */
  reserve(): number { this.#types.push(null); return this.#types.length; }

  #rec(id: number | undefined, kind: number, name: string, vlen: number, sizeOrType: number, extra: Buffer, kflag = false): number {
    const h = Buffer.alloc(12);
    h.writeUInt32LE(this.str(name), 0);
    h.writeUInt32LE(((kflag ? 1 : 0) << 31 | (kind << 24) | vlen) >>> 0, 4);
    h.writeUInt32LE(sizeOrType, 8);
    const b = Buffer.concat([h, extra]);
    if (id === undefined) { this.#types.push(b); return this.#types.length; }
    this.#types[id - 1] = b;
    return id;
  }

  int(name: string, size: number, signed = false): number {
    const e = Buffer.alloc(4);
    e.writeUInt32LE(((signed ? 1 : 0) << 24) | (size * 8), 0);
    return this.#rec(undefined, BtfKind.INT, name, 0, size, e);
  }
  ptr(type: number): number { return this.#rec(undefined, BtfKind.PTR, '', 0, type, Buffer.alloc(0)); }
  typedef(name: string, type: number): number { return this.#rec(undefined, BtfKind.TYPEDEF, name, 0, type, Buffer.alloc(0)); }
  constOf(type: number): number { return this.#rec(undefined, BtfKind.CONST, '', 0, type, Buffer.alloc(0)); }
  array(type: number, index: number, n: number): number {
    const e = Buffer.alloc(12);
    e.writeUInt32LE(type, 0); e.writeUInt32LE(index, 4); e.writeUInt32LE(n, 8);
    return this.#rec(undefined, BtfKind.ARRAY, '', 0, 0, e);
  }
  struct(name: string, size: number, members: Member[], opts: { union?: boolean; id?: number } = {}): number {
    const bitfields = members.some((m) => (m[3] ?? 0) > 0);
    const e = Buffer.alloc(12 * members.length);
    members.forEach(([n, t, off, bits], i) => {
      e.writeUInt32LE(this.str(n), 12 * i);
      e.writeUInt32LE(t, 12 * i + 4);
      e.writeUInt32LE(bitfields ? (((bits ?? 0) << 24) | off) >>> 0 : off, 12 * i + 8);
    });
    return this.#rec(opts.id, opts.union ? BtfKind.UNION : BtfKind.STRUCT, name, members.length, size, e, bitfields);
  }
  enum(name: string, values: [string, number][]): number {
    const e = Buffer.alloc(8 * values.length);
    values.forEach(([n, v], i) => { e.writeUInt32LE(this.str(n), 8 * i); e.writeInt32LE(v, 8 * i + 4); });
    return this.#rec(undefined, BtfKind.ENUM, name, values.length, 4, e);
  }

  build(): Buffer {
    if (this.#types.includes(null)) throw new UsageError('BtfWriter: a reserved type was never written');
    const types = Buffer.concat(this.#types as Buffer[]);
    const strs = Buffer.from(this.#strs.map((s) => `${s}\0`).join(''), 'latin1');
    const h = Buffer.alloc(24);
    h.writeUInt16LE(BTF_MAGIC, 0); h[2] = 1; h[3] = 0;
    h.writeUInt32LE(24, 4); h.writeUInt32LE(0, 8); h.writeUInt32LE(types.length, 12);
    h.writeUInt32LE(types.length, 16); h.writeUInt32LE(strs.length, 20);
    return Buffer.concat([h, types, strs]);
  }
}

// ---------------------------------------------------------------- kallsyms writer

export interface SymbolSpec { name: string; type: string; address: bigint }

/** The tables of scripts/kallsyms.c (6.1 order), each 8-aligned from `at` (8-aligned). Returns the bytes and where each table is. */
export function writeKallsyms(symbols: readonly SymbolSpec[], relativeBase: bigint, opts: { seqs: boolean; order?: 'v6.1' | 'v6.4' }): { bytes: Buffer; tokenTable: number; names: number; markers: number; relativeBase: number } {
  const v64 = opts.order === 'v6.4';
  const n = symbols.length;
  // Tokens: every character used stands for itself; the free slots hold a few multi-character tokens (used greedily).
  const tokens: string[] = new Array(256).fill('');
  const used = new Set<number>();
  for (const s of symbols) for (const c of s.type + s.name) used.add(c.charCodeAt(0));
  for (let d = 0; d < 10; d++) used.add(0x30 + d);
  for (const c of used) tokens[c] = String.fromCharCode(c);
  const multi = ['_', 'init', 'task', 'func_', 'sym', 'kvm', '_t', 'ta', 'mem'];
  let k = 0;
  for (let i = 0; i < 256; i++) if (tokens[i] === '') tokens[i] = k < multi.length ? (multi[k++]!.length > 1 ? multi[k - 1]! : `x${i}`) : `@${i.toString(16)}`;
  const long = tokens.map((t, i) => [t, i] as const).filter(([t]) => t.length > 1).sort((a, b) => b[0].length - a[0].length);
  const encode = (s: string): number[] => {
    const out: number[] = [];
    for (let p = 0; p < s.length;) {
      const m = long.find(([t]) => s.startsWith(t, p));
      if (m !== undefined && p > 0) { out.push(m[1]); p += m[0].length; } // the type letter stays a token of its own
      else { out.push(s.charCodeAt(p)); p++; }
    }
    return out;
  };
  const parts: Buffer[] = [];
  let len = 0;
  const push = (b: Buffer) => { parts.push(b); len += b.length; };
  const pad8 = () => { if (len % 8) push(Buffer.alloc(8 - (len % 8))); };
  const offsets = Buffer.alloc(4 * n);
  symbols.forEach((s, i) => {
    const rel = s.address < relativeBase ? Number(s.address) : Number(relativeBase - 1n - s.address);
    offsets.writeInt32LE(rel, 4 * i);
  });
  const rb = Buffer.alloc(8); rb.writeBigUInt64LE(relativeBase);
  let relAt = -1;
  if (!v64) { push(offsets); pad8(); relAt = len; push(rb); }
  const ns = Buffer.alloc(8); ns.writeUInt32LE(n); push(ns);
  const names = len;
  const markers: number[] = [];
  let off = 0;
  const nameBytes: Buffer[] = [];
  symbols.forEach((s, i) => {
    if (i % 256 === 0) markers.push(off);
    const t = encode(s.type + s.name);
    const head = t.length < 0x80 ? [t.length] : [(t.length & 0x7f) | 0x80, t.length >> 7];
    const b = Buffer.from([...head, ...t]);
    nameBytes.push(b);
    off += b.length;
  });
  push(Buffer.concat(nameBytes)); pad8();
  const markersAt = len;
  const mb = Buffer.alloc(4 * markers.length);
  markers.forEach((m, i) => mb.writeUInt32LE(m, 4 * i));
  push(mb); pad8();
  const order = symbols.map((s, i) => [s.name, i] as const).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1]));
  const sb = Buffer.alloc(3 * n);
  order.forEach(([, i], j) => { sb[3 * j] = (i >> 16) & 0xff; sb[3 * j + 1] = (i >> 8) & 0xff; sb[3 * j + 2] = i & 0xff; });
  if (opts.seqs && !v64) { push(sb); pad8(); }
  const tokenTable = len;
  const tIndex = Buffer.alloc(512);
  let to = 0;
  const tb: Buffer[] = [];
  tokens.forEach((t, i) => { tIndex.writeUInt16LE(to, 2 * i); const b = Buffer.from(`${t}\0`, 'latin1'); tb.push(b); to += b.length; });
  push(Buffer.concat(tb)); pad8();
  push(tIndex);
  if (v64) { pad8(); push(offsets); pad8(); relAt = len; push(rb); push(sb); }
  return { bytes: Buffer.concat(parts), tokenTable, names, markers: markersAt, relativeBase: relAt };
}

// ---------------------------------------------------------------- the guest

export interface SyntheticLinuxOptions {
  seed?: number;
  /** Write kallsyms_seqs_of_names (6.2 / Debian 6.1) or not (vanilla 6.1). Default true. */
  seqs?: boolean;
  /** Generated function symbols besides the named ones (default 700: three markers). */
  extraSymbols?: number;
  /** kallsyms table order: 'v6.1' (offsets first; default) or 'v6.4' (num_syms first, offsets after the token index). */
  order?: 'v6.1' | 'v6.4';
}

export interface SyntheticLinuxTask { pid: number; ppid: number; comm: string; kthread: boolean; uid: number; va: bigint }

export interface SyntheticLinuxTruth {
  base: SyntheticTruth;
  cr3: bigint;
  text: bigint;
  textPa: bigint;
  symbols: SymbolSpec[];
  /** Task list order (init_task excluded, as /proc). */
  tasks: SyntheticLinuxTask[];
  modules: string[];
  uname: { sysname: string; nodename: string; release: string; version: string; machine: string; domainname: string };
  process: { pid: number; argv: string[]; env: string[]; vma: { start: bigint; end: bigint } };
  btfGpa: bigint;
  btfBytes: number;
  /** Member offsets of the synthetic structs (for corruption tests). */
  offsets: { tasksNext: number; tasksPrev: number; moduleList: number };
  /** Where the kallsyms token table was written (gpa). */
  tokenTableGpa: bigint;
  namesGpa: bigint;
  relativeBaseGpa: bigint;
  /** Physical address of a kernel virtual address of the direct map or the image. */
  pa(va: bigint): bigint;
  write(va: bigint, bytes: Buffer): void;
}

export function buildSyntheticLinux(memory: SyntheticMemory & { read(gpa: bigint, length: number): Uint8Array }, opts: SyntheticLinuxOptions = {}): SyntheticLinuxTruth {
  const seed = opts.seed ?? 0x11ce;
  const base = buildSyntheticGuest(memory, { seed, tasks: 3, kernelPages: 4 });
  const text = KERNEL_VIRTUAL_BASE;
  const textPa = base.layout.kernelPhysicalBase;
  const imageEnd = text + BigInt(base.layout.kernelBytes);
  const pa = (va: bigint): bigint => (va >= text && va < imageEnd ? textPa + (va - text) : va - PAGE_OFFSET);
  const write = (va: bigint, b: Buffer) => memory.write(pa(va), b);
  // frames for slab-like objects: above the image, clear of every page the base guest used
  const usedPages = new Set<bigint>([...base.tables, ...base.tasks.map((t) => t.gpa & ~0xfffn), ...base.translations.filter((x) => x.pageSize === 4096).map((x) => x.gpa & ~0xfffn)]);
  let nextFrame = (memory.end / 2n) & ~0xfffn;
  const frame = (): bigint => {
    for (;;) {
      nextFrame += 0x1000n;
      const f = nextFrame;
      if (usedPages.has(f) || (f >= textPa && f < textPa + BigInt(base.layout.kernelBytes))) continue;
      usedPages.add(f);
      return PAGE_OFFSET + f;
    }
  };

  // ---- BTF: the structures this guest has
  const w = new BtfWriter();
  const u8 = w.int('unsigned char', 1), char = w.int('char', 1, true), int = w.int('int', 4, true), u32 = w.int('unsigned int', 4);
  const u64 = w.int('long unsigned int', 8), u16 = w.int('short unsigned int', 2);
  const voidp = w.ptr(0);
  const idx = w.int('__ARRAY_SIZE_TYPE__', 4);
  const pid_t = w.typedef('pid_t', int);
  const listHead = w.reserve();
  const listP = w.ptr(listHead);
  w.struct('list_head', 16, [['next', listP, 0], ['prev', listP, 64]], { id: listHead });
  const uid_t = w.typedef('uid_t', u32);
  const kuidS = w.struct('', 4, [['val', uid_t, 0]]);
  const kuid = w.typedef('kuid_t', kuidS);
  const cred = w.struct('cred', 32, [['usage', int, 0], ['uid', kuid, 32], ['gid', kuid, 64]]);
  const credP = w.ptr(w.constOf(cred));
  const task = w.reserve();
  const taskP = w.ptr(task);
  const comm16 = w.array(char, idx, 16);
  const mm = w.reserve();
  const mmP = w.ptr(mm);
  const pidPair = w.struct('', 8, [['pid', pid_t, 0], ['tgid', pid_t, 32]]);
  const stateUnion = w.struct('', 8, [['__state', u32, 0], ['__pad', u64, 0]], { union: true });
  w.struct('task_struct', 0x300, [
    ['', stateUnion, 0], ['flags', u32, 8 * 8], ['', pidPair, 0x40 * 8], ['tasks', listHead, 0x60 * 8], ['real_parent', taskP, 0x80 * 8],
    ['exit_state', int, 0x88 * 8], ['mm', mmP, 0x90 * 8], ['cred', credP, 0xa0 * 8], ['comm', comm16, 0xb0 * 8], ['worker_private', voidp, 0xc0 * 8],
  ], { id: task });
  const charP = w.ptr(char);
  w.struct('kthread', 0x40, [['flags', u64, 0], ['data', voidp, 0x10 * 8], ['full_name', charP, 0x20 * 8]]);
  const vma = w.reserve();
  const vmaP = w.ptr(vma);
  const pgdS = w.struct('', 8, [['pgd', u64, 0]]);
  const pgdT = w.typedef('pgd_t', pgdS);
  w.struct('mm_struct', 0x200, [
    ['mmap', vmaP, 0], ['', w.struct('', 0x100, [['pgd', w.ptr(pgdT), 0x10 * 8], ['start_brk', u64, 0x20 * 8], ['brk', u64, 0x28 * 8], ['start_stack', u64, 0x30 * 8],
      ['arg_start', u64, 0x38 * 8], ['arg_end', u64, 0x40 * 8], ['env_start', u64, 0x48 * 8], ['env_end', u64, 0x50 * 8]]), 0x40 * 8],
  ], { id: mm });
  w.struct('vm_area_struct', 0x80, [
    ['vm_start', u64, 0], ['vm_end', u64, 64], ['vm_next', vmaP, 128], ['vm_mm', mmP, 0x20 * 8], ['vm_flags', u64, 0x28 * 8],
    ['vm_pgoff', u64, 0x30 * 8], ['vm_file', voidp, 0x38 * 8], ['vm_ops', voidp, 0x40 * 8], ['vm_private_data', voidp, 0x48 * 8],
  ], { id: vma });
  const modState = w.enum('module_state', [['MODULE_STATE_LIVE', 0], ['MODULE_STATE_COMING', 1], ['MODULE_STATE_GOING', 2], ['MODULE_STATE_UNFORMED', 3]]);
  const layoutS = w.struct('module_layout', 0x20, [['base', voidp, 0], ['size', u32, 64], ['text_size', u32, 96]]);
  const atomic = w.typedef('atomic_t', w.struct('', 4, [['counter', int, 0]]));
  const mod = w.reserve();
  w.struct('module', 0x200, [
    ['state', modState, 0], ['list', listHead, 0x08 * 8], ['name', w.array(char, idx, 56), 0x18 * 8], ['core_layout', layoutS, 0x50 * 8],
    ['init_layout', layoutS, 0x70 * 8], ['refcnt', atomic, 0x90 * 8], ['source_list', listHead, 0x98 * 8], ['taints', u64, 0xa8 * 8],
    ['init', voidp, 0xb0 * 8], ['exit', voidp, 0xb8 * 8],
  ], { id: mod });
  const modP = w.ptr(mod);
  w.struct('module_use', 0x30, [['source_list', listHead, 0], ['target_list', listHead, 0x10 * 8], ['source', modP, 0x20 * 8], ['target', modP, 0x28 * 8]]);
  const c65 = w.array(char, idx, 65);
  const uts = w.struct('new_utsname', 390, ['sysname', 'nodename', 'release', 'version', 'machine', 'domainname'].map((n, i) => [n, c65, i * 65 * 8] as Member));
  w.struct('uts_namespace', 0x200, [['name', uts, 8 * 8]]);
  // a bit-field, an unused type or two, so the parser meets them
  w.struct('printk_info', 0x58, [['seq', u64, 0], ['ts_nsec', u64, 64], ['text_len', u16, 128], ['facility', u8, 144], ['flags', u8, 152, 5], ['level', u8, 157, 3], ['caller_id', u32, 160]]);
  const btf = w.build();

  // ---- image layout (offsets from _text)
  const at = (o: number) => text + BigInt(o);
  const KALLSYMS = 0x210000, BTF_AT = 0x300000, INIT_TASK = 0x600000, PHYS_BASE = 0x601000, TOP_PGT = 0x602000;
  const POB = 0x603000, MODULES = 0x603100, L5 = 0x603200, UTS = 0x604000, BANNER = 0x605000, END = 0x800000;
  const banner = 'Linux version 6.1.0-synthetic (kvmmem@model) #1 SMP PREEMPT_DYNAMIC Thu Jan  1 00:00:00 UTC 2026';

  // ---- symbols, sorted by address
  const named: SymbolSpec[] = [
    { name: '_text', type: 'T', address: at(0) }, { name: '_stext', type: 'T', address: at(0) },
    { name: 'linux_banner', type: 'D', address: at(BANNER) }, { name: '__start_BTF', type: 'R', address: at(BTF_AT) },
    { name: '__stop_BTF', type: 'R', address: at(BTF_AT + btf.length) }, { name: 'init_task', type: 'D', address: at(INIT_TASK) },
    { name: 'phys_base', type: 'D', address: at(PHYS_BASE) }, { name: 'init_top_pgt', type: 'D', address: at(TOP_PGT) },
    { name: 'page_offset_base', type: 'D', address: at(POB) }, { name: 'modules', type: 'd', address: at(MODULES) },
    { name: '__pgtable_l5_enabled', type: 'D', address: at(L5) }, { name: 'init_uts_ns', type: 'D', address: at(UTS) },
    { name: '_end', type: 'B', address: at(END) },
  ];
  const extra = opts.extraSymbols ?? 700;
  for (let i = 0; i < extra; i++) named.push({ name: i % 97 === 5 ? 'dup_static' : `func_${String(i).padStart(6, '0')}`, type: i % 3 ? 't' : 'T', address: at(0x1000 + i * 0x40) });
  named.push({ name: `very_long_${'x'.repeat(140)}`, type: 'T', address: at(0x1000 + extra * 0x40) }); // a 2-byte ULEB128 length
  const symbols: SymbolSpec[] = [
    { name: 'fixed_percpu_data', type: 'A', address: 0n }, { name: '__per_cpu_start', type: 'A', address: 0n }, { name: 'runqueues', type: 'A', address: 0x2c000n },
    ...named.sort((a, b) => (a.address < b.address ? -1 : a.address > b.address ? 1 : 0)),
  ];
  const ks = writeKallsyms(symbols, text, { seqs: opts.seqs ?? true, order: opts.order ?? 'v6.1' });
  write(at(KALLSYMS), ks.bytes);
  write(at(BTF_AT), btf);
  write(at(BANNER), Buffer.from(`${banner}\n\0`, 'latin1'));
  const u64b = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt.asUintN(64, v)); return b; };
  write(at(PHYS_BASE), u64b(textPa - (text - 0xffff_ffff_8000_0000n)));
  write(at(POB), u64b(PAGE_OFFSET));
  write(at(L5), Buffer.alloc(8));
  // init_top_pgt: a copy of the PML4 (its entries point at the same lower tables), as the search path walks it
  write(at(TOP_PGT), Buffer.from(memory.read(base.cr3, 4096)));

  // ---- tasks: init_task (pid 0) in the image, the rest in "slab" frames of the direct map
  const credRoot = frame(), credUser = frame();
  write(credRoot, Buffer.alloc(32));
  const cu = Buffer.alloc(32); cu.writeUInt32LE(1000, 4); cu.writeUInt32LE(1000, 8); write(credUser, cu);
  const specs = [
    { pid: 1, ppid: 0, comm: 'init', kthread: false, uid: 0 },
    { pid: 2, ppid: 0, comm: 'kthreadd', kthread: true, uid: 0 },
    { pid: 3, ppid: 2, comm: 'rcu_gp', kthread: true, uid: 0 },
    { pid: 14, ppid: 2, comm: 'ksoftirqd/0', kthread: true, uid: 0 },
    { pid: 12, ppid: 2, comm: 'rcu_tasks_rude_kthread', kthread: true, uid: 0 }, // a long name: kthread->full_name
    { pid: 97, ppid: 1, comm: 'kvmmem-loop', kthread: false, uid: 1000 },
    { pid: 130, ppid: 97, comm: 'sleep', kthread: false, uid: 1000 },
  ];
  const tasks: SyntheticLinuxTask[] = specs.map((s) => ({ ...s, va: frame() }));
  const initVa = at(INIT_TASK);
  const all = [initVa, ...tasks.map((t) => t.va)];
  const byPid = new Map<number, bigint>([[0, initVa], ...tasks.map((t) => [t.pid, t.va] as [number, bigint])]);
  const mmVa = frame(), vmaVa = frame();
  const userFrame = base.translations.find((x) => x.va === USER_VA + 0x123n)!.gpa - 0x123n;
  const argv = ['kvmmem-loop', 'alpha', 'beta gamma'], env = ['HOME=/', 'KVMMEM_TOKEN=a1b2c3'];
  const argBytes = Buffer.from(argv.map((a) => `${a}\0`).join(''), 'latin1');
  const envBytes = Buffer.from(env.map((a) => `${a}\0`).join(''), 'latin1');
  memory.write(userFrame + 0x800n, Buffer.concat([argBytes, envBytes]));
  all.forEach((va, i) => {
    const b = Buffer.alloc(0x300);
    const spec = i === 0 ? { pid: 0, ppid: 0, comm: 'swapper/0', kthread: true, uid: 0 } : tasks[i - 1]!;
    b.writeUInt32LE(i === 0 ? 0 : 1, 0); // __state: running / interruptible
    b.writeUInt32LE(spec.kthread ? 0x0020_0000 : 0x0040_0100, 8);
    b.writeInt32LE(spec.pid, 0x40); b.writeInt32LE(spec.pid, 0x44);
    b.writeBigUInt64LE(all[(i + 1) % all.length]! + 0x60n, 0x60);
    b.writeBigUInt64LE(all[(i + all.length - 1) % all.length]! + 0x60n, 0x68);
    b.writeBigUInt64LE(byPid.get(spec.ppid) ?? initVa, 0x80);
    b.writeBigUInt64LE(spec.pid === 97 ? mmVa : 0n, 0x90);
    b.writeBigUInt64LE(spec.uid === 1000 ? credUser : credRoot, 0xa0);
    b.write(spec.comm.slice(0, 15), 0xb0, 'latin1');
    if (spec.comm.length > 15) {
      const kt = frame();
      const k = Buffer.alloc(0x40);
      k.writeBigUInt64LE(kt + 0x100n, 0x20);
      write(kt, k);
      write(kt + 0x100n, Buffer.from(`${spec.comm}\0`, 'latin1'));
      b.writeBigUInt64LE(kt, 0xc0);
    }
    write(va, b);
  });
  const m = Buffer.alloc(0x200);
  m.writeBigUInt64LE(vmaVa, 0);
  m.writeBigUInt64LE(PAGE_OFFSET + base.cr3, 0x40 + 0x10);
  const argStart = USER_VA + 0x800n;
  const vals = [0n, 0n, 0n, argStart, argStart + BigInt(argBytes.length), argStart + BigInt(argBytes.length), argStart + BigInt(argBytes.length + envBytes.length)];
  vals.forEach((v, i) => m.writeBigUInt64LE(v, 0x40 + 0x20 + 8 * i));
  write(mmVa, m);
  const v = Buffer.alloc(0x80);
  v.writeBigUInt64LE(USER_VA, 0); v.writeBigUInt64LE(USER_VA + 0x1000n, 8); v.writeBigUInt64LE(mmVa, 0x20); v.writeBigUInt64LE(3n, 0x28);
  write(vmaVa, v);

  // ---- modules: "fuse" used by nobody, "failover" used by "net_failover"
  const mods = [
    { name: 'net_failover', size: 24576, init: 0n, refs: 1, base: 0xffff_ffff_c05a_7000n },
    { name: 'failover', size: 16384, init: 0n, refs: 2, base: 0xffff_ffff_c05b_4000n },
    { name: 'fuse', size: 176128, init: 0n, refs: 1, base: 0xffff_ffff_c057_b000n },
  ].map((x) => ({ ...x, va: frame() }));
  const headVa = at(MODULES);
  const nodes = [headVa, ...mods.map((x) => x.va + 0x08n)];
  const useVa = frame();
  mods.forEach((x, i) => {
    const b = Buffer.alloc(0x200);
    b.writeBigUInt64LE(nodes[(i + 2) % nodes.length]!, 0x08);
    b.writeBigUInt64LE(nodes[i]!, 0x10);
    b.write(x.name, 0x18, 'latin1');
    b.writeBigUInt64LE(x.base, 0x50); b.writeUInt32LE(x.size - 4096, 0x58);
    b.writeUInt32LE(4096, 0x70 + 8);
    b.writeInt32LE(x.refs, 0x90);
    const sl = x.va + 0x98n;
    if (x.name === 'failover') { b.writeBigUInt64LE(useVa, 0x98); b.writeBigUInt64LE(useVa, 0xa0); }
    else { b.writeBigUInt64LE(sl, 0x98); b.writeBigUInt64LE(sl, 0xa0); }
    write(x.va, b);
  });
  const hb = Buffer.alloc(16); hb.writeBigUInt64LE(nodes[1]!, 0); hb.writeBigUInt64LE(nodes[nodes.length - 1]!, 8); write(headVa, hb);
  const ub = Buffer.alloc(0x30);
  const failover = mods[1]!;
  ub.writeBigUInt64LE(failover.va + 0x98n, 0); ub.writeBigUInt64LE(failover.va + 0x98n, 8);
  ub.writeBigUInt64LE(mods[0]!.va, 0x20); ub.writeBigUInt64LE(failover.va, 0x28);
  write(useVa, ub);

  // ---- uname
  const uname = { sysname: 'Linux', nodename: 'synthetic', release: '6.1.0-synthetic', version: '#1 SMP PREEMPT_DYNAMIC Thu Jan  1 00:00:00 UTC 2026', machine: 'x86_64', domainname: '(none)' };
  const ub2 = Buffer.alloc(0x200);
  Object.values(uname).forEach((s, i) => ub2.write(s, 8 + i * 65, 'latin1'));
  write(at(UTS), ub2);

  return {
    base, cr3: base.cr3, text, textPa, symbols,
    tasks,
    modules: [
      `net_failover 24576 0 - Live 0x${mods[0]!.base.toString(16)}`,
      `failover 16384 1 net_failover, Live 0x${mods[1]!.base.toString(16)}`,
      `fuse 176128 0 - Live 0x${mods[2]!.base.toString(16)}`,
    ],
    uname,
    process: { pid: 97, argv, env, vma: { start: USER_VA, end: USER_VA + 0x1000n } },
    btfGpa: pa(at(BTF_AT)), btfBytes: btf.length,
    offsets: { tasksNext: 0x60, tasksPrev: 0x68, moduleList: 0x08 },
    tokenTableGpa: pa(at(KALLSYMS + ks.tokenTable)), namesGpa: pa(at(KALLSYMS + ks.names)), relativeBaseGpa: pa(at(KALLSYMS + ks.relativeBase)),
    pa, write,
  };
}

