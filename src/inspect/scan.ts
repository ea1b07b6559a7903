/**
 * scan(): search a guest-physical range for a byte pattern or a regular
 * expression, zero-copy: each chunk is mapped with one Session.mapRange, the
 * live window is searched in place (Buffer.indexOf) and unmapped right after.
 * The next chunk's mapping is requested before the current one is searched,
 * so the token round trips overlap the search.
 *
 * - Matches straddling page and chunk boundaries are found: the last
 *   pattern.length-1 bytes (maxLength-1 for a regex) are carried over.
 * - Holes: a chunk whose mapRange fails with EFAULT (a gpa without RAM) is
 *   retried page by page; pages that cannot be mapped are skipped and counted,
 *   and no match spans a hole.
 * - Cancellation: an AbortSignal rejects with AbortError (code 'ABORT_ERR')
 *   once whatever the scan holds is unmapped.
 * - A guest RAM file that shrinks during the scan (model host) rejects with
 *   GuestMemoryShrunkError (code 'ERR_GUEST_MEMORY_SHRUNK'), checked after
 *   every chunk (see sys/faults), never with a hole or a signal.
 */
import { KvmmemError, UsageError } from '../errors.js';
import * as faults from '../sys/faults.js';
import { PAGE_SIZE, hex, pageBase, toAddress, type AddressLike } from '../client/address.js';
import { Session, type MappedRange } from '../client/session.js';
import { assertTargetVm, type TargetVm } from '../client/target.js';
import { AbortError } from './errors.js';

const PS = BigInt(PAGE_SIZE);

/** A regular expression run over latin1-decoded memory; no match may be longer than maxLength bytes. */
export interface RegexPattern {
  regex: RegExp;
  maxLength: number;
}

export type ScanPattern = Uint8Array | string | RegexPattern;

export interface ScanProgress {
  /** Bytes of [from, to) dealt with so far (searched or skipped). */
  done: number;
  /** to - from. */
  total: number;
  /** Matches so far. */
  matches: number;
}

export interface ScanOptions {
  /** First gpa (default 0). */
  from?: AddressLike;
  /** End gpa (exclusive); default the VM's memory size (`vm.memorySize()`: KVMI_GET_MAX_GFN), required when the VM cannot tell it. */
  to?: AddressLike;
  /** Pages mapped per chunk (default 256 = 1 MiB). */
  chunkPages?: number;
  /** Called after every chunk. */
  onProgress?: (p: ScanProgress) => void;
  signal?: AbortSignal;
  /** Stop after this many matches. */
  maxMatches?: number;
  /** Called with each match's gpa as it is found (before the scan ends). */
  onMatch?: (gpa: bigint) => void;
}

export interface ScanResult {
  /** gpas of the matches' first bytes, ascending. */
  matches: bigint[];
  /** Bytes searched (mapped). */
  scannedBytes: number;
  /** Pages that could not be mapped (holes: EFAULT) and were skipped. */
  skippedPages: number;
}

/** Mapping a chunk: the range, or why not. Never rejects (so a pending one cannot go unhandled). */
type Mapped = { ok: true; range: MappedRange } | { ok: false; error: unknown };

function isHoleError(e: unknown): boolean {
  return e instanceof KvmmemError && e.code === 'EFAULT';
}

/** Searches for a fixed byte string, or a regex, across a stream of contiguous segments. */
export interface Matcher {
  /** Feeds the next segment at `gpa`; `contiguous`: it directly follows the previous one. */
  feed(buf: Buffer, gpa: bigint, contiguous: boolean): void;
  /** End of a contiguous stretch (hole or end of the scan). */
  flush(): void;
}

class BytesMatcher implements Matcher {
  readonly #needle: Buffer;
  readonly #keep: number;
  /** The last (up to) keep bytes of the current stretch, at #carryGpa. */
  readonly #carry: Buffer;
  #carryLen = 0;
  #carryGpa = 0n;
  /** Every match starting below this gpa has been reported (or cannot exist). */
  #decided = 0n;
  readonly #bridge: Buffer;
  constructor(needle: Buffer, private readonly found: (gpa: bigint) => boolean) {
    this.#needle = needle;
    this.#keep = needle.length - 1;
    this.#carry = Buffer.alloc(this.#keep);
    this.#bridge = Buffer.alloc(2 * this.#keep);
  }

