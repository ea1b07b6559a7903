// Map tokens: CSPRNG bytes, single use, bound to one VM, v6 limit and expiry,
// v4 without either, and never in logs or error messages.
import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Window } from '../src/sys/window.js';
import { KVM_HC_MEM_MAP, KVM_INTRO_MEM_MAP, encodeMemMap } from '../src/abi/index.js';
import { DeviceError } from '../src/errors.js';
import { ModelHost, type ModelHostOptions, type ModelVm } from '../src/model/index.js';
import { adoptSocket } from '../src/model/sockets.js';
import { TokenStore } from '../src/model/tokens.js';
import { sinkAcceptor } from './helpers.js';

const PS = 4096;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

class Clock {
  t = 1_000_000;
  now = () => this.t;
}

// ---- TokenStore ----

test('TokenStore: 32 random bytes, single use, unknown and forged tokens refused', (t) => {
  const s = new TokenStore<object>({ ttlMs: Infinity, limit: Infinity });
  const a = {}, b = {};
  const ta = s.issue(a)!, tb = s.issue(b)!;
  t.is(ta.length, 32);
  t.notDeepEqual(ta, tb);
  const seen = new Set<string>();
  for (let i = 0; i < 1000; i++) seen.add(Buffer.from(s.issue(a)!).toString('hex'));
  t.is(seen.size, 1000);
  t.is(s.consume(tb), b);
  t.is(s.consume(tb), undefined, 'replay');
  t.is(s.consume(new Uint8Array(32)), undefined, 'forged');
  t.is(s.consume(ta.subarray(0, 31)), undefined, 'short');
  t.is(s.consume(ta), a);
  t.is(s.outstanding(a), 1000);
  t.is(s.dropVm(a), 1000);
  t.is(s.outstanding(), 0);
  s.close();
});

test('TokenStore v6: at most 8 outstanding per VM; expiry at exactly ttl frees the slot', (t) => {
  const clock = new Clock();
  const s = new TokenStore<object>({ now: clock.now });
  t.teardown(() => s.close());
  const a = {}, b = {};
  const first = s.issue(a)!;
  clock.t += 1000;
  const rest = Array.from({ length: 7 }, () => s.issue(a)!);
  t.is(s.issue(a), null, 'the ninth');
  t.not(s.issue(b), null, 'the limit is per VM');
  clock.t += 1999; // first is 2999 ms old
  t.is(s.issue(a), null);
  clock.t += 1; // 3000 ms: expired
  const again = s.issue(a);
  t.not(again, null, 'the expired token no longer counts');
  t.is(s.consume(first), undefined, 'expired');
  t.is(s.outstanding(a), 8);
  clock.t += 1000; // the other seven are 3000 ms old now
  t.is(s.consume(rest[0]!), undefined);
  t.is(s.outstanding(a), 1);
  t.is(s.consume(again!), a);
  t.is(s.sweep(), 1, 'the sweep removes the expired token nobody asked about (b\'s)');
  t.is(s.outstanding(), 0);
});

test('TokenStore v4: no limit, no expiry', (t) => {
  const clock = new Clock();
  const s = new TokenStore<object>({ now: clock.now, limit: Infinity, ttlMs: Infinity });
  const a = {};
  const tokens = Array.from({ length: 100 }, () => s.issue(a)!);
  clock.t += 365 * 86_400_000;
  t.is(s.consume(tokens[0]!), a);
  t.is(s.outstanding(a), 99);
  s.close();
  t.is(s.issue(a), null, 'closed');
});

test('TokenStore: the sweep timer never keeps the process alive', (t) => {
  const script = `import { TokenStore } from ${JSON.stringify(path.join(ROOT, 'src/model/tokens.ts'))};
const s = new TokenStore({}); s.issue({}); console.log('issued');`;
  const file = path.join(os.tmpdir(), `kvmmem-sweep-${process.pid}.mts`);
  fs.writeFileSync(file, script);
  t.teardown(() => fs.rmSync(file, { force: true }));
  const started = Date.now();
  const r = spawnSync(process.execPath, ['--import', 'tsx', file], { cwd: ROOT, encoding: 'utf8', timeout: 20_000 });
  t.is(r.status, 0, r.stderr);
  t.is(r.stdout.trim(), 'issued');
  t.true(Date.now() - started < 15_000);
});

