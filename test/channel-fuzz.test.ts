// Malformed-input fuzz of the tool end of KVMI (src/channel) with fast-check:
// random, truncated, oversized and wrong-padding handshakes and frames. Every
// run must end, within a bounded time, with the bad connection closed and
// reported ('rejected' before the VM is announced, 'gone' with a
// ProtocolError after), never an unhandled exception, never a hang. The peer
// is a small fake device manager/host written here (node:net + abi codecs).
import test from 'ava';
import fc from 'fast-check';
import { once } from 'node:events';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse as uuidParse } from 'uuid';
import {
  FrameReader, KVMI_IDS, encodeQemu2Introspector, encodeMessage, encodeErrorCode, encodeGetVersionReply,
  encodeMapTokenReply, encodeMsgHdr, encodeEvent, type KvmiFrame,
} from '../src/abi/kvmi.js';
import {
  IntrospectionServer, ProtocolError, VmGoneError, type RejectedInfo, type Vm, type VmGoneInfo,
} from '../src/channel/index.js';
import { RawSocketListener } from '../src/channel/rawfd.js';
import { poller } from '../src/channel/rawfd.js';

const IDS = KVMI_IDS.v6;
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-fuzz-'));
const SERVER_OPTS = { cookie: 'fuzz-cookie', handshakeTimeoutMs: 150, requestTimeoutMs: 300, frameTimeoutMs: 100 } as const;
/** Upper bound for any run to be closed and reported (the timeouts above plus slack for a loaded 2-core box). */
const BOUND_MS = 2000;

let server: IntrospectionServer;
let path: string;
test.before(async () => {
  path = join(dir, 'fuzz.sock');
  server = await IntrospectionServer.listen({ unix: path }, SERVER_OPTS);
});
test.after.always(async () => {
  await server?.close();
  rmSync(dir, { recursive: true, force: true });
});

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

const hello = (name = 'fuzz') => encodeQemu2Introspector({ uuid: uuidParse(randomUUID()), name, startTime: 1n });

async function connect(to = path): Promise<{ sock: net.Socket; closed: Promise<void> }> {
  const sock = net.connect(to);
  sock.on('error', () => {});
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  await once(sock, 'connect');
  sock.resume(); // read (and drop) what the tool sends, so its EOF is seen
  return { sock, closed };
}

// ---------------------------------------------------------------------------
// 1. before the VM is announced: handshake garbage
// ---------------------------------------------------------------------------
const handshakeGarbage = fc.oneof(
  fc.uint8Array({ minLength: 1, maxLength: 300 }).map((b) => ({ kind: 'random', bytes: Buffer.from(b) })),
  fc.integer({ min: 1, max: 95 }).map((k) => ({ kind: 'truncated', bytes: hello().subarray(0, k) })),
  fc.oneof(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 4097, max: 0xffffffff })).map((size) => {
    const b = hello();
    b.writeUInt32LE(size, 0);
    return { kind: 'bad struct_size', bytes: b };
  }),
  fc.integer({ min: 97, max: 4096 }).map((size) => ({ kind: 'oversized, body missing', bytes: Buffer.concat([encodeUInt32(size), hello().subarray(4, 60)]) })),
  fc.uint8Array({ minLength: 64, maxLength: 64 }).filter((n) => !n.includes(0)).map((n) => {
    const b = hello();
    b.set(n, 32);
    return { kind: 'name without NUL', bytes: b };
  }),
  // a valid handshake followed by garbage where KVMI frames should be
  fc.uint8Array({ minLength: 1, maxLength: 64 }).map((g) => ({ kind: 'valid + garbage', bytes: Buffer.concat([hello(), Buffer.from(g)]) })),
);

function encodeUInt32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v, 0);
  return b;
}

