// Who may connect to the tool's KVMI socket (src/channel/server.ts): a cookie
// is required, the unix socket is 0600 whatever the umask, peers are checked
// with SO_PEERCRED against allowUids, and one connection per VM UUID.
// The suite runs as root; peers as another user run in a child that drops to
// nobody (65534), as in test/device.test.ts.
import test from 'ava';
import { execFile, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { once } from 'node:events';
import { randomUUID } from 'node:crypto';
import { chmodSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as uuidParse } from 'uuid';
import { encodeQemu2Introspector, INTROSPECTOR2QEMU_SIZE } from '../src/abi/kvmi.js';
import { cookieHash } from '../src/abi/cookie.js';
import { UsageError } from '../src/errors.js';
import { IntrospectionServer, PeerRefusedError, type RejectedInfo } from '../src/channel/index.js';
import { CliUsageError, resolveCookie } from '../src/cli/common.js';
import { ModelHost } from '../src/model/index.js';

const COOKIE = 'auth-test-cookie';
const NOBODY = 65534;
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-auth-'));
chmodSync(dir, 0o755); // nobody must reach the socket file; its own mode decides the rest
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const sockPath = () => join(dir, `a${++n}.sock`);
const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

const hello = (uuid: string = randomUUID(), name = 'g') => encodeQemu2Introspector({ uuid: uuidParse(uuid as Parameters<typeof uuidParse>[0]), name, startTime: 1n });

/** Connects, sends a handshake, and collects what the tool sends until it closes (or `ms` passes). */
async function peer(path: string, bytes: Buffer, ms = 3000): Promise<{ received: Buffer; closed: boolean; sock: net.Socket }> {
  const sock = net.connect(path);
  sock.on('error', () => {});
  await once(sock, 'connect');
  const chunks: Buffer[] = [];
  sock.on('data', (c: Buffer) => chunks.push(c));
  sock.write(bytes);
  const closed = await Promise.race([
    once(sock, 'close').then(() => true),
    new Promise<boolean>((r) => setTimeout(() => r(false), ms)),
  ]);
  return { received: Buffer.concat(chunks), closed, sock };
}

/**
 * A child process as nobody: connects to `path`, sends `hello`, reports what
 * it received and how it ended. Plain node (no checkout access needed).
 */
async function asNobody(path: string, helloBytes: Buffer): Promise<{ connectError?: string; received: number; closedByPeer: boolean }> {
  const code = `
    process.setgid(${NOBODY}); process.setuid(${NOBODY});
    const s = require('net').connect(${JSON.stringify(path)});
    let received = 0, done = false, connected = false;
    const finish = (r) => { if (done) return; done = true; console.log(JSON.stringify(r)); process.exit(0); };
    // Before 'connect' an error is the connect() failing; after it, the tool hanging up (EPIPE, ECONNRESET).
    s.on('error', (e) => finish(connected ? { received, closedByPeer: true, error: e.code } : { connectError: e.code, received, closedByPeer: false }));
    s.on('connect', () => connected = true);
    s.on('connect', () => s.write(Buffer.from(${JSON.stringify(helloBytes.toString('hex'))}, 'hex')));
    s.on('data', (c) => { received += c.length; if (received >= ${INTROSPECTOR2QEMU_SIZE}) finish({ received, closedByPeer: false }); });
    s.on('close', () => finish({ received, closedByPeer: true }));
    setTimeout(() => finish({ received, closedByPeer: false, timedOut: true }), 5000);`;
  // Asynchronous: the server runs in this process's event loop.
  const { stdout: out } = await promisify(execFile)(process.execPath, ['-e', code], { encoding: 'utf8', timeout: 20_000 });
  return JSON.parse(out.trim().split('\n').pop()!);
}

// ---------------------------------------------------------------------------
// the cookie
// ---------------------------------------------------------------------------
test('no cookie, no server: listen/create without a cookie or with an empty one is a UsageError', async (t) => {
  for (const opts of [undefined, {}, { cookie: '' }, { cookie: new Uint8Array(0) }, { cookie: 42 }]) {
    const e = await t.throwsAsync(IntrospectionServer.listen({ unix: sockPath() }, opts as never), { instanceOf: UsageError });
    t.is(e?.code, 'ERR_INVALID_ARG');
    t.throws(() => IntrospectionServer.create(opts as never), { instanceOf: UsageError });
  }
  const e = await t.throwsAsync(IntrospectionServer.listen({ unix: sockPath() }, {} as never));
  t.regex(e!.message, /a cookie is required/);
});

test('the handshake reply carries SHA-1 of the configured cookie, never a built-in one', async (t) => {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
  t.teardown(() => server.close());
  const { received, sock } = await peer((server.address as { unix: string }).unix, hello(), 300);
  sock.destroy();
  t.true(received.length >= INTROSPECTOR2QEMU_SIZE);
  t.deepEqual(received.subarray(4, 24), Buffer.from(cookieHash(COOKIE)));
  t.notDeepEqual(received.subarray(4, 24), Buffer.from(cookieHash('kvmmem')));
});

// ---------------------------------------------------------------------------
// the socket file's mode
// ---------------------------------------------------------------------------
test.serial('the unix socket is 0600 even under umask 000, or the mode the caller passes', async (t) => {
  const old = process.umask(0);
  try {
    const a = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
    t.is(statSync((a.address as { unix: string }).unix).mode & 0o777, 0o600);
    await a.close();
    const b = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, mode: 0o660 });
    t.is(statSync((b.address as { unix: string }).unix).mode & 0o777, 0o660);
    await b.close();
  } finally {
    process.umask(old);
  }
  await t.throwsAsync(IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, mode: 0o1777 }), { instanceOf: UsageError });
});

