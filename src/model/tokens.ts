/**
 * The host's map tokens (KVMI_GET_MAP_TOKEN / KVM_HC_MEM_MAP): 32 bytes from a
 * CSPRNG, recorded with the VM whose KVMI connection asked, single use.
 *
 * v6 rules by default: at most `limit` (8) outstanding per VM, further requests
 * fail with -KVM_EAGAIN; a token expires `ttlMs` (3000) after it was issued. v6
 * swept expired tokens once a second, so a token lived 3-4 s; here a token is
 * refused from exactly ttlMs on (checked on use), expired tokens are purged
 * lazily (on issue, use and count) and by an unref'd sweep timer every second.
 * v4 rules: no limit, no expiry (limit = ttlMs = Infinity).
 *
 * Tokens are found by 30 bits of their bytes (a small-integer Map key) and
 * then compared in full (all 32 bytes); nothing here logs or formats a token.
 *
 * Cost: O(1) per issue/consume. Every token gets the same lifetime and issue
 * times never decrease (the clock is clamped), so the insertion-ordered maps
 * are ordered by expiry: purging stops at the first unexpired token.
 */
import { randomFillSync } from 'node:crypto';
import { MEM_TOKEN_SIZE } from '../abi/structs.js';
import { UsageError } from '../errors.js';

export interface TokenStoreOptions {
  /** Most outstanding tokens per VM (default 8; Infinity for v4). */
  limit?: number;
  /** Lifetime in ms (default 3000; Infinity for v4). */
  ttlMs?: number;
  /** Milliseconds clock (default Date.now); tests pass a fake one. */
  now?: () => number;
  /** Sweep period (default 1000 ms, as v6). */
  sweepMs?: number;
}

interface Entry<V> {
  vm: V;
  issued: number;
  /** The token's 32 bytes live in `pool` at `off` (wiped when the token goes). */
  pool: Uint8Array;
  off: number;
  key: number;
  /** The VM's tokens in issue order (a doubly linked list: O(1) removal). */
  prev: Entry<V> | null;
  next: Entry<V> | null;
}

interface VmTokens<V> { head: Entry<V> | null; tail: Entry<V> | null; n: number }

// CSPRNG bytes drawn 8 KiB at a time (one randomFillSync per 256 tokens). Each
// outstanding token keeps its bytes in its pool slot (no per-token copy); the
// slot is wiped when the token is used, dropped or expires. A pool is freed
// once none of its tokens is referenced.
const POOL_TOKENS = 256;
let pool = new Uint8Array(0);
let poolAt = 0;

/** 30 bits of the token at `off` (always a small integer): the map key. */
function keyOf(b: Uint8Array, off: number): number {
  return (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16) | ((b[off + 3]! & 0x3f) << 24));
}

function wipe(e: { pool: Uint8Array; off: number }): void {
  const p = e.pool, o = e.off;
  for (let i = 0; i < MEM_TOKEN_SIZE; i++) p[o + i] = 0;
}

/** An outstanding token as peekAt() found it: its VM. */
export interface TokenRef<V> {
  readonly vm: V;
}

export class TokenStore<V extends object> {
  readonly limit: number;
  readonly ttlMs: number;
  readonly #now: () => number;
  readonly #sweepMs: number;
  /** Every outstanding token by keyOf(), in issue order (= expiry order). */
  readonly #byKey = new Map<number, Entry<V>>();
  readonly #byVm = new Map<V, VmTokens<V>>();
  #timer: NodeJS.Timeout | undefined;
  #closed = false;
  #lastIssued = -Infinity;

  constructor(opts: TokenStoreOptions = {}) {
    this.limit = opts.limit ?? 8;
    this.ttlMs = opts.ttlMs ?? 3000;
    if (!(this.limit >= 0)) throw new UsageError(`token limit must be >= 0, got ${this.limit}`);
    if (!(this.ttlMs > 0)) throw new UsageError(`token ttlMs must be > 0, got ${this.ttlMs}`);
    this.#now = opts.now ?? Date.now;
    this.#sweepMs = opts.sweepMs ?? 1000;
  }

  /** A fresh token for `vm`, or null when `vm` already has `limit` outstanding (-KVM_EAGAIN). */
  issue(vm: V): Uint8Array | null {
    const out = new Uint8Array(MEM_TOKEN_SIZE);
    return this.issueInto(vm, out, 0) ? out : null;
  }