async function handshakeGarbageProperty(server: IntrospectionServer, to: string, numRuns: number): Promise<Map<string, number>> {
  const kinds = new Map<string, number>();
  await fc.assert(fc.asyncProperty(handshakeGarbage, fc.boolean(), async (g, endAfter) => {
    kinds.set(g.kind, (kinds.get(g.kind) ?? 0) + 1);
    const rejected = once(server, 'rejected') as Promise<[RejectedInfo]>;
    let vmAnnounced = false;
    const onVm = (vm: Vm) => { vmAnnounced = true; vm.close(); };
    server.on('vm', onVm);
    try {
      const { sock, closed } = await connect(to);
      sock.write(g.bytes);
      if (endAfter) sock.end();
      const [info] = await within(rejected, BOUND_MS, `rejection of ${g.kind}`);
      if (typeof info.reason !== 'string' || info.reason.length === 0) throw new Error('empty reason');
      if (!(info.error instanceof Error)) throw new Error('no error object');
      await within(closed, BOUND_MS, `close of ${g.kind}`);
      if (vmAnnounced) throw new Error(`a VM was announced for ${g.kind}`);
      if (server.vms().length !== 0) throw new Error('VM list not empty');
    } finally {
      server.off('vm', onVm);
    }
  }), { numRuns });
  return kinds;
}

test.serial('fuzz: handshake garbage is always rejected and the connection closed', async (t) => {
  const kinds = await handshakeGarbageProperty(server, path, 100);
  t.log([...kinds].map(([k, v]) => `${k}: ${v}`).join(', '));
  t.pass();
});

test.serial('fuzz: the same over the raw-fd (vsock) transport, which leaks no fds', async (t) => {
  const rawPath = join(dir, 'raw.sock');
  const l = RawSocketListener.listenUnix(rawPath);
  const fdsBefore = readdirSync('/proc/self/fd').length;
  const rawServer = IntrospectionServer.create(SERVER_OPTS);
  l.on('connection', (d) => rawServer.adopt(d, 'raw'));
  try {
    await handshakeGarbageProperty(rawServer, rawPath, 40);
  } finally {
    l.close();
    await rawServer.close();
  }
  await new Promise((r) => setTimeout(r, 50));
  t.is(poller.registered, 0);
  // every accepted fd was closed (the poller's wake pipe, 2 fds, may have been created here)
  const fdsAfter = readdirSync('/proc/self/fd').length;
  t.true(fdsAfter <= fdsBefore + 2, `fds before ${fdsBefore}, after ${fdsAfter}`);
});

// ---------------------------------------------------------------------------
// 2. after the VM is announced: bad frames from the host
// ---------------------------------------------------------------------------

/** A minimal host: answers GET_VERSION and CONTROL_VM_EVENTS, holds GET_MAP_TOKEN requests unanswered. */
async function connectedVm(): Promise<{ vm: Vm; sock: net.Socket; closed: Promise<void>; held: KvmiFrame[]; probeOk(): Promise<boolean> }> {
  const vmP = once(server, 'vm') as Promise<[Vm]>;
  const { sock, closed } = await connect();
  const held: KvmiFrame[] = [];
  const reader = new FrameReader();
  let handshook = false;
  let pre = Buffer.alloc(0);
  const waiters: ((f: KvmiFrame) => void)[] = [];
  const onFrames = (c: Buffer) => {
    reader.push(c);
    let f: KvmiFrame | null;
    while ((f = reader.next()) !== null) {
      const { hdr } = f;
      if (hdr.id === IDS.GET_VERSION) sock.write(encodeMessage(hdr, Buffer.concat([encodeErrorCode(0), encodeGetVersionReply('v6', { version: 1 })])));
      else if (hdr.id === IDS.CONTROL_VM_EVENTS) sock.write(encodeMessage(hdr, encodeErrorCode(0)));
      else if (hdr.id === IDS.GET_MAP_TOKEN) {
        held.push({ hdr, body: Buffer.from(f.body) });
        for (const w of waiters.splice(0)) w(f);
      }
    }
  };
  sock.on('data', (c: Buffer) => {
    if (handshook) return onFrames(c);
    pre = Buffer.concat([pre, c]);
    if (pre.length < 24) return;
    handshook = true;
    onFrames(pre.subarray(24));
  });
  sock.write(hello());
  const [vm] = await within(vmP, BOUND_MS, 'vm');
  const probeOk = async () => {
    try {
      await within(vm.getVersion(), BOUND_MS, 'probe');
      return true;
    } catch {
      return false;
    }
  };
  return { vm, sock, closed, held, probeOk };
}