test.serial('as nobody: the default 0600 socket refuses connect() (EACCES), even under umask 000', async (t) => {
  const old = process.umask(0);
  let server: IntrospectionServer;
  try {
    server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE });
  } finally {
    process.umask(old);
  }
  t.teardown(() => server.close());
  const r = await asNobody((server.address as { unix: string }).unix, hello());
  t.is(r.connectError, 'EACCES');
  t.is(r.received, 0);
  t.is(server.vms().length, 0);
});

test.serial('as nobody on a socket it may open: SO_PEERCRED refuses it before the handshake; allowUids admits it', async (t) => {
  const server = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, mode: 0o666 });
  t.teardown(() => server.close());
  const rejected = within(once(server, 'rejected').then(([i]) => i as RejectedInfo), 10_000, 'rejected event');
  const r = await asNobody((server.address as { unix: string }).unix, hello());
  t.is(r.connectError, undefined);
  t.true(r.closedByPeer);
  t.is(r.received, 0, 'a refused peer never sees the cookie hash');
  const info = await rejected;
  t.true(info.error instanceof PeerRefusedError);
  t.is((info.error as PeerRefusedError).code, 'EACCES');
  t.is((info.error as PeerRefusedError).errno, -13);
  t.regex(info.reason, new RegExp(`uid ${NOBODY} .*not allowed`));
  t.is(server.vms().length, 0);

  const open = await IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, mode: 0o666, allowUids: [0, NOBODY] });
  t.teardown(() => open.close());
  const ok = await asNobody((open.address as { unix: string }).unix, hello());
  // The reply may arrive in one chunk with the tool's first request after it: at least the reply.
  t.true(ok.received >= INTROSPECTOR2QEMU_SIZE, `an allowed uid gets the handshake reply (got ${ok.received} bytes)`);
  await t.throwsAsync(IntrospectionServer.listen({ unix: sockPath() }, { cookie: COOKIE, allowUids: [-1] }), { instanceOf: UsageError });
});

