/**
 * The doorbell side of the lab agent (native/lab/kvmmem_agent.h): an
 * asynchronous connection that SUBSCRIBEs to the guest's doorbells and RINGs
 * the guest back. Kept apart from the remapper's blocking connection
 * (agent-client.ts) because events arrive at any time, and a blocking reader
 * would have to poll for them: here the event loop sleeps until the agent
 * writes, so an idle lab costs no CPU.
 */
import * as net from 'node:net';
import { debuglog } from 'node:util';
import { errnoName } from '../abi/errno.js';
import { AgentError } from './agent-client.js';
import { AGENT_F_EVENT, AGENT_MAGIC, AGENT_OP, AGENT_RESP_SIZE, decodeResponse, encodeRequest, type AgentResponse } from './agent-protocol.js';

const debug = debuglog('kvmmem');

export interface DoorbellStats {
  /** EVENTs received (each may stand for several coalesced doorbells). */
  events: number;
  /** Doorbells the agent counted in them. */
  doorbells: number;
  /** RINGs sent. */
  rings: number;
  /** RINGs the agent answered with an error (logged). */
  ringErrors: number;
}

export class Doorbell {
  readonly path: string;
  readonly #sock: net.Socket;
  readonly #waiting = new Map<number, { resolve: (r: AgentResponse) => void; reject: (e: Error) => void }>();
  readonly #stats: DoorbellStats = { events: 0, doorbells: 0, rings: 0, ringErrors: 0 };
  #buf: Buffer = Buffer.alloc(0);
  #seq = 0;
  #closed = false;
  #onEvent: () => void = () => {};
  #onClose: (why: string) => void = () => {};

  private constructor(sock: net.Socket, path: string) {
    this.#sock = sock;
    this.path = path;
    sock.on('data', (d: Buffer) => this.#data(d));
    sock.on('error', (e) => debug('doorbell %s: %s', path, e.message));
    sock.on('close', () => {
      const why = this.#closed ? 'closed' : 'the agent closed the connection (the introspector\'s QEMU exited?)';
      this.#closed = true;
      for (const w of this.#waiting.values()) w.reject(new AgentError(`doorbell ${path}: ${why}`, { code: 'EPIPE', errno: -32 }));
      this.#waiting.clear();
      this.#onClose(why);
    });
  }

  /** Connects and SUBSCRIBEs; `onEvent` runs once per EVENT (doorbells coalesced). */
  static async open(path: string, onEvent: () => void, timeoutMs = 5000): Promise<Doorbell> {
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(path);
      const t = setTimeout(() => { s.destroy(); reject(new AgentError(`doorbell: no connection to the lab agent at ${path} within ${timeoutMs} ms`, { code: 'ETIMEDOUT', errno: -110 })); }, timeoutMs);
      s.once('connect', () => { clearTimeout(t); s.removeAllListeners('error'); resolve(s); });
      s.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(t);
        reject(new AgentError(`doorbell: cannot connect to the lab agent at ${path}: ${e.message}`, {
          code: e.code ?? 'ECONNREFUSED', errno: -(e.errno !== undefined ? Math.abs(e.errno) : 111), syscall: 'connect', cause: e,
          hint: 'the agent listens once QEMU starts with LD_PRELOAD=kvmmem_agent.so and KVMMEM_AGENT_SOCKET set (docs/lab-agent.md)',
        }));
      });
    });
    const d = new Doorbell(sock, path);
    d.#onEvent = onEvent;
    const sub = await d.#call(AGENT_OP.SUBSCRIBE, 0, timeoutMs);
    if (sub.status < 0) {
      d.close();
      throw new AgentError(`doorbell: SUBSCRIBE at ${path}: ${errnoName(-sub.status)}`, {
        code: errnoName(-sub.status), errno: sub.status, syscall: 'SUBSCRIBE',
        hint: 'the agent has no doorbell: start QEMU with KVMMEM_AGENT_IVSHMEM and -device ivshmem-doorbell (docs/lab-agent.md)',
      });
    }
    return d;
  }

  /** Runs when the connection goes away (not after close()). */
  onClose(f: (why: string) => void): void { this.#onClose = f; }

  /** Raises `vector` in the guest; an error answer is counted and logged (the guest re-checks on its own). */
  ring(vector = 0): void {
    if (this.#closed) return;
    this.#stats.rings++;
    this.#call(AGENT_OP.RING, vector, 5000).then((r) => {
      if (r.status < 0) {
        this.#stats.ringErrors++;
        debug('doorbell %s: RING %d: %s', this.path, vector, errnoName(-r.status));
      }
    }, (e: Error) => { this.#stats.ringErrors++; debug('doorbell %s: RING: %s', this.path, e.message); });
  }

  stats(): DoorbellStats { return { ...this.#stats }; }

  get closed(): boolean { return this.#closed; }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#sock.destroy();
  }

  #call(op: number, target: number, timeoutMs: number): Promise<AgentResponse> {
    const seq = (this.#seq = (this.#seq + 1) >>> 0 || 1);
    const b = Buffer.alloc(48);
    encodeRequest({ op, target }, seq, b);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.#waiting.delete(seq);
        reject(new AgentError(`doorbell ${this.path}: no answer to op ${op} within ${timeoutMs} ms`, { code: 'ETIMEDOUT', errno: -110 }));
      }, timeoutMs);
      t.unref();
      this.#waiting.set(seq, {
        resolve: (r) => { clearTimeout(t); resolve(r); },
        reject: (e) => { clearTimeout(t); reject(e); },
      });
      this.#sock.write(b);
    });
  }

  #data(d: Buffer): void {
    this.#buf = this.#buf.length === 0 ? d : Buffer.concat([this.#buf, d]);
    let off = 0;
    while (this.#buf.length - off >= AGENT_RESP_SIZE) {
      const r = decodeResponse(this.#buf, off);
      off += AGENT_RESP_SIZE;
      if (r.magic !== AGENT_MAGIC) {
        debug('doorbell %s: bad magic 0x%s: closing', this.path, r.magic.toString(16));
        this.#sock.destroy();
        return;
      }
      if ((r.flags & AGENT_F_EVENT) !== 0) {
        this.#stats.events++;
        this.#stats.doorbells += Number(r.v[1]);
        try {
          this.#onEvent();
        } catch (e) {
          debug('doorbell %s: event handler: %s', this.path, (e as Error).stack ?? String(e));
        }
        continue;
      }
      const w = this.#waiting.get(r.seq);
      this.#waiting.delete(r.seq);
      w?.resolve(r);
    }
    this.#buf = off === this.#buf.length ? Buffer.alloc(0) : this.#buf.subarray(off);
  }
}
