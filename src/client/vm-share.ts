/**
 * What the sessions of one thread share about one VM:
 *
 * - one 'unhook' and one 'gone' listener, however many sessions map the VM (so
 *   no MaxListenersExceededWarning at eleven sessions), fanned out to each;
 * - the VM's token budget. A host limits the tokens of a VM that are handed out
 *   and not yet used (v6: a handful). Sessions that each requested up to that
 *   many would collide on EAGAIN and back off on timers; instead they take turns
 *   in arrival order, each batch waiting until its tokens fit the budget, so N
 *   sessions together run about as fast as one doing all their work.
 */
import { debuglog } from 'node:util';
import type { TargetVm } from './target.js';

const debug = debuglog('kvmmem');
/** Every this many jobs one asks for its full maxTokensInFlight again (the limit may have been another process's tokens). */
const REPROBE_EVERY = 256;

type EndListener = () => void;

class VmShare {
  readonly #vm: TargetVm;
  readonly #ends = new Set<EndListener>();
  readonly #onEnd = (): void => {
    for (const f of [...this.#ends]) f();
    this.#wakeAll();
  };
  /** Largest batch any session of this VM asks for: the budget's size. */
  #capacity = 1;
  #outstanding = 0;
  /** Outstanding tokens past which the host refused (EAGAIN) with nobody else of ours holding them: its limit. */
  #hostLimit = Infinity;
  #jobs = 0;
  readonly #waiters: { n: number; go: (others: number) => void }[] = [];

  constructor(vm: TargetVm) {
    this.#vm = vm;
    vm.on('unhook', this.#onEnd);
    vm.on('gone', this.#onEnd);
  }

  get empty(): boolean { return this.#ends.size === 0 && this.#waiters.length === 0 && this.#outstanding === 0; }

  join(onEnd: EndListener, maxTokens: number): void {
    this.#ends.add(onEnd);
    if (maxTokens > this.#capacity) {
      this.#capacity = maxTokens;
      this.#pump();
    }
  }

  leave(onEnd: EndListener): void {
    this.#ends.delete(onEnd);
  }

  detach(): void {
    this.#vm.off('unhook', this.#onEnd);
    this.#vm.off('gone', this.#onEnd);
  }

  /**
   * The batch size a new job starts with: maxTokensInFlight, clamped to the
   * host's limit once one was seen (a v6 host hands out 8: asking for 256 only
   * costs refused requests and round trips).
   */
  budgetFor(maxTokens: number): number {
    if (++this.#jobs % REPROBE_EVERY === 0) return maxTokens;
    return Math.min(maxTokens, this.#hostLimit);
  }

  /**
   * A batch of `requested` got `granted` tokens, the rest refused with EAGAIN.
   * Only a batch that had the budget to itself (`others` = 0 of ours
   * outstanding) measures the host's limit; returns the limit known now.
   */
  refused(others: number, granted: number, requested: number, maxTokens: number): number {
    if (granted < requested && others === 0 && Math.max(1, granted) < this.#hostLimit) {
      this.#hostLimit = Math.max(1, granted);
      debug('vm %s: the host refuses tokens past %d outstanding: batches clamped to %d (maxTokensInFlight %d)', this.#vm.name, this.#hostLimit, this.#hostLimit, maxTokens);
    }
    return this.#hostLimit;
  }

  /** Waits until n more tokens fit the budget (first come, first served), then counts them out; resolves to how many of ours others held then. */
  acquire(n: number): Promise<number> {
    const want = Math.min(n, this.#capacity);
    if (this.#waiters.length === 0 && this.#outstanding + want <= this.#capacity) {
      const others = this.#outstanding;
      this.#outstanding += want;
      return Promise.resolve(others);
    }
    return new Promise((go) => {
      this.#waiters.push({ n: want, go });
    });
  }

  /** The tokens of a batch were used (or refused, or lost with the VM). */
  release(n: number): void {
    this.#outstanding = Math.max(0, this.#outstanding - Math.min(n, this.#capacity));
    this.#pump();
    if (this.empty) forget(this.#vm, this);
  }

  #pump(): void {
    while (this.#waiters.length > 0 && this.#outstanding + this.#waiters[0]!.n <= this.#capacity) {
      const w = this.#waiters.shift()!;
      const others = this.#outstanding;
      this.#outstanding += w.n;
      w.go(others);
    }
  }

  /** The VM is ending: every waiter goes on, finds it gone and throws. */
  #wakeAll(): void {
    for (const w of this.#waiters.splice(0)) {
      const others = this.#outstanding;
      this.#outstanding += w.n;
      w.go(others);
    }
  }
}

const shares = new WeakMap<TargetVm, VmShare>();

export function vmShare(vm: TargetVm): VmShare {
  let s = shares.get(vm);
  if (!s) shares.set(vm, (s = new VmShare(vm)));
  return s;
}

/** Drops a session's interest; the share goes when nothing uses it. */
export function leaveVm(vm: TargetVm, onEnd: EndListener): void {
  const s = shares.get(vm);
  if (!s) return;
  s.leave(onEnd);
  if (s.empty) forget(vm, s);
}

function forget(vm: TargetVm, s: VmShare): void {
  if (shares.get(vm) !== s) return;
  s.detach();
  shares.delete(vm);
}

export type { VmShare };
