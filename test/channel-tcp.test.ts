// KVMI over TCP: IntrospectionServer.listen({ tcp }) (src/channel/server.ts)
// and the model device manager connecting over TCP (src/model/device-manager.ts),
// including a slirp-like forwarder that accepts before anything listens behind
// it, and hostile TCP peers (slowloris handshakes, floods that never read).
import test, { type ExecutionContext } from 'ava';
import { once } from 'node:events';
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import { parse as uuidParse } from 'uuid';
import {
  FrameReader, KVMI_IDS, INTROSPECTOR2QEMU_SIZE, encodeErrorCode, encodeEvent, encodeGetVersionReply, encodeMessage, encodeQemu2Introspector,
} from '../src/abi/index.js';
import {
  ChannelLimitError, IntrospectionServer, formatAddress, type RejectedInfo, type Vm, type VmGoneInfo,
} from '../src/channel/index.js';
import { KvmMem } from '../src/client/index.js';
import { KvmmemError } from '../src/errors.js';
import { ModelHost } from '../src/model/index.js';

const COOKIE = 'tcp-test-cookie';
const IDS = KVMI_IDS.v6;
const MiB = 1 << 20;

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(timer));
}

async function tcpServer(t: ExecutionContext, opts: Parameters<typeof IntrospectionServer.listen>[1] = { cookie: COOKIE }) {
  const server = await IntrospectionServer.listen({ tcp: { port: 0 } }, opts);
  t.teardown(() => server.close());
  const a = server.address as { tcp: { host: string; port: number } };
  return { server, port: a.tcp.port };
}

function modelHost(t: ExecutionContext) {
  const host = new ModelHost({ cookie: COOKIE });
  t.teardown(() => host.close());
  return host;
}

/**
 * A slirp-like forwarder: accepts every connection; until `target` is set it
 * closes it at once, resets it, or holds it open saying nothing; then pipes new ones to the target.
 */
async function forwarder(t: ExecutionContext, mode: 'close' | 'reset' | 'hold' = 'close') {
  const state = { target: 0, accepted: 0, dropped: 0 };
  const sockets = new Set<net.Socket>();
  const srv = net.createServer((c) => {
    state.accepted++;
    sockets.add(c);
    c.on('error', () => {});
    c.on('close', () => sockets.delete(c));
    if (state.target === 0) {
      state.dropped++;
      if (mode === 'reset') c.resetAndDestroy();
      else if (mode === 'close') c.destroy();
      return;
    }
    const up = net.connect({ port: state.target, host: '127.0.0.1' });
    up.on('error', () => c.destroy());
    c.pipe(up).pipe(c);
    sockets.add(up);
    up.on('close', () => { sockets.delete(up); c.destroy(); });
  });
  await new Promise<void>((r) => srv.listen({ host: '127.0.0.1', port: 0 }, r));
  t.teardown(() => {
    for (const s of sockets) s.destroy();
    srv.close();
  });
  return { state, port: (srv.address() as net.AddressInfo).port };
}

test('listen({ tcp: { port: 0 } }): a free port, reported; a model VM attaches over TCP, maps and reads through it', async (t) => {
  const { server, port } = await tcpServer(t);
  t.true(port > 0);
  t.deepEqual(server.address, { tcp: { host: '127.0.0.1', port } });
  t.is(formatAddress(server.address!), `tcp:127.0.0.1:${port}`);
  const host = modelHost(t);
  const mvm = host.createVm({ name: 'tcp-guest', memory: 4 * MiB });
  mvm.memory.write(0x3000n, Buffer.from('over tcp'));
  const vmP = server.waitForVm({ name: 'tcp-guest' }, 5000);
  const att = await mvm.attach({ tcp: { host: '127.0.0.1', port } });
  t.true(att.socket.remotePort === port);
  const vm = await vmP;
  t.is(vm.transport, 'tcp');
  const session = KvmMem.open({ model: host });
  t.teardown(() => session.close());
  const page = await session.map(vm, 0x3000n);
  t.is(page.buffer.toString('latin1', 0, 8), 'over tcp');
  page.unmap();
  t.is((await vm.readPhysical(0x3000n, 8)).toString(), 'over tcp');
  // The tool closing the connection unhooks the VM, as over unix.
  vm.close();
  await within(new Promise<void>((r) => { const i = setInterval(() => { if (!mvm.hooked) { clearInterval(i); r(); } }, 5); }), 3000, 'unhook');
  t.false(mvm.hooked);
});

