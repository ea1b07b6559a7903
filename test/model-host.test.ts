// The model host: VM ioctls HOOK/UNHOOK/PREUNHOOK (seeds 000 and 004), the
// device manager's handshake, the host side of the KVMI socket, direct
// hypercalls, revocation on unhook/removal, counters. The tool side here is a
// deliberately minimal test peer (the real one lives in src/channel).
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { version as uuidVersion } from 'uuid';
import { Window } from '../src/sys/window.js';
import * as libc from '../src/sys/libc.js';
import {
  FrameReader, KVMI_EVENT_UNHOOK, KVMI_IDS, KVM_HC_MEM_MAP, KVM_HC_MEM_UNMAP, KVM_INTROSPECTION_HOOK,
  KVM_INTROSPECTION_PREUNHOOK, KVM_INTROSPECTION_UNHOOK, KVM_INTRO_MEM_MAP, decodeErrorCode, decodeEvent,
  decodeGetVersionReply, decodeMapTokenReply, decodeQemu2Introspector, encodeControlVmEvents, encodeEventReply,
  encodeHook, encodeIntrospector2Qemu, encodeMemMap, encodeMessage, type KvmiFrame, type KvmiProtocol,
  type Qemu2Introspector,
} from '../src/abi/index.js';
import { cookieHash } from '../src/abi/cookie.js';
import { DeviceError, KvmmemError } from '../src/errors.js';
import { ModelHost, type ModelVm } from '../src/model/index.js';
import { adoptSocket, socketFd } from '../src/model/sockets.js';

const PS = 4096;

// ---- a minimal tool peer ----

interface ToolConn {
  socket: net.Socket;
  hello: Qemu2Introspector;
  /** Sends a command, resolves with the reply frame (same seq). */
  request(id: number, body?: Uint8Array): Promise<KvmiFrame>;
  /** Raw bytes. */
  send(buf: Uint8Array): void;
  /** Next message that is not a reply (events). */
  nextEvent(): Promise<KvmiFrame>;
  closed: Promise<void>;
}

interface PeerOptions {
  /** Cookie whose SHA-1 the tool answers with (default 'cookie'). */
  cookie?: string;
  /** Do not answer the handshake. */
  silent?: boolean;
  /** Bytes sent right after the handshake reply, in the same write. */
  eager?: Buffer;
}

