/**
 * The lab host: what a KVMI host (KVM + QEMU's device manager) does for the
 * lab's two VMs, on stock QEMU.
 *
 *   introspector VM                         this process (LabHost)
 *   kvmmem.ko --mailbox slot + doorbell-->  MailboxServer -> ModelHost.hypercall
 *                                             (tokens, v6 rules, the host's list)
 *                                             -> AgentRemapper -> the agent in the
 *                                                introspector's QEMU remaps the page
 *   the tool  <--KVMI over TCP (hostfwd)--  device manager of each target VM
 *
 * The model host's code is reused as it is (token store, hypercall semantics,
 * hook/unhook/preunhook, the device manager); only the page remapper differs.
 * Each target VM's device manager connects to the tool inside the
 * introspector, and again whenever the tool goes away: the tool runs when a
 * user runs it (`kvmmem lab run -- kvmmem ...`), not when the lab comes up.
 */
import * as fs from 'node:fs';
import { debuglog } from 'node:util';
import { KvmmemError, UsageError } from '../errors.js';
import { GuestMemory } from '../model/memory.js';
import { ModelHost, type HostStats } from '../model/host.js';
import type { ModelVm } from '../model/vm.js';
import { attach } from '../model/device-manager.js';
import type { UnhookAck } from '../model/kvmi-server.js';
import type { AgentStats } from './agent-client.js';
import { AgentRemapper } from './agent-remapper.js';
import { Doorbell, type DoorbellStats } from './doorbell.js';
import { MailboxServer, type MailboxStats } from './mailbox-server.js';

const debug = debuglog('kvmmem');
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

export interface LabHostTarget {
  /** The VM's name (the handshake's name: what `--vm` names inside). */
  name: string;
  /** The target QEMU's mem-path= file (memory-backend-file, share=on). */
  ramPath: string;
  uuid?: string;
}

export interface LabHostOptions {
  /** The agent's control socket in the introspector's QEMU (KVMMEM_AGENT_SOCKET). */
  agentSocket: string;
  /** The doorbell's shared memory (KVMMEM_AGENT_MAILBOX): the mailbox the guest module uses. */
  mailboxPath: string;
  /** The introspector's RAM file (its QEMU's mem-path=): an UNMAP zeroes the page there and restores it. */
  introspectorRam?: string;
  targets: LabHostTarget[];
  /** The KVMI cookie the tool inside must present. */
  cookie: string;
  /** Where the tool listens, as seen from here (the hostfwd); none: VMs are not attached. */
  tool?: { tcp: { host: string; port: number } };
  /** Mailbox slots served (default 16). */
  nslots?: number;
  /** Wait between attach rounds while no tool listens (default 500 ms). */
  attachIntervalMs?: number;
}

export interface LabHostStats {
  host: HostStats;
  mailbox: MailboxStats;
  doorbell: DoorbellStats;
  agent: AgentStats | null;
  remaps: { remapCalls: number; remappedPages: number };
  /** Per target: whether its device manager is hooked to a tool now, and how many times it attached. */
  targets: { name: string; hooked: boolean; attaches: number; lastError: string | null }[];
}

interface TargetState { vm: ModelVm; attaches: number; lastError: string | null; loop: Promise<void> | null }

export class LabHost {
  readonly host: ModelHost;
  readonly mailbox: MailboxServer;
  readonly #doorbell: Doorbell;
  readonly #remapper: AgentRemapper;
  readonly #targets: TargetState[] = [];
  readonly #memories: GuestMemory[] = [];
  #closed = false;

  private constructor(host: ModelHost, remapper: AgentRemapper, mailbox: MailboxServer, doorbell: Doorbell) {
    this.host = host;
    this.#remapper = remapper;
    this.mailbox = mailbox;
    this.#doorbell = doorbell;
  }

