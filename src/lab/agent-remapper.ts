/**
 * The lab's page remapper: the QEMU agent (native/lab, docs/lab-agent.md)
 * swaps the host page behind one guest-physical page of the *introspector*
 * VM, as a real KVMI host's mm_remote_map() does; the introspector's kernel
 * never sees a change.
 *
 * - The introspector page is its guest-physical address (the mailbox's a2 for
 *   MAP, a0 for UNMAP), which equals the offset in the introspector's RAM file
 *   below the PCI hole (guests up to 2816 MiB).
 * - MAP: agent MAP of that page to the target's RAM file (ATTACH_PATH once per
 *   target file) at the target page's file offset.
 * - UNMAP (and revoke): the page must read zeros afterwards, as the model's
 *   fresh page does. With the introspector's RAM file known, the page of that
 *   file is zeroed (pwrite) and then RESTOREd: QEMU's mapping of its own file
 *   comes back, so its RAM VMA merges again and no anonymous page is left
 *   behind. Without it, the agent's FRESH (a private zero page: one VMA per
 *   run until the next RESTORE_ALL).
 * - Batches: the queued remaps are coalesced into runs and pipelined to the
 *   agent in one write; a MAP run that fails is rolled back per page.
 * - Nothing is mapped in this process: no VMA accounting, no SIGBUS guards
 *   (a target file that shrinks hurts QEMU, and a target VM's RAM never does).
 */
import * as fs from 'node:fs';
import { debuglog } from 'node:util';
import { PAGE_SIZE } from '../abi/structs.js';
import { errnoName } from '../abi/errno.js';
import { UsageError } from '../errors.js';
import type { GuestMemory } from '../model/memory.js';
import type { PageRemapper, RemapCounters, RemapperContext } from '../model/remapper.js';
import type { ModelVm } from '../model/host.js';
import { AGENT_OP, type AgentRequest } from './agent-protocol.js';
import { AgentClient } from './agent-client.js';

const debug = debuglog('kvmmem');
const PS = PAGE_SIZE;
/** Guest-physical = RAM file offset only below q35's PCI hole (docs/lab-agent.md "Addresses"). */
const MAX_FLAT_RAM = 2816 * 1024 * 1024;
const ZERO_PAGES = 64;

export interface AgentRemapperOptions {
  /** The agent's control socket. */
  agentSocket: string;
  /** The introspector's RAM file (QEMU's mem-path=): UNMAP zeroes the page there and RESTOREs it; absent: FRESH. */
  introspectorRam?: string;
  /** Bound on each agent round trip (default 5000 ms). */
  timeoutMs?: number;
}

/** A queued remap: a MAP of `target` at `offset`, or (target 0) a fresh page. */
interface Pending { page: number; target: number; offset: number }
interface Run { page: number; pages: number; target: number; offset: number }

export class AgentRemapper implements PageRemapper {
  readonly kind = 'agent';
  readonly agent: AgentClient;
  /** Introspector RAM bytes (what the agent found QEMU mapping). */
  readonly ramSize: number;
  readonly #ctx: RemapperContext;
  readonly #ramFd: number;
  readonly #targets = new Map<GuestMemory, number>();
  readonly #counters: RemapCounters = { remapCalls: 0, remappedPages: 0 };
  #pending: Pending[] | null = null;
  readonly #zeros = Buffer.alloc(ZERO_PAGES * PS);
  #closed = false;

  constructor(ctx: RemapperContext, opts: AgentRemapperOptions) {
    this.#ctx = ctx;
    const agent = AgentClient.connect(opts.agentSocket, opts.timeoutMs ?? 5000);
    try {
      // The agent finds QEMU's RAM mapping on the first request that needs it: RESTORE of a
      // page that is not remapped changes nothing and makes it look (-ENODEV: not mapped yet).
      const probe = agent.call({ op: AGENT_OP.RESTORE, gpa: 0, npages: 1 });
      const info = agent.info();
      if (probe.status < 0 || info.ramSize === 0) {
        throw new UsageError(`the lab agent at ${opts.agentSocket} has no RAM mapping (${errnoName(-probe.status)})`,
          'start QEMU with KVMMEM_AGENT_RAM = its memory-backend-file mem-path= (share=on), and wait until it runs');
      }
      if (info.pageSize !== PS) throw new UsageError(`the lab agent's page size is ${info.pageSize}, not ${PS}`);
      if (info.ramSize > MAX_FLAT_RAM) {
        throw new UsageError(`the introspector has ${info.ramSize} bytes of RAM: above ${MAX_FLAT_RAM} guest-physical addresses are not RAM file offsets`,
          'give the introspector VM at most 2816 MiB');
      }
      this.ramSize = info.ramSize;
      this.#ramFd = opts.introspectorRam === undefined ? -1 : fs.openSync(opts.introspectorRam, 'r+');
    } catch (e) {
      agent.close();
      throw e;
    }
    this.agent = agent;
  }

  // ---- introspector page identity: a guest-physical address of the introspector ----

  mapPage(mapGpa: bigint, _present: boolean): number {
    if (mapGpa >= BigInt(this.ramSize)) return -1;
    return Number(mapGpa) - (Number(mapGpa) % PS);
  }

  validPage(page: number): boolean {
    return page >= 0 && page + PS <= this.ramSize;
  }

  unmapPage(mapGpa: bigint): number {
    return this.mapPage(mapGpa, true);
  }

  // The agent's remaps are QEMU's VMAs (it fails a MAP with -ENOMEM at QEMU's vm.max_map_count): nothing to count here.
  cost(): number { return 0; }
  room(): boolean { return true; }
  listed(): void { /* no accounting */ }
  unlisted(): void { /* no accounting */ }

