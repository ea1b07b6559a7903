/**
 * Reading kernel structures by member name: offsets and sizes from BTF, one
 * read covering every member asked for. No offset is written in the code.
 */
import { hex } from '../../client/address.js';
import type { Btf, ResolvedMember } from './btf.js';
import { LinuxStructureError } from './errors.js';
import type { KernelMemory } from './memory.js';

/** The members of one struct a view reads, resolved once. */
export class StructLayout {
  readonly struct: string;
  readonly size: number;
  readonly members: ReadonlyMap<string, ResolvedMember>;
  readonly #lo: number;
  readonly #hi: number;

  constructor(btf: Btf, struct: string, paths: readonly string[]) {
    this.struct = struct;
    this.size = btf.structSize(struct);
    const m = new Map<string, ResolvedMember>();
    let lo = Infinity, hi = 0;
    for (const p of paths) {
      const r = btf.member(struct, p);
      m.set(p, r);
      lo = Math.min(lo, r.offset);
      hi = Math.max(hi, r.offset + Math.max(r.size, Math.ceil((r.bitOffset % 8 + r.bitSize) / 8)));
    }
    this.members = m;
    this.#lo = lo === Infinity ? 0 : lo;
    this.#hi = hi;
  }

  offset(path: string): number {
    const r = this.members.get(path);
    if (r === undefined) throw new Error(`StructLayout ${this.struct}: '${path}' was not declared`);
    return r.offset;
  }

  /** Reads the members of the struct at `addr` (one read of the span they cover). */
  async read(mem: KernelMemory, addr: bigint): Promise<StructView> {
    const buf = await mem.read(addr + BigInt(this.#lo), this.#hi - this.#lo, `struct ${this.struct}`);
    return new StructView(this, addr, buf, this.#lo);
  }
}

export class StructView {
  constructor(readonly layout: StructLayout, readonly address: bigint, readonly buf: Buffer, private readonly base: number) {}

  #m(path: string): ResolvedMember {
    const r = this.layout.members.get(path);
    if (r === undefined) throw new Error(`StructView ${this.layout.struct}: '${path}' was not declared`);
    return r;
  }

  /** Address of a member in the guest. */
  addr(path: string): bigint { return this.address + BigInt(this.#m(path).offset); }

  /** An unsigned integer member of 1, 2, 4 or 8 bytes, or a bit-field (as bigint). */
  big(path: string): bigint {
    const r = this.#m(path);
    const o = r.offset - this.base;
    if (r.bitSize > 0) {
      const first = Math.floor(r.bitOffset / 8);
      let v = 0n;
      const nbytes = Math.ceil(((r.bitOffset % 8) + r.bitSize) / 8);
      for (let i = nbytes - 1; i >= 0; i--) v = (v << 8n) | BigInt(this.buf[first - this.base + i]!);
      return (v >> BigInt(r.bitOffset % 8)) & ((1n << BigInt(r.bitSize)) - 1n);
    }
    switch (r.size) {
      case 1: return BigInt(this.buf[o]!);
      case 2: return BigInt(this.buf.readUInt16LE(o));
      case 4: return BigInt(this.buf.readUInt32LE(o));
      case 8: return this.buf.readBigUInt64LE(o);
      default: throw new LinuxStructureError(`struct ${this.layout.struct}`, this.address, `member ${path} is ${r.size} bytes, not an integer`);
    }
  }

  num(path: string): number { return Number(this.big(path)); }

  /** A signed 32-bit member (pid_t, int). */
  i32(path: string): number { return this.buf.readInt32LE(this.#m(path).offset - this.base); }

  /** A char array member, up to its NUL. */
  chars(path: string): string {
    const r = this.#m(path);
    const o = r.offset - this.base;
    const b = this.buf.subarray(o, o + r.size);
    const nul = b.indexOf(0);
    return b.toString('latin1', 0, nul < 0 ? b.length : nul);
  }

  /** A pointer member, checked to be a kernel pointer (or NULL when nullable). */
  ptr(mem: KernelMemory, path: string, nullable = false): bigint {
    const p = this.big(path);
    if (p === 0n && nullable) return 0n;
    if (!mem.isKernelPointer(p)) throw new LinuxStructureError(`struct ${this.layout.struct}`, this.address, `${path} = ${hex(p)} is not a kernel pointer`);
    return p;
  }
}
