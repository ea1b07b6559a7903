// src/channel: the tool end of the KVMI socket protocol, against a fake device
// manager / host written here with node:net and the abi codecs (no src/model).
import test from 'ava';
import { EventEmitter, once } from 'node:events';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, existsSync, lstatSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse as uuidParse } from 'uuid';
import {
  FrameReader, KVMI_IDS, encodeQemu2Introspector, decodeIntrospector2Qemu, encodeMessage, encodeErrorCode,
  encodeGetVersionReply, encodeMapTokenReply, encodeEvent, decodeEventReply, decodeControlVmEvents,
  type KvmiFrame, type KvmiProtocol,
} from '../src/abi/kvmi.js';
import { cookieHash } from '../src/abi/cookie.js';
import { ERRNO } from '../src/abi/errno.js';
import { SyscallError } from '../src/errors.js';
import * as libc from '../src/sys/libc.js';
import {
  IntrospectionServer, KvmiError, ProtocolError, TimeoutError, VmGoneError, type IntrospectionServerOptions, type RejectedInfo, type Vm, type VmGoneInfo,
} from '../src/channel/index.js';
import { RawSocketListener } from '../src/channel/rawfd.js';
import { startTimeToDate } from '../src/channel/vm.js';
import { poller } from '../src/channel/rawfd.js';

