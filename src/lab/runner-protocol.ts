/**
 * The frames of the lab's command runner (native/lab/kvmmem_runner.c is the
 * guest side and documents the format): `u32 len | u8 type | u32 id | payload`,
 * little-endian, len counting type + id + payload. The lab daemon's control
 * socket speaks the same frames, so `kvmmem lab run` and the in-process Lab
 * share one client (RunnerConnection).
 */
import type { Socket } from 'node:net';

export const FRAME = {
  RUN: 1, KILL: 2, PING: 3,
  HELLO: 16, OUT: 17, ERR: 18, EXIT: 19, FAIL: 20,
} as const;

/** Largest frame either side accepts (the runner's RUNNER_MAX_FRAME). */
export const MAX_FRAME = 1 << 20;

export interface Frame { type: number; id: number; payload: Buffer }

export function encodeFrame(type: number, id: number, payload: Buffer | string = Buffer.alloc(0)): Buffer {
  const p = typeof payload === 'string' ? Buffer.from(payload) : payload;
  const h = Buffer.alloc(9);
  h.writeUInt32LE(5 + p.length, 0);
  h[4] = type;
  h.writeUInt32LE(id >>> 0, 5);
  return Buffer.concat([h, p]);
}

/** RUN payload: flags, cwd, argc, argv..., env "K=V"... as NUL-terminated strings. */
export function encodeRun(id: number, argv: readonly string[], env: Readonly<Record<string, string>>, cwd: string, flags = 0): Buffer {
  const parts = [String(flags), cwd, String(argv.length), ...argv, ...Object.entries(env).map(([k, v]) => `${k}=${v}`)];
  for (const p of parts) if (p.includes('\0')) throw new TypeError(`a NUL byte in a command, its env or cwd: ${JSON.stringify(p)}`);
  const frame = encodeFrame(FRAME.RUN, id, parts.map((p) => `${p}\0`).join(''));
  if (frame.length - 4 > MAX_FRAME) throw new RangeError(`command, env and cwd are ${frame.length} bytes; the runner takes at most ${MAX_FRAME}`);
  return frame;
}

/** Incremental decoder: feed chunks, get whole frames. Throws on a frame length the peer could never send. */
export class FrameDecoder {
  private buf: Buffer = Buffer.alloc(0);
  push(chunk: Buffer): Frame[] {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    const out: Frame[] = [];
    while (this.buf.length >= 4) {
      const len = this.buf.readUInt32LE(0);
      if (len < 5 || len > MAX_FRAME) throw new Error(`runner frame of bad length ${len}`);
      if (this.buf.length < 4 + len) break;
      out.push({ type: this.buf[4]!, id: this.buf.readUInt32LE(5), payload: Buffer.from(this.buf.subarray(9, 4 + len)) });
      this.buf = this.buf.subarray(4 + len);
    }
    return out;
  }
}

/** Exit of a command as the runner reports it. */
export interface ExitStatus { code: number | null; signal: number | null }

export function parseExit(payload: Buffer): ExitStatus {
  const m = /^(code|signal) (\d+)$/.exec(payload.toString('latin1'));
  if (!m) throw new Error(`bad EXIT payload ${JSON.stringify(payload.toString('latin1'))}`);
  return m[1] === 'code' ? { code: Number(m[2]), signal: null } : { code: null, signal: Number(m[2]) };
}

export function socketWrite(sock: Socket, b: Buffer): void {
  if (!sock.destroyed) sock.write(b);
}