  /**
   * Starts serving: the model host with the agent remapper, each target VM
   * over its RAM file, the mailbox (its magic written last, so a module loaded
   * after this binds), the doorbell subscription, and the attach loops.
   * Everything started is stopped again when a step fails.
   */
  static async start(o: LabHostOptions): Promise<LabHost> {
    if (o === null || typeof o !== 'object') throw new UsageError('LabHost.start: options are required');
    if (!Array.isArray(o.targets) || o.targets.length === 0) throw new UsageError('LabHost.start: at least one target VM is required');
    for (const f of [o.mailboxPath, ...o.targets.map((t) => t.ramPath)]) {
      if (!fs.existsSync(f)) throw new UsageError(`LabHost.start: ${f} does not exist`, 'start the VMs first (the agent creates the mailbox; QEMU the RAM files)');
    }
    let remapper: AgentRemapper | undefined;
    const host = new ModelHost({
      name: 'lab', cookie: o.cookie,
      remapper: (ctx) => (remapper = new AgentRemapper(ctx, { agentSocket: o.agentSocket, ...(o.introspectorRam === undefined ? {} : { introspectorRam: o.introspectorRam }) })),
    });
    const memories: GuestMemory[] = [];
    let mailbox: MailboxServer | undefined;
    let doorbell: Doorbell | undefined;
    try {
      for (const t of o.targets) {
        const size = BigInt(fs.statSync(t.ramPath).size);
        const memory = GuestMemory.fromFile(t.ramPath, { regions: GuestMemory.pcLayout(size, { machine: 'q35' }), name: t.name });
        memories.push(memory);
        host.createVm({ name: t.name, memory, ...(t.uuid === undefined ? {} : { uuid: t.uuid }) });
      }
      let lab: LabHost | undefined;
      doorbell = await Doorbell.open(o.agentSocket, () => lab?.mailbox.serve());
      const bell = doorbell;
      mailbox = new MailboxServer({ path: o.mailboxPath, host, ring: () => bell.ring(0), ...(o.nslots === undefined ? {} : { nslots: o.nslots }) });
      lab = new LabHost(host, remapper!, mailbox, doorbell);
      lab.#memories.push(...memories);
      mailbox.start();
      mailbox.serve(); // requests written before we subscribed
      doorbell.onClose((why) => { debug('lab host: doorbell: %s', why); void lab!.close(); });
      for (const vm of host.vms()) lab.#targets.push({ vm, attaches: 0, lastError: null, loop: null });
      if (o.tool !== undefined) for (const t of lab.#targets) t.loop = lab.#attachLoop(t, o.tool.tcp, o.cookie, o.attachIntervalMs ?? 500);
      debug('lab host: serving %s for %d target(s)', o.mailboxPath, o.targets.length);
      return lab;
    } catch (e) {
      doorbell?.close();
      mailbox?.close();
      host.close();
      for (const m of memories) m.close();
      throw e;
    }
  }

  get closed(): boolean { return this.#closed; }

  /** The target VMs (their device managers' side). */
  vms(): ModelVm[] { return this.#targets.map((t) => t.vm); }

  stats(): LabHostStats {
    let agent: AgentStats | null = null;
    try { if (!this.#remapper.agent.closed) agent = this.#remapper.agent.stats(); } catch { /* the agent went away */ }
    return {
      host: this.host.stats(), mailbox: this.mailbox.stats(), doorbell: this.#doorbell.stats(), agent,
      remaps: this.#remapper.counters(),
      targets: this.#targets.map((t) => ({ name: t.vm.name, hooked: t.vm.hooked, attaches: t.attaches, lastError: t.lastError })),
    };
  }

  /**
   * The device manager's pre-unhook of target `name` (KVM_INTROSPECTION_PREUNHOOK): the tool gets
   * the UNHOOK event, then the VM is unhooked (its mappings revoked: the
   * introspector's pages read zeros). The attach loop hooks it again when the
   * tool still listens. Resolves with how the tool answered.
   */
  async preunhook(name: string, timeoutMs?: number): Promise<UnhookAck> {
    const t = this.#targets.find((x) => x.vm.name === name);
    if (t === undefined) throw new UsageError(`lab host: no target VM '${name}' (have: ${this.#targets.map((x) => x.vm.name).join(', ')})`);
    return t.vm.preunhook(timeoutMs === undefined ? {} : { timeoutMs });
  }

  /**
   * Stops serving: attach loops end, the mailbox's magic is cleared (a guest
   * call now fails fast), the target VMs are unhooked (their mappings revoked:
   * the introspector pages read zeros again) and every page the agent remapped
   * goes back to the introspector's own RAM.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.mailbox.close();
    this.#doorbell.close();
    for (const t of this.#targets) {
      try { if (t.vm.hooked) t.vm.unhook(); } catch (e) { debug('lab host: unhook %s: %s', t.vm.name, (e as Error).message); }
    }
    this.host.close(); // revokes, then the remapper's RESTORE_ALL + DETACH
    for (const m of this.#memories) m.close();
    // The attach loops see #closed at their next step; one mid-attempt ends within its
    // attemptTimeoutMs and its hook fails on the closed host. Not awaited: a loop asleep
    // on an unref'd timer must not hold close() (or the process) open.
  }

  /** Attach, wait until the tool goes away, attach again; until close(). */
  async #attachLoop(t: TargetState, tcp: { host: string; port: number }, cookie: string, intervalMs: number): Promise<void> {
    while (!this.#closed) {
      try {
        const a = await attach(t.vm, { tcp, cookie, timeoutMs: 30_000, retries: 1_000_000, retryDelayMs: intervalMs, attemptTimeoutMs: 3000 });
        if (this.#closed) { a.socket.destroy(); break; }
        t.attaches++;
        t.lastError = null;
        debug('lab host: %s attached to the tool at %s:%d', t.vm.name, tcp.host, tcp.port);
        await new Promise<void>((r) => { if (a.socket.destroyed) r(); else a.socket.once('close', () => r()); });
        debug('lab host: the tool closed %s\'s connection', t.vm.name);
      } catch (e) {
        if (this.#closed) break;
        t.lastError = (e as Error).message;
        // A tool that listens but refuses us (cookie, EEXIST...) is worth a line; silence is the normal idle state.
        if (!(e instanceof KvmmemError) || (e.code !== 'ETIMEDOUT' && e.code !== 'ECONNRESET' && e.code !== 'ECONNREFUSED')) debug('lab host: attach %s: %s', t.vm.name, t.lastError);
      }
      await sleep(intervalMs);
    }
  }
}