const dir = mkdtempSync(join(tmpdir(), 'kvmmem-channel-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const sockPath = () => join(dir, `s${++n}.sock`);
/** The cookie every server and fake device manager here share unless a test says otherwise. */
const COOKIE = 'channel-test-cookie';
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

// ---------------------------------------------------------------------------
// A fake device manager + host: QEMU's handshake, then KVM's side of KVMI.
// ---------------------------------------------------------------------------
interface FakeOptions {
  uuid?: string;
  name?: string;
  startTime?: bigint;
  structSize?: number;
  cookie?: string;
  protocol?: KvmiProtocol;
  /** v6 host: at most this many unconsumed tokens, then -EAGAIN. */
  tokenLimit?: number;
  /** Custom handling; return true when the frame was dealt with. */
  onFrame?: (f: KvmiFrame, host: FakeHost) => boolean;
}

class FakeHost extends EventEmitter {
  readonly sock: net.Socket;
  readonly protocol: KvmiProtocol;
  readonly ids: (typeof KVMI_IDS)['v6'];
  readonly frames: KvmiFrame[] = [];
  /** Sizes of the data chunks carrying frames, as read from the socket. */
  readonly chunks: number[] = [];
  readonly tokens: Uint8Array[] = [];
  outstanding = 0;
  tokenLimit: number;
  onFrame: FakeOptions['onFrame'];
  readonly ended: Promise<void>;
  #reader = new FrameReader();

  private constructor(sock: net.Socket, opts: FakeOptions) {
    super();
    this.sock = sock;
    this.protocol = opts.protocol ?? 'v6';
    this.ids = KVMI_IDS[this.protocol] as (typeof KVMI_IDS)['v6'];
    this.tokenLimit = opts.tokenLimit ?? (this.protocol === 'v6' ? 8 : Infinity);
    this.onFrame = opts.onFrame;
    this.ended = new Promise((resolve) => sock.once('close', () => resolve()));
  }

  static hello(opts: FakeOptions = {}): Buffer {
    return encodeQemu2Introspector({
      uuid: uuidParse(opts.uuid ?? randomUUID()), name: opts.name ?? 'vm1',
      startTime: opts.startTime ?? 1_700_000_000n, ...(opts.structSize === undefined ? {} : { structSize: opts.structSize }),
    });
  }

  /** Connects, handshakes like QEMU (closing on a wrong cookie hash), then serves KVMI. */
  static async connect(path: string, opts: FakeOptions = {}): Promise<FakeHost> {
    const sock = net.connect(path);
    sock.on('error', () => {});
    await once(sock, 'connect');
    const host = new FakeHost(sock, opts);
    sock.write(FakeHost.hello(opts));
    let buf = Buffer.alloc(0);
    await new Promise<void>((resolve, reject) => {
      const onData = (c: Buffer) => {
        buf = Buffer.concat([buf, c]);
        if (buf.length < 24) return;
        sock.off('data', onData);
        sock.off('close', onClose);
        const reply = decodeIntrospector2Qemu(buf.subarray(0, 24));
        const want = cookieHash(opts.cookie ?? COOKIE);
        if (Buffer.compare(Buffer.from(reply.cookieHash), Buffer.from(want)) !== 0 || reply.structSize !== 24) {
          sock.destroy(); // QEMU: wrong cookie -> hang up
          reject(new Error('cookie hash mismatch'));
          return;
        }
        host.#start(buf.subarray(24));
        resolve();
      };
      const onClose = () => reject(new Error('closed during the handshake'));
      sock.on('data', onData);
      sock.once('close', onClose);
    });
    return host;
  }

  #start(rest: Buffer): void {
    const onData = (c: Buffer) => {
      this.#reader.push(c);
      let f: KvmiFrame | null;
      let any = false;
      while ((f = this.#reader.next()) !== null) {
        any = true;
        const frame = { hdr: f.hdr, body: Buffer.from(f.body) };
        this.frames.push(frame);
        this.emit('frame', frame);
        if (this.onFrame?.(frame, this)) continue;
        this.serve(frame);
      }
      if (any) this.chunks.push(c.length);
    };
    this.sock.on('data', onData);
    if (rest.length) onData(rest);
  }

  reply(f: KvmiFrame, err: number, data: Uint8Array = Buffer.alloc(0)): void {
    this.sock.write(encodeMessage(f.hdr, err === 0 ? Buffer.concat([encodeErrorCode(0), data]) : encodeErrorCode(err)));
  }

  /** The default behaviour of a v4/v6 host. */
  serve(f: KvmiFrame): void {
    const { id } = f.hdr;
    if (id === this.ids.GET_VERSION) this.reply(f, 0, encodeGetVersionReply(this.protocol, { version: 1, commands: 0xff, events: 0x3 }));
    else if (id === this.ids.CONTROL_VM_EVENTS && this.protocol === 'v6') {
      decodeControlVmEvents(f.body);
      this.reply(f, 0);
    } else if (id === this.ids.GET_MAP_TOKEN) {
      if (this.outstanding >= this.tokenLimit) {
        this.reply(f, -ERRNO.EAGAIN!);
        return;
      }
      const t = randomBytes(32);
      this.tokens.push(t);
      this.outstanding++;
      this.sock.write(encodeMessage(f.hdr, encodeMapTokenReply(t)));
    } else if (id === this.ids.EVENT_REPLY) {
      // event replies are recorded in frames only
    } else this.reply(f, -ERRNO.KVM_ENOSYS!);
  }

  sendEvent(event: number, seq: number, vcpu = 0xffff): void {
    this.sock.write(encodeMessage({ id: this.ids.EVENT, seq }, encodeEvent({ vcpu, event })));
  }

  framesOf(id: number | null): KvmiFrame[] {
    return this.frames.filter((f) => f.hdr.id === id);
  }

  async waitFrame(pred: (f: KvmiFrame) => boolean, ms = 2000): Promise<KvmiFrame> {
    const f = this.frames.find(pred);
    if (f) return f;
    return within(new Promise<KvmiFrame>((resolve) => {
      const on = (x: KvmiFrame) => {
        if (pred(x)) {
          this.off('frame', on);
          resolve(x);
        }
      };
      this.on('frame', on);
    }), ms, 'waiting for a frame');
  }
}

async function setup(t: { teardown(fn: () => unknown): void }, serverOpts: Partial<IntrospectionServerOptions> = {}, fake: FakeOptions = {}) {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, protocol: fake.protocol ?? 'v6', ...serverOpts });
  t.teardown(() => server.close());
  const vmP = once(server, 'vm') as Promise<[Vm]>;
  const host = await FakeHost.connect((server.address as { unix: string }).unix, fake);
  t.teardown(() => host.sock.destroy());
  const [vm] = await within(vmP, 3000, 'vm event');
  return { server, host, vm };
}

function rejectedOnce(server: IntrospectionServer): Promise<RejectedInfo> {
  return within(once(server, 'rejected').then(([i]) => i as RejectedInfo), 3000, 'rejected event');
}

/** Raw client: sends bytes, resolves when the server closes the connection. */
async function rawClient(path: string, bytes: Buffer, opts: { endAfter?: boolean } = {}) {
  const sock = net.connect(path);
  sock.on('error', () => {});
  await once(sock, 'connect');
  const received: Buffer[] = [];
  sock.on('data', (c) => received.push(c));
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  sock.write(bytes);
  if (opts.endAfter) sock.end();
  return { sock, closed, received };
}