let seqNo = 0;
async function toolPeer(t: ExecutionContext, opts: PeerOptions = {}) {
  const p = path.join(os.tmpdir(), `kvmmem-host-${process.pid}-${seqNo++}.sock`);
  const accepted: ToolConn[] = [];
  const waiting: ((c: ToolConn) => void)[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    const reader = new FrameReader();
    let hello: Qemu2Introspector | null = null;
    let seq = 0;
    const pending = new Map<number, (f: KvmiFrame) => void>();
    const events: KvmiFrame[] = [];
    const eventWaiters: ((f: KvmiFrame) => void)[] = [];
    let resolveClosed!: () => void;
    const closed = new Promise<void>((r) => { resolveClosed = r; });
    socket.on('close', () => { sockets.delete(socket); resolveClosed(); });
    socket.on('data', (chunk) => {
      reader.push(chunk);
      if (hello === null) {
        const s = reader.nextStructSized();
        if (s === null) return;
        hello = decodeQemu2Introspector(s);
        if (opts.silent) return;
        const reply = encodeIntrospector2Qemu({ cookieHash: cookieHash(opts.cookie ?? 'cookie') });
        socket.write(opts.eager ? Buffer.concat([reply, opts.eager]) : reply);
        const conn: ToolConn = {
          socket, hello,
          request: (id, body = new Uint8Array(0)) => new Promise((resolve) => {
            const s2 = ++seq;
            pending.set(s2, resolve);
            socket.write(encodeMessage({ id, seq: s2 }, body));
          }),
          send: (buf) => socket.write(buf),
          nextEvent: () => new Promise((resolve) => {
            const e = events.shift();
            if (e) resolve(e);
            else eventWaiters.push(resolve);
          }),
          closed,
        };
        const w = waiting.shift();
        if (w) w(conn);
        else accepted.push(conn);
      }
      for (let f = reader.next(); f !== null; f = reader.next()) {
        const frame = { hdr: f.hdr, body: Buffer.from(f.body) };
        const r = pending.get(f.hdr.seq);
        if (r) {
          pending.delete(f.hdr.seq);
          r(frame);
        } else {
          const w = eventWaiters.shift();
          if (w) w(frame);
          else events.push(frame);
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(p, r));
  t.teardown(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  return {
    path: p,
    accept: (): Promise<ToolConn> => new Promise((resolve) => {
      const c = accepted.shift();
      if (c) resolve(c);
      else waiting.push(resolve);
    }),
    /** A plain connected client socket to this server (for raw HOOK tests). */
    connect: (): Promise<net.Socket> => new Promise((resolve, reject) => {
      const c = net.createConnection({ path: p }, () => resolve(c));
      c.on('error', reject);
      t.teardown(() => c.destroy());
    }),
  };
}

function newHost(t: ExecutionContext, opts: ConstructorParameters<typeof ModelHost>[0] = {}) {
  const host = new ModelHost({ cookie: 'cookie', ...opts });
  t.teardown(() => host.close());
  return host;
}

async function attached(t: ExecutionContext, opts: { protocol?: KvmiProtocol; host?: ModelHost; name?: string } = {}) {
  const host = opts.host ?? newHost(t, opts.protocol ? { protocol: opts.protocol } : {});
  const vm = host.createVm({ name: opts.name ?? 'guest', memory: 16 * PS });
  const tool = await toolPeer(t);
  const [att, conn] = await Promise.all([vm.attach({ unix: tool.path }), tool.accept()]);
  return { host, vm, tool, att, conn, ids: KVMI_IDS[host.protocol] };
}

const errOf = (fn: () => unknown) => {
  try {
    fn();
    return null;
  } catch (e) {
    return e as DeviceError;
  }
};

const until = async (cond: () => boolean, ms = 2000) => {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 5));
  }
};

// ---- seed 000: the selftest's hook expectations ----

test('seed 000 selftest: padding 1 -> EINVAL, fd -1 -> EINVAL, valid -> 0, again -> EEXIST, unhook -> 0', async (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'selftest', memory: 4 * PS });
  const tool = await toolPeer(t);
  const fd = adoptSocket(await tool.connect());
  const hook = (f: number, padding: number) => errOf(() => vm.ioctl(KVM_INTROSPECTION_HOOK, encodeHook({ fd: f, padding, uuid: vm.uuidBytes })));
  t.is(hook(fd, 1)?.code, 'EINVAL');
  t.is(hook(-1, 0)?.code, 'EINVAL');
  t.false(vm.hooked);
  t.is(hook(fd, 0), null);
  t.true(vm.hooked);
  const again = hook(fd, 0);
  t.is(again?.code, 'EEXIST');
  t.is(again?.syscall, 'KVM_INTROSPECTION_HOOK');
  t.true(again instanceof DeviceError);
  t.is(vm.ioctl(KVM_INTROSPECTION_UNHOOK), 0);
  t.false(vm.hooked);
  t.is(vm.unhook(), 0, 'unhook is idempotent');
});

test('HOOK: order of checks and other invalid fds (short struct, non-socket fd, closed fd)', async (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'g', memory: 4 * PS });
  t.is(errOf(() => vm.ioctl(KVM_INTROSPECTION_HOOK, new Uint8Array(23)))?.code, 'EFAULT');
  t.is(errOf(() => vm.ioctl(KVM_INTROSPECTION_HOOK, 0))?.code, 'EFAULT', 'NULL pointer');
  const file = fs.openSync(process.execPath, 'r');
  t.teardown(() => fs.closeSync(file));
  t.is(errOf(() => vm.hook({ fd: file }))?.code, 'EINVAL', 'a regular file is not a socket');
  t.is(errOf(() => vm.hook({ fd: 100000 }))?.code, 'EINVAL', 'EBADF reads as EINVAL');
  const tool = await toolPeer(t);
  const fd = adoptSocket(await tool.connect());
  t.is(vm.hook({ fd }), 0);
  // Padding is checked before EEXIST (kvmi_ioctl_hook, then kvmi_hook), the socket after it.
  t.is(errOf(() => vm.hook({ fd, padding: 7 }))?.code, 'EINVAL');
  t.is(errOf(() => vm.hook({ fd: -1 }))?.code, 'EEXIST');
  t.is(errOf(() => vm.ioctl(0xae00))?.code, 'ENOTTY');
  // A pointer to the struct works too.
  vm.unhook();
  const w = Window.alloc(PS);
  t.teardown(() => w.free());
  encodeHook({ fd: adoptSocket(await tool.connect()), uuid: new Uint8Array(16).fill(9) }).copy(w.buffer!, 0);
  t.is(vm.ioctl(KVM_INTROSPECTION_HOOK, BigInt(w.address)), 0);
  t.deepEqual([...vm.hookUuid!], new Array(16).fill(9), 'the hook struct\'s uuid is kept for messages');
});

