/**
 * A whole KVMI deployment in one process, on the hypercall model: the tool's
 * IntrospectionServer on a unix socket, a ModelHost whose device managers
 * connect to it and hook their VMs, and sessions over the model's /dev/kvmmem.
 * Everything in between is real (sockets, handshake, tokens, page remaps), so
 * code written against a lab runs unchanged against a real deployment.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IntrospectionServer, type Vm } from '../channel/index.js';
import { ModelHost, type GuestMemory, type ModelHostOptions, type ModelVm } from '../model/index.js';
import { UsageError } from '../errors.js';
import { KvmMem } from './kvmmem.js';
import type { Session, SessionOptions } from './session.js';

export interface LabVmSpec {
  name: string;
  /** Guest memory, or a size in bytes for an anonymous VM. */
  memory: GuestMemory | bigint | number;
  uuid?: string;
}

export interface LabOptions {
  vms: LabVmSpec[];
  host?: ModelHostOptions;
  /** The handshake cookie both sides share (default 'kvmmem'). */
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
  #closed = false;

  private constructor(host: ModelHost, server: IntrospectionServer, socketPath: string, tmp: string | undefined) {
    this.host = host;
    this.server = server;
    this.socketPath = socketPath;
    this.#tmp = tmp;
  }

  static async start(opts: LabOptions): Promise<ModelLab> {
    const cookie = opts.cookie ?? 'kvmmem';
    const tmp = opts.socketPath === undefined ? mkdtempSync(join(tmpdir(), 'kvmmem-lab-')) : undefined;
    const socketPath = opts.socketPath ?? join(tmp!, 'kvmi.sock');
    const server = await IntrospectionServer.listen({ unix: socketPath }, { cookie });
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

  /** A new session over the model's /dev/kvmmem (one driver file_map). */
  open(options: SessionOptions = {}): Session {
    const s = KvmMem.open({ model: this.host, ...options });
    this.#sessions.add(s);
    return s;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const s of this.#sessions) s.close();
    await this.server.close();
    this.host.close();
    if (this.#tmp !== undefined) rmSync(this.#tmp, { recursive: true, force: true });
  }

  async [Symbol.asyncDispose](): Promise<void> { await this.close(); }
}
