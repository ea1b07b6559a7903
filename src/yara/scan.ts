/**
 * yaraScan(): YARA rules over a guest-physical range, live and zero-copy.
 *
 * Memory is mapped a chunk at a time (the inspect layer's walkRange: the next
 * chunk's tokens are fetched while this one is scanned) and each mapped
 * window is handed to YARA-X in place. A match is reported once, by where it
 * starts:
 *
 * - in a window, a match that starts at least `overlap` bytes before the end
 *   of what has been fed so far is decided there;
 * - one that starts in the last `overlap` bytes is decided by a *bridge*
 *   scan of those bytes (copied) plus the first `overlap` bytes of the next
 *   contiguous window, or as found when the stretch ends (a hole, `to`).
 *
 * So every match no longer than `overlap` is found exactly once, wherever it
 * lies across pages and chunks. YARA-X itself never reports a regular
 * expression or hex-jump match longer than 4,095 bytes (measured: the default
 * overlap of 4,096 is enough for those); a text string longer than `overlap`
 * needs a larger one. Conditions are evaluated per window (see the README:
 * `filesize` is the window's size, offsets are relative to it).
 */
import { UsageError } from '../errors.js';
import { type AddressLike } from '../client/address.js';
import { type Session } from '../client/session.js';
import { type TargetVm } from '../client/target.js';
import { walkOptions, walkRange, type Matcher } from '../inspect/scan.js';
import type { RuleMatch } from '@litko/yara-x';
import { YaraRules } from './rules.js';

/** Bytes of context kept on each side of a hit. */
const CONTEXT = 16;
/** Bytes of the match itself kept in a hit. */
const DATA_MAX = 64;

/** One string of one rule matching at one address. */
export interface YaraHit {
  rule: string;
  namespace: string;
  tags: string[];
  meta: Record<string, unknown>;
  /** The string's identifier, e.g. '$a'. */
  string: string;
  /** Guest-physical address of the match's first byte. */
  gpa: bigint;
  length: number;
  /** The first (up to 64) bytes of the match. */
  data: Buffer;
  /** Up to 16 bytes before and after the match, as far as the window reached. */
  before: Buffer;
  after: Buffer;
}

export interface YaraProgress {
  done: number;
  total: number;
  hits: number;
}

export interface YaraScanOptions {
  from?: AddressLike;
  /** End gpa (exclusive); default the VM's memory size (`vm.memorySize()`: KVMI_GET_MAX_GFN), required when the VM cannot tell it. */
  to?: AddressLike;
  /** Pages mapped per chunk (default 256 = 1 MiB). */
  chunkPages?: number;
  /** Longest match found exactly at a chunk edge (default 4096; see the module comment). */
  overlap?: number;
  /** Stop after this many hits. */
  maxMatches?: number;
  onProgress?: (p: YaraProgress) => void;
  /** Called with each hit as it is decided (before the scan ends). */
  onHit?: (hit: YaraHit) => void;
  signal?: AbortSignal;
}

export interface YaraScanResult {
  /** Hits in the order they were decided (ascending gpa within a stretch). */
  hits: YaraHit[];
  /** Rules that had hits, with their counts. */
  rules: { rule: string; namespace: string; hits: number }[];
  scannedBytes: number;
  skippedPages: number;
}

/** A hit found but not yet decided (it starts in the carried tail). */
type Pending = YaraHit;

/** @internal Feeds windows to YARA-X and reports each string match once (see the module comment). */
export class YaraMatcher implements Matcher {
  readonly #rules: YaraRules;
  readonly #overlap: number;
  readonly #found: (hit: YaraHit) => boolean;
  /** The last (up to) overlap bytes of the current stretch, at #carryGpa. */
  readonly #carry: Buffer;
  #carryLen = 0;
  #carryGpa = 0n;
  #pending: Pending[] = [];
  #bridge: Buffer;
  #stopped = false;

  constructor(rules: YaraRules, overlap: number, found: (hit: YaraHit) => boolean) {
    this.#rules = rules;
    this.#overlap = overlap;
    this.#found = found;
    this.#carry = Buffer.alloc(overlap);
    this.#bridge = Buffer.alloc(2 * overlap);
  }

