/**
 * `kvmmem scan|read|translate --listen ADDR --vm NAME` on a real deployment.
 * No machine here has a real /dev/kvmmem, so the deployment path is run in
 * process with the model's device in its place (openDeployment takes a device
 * opener), against a ModelHost whose device manager connects over TCP or unix
 * exactly as QEMU would; the command line itself is run as a child process up
 * to the point where it needs a real device, which must fail clearly and at once.
 */
import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BoundAddress, ListenAddress } from '../src/channel/index.js';
import type { Output } from '../src/cli/common.js';
import { readTarget, scanTarget, translateTarget } from '../src/cli/inspect-commands.js';
import { listenOf, openDeployment, parseListen, vmFilterOf, type Target } from '../src/cli/target.js';
import { KvmmemError } from '../src/errors.js';
import { buildSyntheticGuest } from '../src/inspect/index.js';
import { ModelHost, type ModelVm } from '../src/model/index.js';

const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));
const COOKIE = 'cli-deployment-cookie';
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-clidep-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
const MiB = 1 << 20;

function kvmmem(args: string[], env: Record<string, string> = {}) {
  const t0 = Date.now();
  const base: NodeJS.ProcessEnv = { ...process.env, NODE_DEBUG: '' };
  delete base.KVMMEM_COOKIE;
  delete base.KVMMEM_LISTEN;
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000, env: { ...base, ...env } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - t0 };
}

/** An Output that keeps what the command printed. */
function capture(json: boolean): Output & { lines: string[]; docs: unknown[] } {
  const lines: string[] = [];
  const docs: unknown[] = [];
  return { json, lines, docs, say(l = '') { if (!json) lines.push(l); }, result(v) { if (json) docs.push(JSON.parse(JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? `0x${x.toString(16)}` : x)))); } };
}

/** The address a device manager connects to, from what the tool bound. */
function attachTo(a: BoundAddress): { unix: string } | { tcp: { host: string; port: number } } {
  if ('unix' in a) return { unix: a.unix };
  if ('tcp' in a) return { tcp: a.tcp };
  throw new Error('no vsock here');
}

/** The CLI's deployment path with the model's device, and a model VM (synthetic guest) attaching to it. */
async function deployment(t: ExecutionContext, listen: ListenAddress, opts: { vmName?: string; want?: string; cookie?: string; waitMs?: number } = {}) {
  const host = new ModelHost({ cookie: opts.cookie ?? COOKIE });
  t.teardown(() => host.close());
  const mvm = host.createVm({ name: opts.vmName ?? 'victim', memory: 64 * MiB });
  const truth = buildSyntheticGuest(mvm.memory, { seed: 11 });
  let attached: Promise<unknown> = Promise.resolve();
  const target = await openDeployment({
    device: () => host.openDevice(), listen, cookie: COOKIE, vm: vmFilterOf(opts.want ?? 'victim'), waitMs: opts.waitMs ?? 10_000,
    onListening: (a) => { attached = mvm.attach({ ...attachTo(a), retries: 0 }).catch((e: unknown) => e); },
  });
  t.teardown(() => target.close());
  await attached;
  return { host, mvm, truth, target };
}