test('HOOK with a socket fd nobody adopted: the host takes its own reference (dup) and serves on it', async (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'dup', memory: 4 * PS });
  const tool = await toolPeer(t);
  // Handshake by hand over a raw connection, then hand its fd over without adopting it.
  // (onread: a socket whose pause() really stops reading, so it cannot steal the host's bytes.)
  let got = 0;
  let gotReply!: () => void;
  const replied = new Promise<void>((r) => { gotReply = r; });
  const raw = net.createConnection({ path: tool.path, onread: { buffer: Buffer.alloc(256), callback: (n) => { got += n; if (got >= 24) gotReply(); return true; } } });
  await new Promise((r) => raw.once('connect', r));
  const hello = Buffer.alloc(96);
  hello.writeUInt32LE(96, 0);
  raw.write(hello);
  const conn = await tool.accept();
  await replied; // the "device manager" consumed the 24-byte handshake reply
  raw.pause();
  t.is(vm.hook({ fd: socketFd(raw) }), 0);
  const reply = await conn.request(KVMI_IDS.v6.GET_VERSION);
  t.is(decodeErrorCode(reply.body), 0);
  t.is(decodeGetVersionReply('v6', reply.body, 8).version, 1);
  vm.unhook();
  raw.destroy();
});

test('EPERM: introspection disabled refuses HOOK (before anything else), UNHOOK and PREUNHOOK', async (t) => {
  const host = newHost(t, { introspection: false });
  const vm = host.createVm({ name: 'g', memory: 4 * PS });
  t.is(errOf(() => vm.hook({ fd: -1, padding: 1 }))?.code, 'EPERM');
  t.is(errOf(() => vm.ioctl(KVM_INTROSPECTION_HOOK, new Uint8Array(1)))?.code, 'EPERM');
  t.is(errOf(() => vm.unhook())?.code, 'EPERM');
  t.is(errOf(() => vm.ioctl(KVM_INTROSPECTION_PREUNHOOK))?.code, 'EPERM');
  await t.throwsAsync(vm.preunhook(), { code: 'EPERM' });
});

// ---- device manager: handshake ----

test('attach: handshake (uuid, name, start time), cookie hash checked, then HOOK', async (t) => {
  const { vm, conn, att, host } = await attached(t, { name: 'web-01' });
  t.true(vm.hooked);
  t.is(conn.hello.structSize, 96);
  t.deepEqual([...conn.hello.uuid], [...vm.uuidBytes]);
  t.is(conn.hello.name, 'web-01');
  t.is(conn.hello.startTime, vm.startTime);
  t.is(att.toolStructSize, 24);
  t.is(att.fd, socketFd(att.socket));
  t.is(uuidVersion(vm.uuid), 4);
  t.deepEqual(host.stats().vms[0], { uuid: vm.uuid, name: 'web-01', hooked: true, mappings: 0, tokensOutstanding: 0 });
});

test('attach: a wrong cookie hash closes the socket and rejects; no cookie configured accepts any', async (t) => {
  const host = newHost(t, { cookie: 'secret' });
  const vm = host.createVm({ name: 'g', memory: 4 * PS });
  const bad = await toolPeer(t, { cookie: 'not-the-secret' });
  const accepted = bad.accept();
  await t.throwsAsync(vm.attach({ unix: bad.path }), { instanceOf: KvmmemError, code: 'EACCES', message: /cookie hash mismatch/ });
  await (await accepted).closed;
  t.false(vm.hooked);
  const good = await toolPeer(t, { cookie: 'secret' });
  await vm.attach({ unix: good.path });
  t.true(vm.hooked);
  const open = newHost(t, { cookie: undefined });
  const vm2 = open.createVm({ name: 'h', memory: 4 * PS });
  await vm2.attach({ unix: bad.path });
  t.true(vm2.hooked);
});

