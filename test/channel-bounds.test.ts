// Per-connection bounds of the tool end of KVMI (src/channel/vm.ts,
// ChannelLimits): a hostile peer flooding events, reading its replies or not,
// stays within fixed memory, is closed with a ChannelLimitError when it goes
// over a bound, and does not stop a well-behaved VM on the same server.
// Assertions are on bytes buffered and memory, never on time.
import test from 'ava';
import fc from 'fast-check';
import { once } from 'node:events';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { Duplex } from 'node:stream';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse as uuidParse } from 'uuid';
import {
  FrameReader, KVMI_IDS, encodeQemu2Introspector, encodeMessage, encodeMsgHdr, encodeErrorCode, encodeGetVersionReply,
  encodeMapTokenReply, encodeEvent, INTROSPECTOR2QEMU_SIZE, type KvmiFrame,
} from '../src/abi/kvmi.js';
import { KvmmemError } from '../src/errors.js';
import {
  ChannelLimitError, DEFAULT_LIMITS, IntrospectionServer, ProtocolError, VmGoneError, type ChannelLimits, type Vm, type VmGoneInfo,
} from '../src/channel/index.js';
import { RawSocketListener } from '../src/channel/rawfd.js';
import { poller } from '../src/channel/rawfd.js';
import { KvmMem } from '../src/client/index.js';
import { ModelHost } from '../src/model/index.js';

const IDS = KVMI_IDS.v6;
const COOKIE = 'bounds-test-cookie';
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-bounds-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const sockPath = () => join(dir, `b${++n}.sock`);
const MiB = 1 << 20;

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

const hello = (name: string) => encodeQemu2Introspector({ uuid: uuidParse(randomUUID()), name, startTime: 1n });
const eventFrame = (seq: number) => encodeMessage({ id: IDS.EVENT, seq }, encodeEvent({ vcpu: 0, event: 3 }));
/** 1024 events (16 KiB): the flood unit. */
const EVENTS = Buffer.concat(Array.from({ length: 1024 }, (_, i) => eventFrame(i)));

/** JS heap + Buffers: what a peer could grow. */
function memory(): number {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

/** Samples the flooder's connection and the process while `body` runs. */
async function watching<T>(vm: () => Vm | undefined, body: () => Promise<T>): Promise<{ result: T; maxRead: number; maxWrite: number; memGrowth: number }> {
  (globalThis as { gc?: () => void }).gc?.();
  const base = memory();
  let maxRead = 0, maxWrite = 0, maxMem = base;
  const sample = () => {
    const v = vm();
    if (v !== undefined && v.state !== 'gone') {
      const b = v.buffered;
      maxRead = Math.max(maxRead, b.read);
      maxWrite = Math.max(maxWrite, b.write);
    }
    maxMem = Math.max(maxMem, memory());
  };
  const timer = setInterval(sample, 10);
  try {
    const result = await body();
    sample();
    return { result, maxRead, maxWrite, memGrowth: maxMem - base };
  } finally {
    clearInterval(timer);
  }
}

/**
 * A hostile device manager on a real socket: handshakes, answers the tool's
 * GET_VERSION and CONTROL_VM_EVENTS, then sends events as fast as its own
 * socket takes them. `readReplies: false` stops reading from then on.
 */
async function flooder(path: string, opts: { readReplies: boolean; name?: string }) {
  const sock = net.connect(path);
  sock.on('error', () => {});
  await once(sock, 'connect');
  const state = { written: 0, repliesRead: 0, stopped: false };
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  const flood = () => {
    while (!state.stopped && !sock.destroyed) {
      const ok = sock.write(EVENTS, (err) => { if (!err) state.written += EVENTS.length; });
      if (!ok) return; // our own backpressure: wait for 'drain'
    }
  };
  sock.on('drain', flood);
  const reader = new FrameReader();
  let pre = Buffer.alloc(0);
  let handshook = false;
  sock.on('data', (c: Buffer) => {
    if (!handshook) {
      pre = Buffer.concat([pre, c]);
      if (pre.length < INTROSPECTOR2QEMU_SIZE) return;
      handshook = true;
      c = pre.subarray(INTROSPECTOR2QEMU_SIZE);
    }
    reader.push(c);
    for (let f = reader.next(); f !== null; f = reader.next()) {
      if (f.hdr.id === IDS.GET_VERSION) sock.write(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), encodeGetVersionReply('v6', { version: 1 })])));
      else if (f.hdr.id === IDS.CONTROL_VM_EVENTS) {
        sock.write(encodeMessage(f.hdr, encodeErrorCode(0)));
        if (!opts.readReplies) sock.pause();
        setImmediate(flood);
      } else state.repliesRead++;
    }
  });
  sock.write(hello(opts.name ?? 'flood'));
  return { sock, state, closed, stop() { state.stopped = true; sock.destroy(); } };
}