interface BadFrame { kind: string; build(pendingSeqs: number[]): Buffer; alwaysFatal: boolean }

const tokenReply = (seq: number) => encodeMessage({ id: IDS.GET_MAP_TOKEN, seq }, encodeMapTokenReply(randomBytes(32)));
const hdrOnly = (id: number, seq: number, size: number) => encodeMsgHdr({ id, seq, size });

const badFrames: fc.Arbitrary<BadFrame> = fc.oneof(
  fc.uint8Array({ minLength: 1, maxLength: 200 }).map((b) => ({ kind: 'random bytes', alwaysFatal: false, build: () => Buffer.from(b) })),
  fc.integer({ min: 1, max: 47 }).map((k) => ({ kind: 'truncated reply', alwaysFatal: true, build: (s: number[]) => tokenReply(s[0]!).subarray(0, k) })),
  fc.integer({ min: 1, max: 7 }).map((k) => ({ kind: 'truncated header', alwaysFatal: true, build: (s: number[]) => tokenReply(s[0]!).subarray(0, k) })),
  fc.oneof(fc.integer({ min: 9, max: 39 }), fc.integer({ min: 41, max: 0xffff })).map((size) => ({
    kind: 'reply size mismatch / oversized', alwaysFatal: true, build: (s: number[]) => hdrOnly(IDS.GET_MAP_TOKEN, s[0]!, size),
  })),
  fc.integer({ min: 0, max: 7 }).map((size) => ({
    kind: 'reply shorter than error code', alwaysFatal: true, build: (s: number[]) => Buffer.concat([hdrOnly(IDS.GET_MAP_TOKEN, s[0]!, size), Buffer.alloc(size)]),
  })),
  fc.integer({ min: 0, max: 0xffffffff }).map((seq) => ({
    kind: 'reply with unknown seq', alwaysFatal: true, build: (s: number[]) => tokenReply(s.includes(seq) ? (seq ^ 0x80000000) >>> 0 : seq),
  })),
  fc.tuple(fc.integer({ min: 1, max: 0xffffffff }), fc.constantFrom(0, -11, -22)).map(([pad, err]) => ({
    kind: 'non-zero error-code padding', alwaysFatal: true,
    build: (s: number[]) => {
      const body = err === 0 ? encodeMapTokenReply(randomBytes(32)) : encodeErrorCode(err);
      body.writeUInt32LE(pad, 4);
      return encodeMessage({ id: IDS.GET_MAP_TOKEN, seq: s[0]! }, body);
    },
  })),
  fc.integer({ min: 1, max: 32 }).map((extra) => ({
    kind: 'error reply with data', alwaysFatal: true,
    build: (s: number[]) => encodeMessage({ id: IDS.GET_MAP_TOKEN, seq: s[0]! }, Buffer.concat([encodeErrorCode(-11), Buffer.alloc(extra)])),
  })),
  fc.integer({ min: 0, max: 0xffff }).filter((id) => id !== IDS.GET_MAP_TOKEN && id !== IDS.EVENT).map((id) => ({
    kind: 'reply with the wrong id', alwaysFatal: true, build: (s: number[]) => encodeMessage({ id, seq: s[0]! }, encodeMapTokenReply(randomBytes(32))),
  })),
  fc.tuple(fc.integer({ min: 1, max: 0xffffff }), fc.nat(0xffff)).map(([pad, seq]) => ({
    kind: 'event with non-zero padding', alwaysFatal: true,
    build: () => {
      const ev = encodeEvent({ vcpu: 0, event: 0 });
      ev.writeUIntLE(pad, 5, 3);
      return encodeMessage({ id: IDS.EVENT, seq }, ev);
    },
  })),
  fc.integer({ min: 0, max: 7 }).map((size) => ({
    kind: 'event shorter than kvmi_event', alwaysFatal: true, build: () => Buffer.concat([hdrOnly(IDS.EVENT, 1, size), Buffer.alloc(size)]),
  })),
  fc.integer({ min: 4097, max: 0xffff }).map((size) => ({ kind: 'oversized event', alwaysFatal: true, build: () => hdrOnly(IDS.EVENT, 1, size) })),
  fc.integer({ min: 9, max: 0xffff }).map((evSize) => ({
    kind: 'kvmi_event.size beyond its message', alwaysFatal: true,
    build: () => {
      const ev = encodeEvent({ vcpu: 0, event: 3 });
      ev.writeUInt16LE(evSize, 0);
      return encodeMessage({ id: IDS.EVENT, seq: 2 }, ev);
    },
  })),
);