async function commandsAgree(t: ExecutionContext, target: Target, mvm: ModelVm, truth: ReturnType<typeof buildSyntheticGuest>) {
  t.is(target.kind, 'deployment');
  t.is(target.end, mvm.memory.end, 'KVMI_GET_MAX_GFN: the end of the VM\'s memory');
  t.regex(target.label, /^VM victim \([0-9a-f-]{36}\) via the given device$/);
  const s = capture(true);
  t.is(await scanTarget(s, target, { pattern: 'Linux version ', to: 64n * BigInt(MiB) }), 0);
  const doc = s.docs[0] as { matches: string[]; vm: { name: string } };
  t.is(doc.vm.name, 'victim');
  t.true(doc.matches.length >= 1);
  const bannerGpa = BigInt(doc.matches[0]!);
  t.is(mvm.memory.read(bannerGpa, 14).toString('latin1'), 'Linux version ');
  const r = capture(false);
  t.is(await readTarget(r, target, { gpa: bannerGpa, len: 32 }), 0);
  t.regex(r.lines.join('\n'), new RegExp(`^${bannerGpa.toString(16).padStart(8, '0')}: 4c69 6e75 7820 7665`, 'm'));
  const tr = capture(true);
  t.is(await translateTarget(tr, target, { cr3: truth.cr3, va: truth.bannerVa, levels: 4 }), 0);
  t.is((tr.docs[0] as { gpa: string }).gpa, `0x${bannerGpa.toString(16)}`);
  // scan without --to: to the end the host told (KVMI_GET_MAX_GFN), the same matches.
  const whole = capture(true);
  t.is(await scanTarget(whole, target, { pattern: 'Linux version ' }), 0);
  t.deepEqual((whole.docs[0] as { matches: string[] }).matches, doc.matches);
  // A host that does not tell it (v4): --to is required.
  await t.throwsAsync(scanTarget(capture(false), { ...target, end: null }, { pattern: 'x' }), { message: /--to is required here: the host did not tell/ });
}

test('scan, read and translate on a deployment over TCP: the model VM connects to the tool\'s tcp port, pages map through the device', async (t) => {
  const { mvm, truth, target } = await deployment(t, { tcp: { host: '127.0.0.1', port: 0 } });
  await commandsAgree(t, target, mvm, truth);
  t.is(target.vm.transport, 'tcp');
});

test('the same over a unix socket', async (t) => {
  const { mvm, truth, target } = await deployment(t, { unix: join(dir, 'kvmi.sock') });
  await commandsAgree(t, target, mvm, truth);
  t.is(target.vm.transport, 'unix');
});

test('waiting is bounded: the error names the VM, the address, the wait, and a refused connection\'s reason', async (t) => {
  const host = new ModelHost({ cookie: COOKIE });
  t.teardown(() => host.close());
  // Nobody connects.
  const none = await t.throwsAsync<KvmmemError>(openDeployment({ device: () => host.openDevice(), listen: { tcp: { port: 0 } }, cookie: COOKIE, vm: { name: 'victim' }, waitMs: 300 }));
  t.is(none!.code as string, 'ETIMEDOUT');
  t.regex(none!.message, /^waited 300 ms on tcp:127\.0\.0\.1:\d+ for VM "victim" to connect: none did/);
  t.notRegex(none!.message, /refused/);
  // Another VM connects (not the one asked for), and one with the wrong cookie is refused.
  const other = host.createVm({ name: 'other', memory: MiB });
  const bad = new ModelHost({ cookie: 'wrong' });
  t.teardown(() => bad.close());
  const wrong = bad.createVm({ name: 'victim', memory: MiB });
  const e = await t.throwsAsync<KvmmemError>(openDeployment({
    device: () => host.openDevice(), listen: { tcp: { port: 0 } }, cookie: COOKIE, vm: { name: 'victim' }, waitMs: 1500,
    onListening: (a) => {
      void other.attach({ ...attachTo(a) });
      void wrong.attach({ ...attachTo(a), retries: 0 }).catch(() => {});
    },
  }));
  t.regex(e!.message, /for VM "victim" to connect: none did; 1 connection\(s\) refused, the last: handshake rejected by the device manager \(wrong cookie\?\)/);
  t.regex(e!.hint!, /same cookie, and check --vm/);
  t.is(host.openDevice().constructor.name, 'ModelDevice', 'the host is still usable');
});