// ---- through the host and the driver ----


async function hooked(t: ExecutionContext, opts: ModelHostOptions = {}) {
  const host = new ModelHost(opts);
  const sink = await sinkAcceptor('tok');
  const hook = async (vm: ModelVm) => {
    vm.hook({ fd: adoptSocket(await sink.connect()) });
  };
  const a = host.createVm({ name: 'a', memory: 8 * PS });
  const b = host.createVm({ name: 'b', memory: 8 * PS });
  await hook(a);
  await hook(b);
  const w = Window.alloc(8 * PS);
  t.teardown(() => {
    host.close();
    w.free();
    sink.close();
  });
  const dev = host.openDevice();
  const map = (token: Uint8Array, gpa: bigint, page: number) => {
    try {
      return dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token, gpa, gva: BigInt(w.address + page * PS) }));
    } catch (e) {
      return (e as DeviceError).errno!;
    }
  };
  return { host, a, b, w, dev, map, hook };
}

test('single use: a token maps once; replaying it, even after a failed MAP, is -ENOENT', async (t) => {
  const { a, map } = await hooked(t);
  const tk = a.getMapToken();
  t.is(map(tk, 0n, 0), 0);
  t.is(map(tk, 0n, 1), -2);
  const tk2 = a.getMapToken();
  t.is(map(tk2, 100n * 4096n, 2), -14, 'out of bounds: the token was looked up and removed first');
  t.is(map(tk2, 0n, 2), -2);
  const tk3 = a.getMapToken();
  t.is(map(tk3, 1n * 4096n, 0), -114, 'EALREADY also uses the token up');
  t.is(map(tk3, 1n * 4096n, 3), -2);
  t.is(a.stats().tokensOutstanding, 0);
});

test('forged tokens, and tokens of an unhooked VM, are -ENOENT', async (t) => {
  const { a, b, map, hook } = await hooked(t);
  t.is(map(new Uint8Array(32), 0n, 0), -2);
  const bytes = a.getMapToken();
  bytes[0]! ^= 1;
  t.is(map(bytes, 0n, 0), -2, 'one flipped bit');
  const tk = a.getMapToken();
  a.unhook();
  t.is(map(tk, 0n, 0), -2, 'unhook dropped it');
  await hook(a);
  t.is(map(tk, 0n, 0), -2, 'a new hook does not bring it back');
  t.is(map(b.getMapToken(), 0n, 0), 0);
});

test('bound to the VM that asked: a token of B maps B\'s memory, not A\'s', async (t) => {
  const { a, b, map, w } = await hooked(t);
  a.memory.write(0n, Buffer.from('AAAA'));
  b.memory.write(0n, Buffer.from('BBBB'));
  t.is(map(b.getMapToken(), 0n, 0), 0);
  t.is(map(a.getMapToken(), 0n, 1), 0);
  t.is(w.buffer!.toString('latin1', 0, 4), 'BBBB');
  t.is(w.buffer!.toString('latin1', PS, PS + 4), 'AAAA');
});

test('expired (v6, 3 s by default; a fake clock here): -ENOENT, and no longer counted', async (t) => {
  const clock = new Clock();
  const { a, map, host } = await hooked(t, { now: clock.now });
  const tk = a.getMapToken();
  const fresh = a.getMapToken();
  clock.t += 2999;
  t.is(map(fresh, 0n, 0), 0, 'just in time');
  clock.t += 1;
  t.is(host.stats().tokensOutstanding, 0);
  t.is(map(tk, 1n * 4096n, 1), -2);
});

test('expired in real time with a short ttl', async (t) => {
  const { a, map } = await hooked(t, { tokenTtlMs: 50 });
  const tk = a.getMapToken();
  await new Promise((r) => setTimeout(r, 80));
  t.is(a.stats().tokensOutstanding, 0);
  t.is(map(tk, 0n, 0), -2);
});

