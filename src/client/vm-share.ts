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
import type { TargetVm } from './target.js';

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
  readonly #waiters: { n: number; go: () => void }[] = [];

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

  /** Waits until n more tokens fit the budget (first come, first served), then counts them out. */
  acquire(n: number): Promise<void> {
    const want = Math.min(n, this.#capacity);
    if (this.#waiters.length === 0 && this.#outstanding + want <= this.#capacity) {
      this.#outstanding += want;
      return Promise.resolve();
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
      this.#outstanding += w.n;
      w.go();
    }
  }

  /** The VM is ending: every waiter goes on, finds it gone and throws. */
  #wakeAll(): void {
    for (const w of this.#waiters.splice(0)) {
      this.#outstanding += w.n;
      w.go();
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