test('TCP listen options: allowUids is refused (no SO_PEERCRED), bad ports are usage errors, a taken port is EADDRINUSE', async (t) => {
  await t.throwsAsync(IntrospectionServer.listen({ tcp: { port: 0 } }, { cookie: COOKIE, allowUids: [0] }),
    { code: 'ERR_INVALID_ARG', message: /allowUids cannot apply to a TCP listener/ });
  for (const port of [-1, 65536, 1.5, NaN]) {
    await t.throwsAsync(IntrospectionServer.listen({ tcp: { port } }, { cookie: COOKIE }), { code: 'ERR_INVALID_ARG' }, String(port));
  }
  await t.throwsAsync(IntrospectionServer.listen({ tcp: { host: '', port: 0 } }, { cookie: COOKIE }), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(IntrospectionServer.listen({ tcp: { port: 0 } }, { cookie: '' }), { code: 'ERR_INVALID_ARG' });
  const { port } = await tcpServer(t);
  const e = await t.throwsAsync(IntrospectionServer.listen({ tcp: { port } }, { cookie: COOKIE }), { instanceOf: KvmmemError, code: 'EADDRINUSE' });
  t.regex(e!.message, new RegExp(`listen tcp:127.0.0.1:${port}`));
  t.regex(e!.hint!, /port 0/);
});

test('TCP: a device manager with the wrong cookie hangs up and is reported as rejected', async (t) => {
  const { server, port } = await tcpServer(t);
  const rejected = once(server, 'rejected') as Promise<[RejectedInfo]>;
  const host = new ModelHost({ cookie: 'another-cookie' });
  t.teardown(() => host.close());
  const mvm = host.createVm({ name: 'wrong', memory: MiB });
  await t.throwsAsync(mvm.attach({ tcp: { port }, retries: 0 }), { code: 'EACCES', message: /cookie hash mismatch/ });
  const [info] = await within(rejected, 3000, 'rejected');
  t.is(info.transport, 'tcp');
  t.regex(info.reason, /wrong cookie/);
  t.deepEqual(server.vms(), []);
});

test('device manager over TCP: a forwarder that accepts and closes until the tool listens is retried, then attaches', async (t) => {
  for (const mode of ['close', 'reset'] as const) {
    const fwd = await forwarder(t, mode);
    const host = modelHost(t);
    const mvm = host.createVm({ name: `late-${mode}`, memory: MiB });
    const attached = mvm.attach({ tcp: { port: fwd.port }, timeoutMs: 10_000, retryDelayMs: 20 });
    // The tool comes up behind the forwarder a little later.
    await new Promise((r) => setTimeout(r, 200));
    const { server, port } = await tcpServer(t);
    const vmP = server.waitForVm({ name: `late-${mode}` }, 10_000);
    fwd.state.target = port;
    await within(attached, 10_000, 'attach through the forwarder');
    const vm = await vmP;
    t.true(fwd.state.dropped >= 1, `${fwd.state.dropped} connections dropped before the tool listened (${mode})`);
    t.is(vm.state, 'connected');
    t.true(mvm.hooked);
  }
});

test('device manager over TCP: a connection held open in silence is dropped after attemptTimeoutMs and retried', async (t) => {
  const fwd = await forwarder(t, 'hold');
  const host = modelHost(t);
  const mvm = host.createVm({ name: 'held', memory: MiB });
  const attached = mvm.attach({ tcp: { port: fwd.port }, timeoutMs: 10_000, attemptTimeoutMs: 150, retryDelayMs: 10 });
  await new Promise((r) => setTimeout(r, 400));
  const { server, port } = await tcpServer(t);
  const vmP = server.waitForVm({ name: 'held' }, 10_000);
  fwd.state.target = port;
  await within(attached, 10_000, 'attach after held connections');
  t.is((await vmP).state, 'connected');
  t.true(fwd.state.dropped >= 1, `${fwd.state.dropped} silent attempts before the tool listened`);
  // Without time left for another attempt, silence is the plain ETIMEDOUT.
  const fwd2 = await forwarder(t, 'hold');
  const other = host.createVm({ name: 'held2', memory: MiB });
  const e = await t.throwsAsync(other.attach({ tcp: { port: fwd2.port }, timeoutMs: 300, attemptTimeoutMs: 1000 }), { code: 'ETIMEDOUT' });
  t.regex(e!.message, /no reply within \d+ ms/);
});

test('device manager over TCP: retries are bounded; the error names the attempts, the time and what to check', async (t) => {
  const fwd = await forwarder(t);
  const host = modelHost(t);
  const mvm = host.createVm({ name: 'never', memory: MiB });
  const t0 = Date.now();
  const e = await t.throwsAsync(mvm.attach({ tcp: { port: fwd.port }, timeoutMs: 800, retryDelayMs: 10 }), { instanceOf: KvmmemError });
  const ms = Date.now() - t0;
  t.is(e!.code, 'ECONNRESET');
  t.regex(e!.message, new RegExp(`attach .* to tcp:127.0.0.1:${fwd.port}: \\d+ attempts in \\d+ ms, the last: .*closed the connection before sending anything`));
  t.regex(e!.hint!, /listening/);
  t.true(ms < 3000, `gave up after ${ms} ms`);
  t.true(fwd.state.accepted >= 2, `${fwd.state.accepted} attempts`);
  t.false(mvm.hooked);
  // retries: 0 gives the first error as it is; a refused port is ECONNREFUSED.
  const closed = net.createServer();
  await new Promise<void>((r) => closed.listen({ host: '127.0.0.1', port: 0 }, r));
  const freePort = (closed.address() as net.AddressInfo).port;
  await new Promise<void>((r) => closed.close(() => r()));
  await t.throwsAsync(mvm.attach({ tcp: { port: freePort }, retries: 0 }), { code: 'ECONNREFUSED', message: /connect tcp:127.0.0.1:\d+/ });
  const many = await t.throwsAsync(mvm.attach({ tcp: { port: freePort }, retries: 3, retryDelayMs: 5 }), { code: 'ECONNREFUSED' });
  t.regex(many!.message, /4 attempts/);
  for (const bad of [{ tcp: { port: 0 } }, { tcp: { port: 70000 } }, { tcp: { host: '', port: 1 } }, { unix: '/x', tcp: { port: 1 } }]) {
    await t.throwsAsync(mvm.attach(bad as never), { code: 'ERR_INVALID_ARG' }, JSON.stringify(bad));
  }
});

test('TCP slowloris: handshakes beyond maxHandshakes are closed at once, the rest time out; a good VM still attaches', async (t) => {
  const { server, port } = await tcpServer(t, { cookie: COOKIE, handshakeTimeoutMs: 1500, maxHandshakes: 4 });
  const rejected: RejectedInfo[] = [];
  server.on('rejected', (i) => rejected.push(i));
  const hello = encodeQemu2Introspector({ uuid: uuidParse(randomUUID()), name: 'slow', startTime: 1n });
  // All at once (well within the handshake timeout), each sending one byte and then only a drip.
  const peers = await Promise.all(Array.from({ length: 10 }, async () => {
    const sock = net.connect({ port, host: '127.0.0.1' });
    sock.on('error', () => {});
    t.teardown(() => sock.destroy());
    const closed = new Promise<void>((r) => sock.once('close', () => r()));
    await once(sock, 'connect');
    sock.write(hello.subarray(0, 1));
    return { sock, closed };
  }));
  // Drip one more byte into each now and then: the handshake timeout is for the whole struct, not per byte.
  const drip = setInterval(() => { for (const p of peers) if (!p.sock.destroyed) p.sock.write(hello.subarray(1, 2)); }, 50);
  t.teardown(() => clearInterval(drip));
  await within(Promise.all(peers.map((p) => p.closed)), 10_000, 'every slow peer closed');
  clearInterval(drip);
  const limited = rejected.filter((r) => r.error instanceof ChannelLimitError);
  const timedOut = rejected.filter((r) => /timed out/.test(r.reason));
  t.true(limited.length >= 6, `${limited.length} closed over maxHandshakes`);
  t.is((limited[0]!.error as ChannelLimitError).limit, 'handshakes');
  t.is(limited.length + timedOut.length, 10, rejected.map((r) => r.reason).join('; '));
  t.true(timedOut.every((r) => r.transport === 'tcp'));
  // The server is not worn out.
  const host = modelHost(t);
  const mvm = host.createVm({ name: 'after-slowloris', memory: MiB });
  const vmP = server.waitForVm({ name: 'after-slowloris' }, 5000);
  await mvm.attach({ tcp: { port } });
  t.is((await vmP).state, 'connected');
});

test('TCP flood: a peer sending events without reading the replies is closed (writeStall); another VM keeps working', async (t) => {
  const { server, port } = await tcpServer(t, { cookie: COOKIE, limits: { writeStallMs: 300 } });
  const host = modelHost(t);
  const good = host.createVm({ name: 'good', memory: MiB });
  good.memory.write(0n, Buffer.from('good page'));
  const goodP = server.waitForVm({ name: 'good' }, 5000);
  await good.attach({ tcp: { port } });
  const goodVm = await goodP;
  const floodVmP = new Promise<Vm>((r) => server.on('vm', (v: Vm) => { if (v.name === 'flood') r(v); }));
  const sock = net.connect({ port, host: '127.0.0.1' });
  sock.on('error', () => {});
  t.teardown(() => sock.destroy());
  await once(sock, 'connect');
  const events = Buffer.concat(Array.from({ length: 1024 }, (_, i) => encodeMessage({ id: IDS.EVENT, seq: i }, encodeEvent({ vcpu: 0, event: 3 }))));
  let written = 0;
  const flood = () => { while (!sock.destroyed && sock.write(events, (e) => { if (!e) written += events.length; })); };
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
        sock.pause(); // never reads again
        setImmediate(flood);
      }
    }
  });
  sock.write(encodeQemu2Introspector({ uuid: uuidParse(randomUUID()), name: 'flood', startTime: 1n }));
  const fvm = await within(floodVmP, 5000, 'the flooder\'s VM');
  const gone = await within(new Promise<VmGoneInfo>((r) => fvm.once('gone', r)), 30_000, 'the flooder closed');
  t.true(gone.error instanceof ChannelLimitError, gone.reason);
  t.is((gone.error as ChannelLimitError).limit, 'writeStall');
  t.true(written > 256 * 1024, `${written} bytes flooded`);
  t.is(goodVm.state, 'connected');
  t.is((await goodVm.readPhysical(0n, 9)).toString(), 'good page');
});