/** A server, a model host with a well-behaved VM attached to it, and a session over the host's device. */
async function withGoodVm(t: { teardown(fn: () => unknown): void }, limits: Partial<ChannelLimits> = {}) {
  const path = sockPath();
  const server = await IntrospectionServer.listen({ unix: path }, { cookie: COOKIE, limits });
  const host = new ModelHost({ cookie: COOKIE });
  const mvm = host.createVm({ name: 'good', memory: 4 * MiB });
  const session = KvmMem.open({ model: host });
  t.teardown(async () => {
    session.close();
    host.close();
    await server.close();
  });
  const goodP = server.waitForVm({ name: 'good' }, 5000);
  await mvm.attach({ unix: path });
  const good = await goodP;
  let flood: Vm | undefined;
  const floodVm = new Promise<Vm>((resolve) => server.on('vm', (v: Vm) => { if (v.name === 'flood') resolve(flood = v); }));
  // Each page carries its own number, so a map that returned the wrong page would show.
  for (let i = 0; i < 1024; i++) mvm.memory.write(BigInt(i * 4096), Buffer.from(`page ${i} `));
  /** Maps `count` pages one by one and checks each one's content. */
  const mapPages = async (count: number) => {
    let ok = 0;
    for (let i = 0; i < count; i++) {
      const page = await session.map(good, BigInt((i % 1024) * 4096));
      if (page.buffer.toString('latin1', 0, `page ${i % 1024} `.length) === `page ${i % 1024} `) ok++;
      page.unmap();
    }
    return ok;
  };
  return { path, server, host, good, session, mapPages, floodVm, flood: () => flood };
}

// ---------------------------------------------------------------------------
// 1. floods over real sockets, next to a good VM
// ---------------------------------------------------------------------------
test.serial('a peer that floods events and never reads is closed (writeStall) within bounded memory; the good VM maps on', async (t) => {
  const writeStallMs = 500;
  const g = await withGoodVm(t, { writeStallMs });
  const f = await flooder(g.path, { readReplies: false });
  t.teardown(() => f.stop());
  const fvm = await within(g.floodVm, 5000, 'the flooder\'s VM');
  const gone = new Promise<VmGoneInfo>((r) => fvm.once('gone', r));
  const run = await watching(g.flood, async () => {
    const mapped = await g.mapPages(200);
    return { mapped, info: await within(gone, 30_000, 'the flooder being closed') };
  });
  const { mapped, info } = run.result;
  t.log(`flood accepted ${(f.state.written / MiB).toFixed(2)} MiB; tool buffered <= ${run.maxRead} B read / ${run.maxWrite} B write; memory +${(run.memGrowth / MiB).toFixed(1)} MiB`);
  t.true(info.error instanceof ChannelLimitError, info.reason);
  const e = info.error as ChannelLimitError;
  t.is(e.code, 'ERR_KVMI_LIMIT');
  t.is(e.limit, 'writeStall');
  t.true(e instanceof ProtocolError);
  t.regex(e.message, /writeStall limit exceeded: the peer left \d+ bytes of replies unread/);
  await within(f.closed, 5000, 'the flooder\'s socket closing');
  // It flooded past the high-water mark, and the tool held no more than its bounds.
  t.true(f.state.written > DEFAULT_LIMITS.writeHighWaterBytes, `flood of ${f.state.written} bytes`);
  t.true(f.state.written < 64 * MiB, `flood of ${f.state.written} bytes accepted before the close`);
  t.true(run.maxWrite <= DEFAULT_LIMITS.maxWriteQueueBytes);
  t.true(run.maxRead <= DEFAULT_LIMITS.maxReadBufferBytes);
  t.true(run.memGrowth < 96 * MiB, `memory grew by ${run.memGrowth} bytes`);
  // The good VM: every page right, still connected, still mapping.
  t.is(mapped, 200);
  t.is(g.good.state, 'connected');
  t.is(await g.mapPages(20), 20);
  t.deepEqual(g.server.vms(), [g.good]);
});