  feed(buf: Buffer, gpa: bigint, contiguous: boolean): void {
    const needle = this.#needle;
    const k = this.#keep;
    if (!contiguous) this.#carryLen = 0;
    // Matches that start in the carried tail and end in this segment.
    if (this.#carryLen > 0) {
      const take = Math.min(k, buf.length);
      const bridge = this.#bridge;
      this.#carry.copy(bridge, 0, 0, this.#carryLen);
      buf.copy(bridge, this.#carryLen, 0, take);
      const view = bridge.subarray(0, this.#carryLen + take);
      for (let i = view.indexOf(needle); i >= 0 && i < this.#carryLen; i = view.indexOf(needle, i + 1)) {
        const at = this.#carryGpa + BigInt(i);
        if (at >= this.#decided && !this.found(at)) return;
      }
    }
    // Matches inside the segment: the live buffer itself, no copy.
    for (let i = buf.indexOf(needle); i >= 0; i = buf.indexOf(needle, i + 1)) {
      if (!this.found(gpa + BigInt(i))) return;
    }
    this.#decided = gpa + BigInt(buf.length - k);
    if (k === 0) return;
    // Carry the last k bytes of the stretch (older ones too if this segment is short).
    if (buf.length >= k) {
      buf.copy(this.#carry, 0, buf.length - k);
      this.#carryLen = k;
      this.#carryGpa = gpa + BigInt(buf.length - k);
    } else {
      const keepOld = Math.min(this.#carryLen, k - buf.length);
      const merged = Buffer.alloc(keepOld + buf.length);
      this.#carry.copy(merged, 0, this.#carryLen - keepOld, this.#carryLen);
      buf.copy(merged, keepOld);
      merged.copy(this.#carry, 0);
      this.#carryGpa = gpa - BigInt(keepOld);
      this.#carryLen = merged.length;
    }
  }

  flush(): void {
    this.#carryLen = 0;
  }
}

class RegexMatcher implements Matcher {
  readonly #re: RegExp;
  readonly #keep: number;
  #text = '';
  #textGpa = 0n;
  constructor(re: RegExp, maxLength: number, private readonly found: (gpa: bigint) => boolean) {
    const flags = re.flags.replace(/[gy]/g, '') + 'g';
    this.#re = new RegExp(re.source, flags);
    this.#keep = maxLength - 1;
  }

  feed(buf: Buffer, gpa: bigint, contiguous: boolean): void {
    if (!contiguous) this.flush();
    const chunk = buf.toString('latin1');
    if (this.#text.length === 0) {
      this.#text = chunk;
      this.#textGpa = gpa;
    } else {
      this.#text += chunk;
    }
    this.#run(false);
  }

  flush(): void {
    if (this.#text.length > 0) this.#run(true);
    this.#text = '';
  }

  /**
   * Reports matches starting before the last maxLength-1 characters (all of
   * them at the end of a stretch); keeps the rest of the text, from the end of
   * the last match reported or that limit, for the next segment.
   */
  #run(final: boolean): void {
    const text = this.#text;
    const limit = final ? text.length + 1 : text.length - this.#keep;
    let carryFrom = Math.max(0, limit);
    if (limit > 0) {
      const re = this.#re;
      re.lastIndex = 0;
      let lastEnd = 0;
      let m: RegExpExecArray | null;
      while ((m = re.exec(text)) !== null) {
        if (m.index >= limit) break;
        if (!this.found(this.#textGpa + BigInt(m.index))) { this.#text = ''; return; }
        lastEnd = m.index + m[0].length;
        if (m[0].length === 0) re.lastIndex++;
      }
      carryFrom = Math.max(carryFrom, lastEnd);
    }
    if (final) { this.#text = ''; return; }
    this.#text = text.slice(carryFrom);
    this.#textGpa += BigInt(carryFrom);
  }
}

function compilePattern(pattern: ScanPattern, found: (gpa: bigint) => boolean): Matcher {
  if (typeof pattern === 'string') pattern = Buffer.from(pattern, 'latin1');
  if (pattern instanceof Uint8Array) {
    const needle = Buffer.isBuffer(pattern) ? pattern : Buffer.from(pattern.buffer, pattern.byteOffset, pattern.length);
    if (needle.length === 0) throw new UsageError('scan: the pattern is empty');
    return new BytesMatcher(Buffer.from(needle), found);
  }
  if (pattern !== null && typeof pattern === 'object' && pattern.regex instanceof RegExp) {
    if (!Number.isSafeInteger(pattern.maxLength) || pattern.maxLength < 1) throw new UsageError(`scan: maxLength must be a positive integer, got ${pattern.maxLength}`);
    return new RegexMatcher(pattern.regex, pattern.maxLength, found);
  }
  throw new UsageError('scan: pattern must be a Uint8Array/Buffer, a string, or { regex: RegExp, maxLength: number }');
}

/** What walkRange() needs besides the session: checked range, chunking, cancellation. */
export interface WalkOptions {
  from: bigint;
  to: bigint;
  chunkPages: number;
  signal?: AbortSignal;
  /** After every chunk: bytes of [from, to) dealt with so far. */
  onChunk?: (done: number) => void;
  /** True once the consumer has seen enough (maxMatches). */
  stopped: () => boolean;
}

export interface WalkResult {
  scannedBytes: number;
  skippedPages: number;
}

/**
 * @internal The chunk loop shared by scan() and yaraScan(): maps [from, to) a
 * chunk at a time (the next one requested before the current one is fed),
 * feeds each mapped segment to `matcher` in place and unmaps it, retries a
 * chunk in a hole page by page (holes break contiguity), and holds nothing
 * mapped when it returns or throws (AbortError on `signal`).
 */
export async function walkRange(session: Session, vm: TargetVm, fn: string, o: WalkOptions, matcher: Matcher): Promise<WalkResult> {
  const { from, to, chunkPages, signal, onChunk, stopped } = o;
  let scannedBytes = 0;
  let skippedPages = 0;
  let done = 0;
  let prevEnd = -1n; // end gpa of the last segment fed (contiguity)
  if (to <= from || stopped()) return { scannedBytes, skippedPages };
  if (signal?.aborted) throw new AbortError(fn, signal.reason);

  const chunkBytes = BigInt(chunkPages) * PS;
  const firstChunk = pageBase(from);
  const chunks = Number((to - firstChunk + chunkBytes - 1n) / chunkBytes);
  /** [start, end) of chunk i, clipped to [from, to). */
  const bounds = (i: number): [bigint, bigint] => {
    const s = firstChunk + BigInt(i) * chunkBytes;
    return [s < from ? from : s, s + chunkBytes > to ? to : s + chunkBytes];
  };
  const mapChunk = (i: number): Promise<Mapped> => {
    const [s, e] = bounds(i);
    return session.mapRange(vm, s, Number(e - s)).then((range) => ({ ok: true as const, range }), (error: unknown) => ({ ok: false as const, error }));
  };
  const feed = (buf: Buffer, gpa: bigint) => {
    matcher.feed(buf, gpa, gpa === prevEnd);
    prevEnd = gpa + BigInt(buf.length);
    scannedBytes += buf.length;
  };
  const hole = () => {
    skippedPages++;
    matcher.flush();
    prevEnd = -1n;
  };
  const aborted = () => signal?.aborted === true;
  // Faults of this VM's RAM: checked after every chunk (and an fstat before it without the SIGBUS guard).
  const watch = faults.watch(vm.uuid);
  const verify = !faults.guarded();

  let next: Promise<Mapped> | null = mapChunk(0);
  let held: MappedRange | null = null;
  let cancelled = false;
  try {
    for (let i = 0; i < chunks && !stopped(); i++) {
      const cur: Mapped = await next!;
      next = null;
      if (cur.ok) held = cur.range;
      if (aborted()) { cancelled = true; break; }
      const [s, e] = bounds(i);
      if (cur.ok) {
        // Ask for the next chunk first: its token round trips overlap this search.
        if (i + 1 < chunks) next = mapChunk(i + 1);
        if (verify) watch.verify(fn);
        feed(cur.range._peek(), s); // the matchers copy what they keep: no view leaves the walk
        watch.check(fn);
        cur.range.unmap();
        held = null;
      } else if (isHoleError(cur.error)) {
        watch.check(fn); // EFAULT because the RAM file shrank is no hole
        // Page by page, one token batch of single-page maps at a time (a group in a hole
        // costs one round trip); never more maps in flight than the host lets us have tokens.
        const group = Math.max(1, session.options.maxTokensInFlight);
        const first = pageBase(s);
        const pages = Number((e - first + PS - 1n) / PS);
        for (let k = 0; k < pages && !stopped(); k += group) {
          if (aborted()) { cancelled = true; break; }
          const n = Math.min(group, pages - k);
          const settled = await Promise.allSettled(Array.from({ length: n }, (_, j) => session.map(vm, first + BigInt(k + j) * PS)));
          const got = settled.map((r) => (r.status === 'fulfilled' ? r.value : undefined));
          try {
            for (let j = 0; j < n; j++) {
              const r = settled[j]!;
              let page = got[j];
              if (r.status === 'rejected') {
                if (isHoleError(r.reason)) { hole(); continue; }
                // Anything else (EAGAIN: someone else holds tokens of this VM too): once more, alone.
                page = got[j] = await session.map(vm, first + BigInt(k + j) * PS).catch((err: unknown) => {
                  if (isHoleError(err)) return undefined;
                  throw err;
                });
                if (page === undefined) { hole(); continue; }
              }
              if (stopped()) continue;
              const p = page!.pageGpa;
              const ps = p < s ? s : p;
              const pe = p + PS > e ? e : p + PS;
              if (verify) watch.verify(fn);
              feed(page!._peek().subarray(Number(ps - p), Number(pe - p)), ps);
            }
            watch.check(fn);
          } finally {
            for (const page of got) page?.[Symbol.dispose]();
          }
        }
        if (cancelled) break;
        if (i + 1 < chunks && !stopped()) next = mapChunk(i + 1);
      } else {
        throw cur.error;
      }
      done += Number(e - s);
      onChunk?.(done);
    }
    if (!stopped() && !cancelled) matcher.flush();
  } finally {
    held?.[Symbol.dispose]();
    if (next !== null) {
      const pending: Mapped = await next;
      if (pending.ok) pending.range[Symbol.dispose]();
    }
  }
  if (cancelled) throw new AbortError(fn, signal!.reason);
  return { scannedBytes, skippedPages };
}

/** @internal Checks the options scan() and yaraScan() share; returns the range and chunking. */
export async function walkOptions(session: Session, vm: TargetVm, fn: string, opts: { from?: AddressLike; to?: AddressLike; chunkPages?: number; onProgress?: unknown; signal?: unknown; maxMatches?: number } | undefined): Promise<{ from: bigint; to: bigint; chunkPages: number; maxMatches: number }> {
  if (opts === undefined || opts === null || typeof opts !== 'object') throw new UsageError(`${fn}: options are required ({ to }, or a VM that knows its memory size)`);
  if (!(session instanceof Session)) throw new UsageError(`${fn}: session must be a Session (from KvmMem.open() or lab.open())`);
  assertTargetVm(vm, fn);
  const from = toAddress(opts.from ?? 0n, 'from');
  let to: bigint;
  if (opts.to !== undefined) to = toAddress(opts.to, 'to');
  else if (typeof vm.memorySize === 'function') to = await vm.memorySize(); // KVMI_GET_MAX_GFN
  else throw new UsageError(`${fn}: { to } is required (one past the last gpa to search): this VM does not tell its memory size`);
  if (from > to) throw new UsageError(`${fn}: from ${hex(from)} is past to ${hex(to)}`, 'give from <= to (to is one past the last gpa to search)');
  if ((opts.onProgress !== undefined && typeof opts.onProgress !== 'function') || (opts.signal !== undefined && !(opts.signal instanceof AbortSignal))) {
    throw new UsageError(`${fn}: onProgress must be a function and signal an AbortSignal`);
  }
  const chunkPages = opts.chunkPages ?? 256;
  if (!Number.isSafeInteger(chunkPages) || chunkPages < 1) throw new UsageError(`${fn}: chunkPages must be a positive integer, got ${chunkPages}`);
  const maxMatches = opts.maxMatches ?? Infinity;
  if (!(maxMatches >= 0)) throw new UsageError(`${fn}: maxMatches must be >= 0, got ${maxMatches}`);
  return { from, to, chunkPages, maxMatches };
}

/** Search [from, to) of `vm`'s guest-physical memory for `pattern`. */
export async function scan(session: Session, vm: TargetVm, pattern: ScanPattern, opts: ScanOptions): Promise<ScanResult> {
  const { from, to, chunkPages, maxMatches } = await walkOptions(session, vm, 'scan', opts);
  const { signal, onProgress, onMatch } = opts;
  if (onMatch !== undefined && typeof onMatch !== 'function') throw new UsageError('scan: onMatch must be a function');
  const total = to > from ? Number(to - from) : 0;
  const matches: bigint[] = [];
  let stopped = maxMatches === 0;
  const matcher = compilePattern(pattern, (gpa) => {
    if (matches.length < maxMatches) onMatch?.(gpa);
    matches.push(gpa);
    if (matches.length >= maxMatches) stopped = true;
    return !stopped;
  });
  const r = await walkRange(session, vm, 'scan', {
    from, to, chunkPages, signal, stopped: () => stopped,
    onChunk: onProgress && ((done) => onProgress({ done, total, matches: matches.length })),
  }, matcher);
  if (matches.length > maxMatches) matches.length = maxMatches;
  return { matches, ...r };
}
