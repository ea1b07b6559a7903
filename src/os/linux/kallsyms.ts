/**
 * kallsyms decoded from the kernel's memory (scripts/kallsyms.c writes these
 * tables into .rodata; CONFIG_KALLSYMS_ALL adds the data symbols).
 *
 * Layouts decoded here (base-relative), each table 8-byte aligned:
 *   4.6 .. 6.3: kallsyms_offsets[N] (s32), kallsyms_relative_base (u64), kallsyms_num_syms (u32),
 *     kallsyms_names, kallsyms_markers[ceil(N/256)] (u32),
 *     [kallsyms_seqs_of_names[N] (3 bytes each), 6.2+ and Debian's 6.1],
 *     kallsyms_token_table (256 NUL-terminated strings), kallsyms_token_index[256] (u16);
 *   6.4 ..: kallsyms_num_syms, names, markers, token_table, token_index, then
 *     kallsyms_offsets, kallsyms_relative_base, kallsyms_seqs_of_names.
 * Offsets with absolute percpu (x86): non-negative ones absolute, the rest
 * relative_base - 1 - offset; without it (no negative offset at all)
 * relative_base + offset. Mainline's PC-relative offsets are refused by name.
 * Names: a ULEB128 length (1-2 bytes), then that many token indexes; the
 * first character of the expanded name is the type letter.
 *
 * Found by its digits: every character of a name has a one-character token,
 * so tokens 0x30..0x39 are "0".."9"; from there, 48 tokens back is the
 * table's start, and every other table is checked against the ones found.
 */
import { hex } from '../../client/address.js';
import { LinuxNoSuchError, LinuxNotFoundError, LinuxUnsupportedError } from './errors.js';

/** The anchor: tokens 0x30..0x39 of kallsyms_token_table. */
export const KALLSYMS_DIGITS = Buffer.from('0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00', 'latin1');

/** Reads guest-physical bytes; throws where there is no RAM. */
export type PhysBytes = (gpa: bigint, length: number) => Promise<Buffer>;

export interface KallsymsLocation {
  /** Guest-physical addresses of the tables found. */
  tokenTable: bigint;
  tokenIndex: bigint;
  markers: bigint;
  names: bigint;
  numSyms: bigint;
  relativeBase: bigint;
  offsets: bigint;
  /** kallsyms_seqs_of_names, when the kernel has it. */
  seqsOfNames: bigint | null;
}

export interface KernelSymbol {
  name: string;
  /** The type letter as /proc/kallsyms prints it (T, t, D, d, A, ...). */
  type: string;
  address: bigint;
}

const MAX_TOKEN = 64;
const MARKER_STEP_MIN = 256 * 2; // each name: a length byte and at least one token
const MARKER_STEP_MAX = 256 * 1024;

const align = (v: number, a: number) => Math.ceil(v / a) * a;

/** The token table around an anchor, or why not. `buf` holds guest-physical [bufGpa, +len). */
function tokensAt(buf: Buffer, anchor: number): { start: number; end: number; offsets: number[]; tokens: string[]; indexAt: number } | string {
  // Walk back 48 tokens: before "0\0" is the NUL of token 0x2f.
  let pos = anchor;
  for (let k = 0; k < 0x30; k++) {
    if (pos < 2 || buf[pos - 1] !== 0) return `no NUL before token ${0x2f - k}`;
    let s = pos - 2;
    while (s >= 0 && buf[s] !== 0 && pos - 1 - s <= MAX_TOKEN) s--;
    if (pos - 1 - (s + 1) < 1 || pos - 1 - (s + 1) > MAX_TOKEN) return `token ${0x2f - k} is empty or longer than ${MAX_TOKEN}`;
    pos = s + 1;
  }
  const start = pos;
  if (start % 4 !== 0) return `token table start is not 4-aligned`;
  const offsets: number[] = [];
  const tokens: string[] = [];
  let p = start;
  for (let i = 0; i < 256; i++) {
    const nul = buf.indexOf(0, p);
    if (nul < 0 || nul - p > MAX_TOKEN || nul === p) return `token ${i} is empty, unterminated or too long`;
    offsets.push(p - start);
    tokens.push(buf.toString('latin1', p, nul));
    p = nul + 1;
  }
  for (let d = 0; d < 10; d++) if (tokens[0x30 + d] !== String(d)) return 'tokens 0x30..0x39 are not the digits';
  // kallsyms_token_index: 256 u16 equal to the offsets, right after the table (8-aligned, or any even pad below 8).
  for (const at of [align(p, 8), align(p, 2), align(p, 4)]) {
    if (at + 512 > buf.length) return 'token index cut by the window';
    let ok = true;
    for (let i = 0; i < 256 && ok; i++) ok = buf.readUInt16LE(at + 2 * i) === offsets[i];
    if (ok) return { start, end: p, offsets, tokens, indexAt: at };
  }
  return 'no kallsyms_token_index equal to the token offsets after the table';
}

