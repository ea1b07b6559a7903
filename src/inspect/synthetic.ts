/**
 * A synthetic x86-64 "guest" for the model: writes 4-level page tables, a
 * kernel-like banner and a circular doubly linked task list into a VM's
 * guest-physical memory, at places chosen by a seeded PRNG, and returns the
 * ground truth so tests (and the demo) can check what the inspector finds.
 *
 * Address space (Linux-like):
 * - direct map at PAGE_OFFSET 0xffff888000000000: 1 GiB pages over all RAM (gpa = va - PAGE_OFFSET);
 * - kernel image at 0xffffffff81000000: 2 MiB pages onto a randomised, 2 MiB-aligned physical load address;
 * - "vmalloc" area at 0xffffc90000000000: 4 KiB pages onto scattered frames, holding the task structs
 *   (one of them straddles a virtual page boundary whose two frames are not adjacent);
 * - one user page at 0x555555554000 (4 KiB, U/S set).
 * Entries carry realistic flag noise (NX, global, accessed/dirty, PAT on a 2 MiB page,
 * software bits 57/58) that a correct walk must ignore.
 */
import { UsageError } from '../errors.js';
import { PTE_ACCESSED, PTE_DIRTY, PTE_GLOBAL, PTE_NX, PTE_PRESENT, PTE_PS, PTE_RW, PTE_US, type PageSize } from './paging.js';
import type { PagingLevel } from './errors.js';

/** The part of GuestMemory (src/model) this needs. */
export interface SyntheticMemory {
  write(gpa: bigint, bytes: Uint8Array): void;
  /** One past the highest gpa with RAM. */
  readonly end: bigint;
  /** The RAM region holding gpa, or undefined for a hole. */
  regionOf(gpa: bigint): { gpa: bigint; size: bigint } | undefined;
}

export interface SyntheticOptions {
  /** PRNG seed (default 0x5eed): the same seed and memory layout give the same guest. */
  seed?: number;
  /** Number of tasks in the list (default 6, at least 3). */
  tasks?: number;
  /** 2 MiB pages of kernel image (default 2). */
  kernelPages?: number;
  /** Fill the kernel image with pseudo-random bytes (default true; false leaves whatever is there). */
  fillKernel?: boolean;
}

export interface SyntheticTask {
  va: bigint;
  gpa: bigint;
  pid: number;
  comm: string;
}

export interface SyntheticTranslation {
  va: bigint;
  gpa: bigint;
  pageSize: PageSize;
}

export interface SyntheticTruth {
  seed: number;
  /** Root of the page tables (the PML4's gpa). */
  cr3: bigint;
  /** The banner, without its trailing "\n" (as /proc/version prints it). */
  banner: string;
  bannerGpa: bigint;
  bannerVa: bigint;
  /** The task list in list order; tasks[0] is the head (like init_task). */
  tasks: SyntheticTask[];
  /** Byte offsets in a task struct. */
  taskLayout: typeof TASK_LAYOUT;
  /** Sample translations covering every page size. */
  translations: SyntheticTranslation[];
  /** Canonical addresses that are not mapped, and the level whose entry is not present. */
  notPresent: { va: bigint; level: PagingLevel }[];
  /** gpas of the page-table pages written. */
  tables: bigint[];
  layout: {
    pageOffset: bigint;
    kernelVirtualBase: bigint;
    kernelPhysicalBase: bigint;
    kernelBytes: number;
    vmallocBase: bigint;
    userVa: bigint;
  };
}

/** struct task { u64 next; u64 prev; u32 pid; char comm[16]; u32 pad; } */
export const TASK_LAYOUT = Object.freeze({ next: 0, prev: 8, pid: 16, comm: 20, commLength: 16, size: 40 });

export const PAGE_OFFSET = 0xffff_8880_0000_0000n;
export const KERNEL_VIRTUAL_BASE = 0xffff_ffff_8100_0000n;
export const VMALLOC_BASE = 0xffff_c900_0000_0000n;
export const USER_VA = 0x5555_5555_4000n;

const KIB4 = 4096n;
const MIB2 = 2n * 1024n * 1024n;
const GIB1 = 1024n * 1024n * 1024n;
const VA_MASK = (1n << 48n) - 1n;
const SW_BIT_57 = 1n << 57n;
const SW_BIT_58 = 1n << 58n;
const PAT_LARGE = 1n << 12n;