test.serial('a peer that floods events and reads its replies is served within bounded memory; the good VM maps on', async (t) => {
  const g = await withGoodVm(t);
  const f = await flooder(g.path, { readReplies: true });
  t.teardown(() => f.stop());
  const fvm = await within(g.floodVm, 5000, 'the flooder\'s VM');
  const run = await watching(g.flood, async () => {
    // The flood is on before the good VM starts, and stays on while it maps.
    const t0 = Date.now();
    while (fvm.messagesReceived < 100_000) {
      if (Date.now() - t0 > 30_000) throw new Error(`only ${fvm.messagesReceived} flood events in 30 s`);
      await new Promise((r) => setTimeout(r, 10));
    }
    const before = fvm.messagesReceived;
    const mapped = await g.mapPages(300);
    return { mapped, during: fvm.messagesReceived - before };
  });
  t.log(`${fvm.messagesReceived} events answered (${run.result.during} while the good VM mapped 300 pages); buffered <= ${run.maxRead} B read / ${run.maxWrite} B write; memory +${(run.memGrowth / MiB).toFixed(1)} MiB`);
  t.is(run.result.mapped, 300);
  t.true(run.result.during > 0, 'the flood went on during the maps');
  t.is(fvm.state, 'connected'); // it reads its replies: within every bound
  t.true(f.state.repliesRead > 0);
  t.true(run.maxWrite <= DEFAULT_LIMITS.maxWriteQueueBytes);
  t.true(run.maxRead <= DEFAULT_LIMITS.maxReadBufferBytes);
  t.true(run.memGrowth < 96 * MiB, `memory grew by ${run.memGrowth} bytes`);
  t.is(g.good.state, 'connected');
});

test.serial('the raw-fd (vsock) transport holds the same bounds: a non-reading flooder is closed, no fd left', async (t) => {
  const path = sockPath();
  const l = RawSocketListener.listenUnix(path);
  const server = IntrospectionServer.create({ cookie: COOKIE, limits: { writeStallMs: 300 } });
  l.on('connection', (d) => server.adopt(d, 'raw'));
  let fvm: Vm | undefined;
  const vmP = new Promise<Vm>((r) => server.once('vm', (v: Vm) => r(fvm = v)));
  const f = await flooder(path, { readReplies: false });
  try {
    await within(vmP, 5000, 'the flooder\'s VM');
    const gone = new Promise<VmGoneInfo>((r) => fvm!.once('gone', r));
    const run = await watching(() => fvm, () => within(gone, 30_000, 'the flooder being closed'));
    t.is((run.result.error as ChannelLimitError).limit, 'writeStall');
    t.true(f.state.written > DEFAULT_LIMITS.writeHighWaterBytes);
    t.true(f.state.written < 64 * MiB);
    t.true(run.maxWrite <= DEFAULT_LIMITS.maxWriteQueueBytes);
    t.true(run.memGrowth < 96 * MiB, `memory grew by ${run.memGrowth} bytes`);
    await within(f.closed, 5000, 'the flooder\'s socket closing');
  } finally {
    f.stop();
    l.close();
    await server.close();
  }
  const t0 = Date.now();
  while (poller.registered > 0 && Date.now() - t0 < 3000) await new Promise((r) => setTimeout(r, 10));
  t.is(poller.registered, 0);
});