test('attach: EEXIST when already hooked (the new socket is closed), ENOENT without a listener, ETIMEDOUT without a reply', async (t) => {
  const { vm, tool } = await attached(t);
  const second = tool.accept();
  const e = await t.throwsAsync(vm.attach({ unix: tool.path }), { instanceOf: DeviceError });
  t.is(e!.code, 'EEXIST');
  await (await second).closed;
  t.true(vm.hooked, 'the first hook stays');
  const host = newHost(t);
  const vm2 = host.createVm({ name: 'x', memory: 4 * PS });
  await t.throwsAsync(vm2.attach({ unix: path.join(os.tmpdir(), `kvmmem-nobody-${process.pid}.sock`) }), { code: 'ENOENT' });
  const silent = await toolPeer(t, { silent: true });
  await t.throwsAsync(vm2.attach({ unix: silent.path, timeoutMs: 100 }), { code: 'ETIMEDOUT' });
  t.false(vm2.hooked);
});

test('attach: messages the tool sends in the same write as its handshake reply are served', async (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'g', memory: 4 * PS });
  const tool = await toolPeer(t, { eager: encodeMessage({ id: KVMI_IDS.v6.GET_VERSION, seq: 1000 }, new Uint8Array(0)) });
  const [, conn] = await Promise.all([vm.attach({ unix: tool.path }), tool.accept()]);
  const ev = await conn.nextEvent(); // the reply to seq 1000 was not requested through request()
  t.is(ev.hdr.seq, 1000);
  t.is(ev.hdr.id, KVMI_IDS.v6.GET_VERSION);
  t.is(decodeErrorCode(ev.body), 0);
});

// ---- the KVMI commands ----

test('v6 wire: GET_VERSION, GET_MAP_TOKEN (usable with the driver), CONTROL_VM_EVENTS errors, unknown id -> -KVM_ENOSYS', async (t) => {
  const { vm, conn, ids, host } = await attached(t);
  let r = await conn.request(ids.GET_VERSION);
  t.is(r.hdr.id, ids.GET_VERSION);
  t.is(r.body.length, 16);
  t.is(decodeErrorCode(r.body), 0);
  t.deepEqual(decodeGetVersionReply('v6', r.body, 8), { version: 1 });

  r = await conn.request(ids.GET_MAP_TOKEN);
  const { err, token } = decodeMapTokenReply(r.body);
  t.is(err, 0);
  t.is(token!.length, 32);
  t.is(vm.stats().tokensOutstanding, 1);
  const dev = host.openDevice();
  const w = Window.alloc(PS);
  t.teardown(() => w.free());
  vm.memory.write(5n * 4096n, Buffer.from('over the wire'));
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token: token!, gpa: 5n * 4096n, gva: BigInt(w.address) })), 0);
  t.is(w.buffer!.toString('latin1', 0, 13), 'over the wire');

  r = await conn.request(ids.CONTROL_VM_EVENTS!, encodeControlVmEvents({ eventId: 3, enable: true }));
  t.is(decodeErrorCode(r.body), -22, 'only the UNHOOK event is known');
  const padded = encodeControlVmEvents({ eventId: KVMI_EVENT_UNHOOK, enable: true });
  padded[3] = 1;
  r = await conn.request(ids.CONTROL_VM_EVENTS!, padded);
  t.is(decodeErrorCode(r.body), -22, 'non-zero padding');
  r = await conn.request(ids.CONTROL_VM_EVENTS!, encodeControlVmEvents({ eventId: KVMI_EVENT_UNHOOK, enable: true }));
  t.is(r.body.length, 8);
  t.is(decodeErrorCode(r.body), 0);
  t.true(vm.connection!.unhookEventEnabled);

  r = await conn.request(77, new Uint8Array(12));
  t.is(r.hdr.id, 77);
  t.is(decodeErrorCode(r.body), -1000);
  t.true(vm.hooked);
});