test('over the limit: the ninth token -> EAGAIN (a DeviceError); the limit is per VM and configurable', async (t) => {
  const { a, b } = await hooked(t);
  for (let i = 0; i < 8; i++) a.getMapToken();
  const e = t.throws(() => a.getMapToken(), { instanceOf: DeviceError });
  t.is(e!.code, 'EAGAIN');
  t.regex(e!.hint!, /too many tokens/);
  t.notThrows(() => b.getMapToken());
  const { a: a2 } = await hooked(t, { tokenLimit: 2 });
  a2.getMapToken();
  a2.getMapToken();
  t.throws(() => a2.getMapToken(), { code: 'EAGAIN' });
});

test('v4 host: no limit, no expiry', async (t) => {
  const clock = new Clock();
  const { a, map } = await hooked(t, { protocol: 'v4', now: clock.now });
  const tokens = Array.from({ length: 50 }, () => a.getMapToken());
  clock.t += 86_400_000;
  t.is(map(tokens[49]!, 0n, 0), 0);
  t.is(a.stats().tokensOutstanding, 49);
});

test('a VM that is not hooked has no connection to ask for tokens', async (t) => {
  const { host } = await hooked(t);
  const c = host.createVm({ name: 'c', memory: PS });
  t.throws(() => c.getMapToken(), { code: 'ENOTCONN' });
});

test('tokens never appear in debug logs or error messages (NODE_DEBUG=kvmmem)', (t) => {
  const src = (p: string) => JSON.stringify(path.join(ROOT, p));
  const script = `
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { ModelHost } from ${src('src/model/index.ts')};
import { adoptSocket } from ${src('src/model/sockets.ts')};
import { Window } from ${src('src/sys/window.ts')};
import { KVM_INTRO_MEM_MAP, KVM_HC_MEM_MAP, encodeMemMap } from ${src('src/abi/index.ts')};
const p = path.join(os.tmpdir(), 'kvmmem-tokenlog-' + process.pid + '.sock');
const server = net.createServer((c) => c.resume());
await new Promise((r) => server.listen(p, r));
const c = await new Promise((r) => { const s = net.createConnection({ path: p }, () => r(s)); });
const host = new ModelHost({ tokenTtlMs: 20 });
const vm = host.createVm({ name: 'v', memory: 4 * 4096 });
vm.hook({ fd: adoptSocket(c) });
const dev = host.openDevice();
const w = Window.alloc(2 * 4096);
const tokens = [];
const messages = [];
const tryMap = (token, gpa, page) => { try { dev.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token, gpa, gva: BigInt(w.address + page * 4096) })); } catch (e) { messages.push(e.message, String(e.stack), JSON.stringify(e)); } };
for (let i = 0; i < 8; i++) tokens.push(vm.getMapToken());
try { vm.getMapToken(); } catch (e) { messages.push(e.message, String(e.stack)); }
tryMap(tokens[0], 0n, 0);
tryMap(tokens[0], 0n, 1);
tryMap(tokens[1], 999n * 4096n, 1);
tryMap(tokens[2], 4096n, 0);
host.hypercall(KVM_HC_MEM_MAP, tokens[3], 0n, 0n);
await new Promise((r) => setTimeout(r, 40));
tryMap(tokens[4], 0n, 1);
host.close();
c.destroy(); server.close();
process.stdout.write(JSON.stringify({ tokens: tokens.map((t) => Buffer.from(t).toString('hex')), messages }));
`;
  const file = path.join(os.tmpdir(), `kvmmem-tokenlog-${process.pid}.mts`);
  fs.writeFileSync(file, script);
  t.teardown(() => fs.rmSync(file, { force: true }));
  const r = spawnSync(process.execPath, ['--import', 'tsx', file], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, NODE_DEBUG: 'kvmmem' }, timeout: 30_000 });
  t.is(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { tokens: string[]; messages: string[] };
  t.is(out.tokens.length, 8);
  t.true(r.stderr.includes('KVMMEM'), 'debug logging was on');
  t.regex(r.stderr, /HC failed/);
  t.true(out.messages.length >= 5);
  const haystacks = [r.stderr, out.messages.join('\n')];
  for (const hex of out.tokens) {
    const bytes = Buffer.from(hex, 'hex');
    for (const needle of [hex, hex.slice(0, 16), bytes.toString('base64').slice(0, 12), [...bytes.subarray(0, 4)].join(',')]) {
      for (const h of haystacks) t.false(h.includes(needle), `token material ${needle} leaked`);
    }
  }
});