// ---------------------------------------------------------------------------
// handshake
// ---------------------------------------------------------------------------
test('handshake v6: VM announced with uuid/name/start time, GET_VERSION and UNHOOK enabled first', async (t) => {
  const uuid = randomUUID();
  const { host, vm, server } = await setup(t, {}, { uuid, name: 'web-01', startTime: 1_700_000_000n });
  t.is(vm.uuid, uuid);
  t.is(vm.name, 'web-01');
  t.is(vm.startTime, 1_700_000_000n);
  t.is(vm.startDate?.toISOString(), '2023-11-14T22:13:20.000Z');
  t.is(vm.protocol, 'v6');
  t.is(vm.version, 1);
  t.is(vm.state, 'connected');
  t.is(vm.handshakeStructSize, 96);
  t.is(vm.tokenLimit, 8);
  t.true(vm.unhookEventEnabled);
  t.deepEqual(server.vms(), [vm]);
  // GET_VERSION then CONTROL_VM_EVENTS(UNHOOK=0, enable=1), in that order, empty GET_VERSION body.
  t.deepEqual(host.frames.map((f) => f.hdr.id), [KVMI_IDS.v6.GET_VERSION, KVMI_IDS.v6.CONTROL_VM_EVENTS]);
  t.is(host.frames[0]!.body.length, 0);
  t.deepEqual(decodeControlVmEvents(host.frames[1]!.body), { eventId: 0, enable: true });
  t.not(host.frames[0]!.hdr.seq, host.frames[1]!.hdr.seq);
});

test('handshake v4: v4 ids, 16-byte version reply, no CONTROL_VM_EVENTS', async (t) => {
  const { host, vm } = await setup(t, { protocol: 'v4' }, { protocol: 'v4' });
  t.is(vm.protocol, 'v4');
  t.is(vm.version, 1);
  t.deepEqual(vm.versionInfo, { version: 1, commands: 0xff, events: 0x3 });
  t.false(vm.unhookEventEnabled);
  t.is(vm.tokenLimit, Infinity);
  t.deepEqual(host.frames.map((f) => f.hdr.id), [KVMI_IDS.v4.GET_VERSION]);
  const token = await vm.getMapToken();
  t.is(host.framesOf(KVMI_IDS.v4.GET_MAP_TOKEN).length, 1);
  t.deepEqual(Buffer.from(token), Buffer.from(host.tokens[0]!));
  const e = await t.throwsAsync(vm.controlVmEvents(0, true), { instanceOf: KvmiError });
  t.is(e.code, 'ENOSYS');
});

test('handshake: larger struct_size (newer peer) is accepted and cut', async (t) => {
  const { vm } = await setup(t, {}, { structSize: 200, name: 'newer' });
  t.is(vm.name, 'newer');
  t.is(vm.handshakeStructSize, 200);
  t.is((await vm.getMapTokens(2)).length, 2);
});

test('handshake: shorter struct_size (older peer) is zero-filled', async (t) => {
  // 32 bytes: struct_size, uuid, padding, start_time; no name at all.
  const uuid = randomUUID();
  const { vm } = await setup(t, {}, { structSize: 32, uuid, name: 'cut-off' });
  t.is(vm.uuid, uuid);
  t.is(vm.name, '');
  t.is(vm.startTime, 1_700_000_000n);
  t.is(vm.handshakeStructSize, 32);
  // Even just the struct_size itself: nil uuid, no start time.
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
  t.teardown(() => server.close());
  const vmP = once(server, 'vm') as Promise<[Vm]>;
  await FakeHost.connect(server.address && 'unix' in server.address ? server.address.unix : '', { structSize: 4 });
  const [vm4] = await within(vmP, 3000, 'vm');
  t.is(vm4.uuid, '00000000-0000-0000-0000-000000000000');
  t.is(vm4.startDate, null);
});

for (const [title, bytes, reason] of [
  ['struct_size 2', Buffer.from([2, 0, 0, 0, 1, 2, 3, 4]), /struct_size/],
  ['struct_size 9999', (() => { const b = FakeHost.hello(); b.writeUInt32LE(9999, 0); return b; })(), /struct_size/],
  ['name not NUL-terminated', (() => { const b = FakeHost.hello(); b.fill(0x41, 32, 96); return b; })(), /NUL/],
] as const) {
  test(`malformed handshake (${title}) -> 'rejected' with a reason, connection closed`, async (t) => {
    const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
    t.teardown(() => server.close());
    const rej = rejectedOnce(server);
    const c = await rawClient(server.address && 'unix' in server.address ? server.address.unix : '', bytes);
    const info = await rej;
    t.regex(info.reason, reason);
    t.true(info.error instanceof ProtocolError);
    t.is((info.error as ProtocolError).code, 'ERR_KVMI_PROTOCOL');
    t.is(info.transport, 'unix');
    await within(c.closed, 2000, 'server closes the connection');
    t.is(Buffer.concat(c.received).length, 0, 'no handshake reply was sent');
    t.is(server.vms().length, 0);
  });
}