interface Decoded {
  loc: KallsymsLocation;
  names: string[];
  types: string[];
  addresses: BigUint64Array;
  relativeBase: bigint;
  order: 'v6.1' | 'v6.4';
}

/** Length of name entry at `p`: [header bytes, token count]. */
function entryLen(buf: Buffer, p: number): [number, number] {
  const b0 = buf[p]!;
  if (b0 & 0x80) return [2, (b0 & 0x7f) | (buf[p + 1]! << 7)];
  return [1, b0];
}

/**
 * Decodes the kallsyms whose token table holds the anchor at `buf[anchor]`;
 * `buf` is guest-physical memory from `bufGpa` (must reach a few MiB before
 * the anchor; `bufGpa` 8-aligned). Returns the reason as a string when this is no kallsyms.
 */
export function decodeKallsyms(buf: Buffer, bufGpa: bigint, anchor: number): Decoded | string {
  const tt = tokensAt(buf, anchor);
  if (typeof tt === 'string') return tt;
  const tableStart = tt.start;
  // kallsyms_markers: a u32 run 0, m1, m2, ... (steps in [512, 262144]) ending right before the
  // token table, or before kallsyms_seqs_of_names (3 bytes per symbol) that ends there.
  let found: { markersAt: number; m: number; seqsAt: number | null; nMin: number; nMax: number } | undefined;
  for (let q = (tableStart & ~3) - 4; q >= 0 && q > tableStart - (8 << 20) && found === undefined; q -= 4) {
    if (buf.readUInt32LE(q) !== 0) continue;
    let len = 1;
    let prev = 0;
    while (q + 4 * (len + 1) <= tableStart) {
      const v = buf.readUInt32LE(q + 4 * len);
      if (v - prev < MARKER_STEP_MIN || v - prev > MARKER_STEP_MAX) break;
      prev = v;
      len++;
    }
    // the bytes after the run may continue it by chance: try it shorter too
    for (let l = len; l >= 2 && found === undefined; l--) {
      const end = q + 4 * l;
      const gap = tableStart - end;
      const nMin = (l - 1) * 256 + 1, nMax = l * 256;
      if (gap < 8) { found = { markersAt: q, m: l, seqsAt: null, nMin, nMax }; break; }
      const seqsAt = align(end, 8);
      const seqLen = tableStart - seqsAt;
      // 3N bytes, the table after it 8-aligned
      if (seqLen >= 3 * nMin && seqLen < 3 * nMax + 8) found = { markersAt: q, m: l, seqsAt, nMin, nMax };
    }
  }
  if (found === undefined) return 'no kallsyms_markers run before the token table';
  const { markersAt, m } = found;
  const markers: number[] = [];
  for (let i = 0; i < m; i++) markers.push(buf.readUInt32LE(markersAt + 4 * i));
  const last = markers[m - 1]!;
  // kallsyms_names starts 8-aligned, with kallsyms_num_syms (u32 + pad) right before it.
  let names = -1, n = 0;
  for (let s = (markersAt - last) & ~7; s >= 8 && s > markersAt - last - 256 * 260; s -= 8) {
    const cand = buf.readUInt32LE(s - 8);
    if (cand < found.nMin || cand > found.nMax || buf.readUInt32LE(s - 4) !== 0) continue;
    let p = s, ok = true;
    for (let i = 0; i < cand && ok; i++) {
      if ((i & 255) === 0 && p - s !== markers[i >> 8]) ok = false;
      const [h, l] = entryLen(buf, p);
      if (l === 0) ok = false;
      p += h + l;
      if (p > markersAt) ok = false;
    }
    if (ok && markersAt - p < 8) { names = s; n = cand; break; }
  }
  if (names < 0) return 'no kallsyms_num_syms/kallsyms_names that land on every marker';
  if (found.seqsAt !== null && !(tableStart - found.seqsAt >= 3 * n && tableStart - found.seqsAt < 3 * n + 8)) return 'kallsyms_seqs_of_names length does not match kallsyms_num_syms';
  // kallsyms_relative_base: before kallsyms_num_syms (4.6 .. 6.3), or after kallsyms_offsets,
  // which follow kallsyms_token_index (6.4+: "scripts/kallsyms: change the output order")
  const kernelLike = (v: bigint) => (v >> 31n) === 0x1ffffffffn;
  let relAt = names - 16;
  let offsetsAt = relAt - align(4 * n, 8);
  let seqsAt = found.seqsAt;
  let order: 'v6.1' | 'v6.4' = 'v6.1';
  if (offsetsAt < 0 || !kernelLike(buf.readBigUInt64LE(relAt))) {
    const before = offsetsAt < 0 ? 'cut by the window' : hex(buf.readBigUInt64LE(relAt));
    offsetsAt = align(tt.indexAt + 512, 8);
    relAt = offsetsAt + align(4 * n, 8);
    if (relAt + 8 > buf.length) return 'kallsyms_offsets after the token index cut by the window';
    if (!kernelLike(buf.readBigUInt64LE(relAt))) {
      return `no kallsyms_relative_base before kallsyms_num_syms (found ${before}) nor after kallsyms_offsets (found ${hex(buf.readBigUInt64LE(relAt))}): a newer layout (PC-relative offsets, no relative base)`;
    }
    if (found.seqsAt !== null) return 'kallsyms_seqs_of_names before the token table and kallsyms_offsets after it: no known layout';
    seqsAt = relAt + 8;
    if (seqsAt + 3 * n > buf.length) return 'kallsyms_seqs_of_names cut by the window';
    order = 'v6.4';
  }
  const relativeBase = buf.readBigUInt64LE(relAt);
  // Absolute percpu (x86 up to 6.x): non-negative offsets are absolute, the rest relative_base - 1 - offset.
  // Without it every offset is an unsigned distance from relative_base (the lowest address).
  let anyNegative = false;
  for (let i = 0; i < n && !anyNegative; i++) anyNegative = buf.readInt32LE(offsetsAt + 4 * i) < 0;
  // Expand names.
  const tokens = tt.tokens;
  const namesOut: string[] = new Array(n);
  const types: string[] = new Array(n);
  const addresses = new BigUint64Array(n);
  let p = names;
  for (let i = 0; i < n; i++) {
    const [h, l] = entryLen(buf, p);
    p += h;
    let s = '';
    for (let k = 0; k < l; k++) s += tokens[buf[p + k]!]!;
    p += l;
    types[i] = s[0]!;
    namesOut[i] = s.slice(1);
    const off = buf.readInt32LE(offsetsAt + 4 * i);
    addresses[i] = !anyNegative ? relativeBase + BigInt(off >>> 0) : off >= 0 ? BigInt(off) : relativeBase - 1n - BigInt(off);
  }
  const at = (o: number) => bufGpa + BigInt(o);
  return {
    loc: {
      tokenTable: at(tableStart), tokenIndex: at(tt.indexAt), markers: at(markersAt), names: at(names), numSyms: at(names - 8),
      relativeBase: at(relAt), offsets: at(offsetsAt), seqsOfNames: seqsAt === null ? null : at(seqsAt),
    },
    names: namesOut, types, addresses, relativeBase, order,
  };
}

