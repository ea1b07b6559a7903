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

/**
 * A count read after garbage collection has settled: pages whose views an
 * earlier test dropped are unmapped by finalizers, at a time GC picks; a
 * before/after comparison must not see them go in between. Needs --expose-gc
 * (package.json's ava nodeArguments).
 */
export async function settled(count: () => number, rounds = 20): Promise<number> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc === undefined) throw new Error('settled() needs node --expose-gc');
  let last = count();
  for (let i = 0; i < rounds; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10)); // finalizers run as tasks after a GC
    const now = count();
    if (now === last) return now;
    last = now;
  }
  throw new Error(`settled(): still changing after ${rounds} GC rounds (last ${last})`);
}