  // ---- remaps ----

  get deferring(): boolean { return this.#pending !== null; }

  map(page: number, mem: GuestMemory, _fd: number, offset: number, _writable: boolean): number {
    let target: number;
    try {
      target = this.#target(mem);
    } catch (e) {
      debug('agent remapper: %s', (e as Error).message);
      return (e as { errno?: number }).errno ?? -5;
    }
    if (this.#pending !== null) {
      this.#pending.push({ page, target, offset });
      return 0;
    }
    return this.#doRuns([{ page, pages: 1, target, offset }])[0]!;
  }

  fresh(page: number): number {
    if (this.#pending !== null) {
      this.#pending.push({ page, target: 0, offset: 0 });
      return 0;
    }
    return this.#doRuns([{ page, pages: 1, target: 0, offset: 0 }])[0]!;
  }

  freshOrLog(page: number, pages: number): void {
    const r = this.#doRuns([{ page, pages, target: 0, offset: 0 }])[0]!;
    if (r < 0) debug('agent remapper: could not give gpa 0x%s (%d pages) a zeroed page: %s', page.toString(16), pages, errnoName(-r));
  }

  begin(): void {
    if (this.#pending !== null) throw new Error('AgentRemapper: remaps are already being deferred');
    this.#pending = [];
  }

  end(): Map<number, number> {
    const q = this.#pending ?? [];
    this.#pending = null;
    const failures = new Map<number, number>();
    if (q.length === 0) return failures;
    // One op per page (the last queued), in page order, then runs of adjacent pages
    // of the same kind (and adjacent target offsets for MAPs).
    const last = new Map<number, Pending>();
    for (const p of q) {
      last.delete(p.page);
      last.set(p.page, p);
    }
    const sorted = [...last.values()].sort((a, b) => a.page - b.page);
    const runs: Run[] = [];
    for (const p of sorted) {
      const r = runs[runs.length - 1];
      if (r !== undefined && r.target === p.target && p.page === r.page + r.pages * PS && (p.target === 0 || p.offset === r.offset + r.pages * PS)) r.pages++;
      else runs.push({ page: p.page, pages: 1, target: p.target, offset: p.offset });
    }
    const res = this.#doRuns(runs);
    for (let i = 0; i < runs.length; i++) {
      const run = runs[i]!;
      if (res[i]! >= 0) continue;
      if (run.target === 0) {
        this.freshOrLog(run.page, run.pages); // retry once; log if it fails again
        continue;
      }
      for (let k = 0; k < run.pages; k++) {
        const p = run.page + k * PS;
        this.#ctx.drop(p);
        failures.set(p, res[i]!);
      }
      this.freshOrLog(run.page, run.pages);
    }
    return failures;
  }

  /** The runs' remaps in one pipelined exchange: 0 or -errno each. */
  #doRuns(runs: Run[]): number[] {
    const reqs: AgentRequest[] = [];
    const first: number[] = [];
    for (const r of runs) {
      this.#counters.remapCalls++;
      this.#counters.remappedPages += r.pages;
      first.push(reqs.length);
      if (r.target !== 0) reqs.push({ op: AGENT_OP.MAP, gpa: r.page, npages: r.pages, target: r.target, offset: r.offset });
      else if (this.#ramFd >= 0) {
        this.#zero(r.page, r.pages); // hidden behind the remap until the RESTORE below
        reqs.push({ op: AGENT_OP.RESTORE, gpa: r.page, npages: r.pages });
      } else reqs.push({ op: AGENT_OP.FRESH, gpa: r.page, npages: r.pages });
    }
    let resps;
    try {
      resps = this.agent.many(reqs);
    } catch (e) {
      debug('agent remapper: %s', (e as Error).message);
      const errno = (e as { errno?: number }).errno ?? -5;
      return runs.map(() => errno);
    }
    return first.map((i) => resps[i]!.status);
  }

  /** Zeroes `pages` pages of the introspector's RAM file at `page`. */
  #zero(page: number, pages: number): void {
    for (let done = 0; done < pages; done += ZERO_PAGES) {
      const n = Math.min(ZERO_PAGES, pages - done) * PS;
      fs.writeSync(this.#ramFd, this.#zeros, 0, n, page + done * PS);
    }
  }

  /** The agent's target id of `mem`'s file (ATTACH_PATH once per file). */
  #target(mem: GuestMemory): number {
    let id = this.#targets.get(mem);
    if (id === undefined) {
      if (mem.path === undefined) throw new UsageError(`lab target ${mem.name} has no file path: the agent attaches targets by path`);
      id = this.agent.attachPath(mem.path);
      this.#targets.set(mem, id);
    }
    return id;
  }

  addVm(_vm: ModelVm): void { /* targets attach on their first MAP */ }

  counters(): RemapCounters { return { ...this.#counters }; }

  /**
   * RESTORE_ALL (everything the agent remapped, whoever asked, goes back to
   * QEMU's own pages), DETACH of our targets, close. The host has revoked its
   * mappings (zeroed) before this.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      if (!this.agent.closed) {
        this.agent.call({ op: AGENT_OP.RESTORE_ALL });
        for (const id of this.#targets.values()) this.agent.call({ op: AGENT_OP.DETACH, target: id });
      }
    } catch (e) {
      debug('agent remapper: close: %s', (e as Error).message);
    }
    this.agent.close();
    if (this.#ramFd >= 0) fs.closeSync(this.#ramFd);
  }
}
