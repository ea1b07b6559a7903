/** Small helpers shared by test files (not a test file itself: ava runs *.test.ts). */
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { DeviceError } from '../src/errors.js';

/** The errno a Device call failed with (0 when it did not throw). */
export function errnoOf(fn: () => unknown): number {
  try {
    fn();
    return 0;
  } catch (e) {
    if (e instanceof DeviceError) return e.errno!;
    throw e;
  }
}

/**
 * A unix socket "tool" that accepts connections and ignores what they send:
 * enough for a model VM to hook. `connect()` gives a connected client socket;
 * `close()` destroys every peer and the server.
 */
export async function sinkAcceptor(name: string): Promise<{ path: string; connect(): Promise<net.Socket>; close(): void }> {
  const p = path.join(os.tmpdir(), `kvmmem-${name}-${process.pid}-${sinkSeq++}.sock`);
  const peers = new Set<net.Socket>();
  const server = net.createServer((c) => {
    peers.add(c);
    c.on('error', () => {});
    c.resume();
    c.on('close', () => peers.delete(c));
  });
  await new Promise<void>((r) => server.listen(p, r));
  return {
    path: p,
    connect: () => new Promise((resolve, reject) => {
      const c = net.createConnection({ path: p }, () => resolve(c));
      c.on('error', reject);
    }),
    close: () => {
      for (const c of peers) c.destroy();
      server.close();
    },
  };
}
let sinkSeq = 0;