/** Quick pre-check of an anchor with a small window (the token table and index only). */
export function tokenTableAt(buf: Buffer, anchor: number): string | null {
  const r = tokensAt(buf, anchor);
  return typeof r === 'string' ? r : null;
}

/** The whole symbol table, in kallsyms order (by address), with lookups by name and by address. */
export class KernelSymbols {
  readonly names: readonly string[];
  readonly types: readonly string[];
  /** Addresses in table order (ascending). */
  readonly addresses: BigUint64Array;
  readonly location: KallsymsLocation;
  /**
   * 'v6.1': offsets first, no seqs_of_names; 'v6.2': offsets first, seqs_of_names before the
   * token table (6.2, 6.3, Debian's 6.1); 'v6.4': num_syms first, offsets, relative_base and
   * seqs_of_names after the token index (6.4 .. 6.12 and later until PC-relative offsets).
   */
  readonly layout: 'v6.1' | 'v6.2' | 'v6.4';
  #byName: Map<string, number> | undefined;

  constructor(d: Decoded) {
    this.names = d.names;
    this.types = d.types;
    this.addresses = d.addresses;
    this.location = d.loc;
    this.layout = d.order === 'v6.4' ? 'v6.4' : d.loc.seqsOfNames === null ? 'v6.1' : 'v6.2';
  }

  get count(): number { return this.names.length; }

  at(i: number): KernelSymbol {
    return { name: this.names[i]!, type: this.types[i]!, address: this.addresses[i]! };
  }

  *[Symbol.iterator](): IterableIterator<KernelSymbol> {
    for (let i = 0; i < this.names.length; i++) yield this.at(i);
  }