/** mulberry32: small, fast, deterministic. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const idx = (va: bigint, shift: bigint): number => Number((va >> shift) & 0x1ffn);

/**
 * Builds the synthetic guest in `memory` (>= 16 MiB of RAM; 64 MiB or more
 * suggested). Only the pages it uses are written.
 */
export function buildSyntheticGuest(memory: SyntheticMemory, opts: SyntheticOptions = {}): SyntheticTruth {
  const seed = opts.seed ?? 0x5eed;
  const nTasks = opts.tasks ?? 6;
  const kernelPages = opts.kernelPages ?? 2;
  if (!Number.isInteger(nTasks) || nTasks < 3 || nTasks > 200) throw new UsageError(`buildSyntheticGuest: tasks must be an integer in 3..200, got ${nTasks}`);
  if (!Number.isInteger(kernelPages) || kernelPages < 1 || kernelPages > 64) throw new UsageError(`buildSyntheticGuest: kernelPages must be an integer in 1..64, got ${kernelPages}`);
  const end = memory.end;
  if (end < 16n * 1024n * 1024n) throw new UsageError(`buildSyntheticGuest: needs at least 16 MiB of guest memory, got ${end} bytes`);
  const rnd = prng(seed);
  const randInt = (n: number) => Math.floor(rnd() * n);

  const isRam = (gpa: bigint, len: bigint): boolean => {
    const r = memory.regionOf(gpa);
    return r !== undefined && gpa + len <= r.gpa + r.size;
  };

  // ---- kernel image: a 2 MiB-aligned physical load address (like KASLR), all RAM
  const kernelBytes = BigInt(kernelPages) * MIB2;
  const slots: bigint[] = [];
  for (let p = MIB2; p + kernelBytes <= end; p += MIB2) if (isRam(p, kernelBytes)) slots.push(p);
  if (slots.length === 0) throw new UsageError(`buildSyntheticGuest: no ${kernelPages}x2 MiB stretch of RAM for the kernel image`);
  const kernelPhys = slots[randInt(slots.length)]!;

  // ---- frame allocator: random 4 KiB RAM frames above 1 MiB, outside the kernel image
  const used = new Set<bigint>();
  const frames = Number(end / KIB4);
  const allocFrame = (): bigint => {
    for (let tries = 0; tries < 100_000; tries++) {
      const f = BigInt(256 + randInt(frames - 256)) * KIB4;
      if (used.has(f)) continue;
      if (f >= kernelPhys && f < kernelPhys + kernelBytes) continue;
      if (!isRam(f, KIB4)) continue;
      used.add(f);
      return f;
    }
    throw new UsageError('buildSyntheticGuest: could not find a free RAM frame');
  };

  // ---- page tables, built in JS and written once per table page
  const tables = new Map<bigint, Buffer>();
  const newTable = (): bigint => {
    const f = allocFrame();
    tables.set(f, Buffer.alloc(4096));
    return f;
  };
  const setEntry = (table: bigint, index: number, value: bigint) => tables.get(table)!.writeBigUInt64LE(value, index * 8);
  const getEntry = (table: bigint, index: number): bigint => tables.get(table)!.readBigUInt64LE(index * 8);
  const TABLE_FLAGS = PTE_PRESENT | PTE_RW | PTE_ACCESSED;
  const KERNEL_TABLE_FLAGS = TABLE_FLAGS;
  const USER_TABLE_FLAGS = TABLE_FLAGS | PTE_US;
  /** The next-level table under entry `index` of `table`, created on demand. */
  const child = (table: bigint, index: number, user = false): bigint => {
    const e = getEntry(table, index);
    if (e & PTE_PRESENT) return e & 0x000f_ffff_ffff_f000n;
    const t = newTable();
    setEntry(table, index, t | (user ? USER_TABLE_FLAGS : KERNEL_TABLE_FLAGS));
    return t;
  };

  const pml4 = newTable();
  const translations: SyntheticTranslation[] = [];

  // direct map: 1 GiB pages over [0, end)
  const dmPdpt = child(pml4, idx(PAGE_OFFSET, 39n));
  const gigs = Number((end + GIB1 - 1n) / GIB1);
  for (let g = 0; g < gigs; g++) {
    setEntry(dmPdpt, idx(PAGE_OFFSET, 30n) + g, (BigInt(g) * GIB1) | PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY | PTE_PS | PTE_GLOBAL | PTE_NX);
  }

  // kernel image: 2 MiB pages (text without NX, the rest NX; PAT set on the last one)
  const kPdpt = child(pml4, idx(KERNEL_VIRTUAL_BASE, 39n));
  const kPd = child(kPdpt, idx(KERNEL_VIRTUAL_BASE, 30n));
  for (let i = 0; i < kernelPages; i++) {
    const va = KERNEL_VIRTUAL_BASE + BigInt(i) * MIB2;
    let e = (kernelPhys + BigInt(i) * MIB2) | PTE_PRESENT | PTE_ACCESSED | PTE_DIRTY | PTE_PS | PTE_GLOBAL;
    if (i > 0) e |= PTE_NX | PTE_RW;
    if (i === kernelPages - 1 && kernelPages > 1) e |= PAT_LARGE;
    setEntry(kPd, idx(va, 21n), e);
  }

  // vmalloc area: 4 KiB pages onto scattered frames, one per task plus one spare
  const vPdpt = child(pml4, idx(VMALLOC_BASE, 39n));
  const vPd = child(vPdpt, idx(VMALLOC_BASE, 30n));
  const vPt = child(vPd, idx(VMALLOC_BASE, 21n));
  const taskPages: bigint[] = [];
  for (let i = 0; i <= nTasks; i++) {
    const f = allocFrame();
    taskPages.push(f);
    let e = f | PTE_PRESENT | PTE_RW | PTE_ACCESSED | PTE_DIRTY | PTE_GLOBAL | PTE_NX;
    if (i % 2 === 1) e |= SW_BIT_58; // software-available bits must be ignored
    setEntry(vPt, idx(VMALLOC_BASE + BigInt(i) * KIB4, 12n), e);
  }
  // the PTE after the last one: not present, but not zero (like a swap entry)
  const swappedVa = VMALLOC_BASE + BigInt(nTasks + 1) * KIB4;
  setEntry(vPt, idx(swappedVa, 12n), 0x0000_0000_0123_4000n | SW_BIT_57);

  // one user page
  const uPdpt = child(pml4, idx(USER_VA, 39n), true);
  const uPd = child(uPdpt, idx(USER_VA, 30n), true);
  const uPt = child(uPd, idx(USER_VA, 21n), true);
  const userFrame = allocFrame();
  setEntry(uPt, idx(USER_VA, 12n), userFrame | PTE_PRESENT | PTE_RW | PTE_US | PTE_ACCESSED | SW_BIT_57);

  // ---- kernel image contents and the banner
  if (opts.fillKernel ?? true) {
    const chunk = Buffer.alloc(Number(MIB2));
    for (let i = 0; i < kernelPages; i++) {
      for (let o = 0; o < chunk.length; o += 4) chunk.writeUInt32LE((rnd() * 4294967296) >>> 0, o);
      memory.write(kernelPhys + BigInt(i) * MIB2, chunk);
    }
  }
  const days = ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'];
  const months = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
  const two = (n: number) => String(n).padStart(2, '0');
  const banner = 'Linux version 6.1.0-kvmmem-synthetic (kvmmem@model) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) '
    + `#1 SMP PREEMPT_DYNAMIC ${days[randInt(7)]} ${months[randInt(12)]} ${two(1 + randInt(28))} ${two(randInt(24))}:${two(randInt(60))}:${two(randInt(60))} UTC 2024`;
  const bannerBytes = Buffer.from(banner + '\n\0', 'latin1');
  const bannerOff = BigInt(8 * randInt(Math.floor((Number(kernelBytes) - bannerBytes.length - 64) / 8)));
  const bannerGpa = kernelPhys + bannerOff;
  const bannerVa = KERNEL_VIRTUAL_BASE + bannerOff;
  memory.write(bannerGpa, bannerBytes);

  // ---- the task list: one task per vmalloc page at a random offset; task 1 straddles pages 1 and 2
  const names = ['swapper/0', 'init', 'kthreadd', 'rcu_gp', 'kworker/0:0H', 'kvmmem-demo', 'ksoftirqd/0', 'migration/0', 'sshd', 'bash'];
  const tasks: SyntheticTask[] = [];
  let pid = 2;
  const straddleOff = 4096 - TASK_LAYOUT.comm - 5; // comm's 6th byte is the first of the next page
  for (let i = 0; i < nTasks; i++) {
    // task 2 stays clear of the bytes task 1 spills into its page
    const low = i === 2 ? 16 : 0;
    const off = i === 1 ? straddleOff : low + 8 * randInt((4096 - TASK_LAYOUT.size - low) / 8);
    const va = VMALLOC_BASE + BigInt(i) * KIB4 + BigInt(off);
    const taskPid = i < 2 ? i : (pid += 1 + randInt(40));
    const comm = i < names.length ? names[i]! : `kworker/${i}:1`;
    tasks.push({ va, gpa: taskPages[i]! + BigInt(off), pid: taskPid, comm });
  }
  const vaToGpa = (va: bigint): bigint => taskPages[Number((va - VMALLOC_BASE) / KIB4)]! + (va & 0xfffn);
  const writeVirtual = (va: bigint, bytes: Buffer) => {
    let done = 0;
    while (done < bytes.length) {
      const cur = va + BigInt(done);
      const n = Math.min(bytes.length - done, 4096 - Number(cur & 0xfffn));
      memory.write(vaToGpa(cur), bytes.subarray(done, done + n));
      done += n;
    }
  };
  for (let i = 0; i < nTasks; i++) {
    const t = tasks[i]!;
    const s = Buffer.alloc(TASK_LAYOUT.size);
    s.writeBigUInt64LE(tasks[(i + 1) % nTasks]!.va, TASK_LAYOUT.next);
    s.writeBigUInt64LE(tasks[(i + nTasks - 1) % nTasks]!.va, TASK_LAYOUT.prev);
    s.writeUInt32LE(t.pid, TASK_LAYOUT.pid);
    s.write(t.comm.slice(0, TASK_LAYOUT.commLength - 1), TASK_LAYOUT.comm, 'latin1');
    writeVirtual(t.va, s);
  }

  // ---- write the tables
  for (const [gpa, buf] of tables) memory.write(gpa, buf);

  // ---- ground truth
  for (let i = 0; i < kernelPages; i++) {
    const o = BigInt(randInt(Number(MIB2)));
    translations.push({ va: KERNEL_VIRTUAL_BASE + BigInt(i) * MIB2 + o, gpa: kernelPhys + BigInt(i) * MIB2 + o, pageSize: 2097152 });
  }
  translations.push({ va: bannerVa, gpa: bannerGpa, pageSize: 2097152 });
  for (let i = 0; i < 3; i++) {
    const g = BigInt(randInt(Number(end)));
    translations.push({ va: PAGE_OFFSET + g, gpa: g, pageSize: 1073741824 });
  }
  for (let i = 0; i <= nTasks; i++) {
    const o = BigInt(randInt(4096));
    translations.push({ va: VMALLOC_BASE + BigInt(i) * KIB4 + o, gpa: taskPages[i]! + o, pageSize: 4096 });
  }
  translations.push({ va: USER_VA + 0x123n, gpa: userFrame + 0x123n, pageSize: 4096 });

  const sign = (va: bigint) => ((va >> 47n) & 1n ? va | ~VA_MASK & ((1n << 64n) - 1n) : va);
  const notPresent: { va: bigint; level: PagingLevel }[] = [
    { va: 0x0000_7fff_f000_0000n, level: 'PML4' }, // nothing in that PML4 slot
    { va: PAGE_OFFSET + BigInt(gigs) * GIB1 + 0x1000n, level: 'PDPT' }, // past the direct map
    { va: KERNEL_VIRTUAL_BASE + kernelBytes + 0x10n, level: 'PD' }, // past the kernel image
    { va: swappedVa + 0x80n, level: 'PT' }, // a swapped-out-like PTE
  ].map((x) => ({ va: sign(x.va), level: x.level as PagingLevel }));

  return {
    seed,
    cr3: pml4,
    banner,
    bannerGpa,
    bannerVa,
    tasks,
    taskLayout: TASK_LAYOUT,
    translations,
    notPresent,
    tables: [...tables.keys()],
    layout: {
      pageOffset: PAGE_OFFSET,
      kernelVirtualBase: KERNEL_VIRTUAL_BASE,
      kernelPhysicalBase: kernelPhys,
      kernelBytes: Number(kernelBytes),
      vmallocBase: VMALLOC_BASE,
      userVa: USER_VA,
    },
  };
}
