/**
 * A synchronous client of the QEMU lab agent's control socket: the host's
 * hypercall path is synchronous (results are final when a hypercall returns,
 * unhook revokes in place), so the remapper asks the agent and waits, blocking
 * this thread for one round trip (tens of µs) rather than making every caller
 * of the host asynchronous. Requests are pipelined in batches (the agent's
 * batch mode), in chunks that fit the socket buffers.
 */
import { BlockingSocket } from '../sys/blocking-socket.js';
import { KvmmemError } from '../errors.js';
import { errnoName } from '../abi/errno.js';
import {
  AGENT_F_EVENT, AGENT_MAGIC, AGENT_MAX_PAYLOAD, AGENT_OP, AGENT_REQ_SIZE, AGENT_RESP_SIZE,
  decodeResponse, encodeRequest, type AgentRequest, type AgentResponse,
} from './agent-protocol.js';

/** Requests written before their answers are read (48 bytes each way: well inside the socket buffers). */
const CHUNK = 256;

/** The agent's connection broke or answered out of protocol. */
export class AgentError extends KvmmemError {}

export interface AgentStats {
  /** Pages mapped to targets. */
  mapped: number;
  /** Fresh (anonymous zero) pages. */
  fresh: number;
  targets: number;
  /** Requests the agent served (all connections). */
  requests: number;
}

export class AgentClient {
  readonly path: string;
  readonly #sock: BlockingSocket;
  #seq = 0;
  readonly #out = Buffer.alloc(AGENT_REQ_SIZE * CHUNK);
  readonly #in = Buffer.alloc(AGENT_RESP_SIZE * CHUNK);

  private constructor(sock: BlockingSocket) {
    this.#sock = sock;
    this.path = sock.path;
  }

  /** Connects to the agent's control socket; each call then waits at most `timeoutMs`. */
  static connect(path: string, timeoutMs = 5000): AgentClient {
    try {
      return new AgentClient(BlockingSocket.connect(path, timeoutMs));
    } catch (e) {
      throw new AgentError(`cannot connect to the lab agent at ${path}: ${(e as Error).message}`, {
        code: (e as KvmmemError).code ?? 'ECONNREFUSED', errno: (e as KvmmemError).errno ?? -111, syscall: 'connect', cause: e,
        hint: 'the agent listens once QEMU starts with LD_PRELOAD=kvmmem_agent.so and KVMMEM_AGENT_SOCKET set (docs/lab-agent.md)',
      });
    }
  }

  get closed(): boolean { return this.#sock.closed; }

  /** One request; its response (status 0 or -errno). Transport failures throw AgentError. */
  call(q: AgentRequest): AgentResponse {
    return this.many([q])[0]!;
  }

  /** Pipelined requests (no payloads), their responses in order. */
  many(qs: readonly AgentRequest[]): AgentResponse[] {
    const out: AgentResponse[] = [];
    for (let at = 0; at < qs.length; at += CHUNK) {
      const part = qs.slice(at, at + CHUNK);
      const seq0 = this.#seq;
      let bytes = 0;
      for (const q of part) {
        if (q.payload !== undefined && part.length > 1) throw new AgentError('agent: a request with a payload goes alone', { code: 'EINVAL', errno: -22 });
        encodeRequest(q, ++this.#seq, this.#out, bytes);
        bytes += AGENT_REQ_SIZE;
      }
      let r = this.#sock.writeAll(this.#out, bytes);
      if (r === 0 && part.length === 1 && part[0]!.payload !== undefined) {
        const p = part[0]!.payload;
        if (p.length > AGENT_MAX_PAYLOAD) throw new AgentError(`agent: payload of ${p.length} bytes (at most ${AGENT_MAX_PAYLOAD})`, { code: 'EMSGSIZE', errno: -90 });
        r = this.#sock.writeAll(p);
      }
      if (r < 0) throw this.#broken('write', r);
      r = this.#sock.readExact(this.#in, part.length * AGENT_RESP_SIZE);
      if (r < 0) throw this.#broken('read', r);
      for (let i = 0; i < part.length; i++) {
        const resp = decodeResponse(this.#in, i * AGENT_RESP_SIZE);
        // This connection never SUBSCRIBEs: an EVENT or a foreign seq is a protocol break.
        if (resp.magic !== AGENT_MAGIC || (resp.flags & AGENT_F_EVENT) !== 0 || resp.seq !== ((seq0 + i + 1) >>> 0) || resp.op !== part[i]!.op) {
          this.close();
          throw new AgentError(`agent at ${this.path}: unexpected response (op ${resp.op}, seq ${resp.seq}, status ${resp.status}) to op ${part[i]!.op}`, { code: 'EPROTO', errno: -71 });
        }
        out.push(resp);
      }
    }
    return out;
  }

  /** ATTACH_PATH: the target id of the file (the agent opens it O_RDWR). */
  attachPath(path: string): number {
    const r = this.call({ op: AGENT_OP.ATTACH_PATH, payload: Buffer.from(path, 'utf8') });
    if (r.status < 0) {
      throw new AgentError(`agent: ATTACH_PATH ${path}: ${errnoName(-r.status)}`, {
        code: errnoName(-r.status), errno: r.status, syscall: 'ATTACH_PATH', path,
        hint: 'the target RAM file must be a regular file the agent (QEMU) can open read-write',
      });
    }
    return Number(r.v[0]);
  }

  info(): { version: number; ramSize: number; vectors: number; pageSize: number } {
    const r = this.call({ op: AGENT_OP.INFO });
    return { version: Number(r.v[0]), ramSize: Number(r.v[1]), vectors: Number(r.v[2]), pageSize: Number(r.v[3]) };
  }

  stats(): AgentStats {
    const r = this.call({ op: AGENT_OP.STATS });
    return { mapped: Number(r.v[0]), fresh: Number(r.v[1]), targets: Number(r.v[2]), requests: Number(r.v[3]) };
  }

  close(): void { this.#sock.close(); }

  #broken(what: string, r: number): AgentError {
    this.close();
    return new AgentError(`agent at ${this.path}: ${what} failed: ${errnoName(-r)}`, {
      code: errnoName(-r), errno: r, syscall: what,
      hint: r === -110 ? 'the agent did not answer in time (is the introspector\'s QEMU stopped?)' : 'the introspector\'s QEMU (and its agent) went away',
    });
  }
}
