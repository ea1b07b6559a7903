/**
 * x86-64 page-table walking over guest-physical memory: 4-level paging (and
 * 5-level, LA57) with 1 GiB and 2 MiB pages, as the MMU does it for a data
 * read (only the present bit and the page-size bit decide; access rights,
 * NX and the software-available bits are ignored).
 */
import { UsageError } from '../errors.js';
import { toAddress, type AddressLike } from '../client/address.js';
import { TranslationError, type PagingLevel } from './errors.js';

/** What a page walk needs: 8-byte little-endian reads of guest-physical memory (a PhysicalReader is one). */
export interface PhysRead {
  readU64(gpa: bigint): Promise<bigint>;
}

/** What readVirtual needs in addition: copies of guest-physical ranges. */
export interface PhysReadBytes extends PhysRead {
  read(gpa: bigint, length: number): Promise<Buffer>;
}

export type PageSize = 4096 | 2097152 | 1073741824;

export interface TranslateOptions {
  /** 4 (default) or 5 (LA57). */
  levels?: 4 | 5;
}

export interface Translation {
  /** Guest-physical address of `va`. */
  gpa: bigint;
  /** Size of the page that maps `va`. */
  pageSize: PageSize;
  /** The entries walked, outermost first (PML4E, PDPTE[, PDE[, PTE]]). */
  entries: bigint[];
}

/** Physical-address bits 12..51 of an entry (or of CR3). */
export const PTE_ADDR_MASK = 0x000f_ffff_ffff_f000n;
const PDPTE_1G_MASK = 0x000f_ffff_c000_0000n;
const PDE_2M_MASK = 0x000f_ffff_ffe0_0000n;
export const PTE_PRESENT = 1n;
export const PTE_RW = 1n << 1n;
export const PTE_US = 1n << 2n;
export const PTE_ACCESSED = 1n << 5n;
export const PTE_DIRTY = 1n << 6n;
/** PS: the entry maps a page (1 GiB in a PDPTE, 2 MiB in a PDE). */
export const PTE_PS = 1n << 7n;
export const PTE_GLOBAL = 1n << 8n;
export const PTE_NX = 1n << 63n;

const U64 = (1n << 64n) - 1n;
const LEVELS_4: readonly PagingLevel[] = ['PML4', 'PDPT', 'PD', 'PT'];
const LEVELS_5: readonly PagingLevel[] = ['PML5', 'PML4', 'PDPT', 'PD', 'PT'];

/** Is `va` canonical for `levels`-level paging (bits 63..47, or 63..56, all equal)? */
export function isCanonical(va: bigint, levels: 4 | 5 = 4): boolean {
  const top = levels === 5 ? 56n : 47n;
  const high = va >> top; // bits 63..top
  return high === 0n || high === (U64 >> top);
}

/** Sign-extends a 48-bit (or 57-bit) address to its canonical form. */
export function canonical(va: bigint, levels: 4 | 5 = 4): bigint {
  const top = levels === 5 ? 56n : 47n;
  const low = va & ((1n << (top + 1n)) - 1n);
  return (low >> top) & 1n ? low | (U64 ^ ((1n << (top + 1n)) - 1n)) : low;
}

function checkLevels(levels: unknown): 4 | 5 {
  if (levels !== 4 && levels !== 5) throw new UsageError(`levels must be 4 or 5, got ${String(levels)}`);
  return levels;
}

/**
 * Translates guest-virtual `va` through the page tables rooted at `cr3`
 * (bits 12..51 taken; PCID and flag bits ignored). Throws TranslationError
 * 'ERR_NON_CANONICAL' for a non-canonical va and 'ERR_PAGE_NOT_PRESENT' naming
 * the level whose entry is not present.
 */