test('truncated handshake then close -> rejected (truncated)', async (t) => {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
  t.teardown(() => server.close());
  const rej = rejectedOnce(server);
  const c = await rawClient((server.address as { unix: string }).unix, FakeHost.hello().subarray(0, 50), { endAfter: true });
  const info = await rej;
  t.regex(info.reason, /truncated kvmi_qemu2introspector: 50 of 96 bytes/);
  await within(c.closed, 2000, 'closed');
});

test('handshake that never completes times out', async (t) => {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, handshakeTimeoutMs: 150 });
  t.teardown(() => server.close());
  const rej = rejectedOnce(server);
  const c = await rawClient((server.address as { unix: string }).unix, FakeHost.hello().subarray(0, 10));
  const info = await rej;
  t.regex(info.reason, /handshake timed out after 150 ms \(received 10 bytes/);
  await within(c.closed, 2000, 'closed');
});

test('wrong cookie: the device manager hangs up -> rejected as such', async (t) => {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: 'secret-A' });
  t.teardown(() => server.close());
  const rej = rejectedOnce(server);
  let vmSeen = false;
  server.on('vm', () => { vmSeen = true; });
  await t.throwsAsync(FakeHost.connect((server.address as { unix: string }).unix, { cookie: 'secret-B', name: 'victim' }), { message: /cookie/ });
  const info = await rej;
  t.is(info.reason, 'handshake rejected by the device manager (wrong cookie?)');
  t.true(info.error instanceof ProtocolError);
  t.is(info.name, 'victim');
  t.false(vmSeen);
  // The right cookie (Uint8Array form) works.
  const s2 = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: new TextEncoder().encode('secret-B') });
  t.teardown(() => s2.close());
  const vmP = once(s2, 'vm');
  await FakeHost.connect((s2.address as { unix: string }).unix, { cookie: 'secret-B' });
  await within(vmP, 2000, 'vm');
  t.pass();
});

test('GET_VERSION with version 0 or a bad reply size rejects the VM', async (t) => {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
  t.teardown(() => server.close());
  let rej = rejectedOnce(server);
  const h0 = await FakeHost.connect((server.address as { unix: string }).unix, {
    onFrame: (f, h) => { if (f.hdr.id === h.ids.GET_VERSION) { h.reply(f, 0, encodeGetVersionReply('v6', { version: 0 })); return true; } return false; },
  });
  t.regex((await rej).reason, /KVMI version 0/);
  await within(h0.ended, 2000, 'closed');
  rej = rejectedOnce(server);
  const h1 = await FakeHost.connect((server.address as { unix: string }).unix, {
    onFrame: (f, h) => { if (f.hdr.id === h.ids.GET_VERSION) { h.reply(f, 0, Buffer.alloc(16)); return true; } return false; },
  });
  const info = await rej;
  t.regex(info.reason, /KVMI_GET_VERSION .* has 24 bytes; expected 8 \(error\) or 16/);
  t.true(info.error instanceof ProtocolError);
  await within(h1.ended, 2000, 'closed');
});

test('a host refusing the UNHOOK event still gives a VM (unhookEventEnabled false)', async (t) => {
  const { vm } = await setup(t, {}, {
    onFrame: (f, h) => { if (f.hdr.id === h.ids.CONTROL_VM_EVENTS) { h.reply(f, -ERRNO.EPERM!); return true; } return false; },
  });
  t.false(vm.unhookEventEnabled);
  t.is(vm.state, 'connected');
});

test('enableUnhookEvent: false skips CONTROL_VM_EVENTS', async (t) => {
  const { vm, host } = await setup(t, { enableUnhookEvent: false });
  t.false(vm.unhookEventEnabled);
  t.is(host.framesOf(KVMI_IDS.v6.CONTROL_VM_EVENTS).length, 0);
});

// ---------------------------------------------------------------------------
// commands
// ---------------------------------------------------------------------------
test('GET_VERSION and CONTROL_VM_EVENTS on demand', async (t) => {
  const { vm, host } = await setup(t);
  t.deepEqual(await vm.getVersion(), { version: 1 });
  await vm.controlVmEvents(0, false);
  const f = host.framesOf(KVMI_IDS.v6.CONTROL_VM_EVENTS).at(-1)!;
  t.deepEqual(decodeControlVmEvents(f.body), { eventId: 0, enable: false });
  t.is(f.body.length, 8);
});

