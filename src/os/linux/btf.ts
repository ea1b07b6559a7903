/**
 * BTF (include/uapi/linux/btf.h) parsed from the kernel's own memory
 * (`__start_BTF`..`__stop_BTF`, CONFIG_DEBUG_INFO_BTF): the real layout of every
 * structure of this build, struct randomisation included. Record offsets are
 * indexed once (typed arrays); names and members are decoded on first use.
 */
import { LinuxNoSuchError, LinuxStructureError } from './errors.js';

export const BTF_MAGIC = 0xeb9f;

export const BtfKind = {
  UNKN: 0, INT: 1, PTR: 2, ARRAY: 3, STRUCT: 4, UNION: 5, ENUM: 6, FWD: 7, TYPEDEF: 8, VOLATILE: 9, CONST: 10,
  RESTRICT: 11, FUNC: 12, FUNC_PROTO: 13, VAR: 14, DATASEC: 15, FLOAT: 16, DECL_TAG: 17, TYPE_TAG: 18, ENUM64: 19,
} as const;
const KIND_NAMES = Object.fromEntries(Object.entries(BtfKind).map(([k, v]) => [v, k.toLowerCase()])) as Record<number, string>;

export interface BtfMember {
  name: string;
  /** Type id of the member. */
  type: number;
  /** Offset from the start of the struct, in bits. */
  bitOffset: number;
  /** Bit-field width, 0 for a plain member. */
  bitSize: number;
}

/** A member found by offsetOf/member: byte offset from the start of the outer struct (anonymous members descended). */
export interface ResolvedMember extends BtfMember {
  /** Byte offset (bitOffset / 8, rounded down for bit-fields). */
  offset: number;
  /** Size in bytes of the member's type (0 for a flexible array). */
  size: number;
}

export interface BtfEnumerator { name: string; value: bigint }

/** Bytes after the 12-byte btf_type header, by kind (vlen: per entry). */
function extraBytes(kind: number, vlen: number): number {
  switch (kind) {
    case BtfKind.INT: case BtfKind.VAR: case BtfKind.DECL_TAG: return 4;
    case BtfKind.ARRAY: return 12;
    case BtfKind.STRUCT: case BtfKind.UNION: case BtfKind.DATASEC: case BtfKind.ENUM64: return 12 * vlen;
    case BtfKind.ENUM: case BtfKind.FUNC_PROTO: return 8 * vlen;
    case BtfKind.PTR: case BtfKind.FWD: case BtfKind.TYPEDEF: case BtfKind.VOLATILE: case BtfKind.CONST:
    case BtfKind.RESTRICT: case BtfKind.FUNC: case BtfKind.FLOAT: case BtfKind.TYPE_TAG: return 0;
    default: return -1;
  }
}

export class Btf {
  /** The blob (a copy), and where it was read from (for errors). */
  readonly data: Buffer;
  readonly address: bigint;
  readonly #typeStart: number;
  readonly #strStart: number;
  readonly #strLen: number;
  /** Per type id (1-based; [0] unused): byte offset of its record in data. */
  readonly #rec: Uint32Array;
  readonly count: number;
  #byName: Map<string, number[]> | undefined;
  readonly #members = new Map<number, BtfMember[]>();

  private constructor(data: Buffer, address: bigint, typeStart: number, strStart: number, strLen: number, rec: Uint32Array, count: number) {
    this.data = data;
    this.address = address;
    this.#typeStart = typeStart;
    this.#strStart = strStart;
    this.#strLen = strLen;
    this.#rec = rec;
    this.count = count;
  }

  /** The header's total size (header + both sections), or null when `head` (>= 24 bytes) is no BTF header. */
  static sizeFromHeader(head: Buffer): number | null {
    if (head.length < 24 || head.readUInt16LE(0) !== BTF_MAGIC || head[2] !== 1) return null;
    const hdrLen = head.readUInt32LE(4);
    if (hdrLen < 24 || hdrLen > 4096) return null;
    const typeEnd = head.readUInt32LE(8) + head.readUInt32LE(12);
    const strEnd = head.readUInt32LE(16) + head.readUInt32LE(20);
    return hdrLen + Math.max(typeEnd, strEnd);
  }