export async function translate(read: PhysRead, cr3: AddressLike, va: AddressLike, opts: TranslateOptions = {}): Promise<Translation> {
  const levels = checkLevels(opts.levels ?? 4);
  const root = toAddress(cr3, 'cr3');
  const v = toAddress(va, 'va');
  if (!isCanonical(v, levels)) throw new TranslationError('ERR_NON_CANONICAL', { va: v, cr3: root }, levels);
  const names = levels === 5 ? LEVELS_5 : LEVELS_4;
  const entries: bigint[] = [];
  let table = root & PTE_ADDR_MASK;
  for (let i = 0; i < names.length; i++) {
    const shift = BigInt(12 + 9 * (names.length - 1 - i)); // PT: 12, PD: 21, PDPT: 30, PML4: 39, PML5: 48
    const index = (v >> shift) & 0x1ffn;
    const entryGpa = table + index * 8n;
    const entry = await read.readU64(entryGpa);
    entries.push(entry);
    const level = names[i]!;
    if ((entry & PTE_PRESENT) === 0n) {
      throw new TranslationError('ERR_PAGE_NOT_PRESENT', { va: v, cr3: root, level, entryGpa, entryValue: entry }, levels);
    }
    if (level === 'PDPT' && (entry & PTE_PS)) {
      return { gpa: (entry & PDPTE_1G_MASK) | (v & 0x3fff_ffffn), pageSize: 1073741824, entries };
    }
    if (level === 'PD' && (entry & PTE_PS)) {
      return { gpa: (entry & PDE_2M_MASK) | (v & 0x1f_ffffn), pageSize: 2097152, entries };
    }
    table = entry & PTE_ADDR_MASK;
  }
  return { gpa: table | (v & 0xfffn), pageSize: 4096, entries };
}

/**
 * Reads `length` bytes of guest-virtual memory at `va`: every page is
 * translated on its own (a huge page once for all of its bytes), so a range
 * that is contiguous virtually but not physically comes out right. Throws
 * TranslationError for the first byte that is not mapped.
 */
export async function readVirtual(reader: PhysReadBytes, cr3: AddressLike, va: AddressLike, length: number, opts: TranslateOptions = {}): Promise<Buffer> {
  if (!Number.isSafeInteger(length) || length < 0) throw new UsageError(`readVirtual: length must be a non-negative integer, got ${length}`);
  const levels = checkLevels(opts.levels ?? 4);
  const start = toAddress(va, 'va');
  const out = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    // Virtual addresses wrap like the CPU's (0xffff_ffff_ffff_ffff + 1 -> 0, then non-canonical checks apply).
    const cur = (start + BigInt(done)) & U64;
    const t = await translate(reader, cr3, cur, { levels });
    const inPage = Number(cur & BigInt(t.pageSize - 1));
    const n = Math.min(length - done, t.pageSize - inPage);
    const bytes = await reader.read(t.gpa, n);
    bytes.copy(out, done);
    done += n;
  }
  return out;
}

/**
 * One guest address space (a CR3) over a physical reader: virtual reads and
 * translations. Nothing is cached: every access walks the tables (which the
 * guest may change at any time); the physical reader's page cache makes the
 * repeated walks cheap.
 */
export class AddressSpace {
  readonly reader: PhysReadBytes;
  readonly cr3: bigint;
  readonly levels: 4 | 5;

  constructor(reader: PhysReadBytes, cr3: AddressLike, opts: TranslateOptions = {}) {
    this.reader = reader;
    this.cr3 = toAddress(cr3, 'cr3');
    this.levels = checkLevels(opts.levels ?? 4);
  }

  translate(va: AddressLike): Promise<Translation> {
    return translate(this.reader, this.cr3, va, { levels: this.levels });
  }

  /** Guest-physical address of `va`, or null when it is not mapped (non-canonical still throws). */
  async gpaOf(va: AddressLike): Promise<bigint | null> {
    try {
      return (await this.translate(va)).gpa;
    } catch (e) {
      if (e instanceof TranslationError && e.code === 'ERR_PAGE_NOT_PRESENT') return null;
      throw e;
    }
  }

  read(va: AddressLike, length: number): Promise<Buffer> {
    return readVirtual(this.reader, this.cr3, va, length, { levels: this.levels });
  }

  async readU64(va: AddressLike): Promise<bigint> {
    return (await this.read(va, 8)).readBigUInt64LE(0);
  }

  async readU32(va: AddressLike): Promise<number> {
    return (await this.read(va, 4)).readUInt32LE(0);
  }

  /** A NUL-terminated latin1 string of at most `max` bytes (without the NUL). */
  async readCString(va: AddressLike, max = 256): Promise<string> {
    // Page by page, so a short string before an unmapped page reads fine.
    const start = toAddress(va, 'va');
    const parts: Buffer[] = [];
    let got = 0;
    while (got < max) {
      const cur = (start + BigInt(got)) & U64;
      const n = Math.min(max - got, 4096 - Number(cur & 0xfffn));
      const b = await this.read(cur, n);
      const nul = b.indexOf(0);
      if (nul >= 0) { parts.push(b.subarray(0, nul)); break; }
      parts.push(b);
      got += n;
    }
    return Buffer.concat(parts).toString('latin1');
  }
}