// ---------------------------------------------------------------------------
// 2. each bound, over an in-memory stream the test controls
// ---------------------------------------------------------------------------

/**
 * The host end of an in-memory connection: `tool` is the stream the server
 * adopts. Writes from the tool are parsed (GET_VERSION and CONTROL_VM_EVENTS
 * answered on the next turn, like a socket would); with `hold` set their
 * completion is withheld, as a peer that does not read.
 */
class MemPeer {
  readonly tool: Duplex;
  readonly frames: KvmiFrame[] = [];
  hold = false;
  #held: (() => void)[] = [];
  #pre = 0;
  #reader = new FrameReader();

  constructor() {
    this.tool = new Duplex({
      read() {},
      write: (chunk: Buffer, _enc, cb) => {
        this.#consume(chunk);
        if (this.hold) this.#held.push(() => cb());
        else cb();
      },
    });
  }

  #consume(chunk: Buffer): void {
    if (this.#pre < INTROSPECTOR2QEMU_SIZE) {
      const skip = Math.min(INTROSPECTOR2QEMU_SIZE - this.#pre, chunk.length);
      this.#pre += skip;
      chunk = chunk.subarray(skip);
    }
    this.#reader.push(chunk);
    for (let f = this.#reader.next(); f !== null; f = this.#reader.next()) {
      const frame = { hdr: f.hdr, body: Buffer.from(f.body) };
      this.frames.push(frame);
      if (f.hdr.id === IDS.GET_VERSION) this.send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), encodeGetVersionReply('v6', { version: 1 })])));
      else if (f.hdr.id === IDS.CONTROL_VM_EVENTS) this.send(encodeMessage(f.hdr, encodeErrorCode(0)));
    }
  }

  /** Bytes from the host to the tool, delivered on the next turn. */
  send(bytes: Buffer): void {
    setImmediate(() => { if (!this.tool.destroyed) this.tool.push(bytes); });
  }

  release(): void {
    const h = this.#held;
    this.#held = [];
    for (const cb of h) cb();
  }

  count(id: number): number {
    return this.frames.filter((f) => f.hdr.id === id).length;
  }

  static async connect(server: IntrospectionServer): Promise<{ peer: MemPeer; vm: Vm }> {
    const peer = new MemPeer();
    const vmP = once(server, 'vm') as Promise<[Vm]>;
    server.adopt(peer.tool, 'memory');
    peer.tool.push(hello('mem'));
    const [vm] = await within(vmP, 3000, 'vm');
    return { peer, vm };
  }
}

const memServer = (limits: Partial<ChannelLimits>) => IntrospectionServer.create({ cookie: COOKIE, requestTimeoutMs: 5000, limits });
const goneOf = (vm: Vm) => within(new Promise<VmGoneInfo>((r) => (vm.state === 'gone' ? r(vm.goneInfo!) : vm.once('gone', r))), 5000, 'gone');

test('limit message: a reply announcing more than maxMessageBytes closes the connection', async (t) => {
  const server = memServer({ maxMessageBytes: 256 });
  t.teardown(() => server.close());
  const { peer, vm } = await MemPeer.connect(server);
  const req = vm.request(0x77);
  const seq = peer.frames.find((f) => f.hdr.id === 0x77)!.hdr.seq;
  peer.send(encodeMsgHdr({ id: 0x77, seq, size: 1000 })); // the header alone is enough
  const info = await goneOf(vm);
  t.is((info.error as ChannelLimitError).limit, 'message');
  t.regex(info.reason, /announces 1008 bytes \(limit 256\)/);
  const e = await t.throwsAsync(req, { instanceOf: VmGoneError });
  t.true((e!.cause as Error) instanceof ChannelLimitError);
  // Within the limit, the same generic request works.
  const s2 = await MemPeer.connect(server);
  const ok = s2.vm.request(0x77);
  const seq2 = s2.peer.frames.find((f) => f.hdr.id === 0x77)!.hdr.seq;
  s2.peer.send(encodeMessage({ id: 0x77, seq: seq2 }, Buffer.concat([encodeErrorCode(0), Buffer.alloc(200, 7)])));
  t.deepEqual(await ok, Buffer.alloc(200, 7));
});

