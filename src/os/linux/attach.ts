/**
 * Finding the kernel in guest-physical memory, with no profile:
 * - from CR3: PGD[511] -> PUD[510] -> the kernel-map PMD, whose first present
 *   entry maps _text (early boot clears the entries below it); 5-level paging
 *   adds PML5[511] first. With page-table isolation CR3 may be the user half
 *   of an 8 KiB pair: bit 12 is cleared.
 * - without CR3: kallsyms found in all of RAM, then the physical base P that
 *   passes three checks together (one alone gave false hits): the u64 at
 *   phys_base equals P - (_text - __START_KERNEL_map); _text walked through
 *   init_top_pgt lands on P; linux_banner starts with "Linux version ".
 */
import { hex } from '../../client/address.js';
import { PTE_ADDR_MASK, PTE_PRESENT, PTE_PS, scan, translate, type PhysicalReader } from '../../inspect/index.js';
import { LinuxNotFoundError } from './errors.js';
import { KALLSYMS_DIGITS, locateKallsyms, type KernelSymbols } from './kallsyms.js';

/** __START_KERNEL_map: the kernel image's virtual window starts here (KASLR moves _text inside it). */
export const START_KERNEL_MAP = 0xffff_ffff_8000_0000n;
const MIB2 = 2n << 20n;

export interface KernelBase {
  pgd: bigint;
  levels: 4 | 5;
  textVa: bigint;
  textPa: bigint;
  /** How many bytes of the image the kernel map covers from _text (last present 2 MiB entry). */
  mappedBytes: bigint;
}

/** The kernel's base from its page tables, or why not. */
export async function baseFromCr3(reader: PhysicalReader, cr3: bigint, levels?: 4 | 5): Promise<KernelBase> {
  const tried: string[] = [];
  // PCID bits away; with PTI the kernel half is the even page of the pair (its user half maps only the entry code)
  const pgds = [...new Set([cr3 & PTE_ADDR_MASK & ~0x1000n, cr3 & PTE_ADDR_MASK])];
  for (const pgd of pgds) {
    const b = await baseFromPgd(reader, pgd, levels, tried);
    if (b !== null) return b;
  }
  throw new LinuxNotFoundError(`no kernel map under CR3 ${hex(cr3)}: ${tried.join('; ')}`, 'give the CR3 of a vCPU of this guest (QEMU: info registers), or no CR3 to search the RAM');
}

async function baseFromPgd(reader: PhysicalReader, pgd: bigint, levels: 4 | 5 | undefined, tried: string[]): Promise<KernelBase | null> {
  for (const lv of levels === undefined ? [4, 5] as const : [levels]) {
    let table = pgd;
    const path = lv === 5 ? [511, 511, 510] : [511, 510];
    let ok = true;
    for (const [depth, i] of path.entries()) {
      const e = await reader.readU64(table + BigInt(i) * 8n);
      if ((e & PTE_PRESENT) === 0n || (e & PTE_PS) !== 0n) { tried.push(`PGD ${hex(pgd)}, ${lv}-level: entry ${i} at level ${depth} is ${hex(e)}`); ok = false; break; }
      table = e & PTE_ADDR_MASK;
    }
    if (!ok) continue;
    const pmd = await reader.read(table, 4096);
    let first = -1, last = -1;
    for (let i = 0; i < 512; i++) {
      if ((pmd.readBigUInt64LE(i * 8) & PTE_PRESENT) !== 0n) { if (first < 0) first = i; last = i; }
    }
    if (first < 0) { tried.push(`PGD ${hex(pgd)}, ${lv}-level: the kernel-map PMD at ${hex(table)} is empty`); continue; }
    const e = pmd.readBigUInt64LE(first * 8);
    let textPa: bigint;
    if (e & PTE_PS) textPa = e & 0x000f_ffff_ffe0_0000n;
    else textPa = (await reader.readU64(e & PTE_ADDR_MASK)) & PTE_ADDR_MASK; // split into 4 KiB pages
    const textVa = START_KERNEL_MAP + BigInt(first) * MIB2;
    // the walk must agree with the arithmetic (a page-table-looking page that is none would not)
    const t = await translate(reader, pgd, textVa, { levels: lv }).catch(() => null);
    if (t === null || t.gpa !== textPa) { tried.push(`PGD ${hex(pgd)}, ${lv}-level: walking ${hex(textVa)} does not land on ${hex(textPa)}`); continue; }
    return { pgd, levels: lv, textVa, textPa, mappedBytes: BigInt(last - first + 1) * MIB2 };
  }
  return null;
}

/** kallsyms in guest-physical [from, to). */
export async function findKallsyms(reader: PhysicalReader, from: bigint, to: bigint): Promise<KernelSymbols> {
  const res = await scan(reader.session, reader.vm, KALLSYMS_DIGITS, { from, to, maxMatches: 256 });
  const read = async (gpa: bigint, n: number) => {
    // holes (no RAM) read as zeros here: the windows are large and may touch one
    try { return await reader.read(gpa, n); } catch {
      const out = Buffer.alloc(n);
      for (let o = 0; o < n; o += 4096) {
        const k = Math.min(4096 - Number((gpa + BigInt(o)) & 0xfffn), n - o);
        try { (await reader.read(gpa + BigInt(o), k)).copy(out, o); } catch { /* hole */ }
      }
      return out;
    }
  };
  return locateKallsyms(res.matches, read, { from, to });
}

/** The physical base by the three checks, given the symbols (search path). */
export async function physicalBaseBySymbols(reader: PhysicalReader, syms: KernelSymbols, end: bigint, hint?: bigint): Promise<{ textPa: bigint; pgd: bigint; levels: 4 | 5 }> {
  const text = syms.address('_text');
  const physBase = syms.address('phys_base');
  const topPgt = syms.address('init_top_pgt');
  const banner = syms.address('linux_banner');
  const l5 = syms.lookup('__pgtable_l5_enabled');
  const image = syms.address('_end') - text;
  const tried: string[] = [];
  const candidates: bigint[] = [];
  if (hint !== undefined) candidates.push(hint - (hint % MIB2));
  for (let p = 0n; p + image <= end; p += MIB2) candidates.push(p);
  for (const p of candidates) {
    const pa = (va: bigint) => p + (va - text);
    try {
      if ((await reader.readU64(pa(physBase))) !== BigInt.asUintN(64, p - (text - START_KERNEL_MAP))) continue; // negative under KASLR: modulo 2^64
      const levels: 4 | 5 = l5 !== undefined && (await reader.readU32(pa(l5))) === 1 ? 5 : 4;
      const walked = await translate(reader, pa(topPgt), text, { levels }).catch(() => null);
      if (walked?.gpa !== p) { tried.push(`${hex(p)}: phys_base fits, the walk does not`); continue; }
      if ((await reader.read(pa(banner), 14)).toString('latin1') !== 'Linux version ') { tried.push(`${hex(p)}: no banner`); continue; }
      return { textPa: p, pgd: pa(topPgt), levels };
    } catch { /* a candidate reaching a hole */ }
  }
  throw new LinuxNotFoundError(`kallsyms found (_text ${hex(text)}) but no physical base below ${hex(end)} passes the phys_base, init_top_pgt and linux_banner checks${tried.length ? ` (${tried.slice(0, 4).join('; ')})` : ''}`);
}