test('v6 wire: the ninth outstanding token -> -KVM_EAGAIN; using one makes room again', async (t) => {
  const { conn, ids, vm } = await attached(t);
  const tokens: Uint8Array[] = [];
  for (let i = 0; i < 8; i++) tokens.push(decodeMapTokenReply((await conn.request(ids.GET_MAP_TOKEN)).body).token!);
  const r = await conn.request(ids.GET_MAP_TOKEN);
  t.is(r.body.length, 8);
  t.is(decodeErrorCode(r.body), -11);
  t.is(vm.host.hypercall(KVM_HC_MEM_MAP, tokens[0]!, 99n * 4096n, 0n), -14, 'consumed (EFAULT on the gpa)');
  t.is(decodeMapTokenReply((await conn.request(ids.GET_MAP_TOKEN)).body).err, 0);
});

test('v4 wire: v4 ids and reply layout, no CONTROL_VM_EVENTS, no token limit', async (t) => {
  const { conn, ids, vm } = await attached(t, { protocol: 'v4' });
  t.is(ids.GET_VERSION, 1);
  let r = await conn.request(ids.GET_VERSION);
  t.is(r.body.length, 8 + 16);
  const v = decodeGetVersionReply('v4', r.body, 8);
  t.is(v.version, 1);
  t.is(v.commands, (1 << 1) | (1 << 15));
  r = await conn.request(8, encodeControlVmEvents({ eventId: 0, enable: true }));
  t.is(decodeErrorCode(r.body), -1000, 'v4 has no KVMI_CONTROL_VM_EVENTS');
  for (let i = 0; i < 20; i++) t.is(decodeMapTokenReply((await conn.request(ids.GET_MAP_TOKEN)).body).err, 0);
  t.is(vm.stats().tokensOutstanding, 20);
  await t.throwsAsync(vm.preunhook(), { code: 'ENOENT' }, 'a v4 tool cannot subscribe to UNHOOK');
});

test('framing errors close the socket: wrong body size for a command, oversized header; QEMU then unhooks', async (t) => {
  for (const bad of [
    (ids: typeof KVMI_IDS.v6) => encodeMessage({ id: ids.GET_VERSION, seq: 1 }, new Uint8Array(4)),
    (ids: typeof KVMI_IDS.v6) => encodeMessage({ id: ids.CONTROL_VM_EVENTS!, seq: 1 }, new Uint8Array(4)),
    () => Buffer.from([1, 0, 0xff, 0xff, 1, 0, 0, 0]),
    (ids: typeof KVMI_IDS.v6) => encodeMessage({ id: ids.EVENT_REPLY, seq: 1 }, new Uint8Array(3)),
  ]) {
    const { conn, ids, vm } = await attached(t);
    conn.send(bad(ids));
    await conn.closed;
    await until(() => !vm.hooked);
    t.is(vm.connection, null);
  }
});

test('raw HOOK (no device manager): when the tool hangs up the VM stays hooked until UNHOOK, PREUNHOOK -> ENOENT', async (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'g', memory: 4 * PS });
  const tool = await toolPeer(t);
  const sock = await tool.connect();
  vm.hook({ fd: adoptSocket(sock) });
  const kvmiConn = vm.connection!;
  sock.destroy();
  await until(() => kvmiConn.closed);
  t.true(vm.hooked, 'kvm->kvmi stays until KVM_INTROSPECTION_UNHOOK');
  t.is(errOf(() => vm.ioctl(KVM_INTROSPECTION_PREUNHOOK))?.code, 'ENOENT');
  t.is(vm.unhook(), 0);
});

// ---- seed 004: PREUNHOOK ----

test('seed 004 PREUNHOOK errors: EFAULT not hooked, ENOENT when the tool did not enable the UNHOOK event', async (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'g', memory: 4 * PS });
  const e = errOf(() => vm.ioctl(KVM_INTROSPECTION_PREUNHOOK));
  t.is(e?.code, 'EFAULT');
  t.regex(e!.hint!, /not introspected yet/);
  await t.throwsAsync(vm.preunhook(), { code: 'EFAULT' });
  const { vm: vm2, conn, ids } = await attached(t, { host, name: 'h' });
  t.is(errOf(() => vm2.ioctl(KVM_INTROSPECTION_PREUNHOOK))?.code, 'ENOENT');
  await conn.request(ids.CONTROL_VM_EVENTS!, encodeControlVmEvents({ eventId: KVMI_EVENT_UNHOOK, enable: true }));
  await conn.request(ids.CONTROL_VM_EVENTS!, encodeControlVmEvents({ eventId: KVMI_EVENT_UNHOOK, enable: false }));
  t.is(errOf(() => vm2.ioctl(KVM_INTROSPECTION_PREUNHOOK))?.code, 'ENOENT', 'disabled again');
  t.true(vm2.hooked);
});