test('limit readBuffer: input that cannot be processed yet is capped', async (t) => {
  const server = memServer({ eventsPerTurn: 1, maxReadBufferBytes: 64 << 10 });
  t.teardown(() => server.close());
  const { peer, vm } = await MemPeer.connect(server);
  peer.send(Buffer.concat(Array.from({ length: 8 }, () => EVENTS))); // 128 KiB in one chunk, one event per turn
  const info = await goneOf(vm);
  t.is((info.error as ChannelLimitError).limit, 'readBuffer');
  t.regex(info.reason, /bytes received and not processed yet \(limit 65536\)/);
});

test('limit writeQueue: requests the peer never takes are capped; pending requests fail with the reason', async (t) => {
  const server = memServer({ writeHighWaterBytes: 16 << 10, maxWriteQueueBytes: 64 << 10 });
  t.teardown(() => server.close());
  const { peer, vm } = await MemPeer.connect(server);
  peer.hold = true;
  const batches: Promise<(Uint8Array | Error)[]>[] = [];
  for (let i = 0; i < 12 && vm.state === 'connected'; i++) batches.push(vm.getMapTokensSettled(1024)); // 8 KiB each
  const info = await goneOf(vm);
  const e = info.error as ChannelLimitError;
  t.is(e.limit, 'writeQueue');
  t.true(e.value > e.max && e.max === 64 << 10);
  t.true(batches.length <= 9, `${batches.length} batches written before the close`);
  for (const r of await Promise.all(batches)) t.true(r.every((x) => x instanceof VmGoneError));
});

test('backpressure: over the high-water mark the tool stops reading, resumes once the peer reads, and loses nothing', async (t) => {
  const server = memServer({ writeHighWaterBytes: 4096, writeStallMs: 60_000 });
  t.teardown(() => server.close());
  const { peer, vm } = await MemPeer.connect(server);
  peer.hold = true;
  const events = 4096;
  for (let k = 0; k < events / 1024; k++) peer.send(EVENTS);
  const t0 = Date.now();
  while (!peer.tool.isPaused() && Date.now() - t0 < 3000) await new Promise((r) => setImmediate(r));
  t.true(peer.tool.isPaused(), 'reading paused');
  const answered = peer.count(IDS.EVENT_REPLY);
  t.true(answered < events, `${answered} answered while paused`);
  await new Promise((r) => setTimeout(r, 50));
  t.is(peer.count(IDS.EVENT_REPLY), answered, 'nothing more is read while the peer does not read');
  // The peer reads (its queue stays under the stream's own 16 KiB mark, so no 'drain' comes):
  // reading resumes, every event gets its reply, in order.
  peer.hold = false;
  peer.release();
  while (peer.count(IDS.EVENT_REPLY) < events && Date.now() - t0 < 10_000) {
    peer.release();
    await new Promise((r) => setImmediate(r));
  }
  const seqs = peer.frames.filter((f) => f.hdr.id === IDS.EVENT_REPLY).map((f) => f.hdr.seq);
  t.is(seqs.length, events);
  t.deepEqual(seqs.slice(0, 1024), Array.from({ length: 1024 }, (_, i) => i));
  t.is(vm.state, 'connected');
  t.is(vm.buffered.read, 0);
});

