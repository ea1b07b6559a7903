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
 * Tokens are compared through their hex spelling, which never leaves this
 * module: nothing here logs or formats a token.
 *
 * Cost: O(1) per issue/consume. Every token gets the same lifetime and issue
 * times never decrease (the clock is clamped), so the insertion-ordered maps
 * are ordered by expiry: purging stops at the first unexpired token.
 */
import { randomFillSync } from 'node:crypto';
import { MEM_TOKEN_SIZE } from '../abi/structs.js';

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

interface Entry<V> { vm: V; issued: number }

// CSPRNG bytes drawn 8 KiB at a time (one randomFillSync per 256 tokens); each
// token's slice is copied out and wiped from the pool.
const POOL = Buffer.alloc(256 * MEM_TOKEN_SIZE);
let poolAt = POOL.length;
function randomToken(): Buffer {
  if (poolAt + MEM_TOKEN_SIZE > POOL.length) {
    randomFillSync(POOL);
    poolAt = 0;
  }
  const t = Buffer.from(POOL.subarray(poolAt, poolAt + MEM_TOKEN_SIZE));
  POOL.fill(0, poolAt, poolAt + MEM_TOKEN_SIZE);
  poolAt += MEM_TOKEN_SIZE;
  return t;
}

export class TokenStore<V extends object> {
  readonly limit: number;
  readonly ttlMs: number;
  readonly #now: () => number;
  readonly #sweepMs: number;
  readonly #byKey = new Map<string, Entry<V>>();
  readonly #byVm = new Map<V, Set<string>>();
  #timer: NodeJS.Timeout | undefined;
  #closed = false;
  #lastIssued = -Infinity;

  constructor(opts: TokenStoreOptions = {}) {
    this.limit = opts.limit ?? 8;
    this.ttlMs = opts.ttlMs ?? 3000;
    if (!(this.limit >= 0)) throw new RangeError(`token limit must be >= 0, got ${this.limit}`);
    if (!(this.ttlMs > 0)) throw new RangeError(`token ttlMs must be > 0, got ${this.ttlMs}`);
    this.#now = opts.now ?? Date.now;
    this.#sweepMs = opts.sweepMs ?? 1000;
  }

  /** A fresh token for `vm`, or null when `vm` already has `limit` outstanding (-KVM_EAGAIN). */
  issue(vm: V): Uint8Array | null {
    if (this.#closed) return null;
    this.#purgeVm(vm);
    const keys = this.#byVm.get(vm);
    if ((keys?.size ?? 0) >= this.limit) return null;
    let token: Buffer, key: string;
    do {
      token = randomToken();
      key = token.toString('hex');
    } while (this.#byKey.has(key)); // 2^-256: never, but cheap to be sure
    // Clamp: issue times never go backwards, which keeps the maps ordered by expiry.
    const issued = this.#lastIssued = Math.max(this.#lastIssued, this.#now());
    this.#byKey.set(key, { vm, issued });
    if (keys) keys.add(key);
    else this.#byVm.set(vm, new Set([key]));
    this.#arm();
    return new Uint8Array(token);
  }

  /**
   * Looks the token up and removes it (single use): the VM it was issued for,
   * or undefined when it is unknown, used, dropped or expired (-ENOENT).
   */
  consume(token: Uint8Array): V | undefined {
    if (token.length !== MEM_TOKEN_SIZE) return undefined;
    const key = Buffer.from(token.buffer, token.byteOffset, token.byteLength).toString('hex');
    const e = this.#byKey.get(key);
    if (e === undefined) return undefined;
    this.#delete(key, e.vm);
    if (this.#expired(e, this.#now())) return undefined;
    return e.vm;
  }

  /** Unexpired outstanding tokens, for one VM or all. */
  outstanding(vm?: V): number {
    if (vm !== undefined) {
      this.#purgeVm(vm);
      return this.#byVm.get(vm)?.size ?? 0;
    }
    this.sweep();
    return this.#byKey.size;
  }

  /** Drops every token of `vm` (unhook, VM removal). */
  dropVm(vm: V): number {
    const keys = this.#byVm.get(vm);
    if (keys === undefined) return 0;
    for (const k of keys) this.#byKey.delete(k);
    this.#byVm.delete(vm);
    this.#disarmIfEmpty();
    return keys.size;
  }

  /** Removes expired tokens (the v6 sweep). Returns how many. */
  sweep(): number {
    if (this.ttlMs === Infinity) return 0;
    const now = this.#now();
    let n = 0;
    for (const [k, e] of this.#byKey) {
      if (!this.#expired(e, now)) break; // the rest are younger
      this.#delete(k, e.vm);
      n++;
    }
    return n;
  }

  close(): void {
    this.#closed = true;
    this.#byKey.clear();
    this.#byVm.clear();
    this.#disarmIfEmpty();
  }

  #expired(e: Entry<V>, now: number): boolean {
    return now - e.issued >= this.ttlMs;
  }

  #purgeVm(vm: V): void {
    if (this.ttlMs === Infinity) return;
    const keys = this.#byVm.get(vm);
    if (keys === undefined) return;
    const now = this.#now();
    for (const k of keys) {
      if (!this.#expired(this.#byKey.get(k)!, now)) break; // the rest are younger
      this.#delete(k, vm);
    }
  }

  #delete(key: string, vm: V): void {
    this.#byKey.delete(key);
    const keys = this.#byVm.get(vm);
    if (keys !== undefined) {
      keys.delete(key);
      if (keys.size === 0) this.#byVm.delete(vm);
    }
    this.#disarmIfEmpty();
  }

  #arm(): void {
    if (this.#timer !== undefined || this.ttlMs === Infinity) return;
    this.#timer = setInterval(() => this.sweep(), this.#sweepMs);
    this.#timer.unref();
  }

  #disarmIfEmpty(): void {
    if (this.#timer !== undefined && this.#byKey.size === 0) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }
}