  /**
   * Parses a whole (base, not split) BTF blob. Every record must lie inside the
   * type section, every name inside the string section and every referenced
   * type id exist: a truncated or damaged blob is a LinuxStructureError.
   */
  static parse(data: Buffer, address = 0n): Btf {
    const bad = (why: string): never => { throw new LinuxStructureError('btf', address, why); };
    if (data.length < 24) bad(`${data.length} bytes, shorter than a BTF header`);
    if (data.readUInt16LE(0) !== BTF_MAGIC) bad(`magic 0x${data.readUInt16LE(0).toString(16)}, not 0xeb9f`);
    if (data[2] !== 1) bad(`version ${data[2]}, not 1`);
    const hdrLen = data.readUInt32LE(4);
    const typeOff = data.readUInt32LE(8), typeLen = data.readUInt32LE(12);
    const strOff = data.readUInt32LE(16), strLen = data.readUInt32LE(20);
    if (hdrLen < 24 || hdrLen > data.length) bad(`header length ${hdrLen}`);
    const typeStart = hdrLen + typeOff, strStart = hdrLen + strOff;
    if (typeStart + typeLen > data.length) bad(`type section [${typeStart}, +${typeLen}) past the end of ${data.length} bytes (truncated)`);
    if (strStart + strLen > data.length) bad(`string section [${strStart}, +${strLen}) past the end of ${data.length} bytes (truncated)`);
    if (strLen === 0 || data[strStart] !== 0 || data[strStart + strLen - 1] !== 0) bad('string section does not start and end with NUL');
    // Index the records: 12-byte header + kind-dependent tail.
    let rec = new Uint32Array(1 << 16);
    let n = 0;
    const end = typeStart + typeLen;
    for (let p = typeStart; p < end;) {
      if (p + 12 > end) bad(`type ${n + 1} at section offset ${p - typeStart}: header cut by the end of the section`);
      const info = data.readUInt32LE(p + 4);
      const kind = (info >>> 24) & 0x1f;
      const extra = extraBytes(kind, info & 0xffff);
      if (extra < 0) bad(`type ${n + 1}: unknown kind ${kind}`);
      if (data.readUInt32LE(p) >= strLen) bad(`type ${n + 1}: name offset ${data.readUInt32LE(p)} past the string section (${strLen})`);
      if (p + 12 + extra > end) bad(`type ${n + 1} (${KIND_NAMES[kind]}) at section offset ${p - typeStart}: cut by the end of the section`);
      n++;
      if (n >= rec.length) { const r = new Uint32Array(rec.length * 2); r.set(rec); rec = r; }
      rec[n] = p;
      p += 12 + extra;
    }
    const btf = new Btf(data, address, typeStart, strStart, strLen, rec, n);
    // References must point at existing types (0 = void).
    for (let id = 1; id <= n; id++) {
      const k = btf.kind(id);
      const refs: number[] = [];
      if (k === BtfKind.PTR || k === BtfKind.TYPEDEF || k === BtfKind.VOLATILE || k === BtfKind.CONST || k === BtfKind.RESTRICT || k === BtfKind.TYPE_TAG || k === BtfKind.VAR || k === BtfKind.FUNC) refs.push(btf.#u32(id, 8));
      else if (k === BtfKind.ARRAY) refs.push(btf.#u32(id, 12), btf.#u32(id, 16));
      for (const r of refs) if (r > n) bad(`type ${id} (${KIND_NAMES[k]}) refers to type ${r}, past the last (${n})`);
    }
    return btf;
  }

  #u32(id: number, at: number): number { return this.data.readUInt32LE(this.#rec[id]! + at); }

  #check(id: number): void {
    if (!Number.isInteger(id) || id < 1 || id > this.count) throw new LinuxNoSuchError(`BTF type id ${id} does not exist (1..${this.count})`);
  }

  /** A string of the string section. */
  str(off: number): string {
    if (off >= this.#strLen) throw new LinuxStructureError('btf', this.address, `string offset ${off} past the string section`);
    const s = this.#strStart + off;
    const e = this.data.indexOf(0, s);
    return this.data.toString('latin1', s, e < 0 ? this.#strStart + this.#strLen : e);
  }

  kind(id: number): number { this.#check(id); return (this.#u32(id, 4) >>> 24) & 0x1f; }
  kindName(id: number): string { return KIND_NAMES[this.kind(id)]!; }
  name(id: number): string { this.#check(id); return this.str(this.#u32(id, 0)); }
  vlen(id: number): number { this.#check(id); return this.#u32(id, 4) & 0xffff; }
  #kindFlag(id: number): boolean { return (this.#u32(id, 4) >>> 31) === 1; }

  /** Type ids with this name (any kind), or of one kind. */
  byName(name: string, kind?: number): number[] {
    if (this.#byName === undefined) {
      const m = new Map<string, number[]>();
      for (let id = 1; id <= this.count; id++) {
        const off = this.#u32(id, 0);
        if (off === 0) continue;
        const nm = this.str(off);
        const l = m.get(nm);
        if (l === undefined) m.set(nm, [id]); else l.push(id);
      }
      this.#byName = m;
    }
    const ids = this.#byName.get(name) ?? [];
    return kind === undefined ? ids : ids.filter((id) => this.kind(id) === kind);
  }

  /** Follows typedef/const/volatile/restrict/type_tag to the type underneath (bounded: a cycle is a damaged blob). */
  resolve(id: number): number {
    for (let hops = 0; hops < 64; hops++) {
      if (id === 0) return 0;
      const k = this.kind(id);
      if (k !== BtfKind.TYPEDEF && k !== BtfKind.CONST && k !== BtfKind.VOLATILE && k !== BtfKind.RESTRICT && k !== BtfKind.TYPE_TAG) return id;
      id = this.#u32(id, 8);
    }
    throw new LinuxStructureError('btf', this.address, `type ${id}: more than 64 typedef/qualifier hops (a cycle)`);
  }

  /** The pointed-to / element type of a pointer, array, typedef, var... */
  target(id: number): number {
    const k = this.kind(id);
    if (k === BtfKind.ARRAY) return this.#u32(id, 12);
    return this.#u32(id, 8);
  }

  /** Element count of an array. */
  arrayLength(id: number): number {
    if (this.kind(id) !== BtfKind.ARRAY) throw new LinuxNoSuchError(`BTF type ${id} is a ${this.kindName(id)}, not an array`);
    return this.#u32(id, 20);
  }

  /** Size in bytes (pointers 8; arrays elements x count; qualifiers resolved). */
  sizeOf(id: number): number {
    for (let hops = 0; hops < 64; hops++) {
      if (id === 0) return 0;
      const k = this.kind(id);
      switch (k) {
        case BtfKind.INT: case BtfKind.STRUCT: case BtfKind.UNION: case BtfKind.ENUM: case BtfKind.ENUM64: case BtfKind.FLOAT: case BtfKind.DATASEC:
          return this.#u32(id, 8);
        case BtfKind.PTR: return 8;
        case BtfKind.ARRAY: return this.sizeOf(this.#u32(id, 12)) * this.#u32(id, 20);
        case BtfKind.TYPEDEF: case BtfKind.CONST: case BtfKind.VOLATILE: case BtfKind.RESTRICT: case BtfKind.TYPE_TAG: case BtfKind.VAR:
          id = this.#u32(id, 8); continue;
        default: return 0;
      }
    }
    throw new LinuxStructureError('btf', this.address, `type ${id}: more than 64 hops sizing it (a cycle)`);
  }

  /** The struct or union named `name` (the one with members when forward declarations share the name). */
  structId(name: string): number {
    const ids = this.byName(name).filter((id) => { const k = this.kind(id); return k === BtfKind.STRUCT || k === BtfKind.UNION; });
    if (ids.length === 0) throw new LinuxNoSuchError(`no struct or union '${name}' in the kernel's BTF`);
    return ids.find((id) => this.vlen(id) > 0) ?? ids[0]!;
  }

  /** Direct members of a struct/union (anonymous ones as they are, name ''). */
  members(id: number): BtfMember[] {
    const k = this.kind(id);
    if (k !== BtfKind.STRUCT && k !== BtfKind.UNION) throw new LinuxNoSuchError(`BTF type ${id} '${this.name(id)}' is a ${this.kindName(id)}, not a struct or union`);
    let ms = this.#members.get(id);
    if (ms !== undefined) return ms;
    ms = [];
    const flag = this.#kindFlag(id);
    const base = this.#rec[id]! + 12;
    for (let i = 0; i < this.vlen(id); i++) {
      const p = base + 12 * i;
      const type = this.data.readUInt32LE(p + 4);
      if (type > this.count) throw new LinuxStructureError('btf', this.address, `struct ${this.name(id)} member ${i} refers to type ${type}, past the last (${this.count})`);
      const off = this.data.readUInt32LE(p + 8);
      ms.push({ name: this.str(this.data.readUInt32LE(p)), type, bitOffset: flag ? off & 0xffffff : off, bitSize: flag ? off >>> 24 : 0 });
    }
    this.#members.set(id, ms);
    return ms;
  }

  /**
   * A member by name, or by a dotted path ('mm.arg_start' style paths go through
   * embedded structs, not pointers), descending into anonymous structs/unions.
   */
  member(struct: string | number, path: string): ResolvedMember {
    let id = typeof struct === 'number' ? struct : this.structId(struct);
    let offsetBits = 0;
    let found: BtfMember | undefined;
    const parts = path.split('.');
    for (let i = 0; i < parts.length; i++) {
      const sid = this.resolve(id);
      const hit = this.#find(sid, parts[i]!, 0);
      if (hit === undefined) {
        throw new LinuxNoSuchError(`no member '${parts.slice(0, i + 1).join('.')}' in ${this.kindName(sid)} ${this.name(sid) || `#${sid}`} (kernel BTF)`);
      }
      offsetBits += hit.bitOffset;
      found = hit;
      id = hit.type;
    }
    return { ...found!, bitOffset: offsetBits, offset: Math.floor(offsetBits / 8), size: this.sizeOf(found!.type) };
  }

  /** Byte offset of `path` in `struct`. */
  offsetOf(struct: string | number, path: string): number {
    return this.member(struct, path).offset;
  }

  /** Does the struct have this member (anonymous members descended)? */
  hasMember(struct: string | number, path: string): boolean {
    try {
      this.member(struct, path);
      return true;
    } catch (e) {
      if (e instanceof LinuxNoSuchError) return false;
      throw e;
    }
  }

  #find(sid: number, name: string, depth: number): BtfMember | undefined {
    if (depth > 32) throw new LinuxStructureError('btf', this.address, `struct #${sid}: anonymous members nested more than 32 deep`);
    const k = this.kind(sid);
    if (k !== BtfKind.STRUCT && k !== BtfKind.UNION) return undefined;
    const ms = this.members(sid);
    for (const m of ms) if (m.name === name) return m;
    for (const m of ms) {
      if (m.name !== '') continue;
      const inner = this.#find(this.resolve(m.type), name, depth + 1);
      if (inner !== undefined) return { ...inner, bitOffset: inner.bitOffset + m.bitOffset };
    }
    return undefined;
  }

  /** Enumerators of an enum / enum64 type. */
  enumerators(id: number): BtfEnumerator[] {
    const k = this.kind(id);
    const base = this.#rec[id]! + 12;
    const out: BtfEnumerator[] = [];
    if (k === BtfKind.ENUM) {
      const signed = this.#kindFlag(id);
      for (let i = 0; i < this.vlen(id); i++) {
        const p = base + 8 * i;
        out.push({ name: this.str(this.data.readUInt32LE(p)), value: BigInt(signed ? this.data.readInt32LE(p + 4) : this.data.readUInt32LE(p + 4)) });
      }
    } else if (k === BtfKind.ENUM64) {
      for (let i = 0; i < this.vlen(id); i++) {
        const p = base + 12 * i;
        out.push({ name: this.str(this.data.readUInt32LE(p)), value: (BigInt(this.data.readUInt32LE(p + 8)) << 32n) | BigInt(this.data.readUInt32LE(p + 4)) });
      }
    } else {
      throw new LinuxNoSuchError(`BTF type ${id} is a ${this.kindName(id)}, not an enum`);
    }
    return out;
  }

  /** The value of an enumerator, searched in every enum (enumerator names are global in C). */
  enumValue(name: string): bigint {
    for (let id = 1; id <= this.count; id++) {
      const k = this.kind(id);
      if (k !== BtfKind.ENUM && k !== BtfKind.ENUM64) continue;
      for (const e of this.enumerators(id)) if (e.name === name) return e.value;
    }
    throw new LinuxNoSuchError(`no enumerator '${name}' in the kernel's BTF`);
  }

  /** Size in bytes of a named struct/union. */
  structSize(name: string): number { return this.sizeOf(this.structId(name)); }
}