test('fairness: at most eventsPerTurn events per turn of the event loop, the rest on the next turns', async (t) => {
  const server = memServer({ eventsPerTurn: 100 });
  t.teardown(() => server.close());
  const { peer, vm } = await MemPeer.connect(server);
  let eventsSeen = 0;
  vm.on('event', () => eventsSeen++);
  const perTurn: number[] = [];
  peer.tool.push(EVENTS); // synchronously delivered: the first turn is this one
  perTurn.push(eventsSeen);
  while (eventsSeen < 1024 && perTurn.length < 100) {
    await new Promise((r) => setImmediate(r));
    perTurn.push(eventsSeen);
  }
  t.is(perTurn[0], 100);
  t.true(perTurn.every((x, i) => i === 0 || x - perTurn[i - 1]! <= 100), perTurn.join(','));
  t.is(eventsSeen, 1024);
  t.is(peer.count(IDS.EVENT_REPLY), 1024);
});

test('limit pending: more requests than maxPending are refused with EAGAIN; the connection stays', async (t) => {
  const server = memServer({ maxPending: 4 });
  t.teardown(() => server.close());
  const { peer, vm } = await MemPeer.connect(server);
  const first = vm.getMapTokensSettled(4); // the host holds them
  const over = await vm.getMapTokensSettled(1);
  t.true(over[0] instanceof KvmmemError);
  t.is((over[0] as KvmmemError).code, 'EAGAIN');
  t.is((over[0] as KvmmemError).errno, -11);
  t.regex((over[0] as KvmmemError).message, /4 requests already await replies .*limit 4/);
  await t.throwsAsync(vm.request(IDS.GET_VERSION), { code: 'EAGAIN' });
  t.is(vm.state, 'connected');
  // The host answers: the pending ones settle and new requests fit again.
  for (const f of peer.frames.filter((x) => x.hdr.id === IDS.GET_MAP_TOKEN)) peer.send(encodeMessage(f.hdr, encodeMapTokenReply(Buffer.alloc(32, 1))));
  t.true((await first).every((x) => x instanceof Uint8Array));
  const again = vm.getMapTokensSettled(1);
  const f = peer.frames.filter((x) => x.hdr.id === IDS.GET_MAP_TOKEN).at(-1)!;
  peer.send(encodeMessage(f.hdr, encodeMapTokenReply(Buffer.alloc(32, 2))));
  t.true((await again)[0] instanceof Uint8Array);
});

test('limits are checked: a bad value is a UsageError', (t) => {
  for (const limits of [{ maxPending: 0 }, { eventsPerTurn: 1.5 }, { maxMessageBytes: 8 }, { writeHighWaterBytes: 10, maxWriteQueueBytes: 5 }, { bogus: 1 }]) {
    t.throws(() => IntrospectionServer.create({ cookie: COOKIE, limits: limits as Partial<ChannelLimits> }), { code: 'ERR_INVALID_ARG' });
  }
});

// ---------------------------------------------------------------------------
// 3. fuzz: hostile byte streams against small bounds
// ---------------------------------------------------------------------------
const FUZZ_LIMITS: ChannelLimits = {
  maxMessageBytes: 512, maxReadBufferBytes: 8192, writeHighWaterBytes: 1024, maxWriteQueueBytes: 16384,
  writeStallMs: 200, eventsPerTurn: 3, maxPending: 64, maxPhysicalBytes: 65536,
};

type Action =
  | { kind: 'events'; count: number; split: number }
  | { kind: 'garbage'; bytes: Uint8Array }
  | { kind: 'oversized'; size: number }
  | { kind: 'replies'; count: number }
  | { kind: 'requests'; count: number }
  | { kind: 'hold' } | { kind: 'release' } | { kind: 'turn' };

const action: fc.Arbitrary<Action> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('events' as const), count: fc.integer({ min: 1, max: 3000 }), split: fc.integer({ min: 1, max: 16384 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('garbage' as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 64 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('oversized' as const), size: fc.integer({ min: 505, max: 0xffff }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('replies' as const), count: fc.integer({ min: 1, max: 80 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('requests' as const), count: fc.integer({ min: 1, max: 100 }) }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'hold' as const }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'release' as const }) },
  { weight: 3, arbitrary: fc.constant({ kind: 'turn' as const }) },
);