test('--listen and $KVMMEM_LISTEN parse unix, vsock and tcp addresses; --vm takes a name or a UUID', (t) => {
  t.deepEqual(parseListen('unix:/run/kvmi.sock'), { unix: '/run/kvmi.sock' });
  t.deepEqual(parseListen('vsock:1234'), { vsock: 1234 });
  t.deepEqual(parseListen('tcp:0.0.0.0:4444'), { tcp: { host: '0.0.0.0', port: 4444 } });
  t.deepEqual(parseListen('tcp:[::1]:4444'), { tcp: { host: '::1', port: 4444 } });
  t.deepEqual(parseListen('tcp:intro.local:0'), { tcp: { host: 'intro.local', port: 0 } });
  t.deepEqual(parseListen('tcp:4444'), { tcp: { port: 4444 } });
  for (const bad of ['tcp:', 'tcp:host', 'tcp:host:65536', 'tcp:::1:80', 'vsock:x', 'udp:1', '/path']) {
    t.throws(() => parseListen(bad), { message: /expected unix:PATH, vsock:PORT or tcp:HOST:PORT/ }, bad);
  }
  t.deepEqual(listenOf({}, { KVMMEM_LISTEN: 'tcp:10.0.2.15:4444' }), { tcp: { host: '10.0.2.15', port: 4444 } });
  t.deepEqual(listenOf({ listen: 'unix:/a' }, { KVMMEM_LISTEN: 'tcp:1' }), { unix: '/a' }, '--listen wins');
  t.is(listenOf({}, {}), undefined);
  t.throws(() => listenOf({}, { KVMMEM_LISTEN: 'nope' }), { message: /^KVMMEM_LISTEN 'nope'/ });
  t.deepEqual(vmFilterOf('web-01'), { name: 'web-01' });
  t.deepEqual(vmFilterOf('1F22FF85-CBDE-4191-B42D-C94E6A901542'), { uuid: '1F22FF85-CBDE-4191-B42D-C94E6A901542' });
  t.deepEqual(vmFilterOf(undefined), {});
});

test('the command line on a deployment: no device or not kvmmem fails at once (exit 1); bad input is exit 2 before anything opens', (t) => {
  const dep = ['--listen', 'tcp:127.0.0.1:0', '--vm', 'victim', '--cookie', 'c', '--wait-ms', '60000'];
  const missing = kvmmem(['read', ...dep, '--device', join(dir, 'no-kvmmem'), '--gpa', '0x1000', '--len', '16']);
  t.is(missing.code, 1, missing.stderr);
  t.regex(missing.stderr, /no such device node/);
  t.true(missing.ms < 30_000, `failed after ${missing.ms} ms, not after the 60 s wait`);
  const devnull = kvmmem(['scan', ...dep, '--device', '/dev/null', '--pattern', 'x', '--to', '0x1000']);
  t.is(devnull.code, 1, devnull.stderr);
  t.regex(devnull.stderr, /\/dev\/null is not a kvmmem device/);
  const viaEnv = kvmmem(['translate', '--device', '/dev/null', '--cr3', '0x1000', '--va', '0x0'], { KVMMEM_LISTEN: 'tcp:127.0.0.1:0', KVMMEM_COOKIE: 'c' });
  t.is(viaEnv.code, 1, viaEnv.stderr);
  t.regex(viaEnv.stderr, /not a kvmmem device/, 'KVMMEM_LISTEN selects the deployment path');
  const usage: [string[], Record<string, string>, RegExp][] = [
    [['read', '--ram', join(dir, 'x'), '--listen', 'tcp:1', '--gpa', '0', '--len', '1'], {}, /--ram FILE or --listen ADDRESS, not both/],
    [['read', '--gpa', '0', '--len', '1'], {}, /give --ram FILE .* or --listen ADDRESS/],
    [['read', '--gpa', '0', '--len', '1'], { KVMMEM_LISTEN: 'tcp:nowhere' }, /^kvmmem: KVMMEM_LISTEN 'tcp:nowhere'/],
    [['read', '--listen', 'tcp:1', '--gpa', '0', '--len', '1'], {}, /a KVMI cookie is required/],
    [['read', '--listen', 'tcp:1', '--cookie', 'c', '--vm', '', '--gpa', '0', '--len', '1'], {}, /--vm must not be empty/],
    [['selftest', '--listen', 'tcp:127.0.0.1:0', '--cookie', 'c', '--allow-uid', '0', '--device', '/dev/null'], {}, /allowUids cannot apply to a TCP listener/],
  ];
  for (const [args, env, re] of usage) {
    const r = kvmmem(args, env);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    t.regex(r.stderr, re);
  }
});