test('tokens: single and batched, plain 32-byte Uint8Arrays equal to what the host issued', async (t) => {
  const { vm, host } = await setup(t);
  const one = await vm.getMapToken();
  t.is(one.constructor, Uint8Array);
  t.is(one.length, 32);
  t.deepEqual(Buffer.from(one), Buffer.from(host.tokens[0]!));
  const batch = await vm.getMapTokens(7);
  t.is(batch.length, 7);
  batch.forEach((tok, i) => t.deepEqual(Buffer.from(tok), Buffer.from(host.tokens[i + 1]!)));
  t.deepEqual(await vm.getMapTokens(0), []);
  t.is(vm.inFlight, 0);
  for (const f of host.framesOf(KVMI_IDS.v6.GET_MAP_TOKEN)) t.is(f.body.length, 0);
});

test('pipelining: getMapTokens(n) puts n requests on the wire before any reply', async (t) => {
  const N = 8;
  const held: KvmiFrame[] = [];
  let firstReplyAfter = -1;
  const { vm, host } = await setup(t, {}, {
    onFrame: (f, h) => {
      if (f.hdr.id !== h.ids.GET_MAP_TOKEN) return false;
      held.push(f);
      if (held.length === N) { // only now answer them all (in reverse order: matching is by seq)
        firstReplyAfter = held.length;
        for (const x of held.splice(0).reverse()) h.serve(x);
      }
      return true;
    },
  });
  vm.resetMaxInFlight();
  const tokens = await within(vm.getMapTokens(N), 3000, 'tokens');
  t.is(firstReplyAfter, N);
  t.true(vm.maxInFlight >= N, `maxInFlight ${vm.maxInFlight}`);
  // Reversed replies still land on the right promise.
  tokens.forEach((tok, i) => t.deepEqual(Buffer.from(tok), Buffer.from(host.tokens[N - 1 - i]!)));
  // All N requests came in one chunk (one socket write).
  t.is(host.chunks.at(-1), N * 8);
});

test('pipelining: concurrent getMapToken() calls overlap too', async (t) => {
  const N = 5;
  const held: KvmiFrame[] = [];
  const { vm } = await setup(t, {}, {
    onFrame: (f, h) => {
      if (f.hdr.id !== h.ids.GET_MAP_TOKEN) return false;
      held.push(f);
      if (held.length === N) for (const x of held.splice(0)) h.serve(x);
      return true;
    },
  });
  vm.resetMaxInFlight();
  const toks = await within(Promise.all(Array.from({ length: N }, () => vm.getMapToken())), 3000, 'tokens');
  t.is(new Set(toks.map((x) => Buffer.from(x).toString('hex'))).size, N);
  t.is(vm.maxInFlight, N);
});

test('error codes: EAGAIN over the host limit -> KvmiError with hint; settled keeps the good tokens', async (t) => {
  const { vm, host } = await setup(t);
  const r = await vm.getMapTokensSettled(10);
  t.is(r.filter((x) => x instanceof Uint8Array).length, 8);
  const errs = r.filter((x): x is KvmiError => x instanceof KvmiError);
  t.is(errs.length, 2);
  t.is(errs[0]!.code, 'EAGAIN');
  t.is(errs[0]!.errno, -11);
  t.is(errs[0]!.syscall, 'KVMI_GET_MAP_TOKEN');
  t.regex(errs[0]!.message, /too many unconsumed tokens/);
  const e = await t.throwsAsync(vm.getMapToken(), { instanceOf: KvmiError });
  t.is(e.code, 'EAGAIN');
  // no token bytes in messages
  for (const tok of host.tokens) t.false(e.message.includes(Buffer.from(tok).toString('hex')));
  host.outstanding = 0;
  t.is((await vm.getMapToken()).length, 32);
  t.is(vm.state, 'connected');
});

test('error codes: unknown command -> KVM_ENOSYS; generic request returns the data', async (t) => {
  const { vm } = await setup(t, {}, {
    onFrame: (f, h) => { if (f.hdr.id === 77) { h.reply(f, 0, Buffer.from('abc')); return true; } return false; },
  });
  const e = await t.throwsAsync(vm.request(99, Buffer.alloc(8)), { instanceOf: KvmiError });
  t.is(e.code, 'KVM_ENOSYS');
  t.is(e.errno, -1000);
  t.regex(e.message, /does not implement/);
  t.deepEqual(await vm.request(77), Buffer.from('abc'));
  // a body over the u16 size limit is refused before anything is sent or registered
  await t.throwsAsync(vm.request(77, Buffer.alloc(70_000)), { instanceOf: RangeError });
  t.is(vm.inFlight, 0);
  t.is(vm.state, 'connected');
});