test('fuzz: hostile byte streams never push a connection past its bounds; over one it is closed with a typed reason', async (t) => {
  const server = memServer(FUZZ_LIMITS);
  t.teardown(() => server.close());
  const ends = new Map<string, number>();
  let bytesTried = 0;
  await fc.assert(fc.asyncProperty(fc.array(action, { minLength: 1, maxLength: 25 }), async (actions) => {
    const { peer, vm } = await MemPeer.connect(server);
    const settled: Promise<unknown>[] = [];
    let seq = 1;
    const check = (what: string) => {
      if (vm.state === 'gone') return;
      const b = vm.buffered;
      if (b.read > FUZZ_LIMITS.maxReadBufferBytes) throw new Error(`${what}: ${b.read} bytes read-buffered`);
      if (b.write > FUZZ_LIMITS.maxWriteQueueBytes) throw new Error(`${what}: ${b.write} bytes write-queued`);
      if (vm.inFlight > FUZZ_LIMITS.maxPending) throw new Error(`${what}: ${vm.inFlight} pending`);
    };
    for (const a of actions) {
      if (vm.state === 'gone') break;
      let bytes: Buffer | null = null;
      if (a.kind === 'events') {
        const all = Buffer.concat(Array.from({ length: a.count }, () => eventFrame(seq++)));
        for (let off = 0; off < all.length; off += a.split) peer.tool.push(all.subarray(off, off + a.split));
        bytesTried += all.length;
      } else if (a.kind === 'garbage') bytes = Buffer.from(a.bytes);
      else if (a.kind === 'oversized') bytes = encodeMsgHdr({ id: IDS.EVENT, seq: seq++, size: a.size });
      else if (a.kind === 'replies') {
        // answers to the oldest outstanding token requests (a well-formed host)
        const tokens = peer.frames.filter((f) => f.hdr.id === IDS.GET_MAP_TOKEN).splice(0, a.count);
        for (const f of tokens) peer.frames.splice(peer.frames.indexOf(f), 1);
        if (tokens.length > 0) bytes = Buffer.concat(tokens.map((f) => encodeMessage(f.hdr, encodeMapTokenReply(Buffer.alloc(32, 3)))));
      } else if (a.kind === 'requests') settled.push(vm.getMapTokensSettled(a.count));
      else if (a.kind === 'hold') peer.hold = true;
      else if (a.kind === 'release') {
        peer.hold = false;
        peer.release();
      } else await new Promise((r) => setImmediate(r));
      if (bytes !== null) {
        bytesTried += bytes.length;
        peer.tool.push(bytes);
      }
      check(a.kind);
    }
    // The peer hangs up: whatever happened, the connection ends, typed, and every request settles.
    peer.release();
    peer.tool.push(null);
    const info = await goneOf(vm);
    if (info.error !== undefined && !(info.error instanceof ProtocolError) && !(info.error instanceof KvmmemError)) {
      throw new Error(`gone with an untyped error: ${String(info.error)}`);
    }
    const key = info.error instanceof ChannelLimitError ? `limit ${info.error.limit}` : info.error instanceof ProtocolError ? 'protocol violation' : 'closed by the host';
    ends.set(key, (ends.get(key) ?? 0) + 1);
    for (const r of await within(Promise.all(settled), 5000, 'pending requests settling') as (Uint8Array | Error)[][]) {
      for (const x of r) if (!(x instanceof Uint8Array) && !(x instanceof KvmmemError)) throw new Error(`request settled with ${String(x)}`);
    }
    if (server.vms().includes(vm)) throw new Error('gone VM still listed');
  }), { numRuns: 150 });
  t.log(`ends: ${[...ends].map(([k, v]) => `${k}: ${v}`).join(', ')}; ${(bytesTried / MiB).toFixed(1)} MiB of hostile input`);
  t.true([...ends.keys()].some((k) => k.startsWith('limit ')), 'some runs went over a bound');
  t.is(server.vms().length, 0);
});
