/**
 * A whole KVMI deployment in one process, on the hypercall model: the tool's
 * IntrospectionServer on a unix socket, a ModelHost whose device managers
 * connect to it and hook their VMs, and sessions over the model's /dev/kvmmem.
 * Everything in between is real (sockets, handshake, tokens, page remaps), so
 * code written against a lab runs unchanged against a real deployment.
 */
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { IntrospectionServer, type Vm } from '../channel/index.js';
import { ModelHost, type GuestMemory, type ModelHostOptions, type ModelVm } from '../model/index.js';
import type { Device } from '../device/device.js';
import { UsageError } from '../errors.js';
import { makeOwnedTempDir, onThreadExit, removeStaleTempDirs } from '../sys/thread.js';
import { Session, type SessionOptions } from '../client/session.js';

/** A lab's session: leaves the lab's list when closed, so a long-lived lab holds only open ones. */
class LabSession extends Session {
  readonly #closed: (s: Session) => void;
  constructor(device: Device, options: SessionOptions, closed: (s: Session) => void) {
    super(device, options);
    this.#closed = closed;
  }

  override close(): void {
    try {
      super.close();
    } finally {
      this.#closed(this);
    }
  }
}

/** Labs of processes killed without cleanup leave their socket directories: swept once per process. */
let staleSwept = false;

export interface LabVmSpec {
  name: string;
  /** Guest memory, or a size in bytes for an anonymous VM. */
  memory: GuestMemory | bigint | number;
  uuid?: string;
}

export interface LabOptions {
  vms: LabVmSpec[];
  host?: ModelHostOptions;
  /** The handshake cookie both sides share (default: 16 random bytes per lab, hex). */
  cookie?: string;
  /** Unix socket path the tool listens on (default: a fresh temp dir). */
  socketPath?: string;
}

export interface LabVm {
  /** The host side: memory, hook state, counters. */
  readonly model: ModelVm;
  /** The tool side: the KVMI connection a session maps through. */
  readonly vm: Vm;
}

export class ModelLab {
  readonly host: ModelHost;
  readonly server: IntrospectionServer;
  readonly socketPath: string;
  readonly #vms = new Map<string, LabVm>();
  readonly #sessions = new Set<Session>();
  readonly #tmp: string | undefined;
  readonly #dropSession = (s: Session): void => { this.#sessions.delete(s); };
  readonly #unhookExit: () => void;
  #closed = false;

  private constructor(host: ModelHost, server: IntrospectionServer, socketPath: string, tmp: string | undefined) {
    this.host = host;
    this.server = server;
    this.socketPath = socketPath;
    this.#tmp = tmp;
    // A process or worker that exits without close() still releases the lab's
    // native resources and removes its directory (the server's sockets end with
    // the thread's event loop).
    this.#unhookExit = onThreadExit(() => this.#teardown());
  }

  static async start(opts: LabOptions): Promise<ModelLab> {
    // Random per lab: a fixed default would be a secret every install shares.
    const cookie = opts.cookie ?? randomBytes(16).toString('hex');
    if (!staleSwept) {
      staleSwept = true;
      removeStaleTempDirs();
    }
    // kvmmem-lab-PID-THREAD-XXXXXX: the owner can be told from the name (thread.ts).
    const tmp = opts.socketPath === undefined ? makeOwnedTempDir('lab') : undefined;
    const socketPath = opts.socketPath ?? join(tmp!, 'kvmi.sock');
    let server: IntrospectionServer;
    try {
      server = await IntrospectionServer.listen({ unix: socketPath }, { cookie });
    } catch (e) {
      if (tmp !== undefined) rmSync(tmp, { recursive: true, force: true });
      throw e;
    }
    const host = new ModelHost({ cookie, ...opts.host });
    const lab = new ModelLab(host, server, socketPath, tmp);
    try {
      for (const spec of opts.vms) await lab.addVm(spec);
    } catch (e) {
      await lab.close();
      throw e;
    }
    return lab;
  }

  /** Creates a VM on the host, hooks it (device manager connects + handshakes) and waits for the tool side. */
  async addVm(spec: LabVmSpec): Promise<LabVm> {
    if (this.#vms.has(spec.name)) throw new UsageError(`a VM named ${spec.name} already exists in this lab`);
    const model = this.host.createVm(spec.uuid === undefined ? { name: spec.name, memory: spec.memory } : { name: spec.name, memory: spec.memory, uuid: spec.uuid });
    const connected = this.server.waitForVm({ uuid: model.uuid }, 10_000);
    await model.attach({ unix: this.socketPath });
    const entry: LabVm = { model, vm: await connected };
    this.#vms.set(spec.name, entry);
    return entry;
  }

  /** The tool-side Vm named `name`. */
  vm(name: string): Vm {
    const e = this.#vms.get(name);
    if (!e) throw new UsageError(`no VM named ${name} in this lab (have: ${[...this.#vms.keys()].join(', ') || 'none'})`);
    return e.vm;
  }

  /** The host-side ModelVm named `name`. */
  modelVm(name: string): ModelVm {
    const e = this.#vms.get(name);
    if (!e) throw new UsageError(`no VM named ${name} in this lab`);
    return e.model;
  }

  /** A new session over the model's /dev/kvmmem (one driver file_map). The lab keeps it until it is closed. */
  open(options: SessionOptions = {}): Session {
    const device = this.host.openDevice();
    let s: Session;
    try {
      s = new LabSession(device, options, this.#dropSession);
    } catch (e) {
      device.close();
      throw e;
    }
    this.#sessions.add(s);
    return s;
  }

  /** Sessions of this lab not closed yet (closed ones are not kept). */
  get openSessions(): number { return this.#sessions.size; }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unhookExit();
    for (const s of [...this.#sessions]) s.close();
    await this.server.close();
    this.host.close();
    if (this.#tmp !== undefined) rmSync(this.#tmp, { recursive: true, force: true });
  }

  /** close() without waiting: what still can be done when the thread exits. */
  #teardown(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const s of [...this.#sessions]) s.close();
    this.host.close();
    if (this.#tmp !== undefined) rmSync(this.#tmp, { recursive: true, force: true });
  }

  async [Symbol.asyncDispose](): Promise<void> { await this.close(); }
}