async function subscribed(t: ExecutionContext, host?: ModelHost) {
  const a = await attached(t, host ? { host, name: `v${seqNo}` } : {});
  await a.conn.request(a.ids.CONTROL_VM_EVENTS!, encodeControlVmEvents({ eventId: KVMI_EVENT_UNHOOK, enable: true }));
  return a;
}

test('PREUNHOOK: the UNHOOK event is sent; the tool\'s reply ends the wait, then the VM is unhooked and its pages revoked', async (t) => {
  const { vm, conn, ids, host } = await subscribed(t);
  const dev = host.openDevice();
  const w = Window.alloc(PS);
  t.teardown(() => w.free());
  vm.memory.write(0n, Buffer.from('guest data'));
  dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token: vm.getMapToken(), gpa: 0n, gva: BigInt(w.address) }));
  vm.getMapToken();
  const done = vm.preunhook({ timeoutMs: 5000 });
  const ev = await conn.nextEvent();
  t.is(ev.hdr.id, ids.EVENT);
  t.deepEqual(decodeEvent(ev.body), { size: 8, vcpu: 0, event: KVMI_EVENT_UNHOOK });
  t.true(vm.hooked, 'still hooked while the tool cleans up');
  t.is(w.buffer!.toString('latin1', 0, 10), 'guest data');
  // v6 event reply: kvmi_vcpu_hdr then kvmi_event_reply.
  conn.send(encodeMessage({ id: ids.EVENT_REPLY, seq: ev.hdr.seq }, Buffer.concat([Buffer.alloc(8), encodeEventReply({ action: 0, event: KVMI_EVENT_UNHOOK })])));
  t.is(await done, 'reply');
  t.false(vm.hooked);
  t.is(host.stats().mappings, 0);
  t.is(vm.stats().tokensOutstanding, 0);
  t.deepEqual(w.buffer!.subarray(0, 10), Buffer.alloc(10));
  await conn.closed;
});

test('PREUNHOOK: the tool closing the socket, or silence until the timeout, also end the wait', async (t) => {
  const a = await subscribed(t);
  const p1 = a.vm.preunhook();
  await a.conn.nextEvent();
  a.conn.socket.end();
  t.is(await p1, 'closed');
  t.false(a.vm.hooked);
  const b = await subscribed(t);
  const started = Date.now();
  t.is(await b.vm.preunhook({ timeoutMs: 150 }), 'timeout');
  t.true(Date.now() - started >= 140);
  t.false(b.vm.hooked);
});

// ---- revocation ----

test('UNHOOK while pages are mapped revokes them (fresh pages) and drops the VM\'s tokens; the tool sees EOF', async (t) => {
  const { vm, conn, host } = await attached(t);
  const other = await attached(t, { host, name: 'other' });
  const dev = host.openDevice();
  const w = Window.alloc(4 * PS);
  t.teardown(() => w.free());
  for (let i = 0; i < 3; i++) dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token: vm.getMapToken(), gpa: BigInt(i * PS), gva: BigInt(w.address + i * PS) }));
  dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token: other.vm.getMapToken(), gpa: 0n, gva: BigInt(w.address + 3 * PS) }));
  other.vm.memory.write(0n, Buffer.from('other'));
  const stale = vm.getMapToken();
  t.is(host.stats().mappings, 4);
  w.buffer!.fill(0x55, 0, 3 * PS);
  t.is(vm.unhook(), 0);
  await conn.closed;
  t.deepEqual(host.stats().vms.map((v) => [v.name, v.hooked, v.mappings, v.tokensOutstanding]), [['guest', false, 0, 0], ['other', true, 1, 0]]);
  t.deepEqual(w.buffer!.subarray(0, 3 * PS), Buffer.alloc(3 * PS), 'fresh zeroed pages, not holes');
  t.is(vm.memory.read(0n, 1)[0], 0x55, 'the guest kept what was written while mapped');
  t.is(w.buffer!.toString('latin1', 3 * PS, 3 * PS + 5), 'other');
  t.is(host.hypercall(KVM_HC_MEM_MAP, stale, 0n, BigInt(w.address)), -2, 'its tokens are gone');
  t.is(dev.mappings().length, 4, 'the driver still lists them; UNMAP/close will get -ENOENT from the host');
  dev.close();
  t.is(host.stats().mappings, 0);
});