// ---------------------------------------------------------------------------
// one connection per VM
// ---------------------------------------------------------------------------
test('a second VM with a UUID already connected is refused (EEXIST) without the cookie hash; the first is unaffected', async (t) => {
  const path = sockPath();
  const server = await IntrospectionServer.listen({ unix: path }, { cookie: COOKIE });
  t.teardown(() => server.close());
  const host = new ModelHost({ cookie: COOKIE });
  t.teardown(() => host.close());
  const mvm = host.createVm({ name: 'g', memory: 1 << 20 });
  const vmP = server.waitForVm({ uuid: mvm.uuid }, 5000);
  await mvm.attach({ unix: path });
  const vm = await vmP;

  const rejected = within(once(server, 'rejected').then(([i]) => i as RejectedInfo), 3000, 'rejected event');
  const dup = await peer(path, hello(mvm.uuid, 'g'));
  t.true(dup.closed);
  t.is(dup.received.length, 0);
  const info = await rejected;
  t.true(info.error instanceof PeerRefusedError);
  t.is((info.error as PeerRefusedError).code, 'EEXIST');
  t.is(info.uuid, mvm.uuid);
  t.regex(info.reason, /already connected/);
  t.is(vm.state, 'connected');
  t.is((await vm.getMapTokens(2)).length, 2);
  t.deepEqual(server.vms(), [vm]);

  // Names may repeat (QEMU does not make them unique); UUIDs may not. 20 peers named "g":
  const many = await Promise.all(Array.from({ length: 20 }, () => peer(path, hello(randomUUID(), 'g'), 200)));
  t.true(many.every((p) => p.received.length >= INTROSPECTOR2QEMU_SIZE));
  for (const p of many) p.sock.destroy();

  // Once the first connection is gone, the UUID may connect again.
  const gone = once(vm, 'gone');
  vm.close();
  await gone;
  const again = await peer(path, hello(mvm.uuid, 'g'), 200);
  again.sock.destroy();
  t.true(again.received.length >= INTROSPECTOR2QEMU_SIZE);
});

test('two connections racing with one UUID: exactly one gets the handshake reply', async (t) => {
  const path = sockPath();
  const server = await IntrospectionServer.listen({ unix: path }, { cookie: COOKIE });
  t.teardown(() => server.close());
  const uuid = randomUUID();
  const both = await Promise.all([peer(path, hello(uuid), 300), peer(path, hello(uuid), 300)]);
  for (const p of both) p.sock.destroy();
  t.deepEqual(both.map((p) => p.received.length >= INTROSPECTOR2QEMU_SIZE).sort(), [false, true]);
});

// ---------------------------------------------------------------------------
// the CLI
// ---------------------------------------------------------------------------
test('CLI: resolveCookie takes --cookie, --cookie-file (one trailing newline dropped) or KVMMEM_COOKIE; none is an error', (t) => {
  const f = join(dir, 'cookie');
  writeFileSync(f, 's3cret\n');
  t.is(resolveCookie({ cookieFile: f }, {}), 's3cret');
  writeFileSync(f, 'two\nlines\r\n');
  t.is(resolveCookie({ cookieFile: f }, {}), 'two\nlines');
  t.is(resolveCookie({ cookie: 'x' }, { KVMMEM_COOKIE: 'env' }), 'x');
  t.is(resolveCookie({}, { KVMMEM_COOKIE: 'env' }), 'env');
  t.throws(() => resolveCookie({}, {}), { instanceOf: CliUsageError, message: /cookie is required/ });
  t.throws(() => resolveCookie({ cookie: 'a', cookieFile: f }, {}), { instanceOf: CliUsageError });
  writeFileSync(f, '\n');
  t.throws(() => resolveCookie({ cookieFile: f }, {}), { instanceOf: CliUsageError, message: /empty/ });
  t.throws(() => resolveCookie({ cookieFile: join(dir, 'missing') }, {}), { instanceOf: CliUsageError, message: /ENOENT|no such file/ });
});

test('CLI: selftest --listen without a cookie exits 2 before touching the device', (t) => {
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_DEBUG: '' };
  delete env.KVMMEM_COOKIE;
  const r = spawnSync(process.execPath, [BIN, 'selftest', '--device', '/dev/null', '--listen', `unix:${sockPath()}`], { encoding: 'utf8', timeout: 60_000, env });
  t.is(r.status, 2, r.stderr);
  t.regex(r.stderr, /cookie is required/);
  // With a cookie it gets past that and fails on the device (/dev/null is no kvmmem device): exit 1.
  const r2 = spawnSync(process.execPath, [BIN, 'selftest', '--device', '/dev/null', '--listen', `unix:${sockPath()}`], {
    encoding: 'utf8', timeout: 60_000, env: { ...env, KVMMEM_COOKIE: 'c' },
  });
  t.is(r2.status, 1, r2.stderr);
  t.regex(r2.stderr, /not a kvmmem device|ENOTTY/);
});