  /**
   * issue(), writing the token's 32 bytes into `out` at `offset` instead of
   * returning a copy (the KVMI connection writes it straight into its reply).
   * false when `vm` already has `limit` outstanding.
   */
  issueInto(vm: V, out: Uint8Array, offset: number): boolean {
    if (this.#closed) return false;
    let rec = this.#byVm.get(vm);
    const now = this.#now();
    if (rec !== undefined) {
      if (this.ttlMs !== Infinity) this.#purgeVm(rec, now);
      if (rec.n >= this.limit) return false;
    } else if (this.limit <= 0) return false;
    let key: number;
    do {
      if (poolAt === pool.length) {
        pool = new Uint8Array(POOL_TOKENS * MEM_TOKEN_SIZE);
        randomFillSync(pool);
        poolAt = 0;
      }
      key = keyOf(pool, poolAt);
      if (!this.#byKey.has(key)) break;
      pool.fill(0, poolAt, poolAt + MEM_TOKEN_SIZE); // 30-bit key taken: draw another token
      poolAt += MEM_TOKEN_SIZE;
    } while (true);
    // Clamp: issue times never go backwards, which keeps the maps ordered by expiry.
    const issued = this.#lastIssued = now > this.#lastIssued ? now : this.#lastIssued;
    if (rec === undefined) this.#byVm.set(vm, rec = { head: null, tail: null, n: 0 });
    const e: Entry<V> = { vm, issued, pool, off: poolAt, key, prev: rec.tail, next: null };
    poolAt += MEM_TOKEN_SIZE;
    if (rec.tail === null) rec.head = e;
    else rec.tail.next = e;
    rec.tail = e;
    rec.n++;
    this.#byKey.set(key, e);
    const p = e.pool, o = e.off;
    for (let i = 0; i < MEM_TOKEN_SIZE; i++) out[offset + i] = p[o + i]!;
    if (this.#timer === undefined) this.#arm();
    return true;
  }

  /**
   * Looks the token up and removes it (single use): the VM it was issued for,
   * or undefined when it is unknown, used, dropped or expired (-ENOENT).
   */
  consume(token: Uint8Array): V | undefined {
    if (token.length !== MEM_TOKEN_SIZE) return undefined;
    return this.consumeAt(token, 0);
  }

  /** consume() of the 32 bytes at `offset` of `buf` (no copy); undefined when fewer are there. */
  consumeAt(buf: Uint8Array, offset: number): V | undefined {
    if (!(offset >= 0) || buf.length - offset < MEM_TOKEN_SIZE) return undefined;
    const e = this.#byKey.get(keyOf(buf, offset));
    if (e === undefined) return undefined;
    const p = e.pool, o = e.off;
    for (let i = 0; i < MEM_TOKEN_SIZE; i++) if (p[o + i] !== buf[offset + i]) return undefined;
    this.#delete(e);
    if (this.#expired(e, this.#now())) return undefined;
    return e.vm;
  }

  /**
   * consumeAt() without its side effects: the entry of the unexpired token at
   * `offset` of `buf`, or undefined (unknown, or expired: consumeAt() would
   * then remove it and answer undefined). Hand the entry to take() to use it.
   */
  peekAt(buf: Uint8Array, offset: number): TokenRef<V> | undefined {
    if (!(offset >= 0) || buf.length - offset < MEM_TOKEN_SIZE) return undefined;
    const e = this.#byKey.get(keyOf(buf, offset));
    if (e === undefined) return undefined;
    const p = e.pool, o = e.off;
    for (let i = 0; i < MEM_TOKEN_SIZE; i++) if (p[o + i] !== buf[offset + i]) return undefined;
    if (this.#expired(e, this.#now())) return undefined;
    return e;
  }

  /** Removes a token peekAt() found (what consumeAt() does to it), with no other check. */
  take(ref: TokenRef<V>): void {
    const e = ref as Entry<V>;
    if (this.#byKey.get(e.key) !== e) return;
    this.#delete(e);
  }

  /** Unexpired outstanding tokens, for one VM or all. */
  outstanding(vm?: V): number {
    if (vm !== undefined) {
      const rec = this.#byVm.get(vm);
      if (rec === undefined) return 0;
      if (this.ttlMs !== Infinity) this.#purgeVm(rec, this.#now());
      return rec.n;
    }
    this.sweep();
    return this.#byKey.size;
  }

  /** Drops every token of `vm` (unhook, VM removal). */
  dropVm(vm: V): number {
    const rec = this.#byVm.get(vm);
    if (rec === undefined) return 0;
    const n = rec.n;
    for (let e = rec.head; e !== null; e = e.next) {
      this.#byKey.delete(e.key);
      wipe(e);
    }
    this.#byVm.delete(vm);
    return n;
  }

  /** Removes expired tokens (the v6 sweep). Returns how many. */
  sweep(): number {
    if (this.ttlMs === Infinity) return 0;
    const now = this.#now();
    let n = 0;
    for (const e of this.#byKey.values()) {
      if (!this.#expired(e, now)) break; // the rest are younger
      this.#delete(e);
      n++;
    }
    this.#disarmIfEmpty();
    return n;
  }

  close(): void {
    this.#closed = true;
    for (const e of this.#byKey.values()) wipe(e);
    this.#byKey.clear();
    this.#byVm.clear();
    this.#disarmIfEmpty();
  }

  #expired(e: Entry<V>, now: number): boolean {
    return now - e.issued >= this.ttlMs;
  }

  #purgeVm(rec: VmTokens<V>, now: number): void {
    let e = rec.head;
    while (e !== null && this.#expired(e, now)) { // the rest are younger
      const next = e.next;
      this.#delete(e);
      e = next;
    }
  }

  /** Removes the entry from both indexes and wipes its bytes. */
  #delete(e: Entry<V>): void {
    this.#byKey.delete(e.key);
    wipe(e);
    const rec = this.#byVm.get(e.vm);
    if (rec === undefined) return;
    if (e.prev === null) rec.head = e.next;
    else e.prev.next = e.next;
    if (e.next === null) rec.tail = e.prev;
    else e.next.prev = e.prev;
    e.prev = e.next = null;
    if (--rec.n === 0) this.#byVm.delete(e.vm);
  }

  #arm(): void {
    if (this.#timer !== undefined || this.ttlMs === Infinity) return;
    this.#timer = setInterval(this.#onTick, this.#sweepMs);
    this.#timer.unref();
  }

  // The timer is left armed when the store empties (re-arming it per batch cost more than
  // the tokens); the next tick finds nothing and disarms it (sweep()).
  #onTick = (): void => { this.sweep(); };

  #disarm(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  #disarmIfEmpty(): void {
    if (this.#timer !== undefined && this.#byKey.size === 0) this.#disarm();
  }
}