test('request timeout -> TimeoutError; the late reply is dropped and the VM stays usable', async (t) => {
  let late: KvmiFrame | null = null;
  const { vm, host } = await setup(t, { requestTimeoutMs: 150 }, {
    onFrame: (f, h) => { if (f.hdr.id === h.ids.GET_MAP_TOKEN && late === null) { late = f; return true; } return false; },
  });
  const e = await t.throwsAsync(vm.getMapToken(), { instanceOf: TimeoutError });
  t.is(e.code, 'ETIMEDOUT');
  host.serve(late!);
  t.is((await vm.getMapToken()).length, 32);
  t.is(vm.state, 'connected');
});

// ---------------------------------------------------------------------------
// unhook (seed 004)
// ---------------------------------------------------------------------------
test('UNHOOK event: unhook emitted, CONTINUE reply, socket closed, gone, pending requests rejected', async (t) => {
  const { vm, host, server } = await setup(t, {}, {
    onFrame: (f, h) => f.hdr.id === h.ids.GET_MAP_TOKEN, // never answered
  });
  const pending = vm.getMapTokens(2);
  await host.waitFrame((f) => f.hdr.id === KVMI_IDS.v6.GET_MAP_TOKEN);
  const seen: string[] = [];
  vm.on('unhook', (info) => {
    seen.push(`unhook:${vm.state}:${info.seq}`);
    t.is(host.framesOf(KVMI_IDS.v6.EVENT_REPLY).length, 0, 'reply only after the listeners');
  });
  const gone = once(vm, 'gone') as Promise<[VmGoneInfo]>;
  host.sendEvent(0, 0x1234);
  const [info] = await within(gone, 2000, 'gone');
  t.deepEqual(seen, [`unhook:unhooking:${0x1234}`]);
  t.is(info.reason, 'unhooked by the host');
  t.is(vm.state, 'gone');
  const err = await t.throwsAsync(pending, { instanceOf: VmGoneError });
  t.is(err.code, 'VM_GONE');
  t.regex(err.message, /wait for it to reconnect/);
  await within(host.ended, 2000, 'the device manager sees the socket closed');
  const reply = host.framesOf(KVMI_IDS.v6.EVENT_REPLY);
  t.is(reply.length, 1);
  t.is(reply[0]!.hdr.seq, 0x1234);
  t.deepEqual(decodeEventReply(reply[0]!.body), { action: 0, event: 0 });
  t.is(reply[0]!.body.length, 8);
  t.deepEqual(server.vms(), []);
  await t.throwsAsync(vm.getMapToken(), { instanceOf: VmGoneError });
});

test('UNHOOK with autoCloseOnUnhook false: replied, state unhooking, closed by the tool later', async (t) => {
  const { vm, host } = await setup(t, { autoCloseOnUnhook: false }, { protocol: 'v4' });
  host.sendEvent(0, 7);
  const reply = await host.waitFrame((f) => f.hdr.id === KVMI_IDS.v4.EVENT_REPLY);
  t.is(reply.hdr.seq, 7);
  t.is(vm.state, 'unhooking');
  await t.throwsAsync(vm.getMapToken(), { instanceOf: VmGoneError });
  const gone = once(vm, 'gone');
  vm.close();
  t.is(vm.state, 'gone');
  await gone;
  await within(host.ended, 2000, 'closed');
});

test('other events are answered with CONTINUE and surfaced as "event"', async (t) => {
  const { vm, host } = await setup(t);
  const ev = once(vm, 'event');
  host.sendEvent(5, 9, 2);
  const [info] = await within(ev, 2000, 'event');
  t.like(info, { event: 5, vcpu: 2, seq: 9 });
  const r = await host.waitFrame((f) => f.hdr.id === KVMI_IDS.v6.EVENT_REPLY);
  t.deepEqual(decodeEventReply(r.body), { action: 0, event: 5 });
  t.is(vm.state, 'connected');
});

