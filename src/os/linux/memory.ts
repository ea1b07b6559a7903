/**
 * The kernel's address space over a physical reader: the kernel image and the
 * direct map translated arithmetically (both are linear), everything else
 * (vmalloc, vmemmap, modules) by a page walk from the kernel's PGD. Typed
 * reads that check what they read is a kernel pointer, naming the struct.
 */
import { KvmmemError } from '../../errors.js';
import { hex } from '../../client/address.js';
import { AddressSpace, TranslationError, translate, type PhysReadBytes } from '../../inspect/index.js';
import { LinuxStructureError } from './errors.js';

const U64 = (1n << 64n) - 1n;
/** Bytes of the direct map checked arithmetically (4-level: 64 TiB). */
const DIRECT_MAP_SPAN = 1n << 46n;

export interface KernelLayout {
  /** Kernel PGD (CR3 without PCID and the PTI user-half bit). */
  pgd: bigint;
  levels: 4 | 5;
  /** _text, virtual and physical. */
  textVa: bigint;
  textPa: bigint;
  /** One past the image's last byte (_end), virtual. */
  endVa: bigint;
  /** page_offset_base: the direct map's start. */
  pageOffset: bigint;
}

export class KernelMemory {
  readonly reader: PhysReadBytes;
  readonly layout: KernelLayout;
  readonly space: AddressSpace;

  constructor(reader: PhysReadBytes, layout: KernelLayout) {
    this.reader = reader;
    this.layout = layout;
    this.space = new AddressSpace(reader, layout.pgd, { levels: layout.levels });
  }

  /** Is `va` a kernel-half canonical address (where kernel pointers point)? */
  isKernelPointer(va: bigint): boolean {
    return this.layout.levels === 5 ? va >= 0xff00_0000_0000_0000n : va >= 0xffff_8000_0000_0000n;
  }

  /** The physical address of `va` (linear ranges without a walk); TranslationError when unmapped. */
  async gpa(va: bigint): Promise<bigint> {
    const l = this.layout;
    if (va >= l.textVa && va < l.endVa) return l.textPa + (va - l.textVa);
    if (va >= l.pageOffset && va - l.pageOffset < DIRECT_MAP_SPAN) return va - l.pageOffset;
    return (await translate(this.reader, l.pgd, va, { levels: l.levels })).gpa;
  }

  /** `length` bytes at `va`; `what` names the structure for the error when it is not mapped. */
  async read(va: bigint, length: number, what = 'kernel memory'): Promise<Buffer> {
    const l = this.layout;
    try {
      const linear = (va >= l.textVa && va + BigInt(length) <= l.endVa) || (va >= l.pageOffset && va + BigInt(length) - l.pageOffset < DIRECT_MAP_SPAN);
      if (linear) return await this.reader.read(await this.gpa(va), length);
      return await this.space.read(va, length);
    } catch (e) {
      if (e instanceof TranslationError) throw new LinuxStructureError(what, va, `not mapped (${e.message})`);
      // a pointer to a gpa without RAM is the guest's fault; anything else (closed reader, shrunk file) is not
      if (e instanceof KvmmemError && e.code === 'EFAULT') throw new LinuxStructureError(what, va, `points at no RAM (${e.message})`);
      throw e;
    }
  }

  async u64(va: bigint, what?: string): Promise<bigint> { return (await this.read(va, 8, what)).readBigUInt64LE(0); }
  async u32(va: bigint, what?: string): Promise<number> { return (await this.read(va, 4, what)).readUInt32LE(0); }

  /** A NUL-terminated string of at most `max` bytes (a page at a time: never past an unmapped page it does not need). */
  async cstring(va: bigint, max: number, what?: string): Promise<string> {
    const parts: Buffer[] = [];
    let got = 0;
    while (got < max) {
      const cur = (va + BigInt(got)) & U64;
      const n = Math.min(max - got, 4096 - Number(cur & 0xfffn));
      const b = await this.read(cur, n, what);
      const nul = b.indexOf(0);
      if (nul >= 0) { parts.push(b.subarray(0, nul)); break; }
      parts.push(b);
      got += n;
    }
    return Buffer.concat(parts).toString('latin1');
  }

  /** Throws unless `p` is a kernel pointer (NULL allowed when `nullable`). */
  checkPointer(p: bigint, struct: string, at: bigint, field: string, nullable = false): bigint {
    if (p === 0n && nullable) return p;
    if (!this.isKernelPointer(p)) throw new LinuxStructureError(struct, at, `${field} = ${hex(p)} is not a kernel pointer`);
    return p;
  }
}