test.serial('fuzz: bad frames after the handshake close the connection and are reported', async (t) => {
  const kinds = new Map<string, number>();
  await fc.assert(fc.asyncProperty(badFrames, fc.boolean(), async (bad, endAfter) => {
    const { vm, sock, closed, held, probeOk } = await connectedVm();
    // two requests in flight, held by the host: their seqs are what a reply would carry
    const pending = vm.getMapTokens(2);
    pending.catch(() => {});
    const t0 = Date.now();
    while (held.length < 2) {
      if (Date.now() - t0 > BOUND_MS) throw new Error('requests not received');
      await new Promise((r) => setTimeout(r, 2));
    }
    const gone = new Promise<VmGoneInfo>((r) => vm.once('gone', r));
    sock.write(bad.build(held.map((f) => f.hdr.seq)));
    if (endAfter) sock.end();
    let info: VmGoneInfo | null = null;
    try {
      info = await within(gone, SERVER_OPTS.frameTimeoutMs + 400, bad.kind);
    } catch (e) {
      if (bad.alwaysFatal || endAfter) throw e;
    }
    kinds.set(bad.kind, (kinds.get(bad.kind) ?? 0) + 1);
    if (info === null) {
      // random bytes that happened to be well-formed (e.g. an event): the VM must still work
      if (vm.state === 'gone' || !(await probeOk())) throw new Error(`${bad.kind}: VM neither closed nor usable`);
      vm.close();
      await within(closed, BOUND_MS, 'close');
      return;
    }
    if (bad.alwaysFatal && !(info.error instanceof ProtocolError)) throw new Error(`${bad.kind}: gone without a ProtocolError: ${info.reason}`);
    if (vm.state !== 'gone') throw new Error('state not gone');
    await within(closed, BOUND_MS, `close after ${bad.kind}`);
    try {
      await pending;
      throw new Error('pending requests resolved');
    } catch (e) {
      if (!(e instanceof VmGoneError)) throw new Error(`pending rejected with ${String(e)}`);
    }
    if (server.vms().includes(vm)) throw new Error('gone VM still listed');
  }), { numRuns: 200 });
  t.log([...kinds].map(([k, v]) => `${k}: ${v}`).join(', '));
  t.is(server.vms().length, 0);
});

test.serial('fuzz: a flood of random chunks on many connections at once never crashes', async (t) => {
  // 20 connections in parallel, each sends a valid handshake then random chunks and closes.
  const runs = Array.from({ length: 20 }, async (_, i) => {
    const { sock, closed } = await connect();
    sock.write(hello(`flood-${i}`));
    for (let k = 0; k < 5; k++) sock.write(randomBytes(1 + (i * 37 + k * 11) % 300));
    sock.end();
    await within(closed, BOUND_MS * 2, `flood ${i}`);
  });
  await Promise.all(runs);
  await new Promise((r) => setTimeout(r, 50));
  t.is(server.vms().length, 0);
});