test('peer closing the connection: gone with a reason, pending rejected', async (t) => {
  const { vm, host } = await setup(t, {}, { onFrame: (f, h) => f.hdr.id === h.ids.GET_MAP_TOKEN });
  const p = vm.getMapToken();
  await host.waitFrame((f) => f.hdr.id === KVMI_IDS.v6.GET_MAP_TOKEN);
  const gone = once(vm, 'gone') as Promise<[VmGoneInfo]>;
  host.sock.end();
  t.is((await gone)[0].reason, 'connection closed by the host');
  await t.throwsAsync(p, { instanceOf: VmGoneError });
});

test('framing violation after the handshake closes the connection with a ProtocolError', async (t) => {
  const { vm, host } = await setup(t);
  const gone = once(vm, 'gone') as Promise<[VmGoneInfo]>;
  host.sock.write(encodeMessage({ id: KVMI_IDS.v6.GET_MAP_TOKEN, seq: 0xdead }, encodeErrorCode(0)));
  const [info] = await within(gone, 2000, 'gone');
  t.regex(info.reason, /seq 0xdead answers no pending request/);
  t.true(info.error instanceof ProtocolError);
  await within(host.ended, 2000, 'closed');
});

// ---------------------------------------------------------------------------
// server
// ---------------------------------------------------------------------------
test('waitForVm: already connected, later, by name/uuid, timeout', async (t) => {
  const { server, vm } = await setup(t, {}, { name: 'alpha' });
  t.is(await server.waitForVm(), vm);
  t.is(await server.waitForVm({ name: 'alpha' }), vm);
  t.is(await server.waitForVm({ uuid: vm.uuid.toUpperCase() }), vm);
  const uuid = randomUUID();
  const later = server.waitForVm({ uuid });
  await FakeHost.connect((server.address as { unix: string }).unix, { name: 'beta', uuid });
  const b = await within(later, 2000, 'waitForVm');
  t.is(b.name, 'beta');
  t.is(server.vms().length, 2);
  const e = await t.throwsAsync(server.waitForVm({ name: 'nope' }, 50), { instanceOf: TimeoutError });
  t.regex(e.message, /name "nope"/);
});

test('close(): unlinks the socket, VMs gone, waiters rejected; stale sockets replaced, live ones refused', async (t) => {
  const path = sockPath();
  // a stale socket file (bound, then closed without unlinking, as after a crash)
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM);
  libc.bind(fd, libc.sockaddrUn(path));
  libc.closeRaw(fd);
  t.true(lstatSync(path).isSocket());
  const server = await IntrospectionServer.listen({ unix: path }, { cookie: COOKIE });
  t.true(lstatSync(path).isSocket());
  await t.throwsAsync(IntrospectionServer.listen({ unix: path }, { cookie: COOKIE }), { code: 'EADDRINUSE', message: /another process/ });
  const host = await FakeHost.connect(path);
  const vm = await server.waitForVm();
  const waiter = server.waitForVm({ name: 'never' });
  const gone = once(vm, 'gone') as Promise<[VmGoneInfo]>;
  await server.close();
  t.is((await gone)[0].reason, 'introspection server closed');
  await t.throwsAsync(waiter, { code: 'ERR_SERVER_CLOSED' });
  await within(host.ended, 2000, 'peer closed');
  t.false(existsSync(path));
  // a regular file is never removed
  writeFileSync(path, 'x');
  await t.throwsAsync(IntrospectionServer.listen({ unix: path }, { cookie: COOKIE }), { code: 'EADDRINUSE', message: /not a socket/ });
  t.true(existsSync(path));
  rmSync(path);
  await server.close(); // idempotent
});

test('bad options are usage errors', async (t) => {
  await t.throwsAsync(IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, protocol: 'v5' as 'v6' }), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(IntrospectionServer.listen({} as { unix: string }, { cookie: COOKIE }), { code: 'ERR_INVALID_ARG' });
});

test('startTimeToDate reads seconds, ms, µs and ns', (t) => {
  const iso = '2023-11-14T22:13:20.000Z';
  t.is(startTimeToDate(1_700_000_000n)?.toISOString(), iso);
  t.is(startTimeToDate(1_700_000_000_000n)?.toISOString(), iso);
  t.is(startTimeToDate(1_700_000_000_000_000n)?.toISOString(), iso);
  t.is(startTimeToDate(1_700_000_000_000_000_000n)?.toISOString(), iso);
  t.is(startTimeToDate(0n), null);
});