  feed(buf: Buffer, gpa: bigint, contiguous: boolean): void {
    if (this.#stopped) return;
    if (!contiguous) this.flush();
    const ov = this.#overlap;
    const streamEnd = gpa + BigInt(buf.length);
    const pending: Pending[] = [];
    if (this.#carryLen > 0) {
      // Bridge: matches that start in the carried tail, seen with what follows it.
      const take = Math.min(ov, buf.length);
      this.#carry.copy(this.#bridge, 0, 0, this.#carryLen);
      buf.copy(this.#bridge, this.#carryLen, 0, take);
      const view = this.#bridge.subarray(0, this.#carryLen + take);
      const decidedBelow = view.length - ov; // starts below this offset have overlap bytes after them
      for (const hit of this.#hits(view, this.#carryGpa, (off) => off < this.#carryLen)) {
        const off = Number(hit.gpa - this.#carryGpa);
        if (off < decidedBelow) { if (!this.#report(hit)) return; } else pending.push(hit);
      }
    }
    this.#pending = [];
    // The window itself, in place.
    const decidedBelow = buf.length - ov;
    for (const hit of this.#hits(buf, gpa, () => true)) {
      const off = Number(hit.gpa - gpa);
      if (off < decidedBelow) { if (!this.#report(hit)) return; } else pending.push(hit);
    }
    this.#pending = pending;
    // Carry the last overlap bytes of the stretch (older ones too if this window is short).
    if (buf.length >= ov) {
      buf.copy(this.#carry, 0, buf.length - ov);
      this.#carryLen = ov;
    } else {
      const keepOld = Math.min(this.#carryLen, ov - buf.length);
      const merged = Buffer.concat([this.#carry.subarray(this.#carryLen - keepOld, this.#carryLen), buf]);
      merged.copy(this.#carry, 0);
      this.#carryLen = merged.length;
    }
    this.#carryGpa = streamEnd - BigInt(this.#carryLen);
  }

  flush(): void {
    const pending = this.#pending;
    this.#pending = [];
    this.#carryLen = 0;
    pending.sort((a, b) => (a.gpa < b.gpa ? -1 : a.gpa > b.gpa ? 1 : 0));
    for (const hit of pending) if (!this.#report(hit)) return;
  }

  #report(hit: YaraHit): boolean {
    if (this.#stopped) return false;
    if (!this.#found(hit)) this.#stopped = true;
    return !this.#stopped;
  }

  /** The string matches of one YARA-X scan of `buf` (at `gpa`) whose start offset passes `keep`, ascending. */
  #hits(buf: Buffer, gpa: bigint, keep: (off: number) => boolean): YaraHit[] {
    let rules: RuleMatch[];
    try {
      rules = this.#rules._engine.scan(buf);
    } catch (e) {
      throw new UsageError(`yara: the engine failed on the window at ${gpa}: ${e instanceof Error ? e.message : String(e)}`, 'a rule that needs a module or variable this scan does not provide');
    }
    const out: YaraHit[] = [];
    for (const r of rules) {
      for (const m of r.matches) {
        if (!keep(m.offset)) continue;
        const end = m.offset + m.length;
        out.push({
          rule: r.ruleIdentifier,
          namespace: r.namespace,
          tags: r.tags,
          meta: r.meta as Record<string, unknown>,
          string: m.identifier,
          gpa: gpa + BigInt(m.offset),
          length: m.length,
          // Copies: the window is unmapped right after this scan.
          data: Buffer.from(buf.subarray(m.offset, Math.min(end, m.offset + DATA_MAX))),
          before: Buffer.from(buf.subarray(Math.max(0, m.offset - CONTEXT), m.offset)),
          after: Buffer.from(buf.subarray(end, Math.min(buf.length, end + CONTEXT))),
        });
      }
    }
    out.sort((a, b) => (a.gpa < b.gpa ? -1 : a.gpa > b.gpa ? 1 : 0));
    return out;
  }
}

/** Scan [from, to) of `vm`'s guest-physical memory with `rules`. */
export async function yaraScan(session: Session, vm: TargetVm, rules: YaraRules, opts: YaraScanOptions): Promise<YaraScanResult> {
  if (!(rules instanceof YaraRules)) throw new UsageError('yaraScan: rules must come from compileRules() or loadRuleFiles()');
  const { from, to, chunkPages, maxMatches } = await walkOptions(session, vm, 'yaraScan', opts);
  const overlap = opts.overlap ?? 4096;
  if (!Number.isSafeInteger(overlap) || overlap < 1 || overlap > 64 * 2 ** 20) throw new UsageError(`yaraScan: overlap must be an integer in 1..${64 * 2 ** 20}, got ${overlap}`);
  if (opts.onHit !== undefined && typeof opts.onHit !== 'function') throw new UsageError('yaraScan: onHit must be a function');
  const { signal, onProgress, onHit } = opts;
  const total = to > from ? Number(to - from) : 0;
  const hits: YaraHit[] = [];
  const counts = new Map<string, { rule: string; namespace: string; hits: number }>();
  let stopped = maxMatches === 0;
  const matcher = new YaraMatcher(rules, overlap, (hit) => {
    hits.push(hit);
    const key = `${hit.namespace}:${hit.rule}`;
    const c = counts.get(key) ?? counts.set(key, { rule: hit.rule, namespace: hit.namespace, hits: 0 }).get(key)!;
    c.hits++;
    onHit?.(hit);
    if (hits.length >= maxMatches) stopped = true;
    return !stopped;
  });
  const r = await walkRange(session, vm, 'yaraScan', {
    from, to, chunkPages, signal, stopped: () => stopped,
    onChunk: onProgress && ((done) => onProgress({ done, total, hits: hits.length })),
  }, matcher);
  return { hits, rules: [...counts.values()], ...r };
}