test('VM removal while mapped: pages revoked, tokens dropped, the VM gone; owned memory closed', async (t) => {
  const { vm, host } = await attached(t);
  const dev = host.openDevice();
  const w = Window.alloc(PS);
  t.teardown(() => w.free());
  dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token: vm.getMapToken(), gpa: 0n, gva: BigInt(w.address) }));
  const tok = vm.getMapToken();
  host.removeVm(vm);
  t.true(vm.removed);
  t.true(vm.memory.closed);
  t.deepEqual(host.stats(), { mappings: 0, tokensOutstanding: 0, vms: [] });
  t.is(host.hypercall(KVM_HC_MEM_MAP, tok, 0n, BigInt(w.address)), -2);
  t.throws(() => vm.getMapToken(), { code: 'ENOTCONN' });
  t.is(errOf(() => vm.hook({ fd: -1 }))?.code, 'ENODEV', 'a removed VM has no VM fd to hook');
});

// ---- direct hypercalls ----

test('hypercall(): token by pointer, bad token pointer -> -ENOENT, introspector page without a mapping -> -EFAULT, others -> -KVM_ENOSYS', async (t) => {
  const { vm, host } = await attached(t);
  const w = Window.alloc(2 * PS);
  t.teardown(() => w.free());
  w.buffer!.set(vm.getMapToken(), PS); // the token lives in page 1
  t.is(host.hypercall(KVM_HC_MEM_MAP, BigInt(w.address + PS), 2n * 4096n, BigInt(w.address)), 0);
  t.is(host.mappingAt(BigInt(w.address + 100))?.gpa, 2n * 4096n);
  t.is(host.hypercall(KVM_HC_MEM_MAP, 0n, 0n, BigInt(w.address)), -2, 'token pointer not mapped');
  t.is(host.hypercall(KVM_HC_MEM_MAP, new Uint8Array(31), 0n, BigInt(w.address)), -2);
  const hole = libc.mmap(0, PS, libc.PROT_READ, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  libc.munmap(hole, PS);
  t.is(host.hypercall(KVM_HC_MEM_MAP, vm.getMapToken(), 0n, BigInt(hole)), -14);
  t.is(host.hypercall(KVM_HC_MEM_MAP, vm.getMapToken(), 0n, 0x7ffffffff000n), -14);
  t.is(host.hypercall(KVM_HC_MEM_MAP, vm.getMapToken(), 0n, BigInt(w.address + 8)), -114, 'EALREADY');
  t.is(host.hypercall(KVM_HC_MEM_UNMAP, 0x1000n), -2);
  t.is(host.hypercall(KVM_HC_MEM_UNMAP, BigInt(w.address + 5)), 0, 'the page holding the address');
  t.is(host.hypercall(12, 0n), -1000);
  t.is(host.hypercall(34), -1000);
  const c = host.counters();
  t.true(c.mapHypercalls >= 6 && c.unmapHypercalls >= 2);
  host.close();
  t.is(host.hypercall(KVM_HC_MEM_UNMAP, 0n), -1000);
});

test('VMs: uuid validated and normalised, duplicates refused, removeVm forgets it', (t) => {
  const host = newHost(t);
  const vm = host.createVm({ name: 'a', memory: PS, uuid: 'A3BB189E-8BF9-3888-9912-ACE4E6543002' });
  t.is(vm.uuid, 'a3bb189e-8bf9-3888-9912-ace4e6543002');
  t.is(host.findVm('A3BB189E-8BF9-3888-9912-ACE4E6543002'), vm);
  t.throws(() => host.createVm({ name: 'b', memory: PS, uuid: vm.uuid }), { message: /already exists/ });
  t.throws(() => host.createVm({ name: 'c', memory: PS, uuid: 'not-a-uuid' }), { code: 'ERR_INVALID_ARG' });
  host.removeVm(vm);
  t.is(host.findVm(vm.uuid), undefined);
  t.deepEqual(host.vms(), []);
});