  #index(): Map<string, number> {
    if (this.#byName === undefined) {
      const m = new Map<string, number>();
      // first wins, except that a global symbol beats a local one of the same name
      for (let i = 0; i < this.names.length; i++) {
        const nm = this.names[i]!;
        const j = m.get(nm);
        if (j === undefined || (this.types[j]! >= 'a' && this.types[i]! < 'a')) m.set(nm, i);
      }
      this.#byName = m;
    }
    return this.#byName;
  }

  /** The address of `name`, or undefined. */
  lookup(name: string): bigint | undefined {
    const i = this.#index().get(name);
    return i === undefined ? undefined : this.addresses[i];
  }

  /** The address of `name`; LinuxNoSuchError when the kernel has no such symbol. */
  address(name: string): bigint {
    const a = this.lookup(name);
    if (a === undefined) throw new LinuxNoSuchError(`no kernel symbol '${name}' in kallsyms`);
    return a;
  }

  /** Every symbol named `name` (static functions repeat). */
  all(name: string): KernelSymbol[] {
    const out: KernelSymbol[] = [];
    for (let i = 0; i < this.names.length; i++) if (this.names[i] === name) out.push(this.at(i));
    return out;
  }

  /** The symbol at or below `addr` (the last one of equal address), or undefined below the first. */
  find(addr: bigint): { symbol: KernelSymbol; offset: bigint } | undefined {
    const a = this.addresses;
    let lo = 0, hi = a.length - 1;
    if (hi < 0 || addr < a[0]!) return undefined;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (a[mid]! <= addr) lo = mid; else hi = mid - 1;
    }
    return { symbol: this.at(lo), offset: addr - a[lo]! };
  }

  /** `name+0x10` as the kernel prints it (%ps without the size), or the address in hex when no symbol covers it. */
  symbolize(addr: bigint): string {
    const f = this.find(addr);
    if (f === undefined) return hex(addr);
    return f.offset === 0n ? f.symbol.name : `${f.symbol.name}+0x${f.offset.toString(16)}`;
  }

  /** The /proc/kallsyms line of symbol i: `%016x %c %s`. */
  line(i: number): string {
    return `${this.addresses[i]!.toString(16).padStart(16, '0')} ${this.types[i]} ${this.names[i]}`;
  }
}

/**
 * Finds and decodes kallsyms in guest-physical [from, to): `find` gives the
 * anchor hits, `read` the bytes. Throws LinuxNotFoundError naming every
 * candidate and why it was refused, LinuxUnsupportedError for a table found
 * but laid out differently.
 */
export async function locateKallsyms(
  hits: readonly bigint[], read: PhysBytes, bounds: { from: bigint; to: bigint },
): Promise<KernelSymbols> {
  const why: string[] = [];
  let unsupported: string | undefined;
  for (const hit of hits) {
    // windows start 8-aligned: buffer offsets keep the alignment of the guest addresses
    const small0 = (hit - 4096n < bounds.from ? bounds.from : hit - 4096n) & ~7n;
    const small1 = hit + 4096n > bounds.to ? bounds.to : hit + 4096n;
    let small: Buffer;
    try { small = await read(small0, Number(small1 - small0)); } catch (e) { why.push(`${hex(hit)}: ${(e as Error).message}`); continue; }
    const pre = tokenTableAt(small, Number(hit - small0));
    if (pre !== null) { why.push(`${hex(hit)}: ${pre}`); continue; }
    const big0 = (hit - (12n << 20n) < bounds.from ? bounds.from : hit - (12n << 20n)) & ~7n;
    // 6.4+ keeps offsets, relative_base and seqs_of_names (7 bytes a symbol) after the token index
    const big1 = hit + (6n << 20n) > bounds.to ? bounds.to : hit + (6n << 20n);
    let big: Buffer;
    try { big = await read(big0, Number(big1 - big0)); } catch (e) { why.push(`${hex(hit)}: ${(e as Error).message}`); continue; }
    const d = decodeKallsyms(big, big0, Number(hit - big0));
    if (typeof d === 'string') {
      why.push(`${hex(hit)}: ${d}`);
      if (d.includes('newer layout')) unsupported = `kallsyms token table at gpa ${hex(hit)}: ${d}`;
      continue;
    }
    return new KernelSymbols(d);
  }
  if (unsupported !== undefined) throw new LinuxUnsupportedError(unsupported);
  throw new LinuxNotFoundError(`no kallsyms in gpa [${hex(bounds.from)}, ${hex(bounds.to)}): ${hits.length} digit-token runs, none a kallsyms table${why.length ? ` (${why.slice(0, 6).join('; ')}${why.length > 6 ? '; ...' : ''})` : ''}`);
}