// ---------------------------------------------------------------------------
// raw-fd transport (the vsock path), exercised with AF_UNIX
// ---------------------------------------------------------------------------
/** A raw-fd listener on a fresh unix path, a node:net client connected to it, and the accepted Duplex. */
async function rawPair(t: { teardown(fn: () => void): void }) {
  const path = sockPath();
  const l = RawSocketListener.listenUnix(path);
  t.teardown(() => l.close());
  const conn = once(l, 'connection');
  const client = net.connect(path);
  await once(client, 'connect');
  const [duplex] = await within(conn, 2000, 'accept') as [import('../src/channel/rawfd.js').RawFdDuplex];
  return { client, duplex };
}

test.serial('raw-fd transport: socket/bind/listen/accept4 through ffi-rs, bulk data both ways', async (t) => {
  const { client, duplex } = await rawPair(t);
  // 4 MiB each way: partial writes, EAGAIN and backpressure on both sides.
  const big = randomBytes(4 << 20);
  const gotServer: Buffer[] = [];
  duplex.on('data', (c: Buffer) => gotServer.push(c));
  const gotClient: Buffer[] = [];
  client.on('data', (c) => gotClient.push(c));
  const serverEnded = once(duplex, 'end');
  const closed = once(duplex, 'close');
  client.end(big);
  duplex.end(big);
  await within(serverEnded, 10_000, 'server side got EOF');
  await within(once(client, 'end'), 10_000, 'client got EOF');
  t.true(Buffer.concat(gotServer).equals(big));
  t.true(Buffer.concat(gotClient).equals(big));
  await within(closed, 2000, 'duplex closed');
  t.true(duplex.destroyed);
});

test.serial('raw-fd transport carries the whole protocol (adopt)', async (t) => {
  const path = sockPath();
  const l = RawSocketListener.listenUnix(path);
  const server = IntrospectionServer.create({ cookie: COOKIE });
  t.teardown(async () => { l.close(); await server.close(); });
  l.on('connection', (d) => server.adopt(d, 'raw-unix'));
  const vmP = once(server, 'vm') as Promise<[Vm]>;
  const host = await FakeHost.connect(path);
  const [vm] = await within(vmP, 3000, 'vm');
  t.is(vm.transport, 'raw-unix');
  const toks = await vm.getMapTokens(8);
  t.is(toks.length, 8);
  const gone = once(vm, 'gone') as Promise<[VmGoneInfo]>;
  host.sendEvent(0, 3);
  t.is((await within(gone, 2000, 'gone'))[0].reason, 'unhooked by the host');
  await within(host.ended, 2000, 'closed');
  t.is(host.framesOf(KVMI_IDS.v6.EVENT_REPLY).length, 1);
});

test.serial('raw-fd transport: the peer resetting mid-stream ends the Duplex, no crash', async (t) => {
  const { client, duplex: d } = await rawPair(t);
  const errors: Error[] = [];
  d.on('error', (e) => errors.push(e));
  const closed = new Promise((r) => d.once('close', r)); // (events.once would reject on 'error')
  client.destroy();
  // writing to a peer that is gone errors (EPIPE/ECONNRESET) instead of throwing or raising SIGPIPE
  await sleep(20);
  d.write(randomBytes(1 << 20));
  d.resume();
  await within(closed, 2000, 'duplex closed');
  t.true(d.destroyed);
  t.true(errors.length <= 1);
  for (const e of errors) t.true(e instanceof SyscallError && ['EPIPE', 'ECONNRESET'].includes(e.code), String(e));
});

test.serial('vsock: socket(AF_VSOCK) + bind + listen works or fails with a typed error', async (t) => {
  let server: IntrospectionServer | null = null;
  try {
    server = await IntrospectionServer.listen({ vsock: libc.VMADDR_PORT_ANY }, { cookie: COOKIE });
  } catch (e) {
    t.true(e instanceof SyscallError, String(e));
    t.log(`vsock unavailable here: ${(e as Error).message}`);
    return;
  }
  const a = server.address as { vsock: number; cid: number };
  t.is(a.cid, libc.VMADDR_CID_ANY);
  t.true(a.vsock > 0 && a.vsock < libc.VMADDR_PORT_ANY);
  t.log(`listening on vsock port ${a.vsock}; no vsock loopback transport on this kernel, so no end-to-end connection is attempted`);
  // The same port twice: EADDRINUSE as a SyscallError.
  const e = await t.throwsAsync(IntrospectionServer.listen({ vsock: a.vsock }, { cookie: COOKIE }), { instanceOf: SyscallError });
  t.is(e.code, 'EADDRINUSE');
  await server.close();
  await sleep(50);
  t.is(poller.registered, 0, 'no fd left registered with the poller');
});
