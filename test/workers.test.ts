/**
 * kvmmem in worker threads (issue 9 items 3 and 8), each scenario in a child
 * process so that a SIGSEGV or a leak is the child's, measured from outside
 * the worker: fds (/proc/self/fd), locked memory (VmLck) and lab directories.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ThreadUnsafeError, checkThreadSafety, ffiBinaries, pinnedFfiBinaries } from '../src/sys/thread.js';

const INDEX = new URL('../src/index.ts', import.meta.url).href;
const LAB_INDEX = new URL('../src/lab/index.ts', import.meta.url).href;
const THREAD = new URL('../src/sys/thread.ts', import.meta.url).href;
const LIBC = new URL('../src/sys/libc.ts', import.meta.url).href;
const TSX_API = import.meta.resolve('tsx/esm/api');
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-workers-test-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

/** Writes a worker body (ESM JS that may import the TypeScript sources) and returns its URL. */
function body(name: string, code: string): string {
  const path = join(dir, `${name}.mjs`);
  writeFileSync(path, code);
  return pathToFileURL(path).href;
}

/** A JS expression that starts a worker running `entry` (tsx registered inside it first); `workerData` is a JS expression. */
const startWorker = (entry: string, workerData = 'null') =>
  `new Worker(${JSON.stringify(`import(${JSON.stringify(TSX_API)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`)}, { eval: true, workerData: ${workerData} })`;

/** Runs `main` (ESM, TypeScript imports allowed) in a child process; its own TMPDIR so lab directories can be counted. */
function child(name: string, main: string) {
  const tmp = mkdtempSync(join(dir, `${name}-tmp-`));
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', main], {
    encoding: 'utf8', timeout: 90_000, env: { ...process.env, TMPDIR: tmp, NODE_DEBUG: '' },
  });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, error: r.error, tmp };
}
const report = (r: ReturnType<typeof child>) => `status ${r.status} signal ${r.signal} ${r.error ? `error ${r.error.message}` : ''}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;

/** A worker body: a lab with a 16 MiB VM, a session, a page and a 1 MiB range mapped, plus (optionally) a recorded locked mapping. */
const SESSION_BODY = `
import { parentPort, workerData } from 'node:worker_threads';
import { ModelLab } from ${JSON.stringify(LAB_INDEX)};
import * as libc from ${JSON.stringify(LIBC)};
import { recordMapping } from ${JSON.stringify(THREAD)};
const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 16 << 20 }] });
const s = lab.open();
const page = await s.map(lab.vm('g'), 0x2000n);
const range = await s.mapRange(lab.vm('g'), 0x10000n, 1 << 20);
if (page.buffer.length !== 4096 || range.buffer.length !== 1 << 20) throw new Error('mapping sizes');
if (workerData.lockedMiB > 0) {
  // What a Window does: an anonymous mapping, locked, recorded in the ledger.
  const len = workerData.lockedMiB << 20;
  const a = libc.mmap(0, len, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  libc.mlock(a, len);
  recordMapping(a, len);
}
// The parent measures, then says how to end (or terminates us): the lab's server keeps the loop alive until then.
parentPort.once('message', (how) => {
  if (how === 'process.exit') process.exit(0);
  if (how === 'throw') throw new Error('an uncaught error ends this worker mid-session');
});
parentPort.postMessage('ready');
`;

/** The child's main: measures, runs one worker to its end, measures again, prints one JSON line. */
function measuringMain(entry: string, workerData: { end: string; lockedMiB: number }, importKvmmem: boolean): string {
  return `
import { Worker } from 'node:worker_threads';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
${importKvmmem ? `await import(${JSON.stringify(INDEX)});` : ''}
const link = (fd) => { try { return readlinkSync('/proc/self/fd/' + fd); } catch { return ''; } };
const snap = () => ({
  fds: readdirSync('/proc/self/fd').length,
  memfds: readdirSync('/proc/self/fd').filter((fd) => link(fd).startsWith('/memfd:')).length,
  lockedKiB: Number(/VmLck:\\s+(\\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]),
  labDirs: readdirSync(tmpdir()).filter((n) => n.startsWith('kvmmem-lab-')).length,
});
const before = snap();
let ready = null;
const w = ${startWorker(entry, JSON.stringify(workerData))};
const timer = setTimeout(() => { console.log('TIMEOUT waiting for the worker to report ready and exit'); process.exit(3); }, 60000);
const end = ${JSON.stringify(workerData.end)};
w.on('error', (e) => { if (end !== 'throw') console.log('WORKER ERROR ' + e.stack); });
w.on('message', (m) => { if (m === 'ready') { ready = snap(); if (end === 'terminate') void w.terminate(); else w.postMessage(end); } });
w.on('exit', () => setTimeout(() => {
  clearTimeout(timer);
  console.log(JSON.stringify({ before, ready, after: snap() }));
}, 50));
`;
}

function figures(t: { fail(m: string): void }, r: ReturnType<typeof child>) {
  const line = r.stdout.split('\n').find((l) => l.startsWith('{'));
  if (r.status !== 0 || r.signal !== null || line === undefined) {
    t.fail(report(r));
    return undefined;
  }
  return JSON.parse(line) as Record<'before' | 'ready' | 'after', { fds: number; memfds: number; lockedKiB: number; labDirs: number }>;
}

test('ffi-rs is pinned resident on import, so no thread exit can unload it', (t) => {
  t.true(pinnedFfiBinaries.length >= 1, 'the ffi-rs binary was found among the mapped files');
  t.deepEqual([...pinnedFfiBinaries].sort(), ffiBinaries().sort());
  for (const p of pinnedFfiBinaries) t.regex(p, /\/ffi-rs\.[^/]+\.node$/);
});

test('where the pin fails, a worker gets ThreadUnsafeError saying what to do (the main thread carries on)', (t) => {
  t.notThrows(() => checkThreadSafety({ pinned: ['/x/ffi-rs.linux-x64-gnu.node'] }, false));
  t.notThrows(() => checkThreadSafety({ failed: 'no dlopen' }, true));
  const e = t.throws(() => checkThreadSafety({ failed: 'no dlopen' }, false), { instanceOf: ThreadUnsafeError });
  t.is(e?.code, 'ERR_WORKER_UNSAFE');
  t.regex(e!.hint!, /import 'kvmmem' \(or 'ffi-rs'\) in the main thread before starting workers, or use a child process/);
});

test('a worker that alone loads kvmmem can exit, be terminated, or run beside others: the process lives', (t) => {
  const entry = body('alone', `
import { parentPort, workerData } from 'node:worker_threads';
import { ModelLab } from ${JSON.stringify(LAB_INDEX)};
const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 1 << 20 }] });
const s = lab.open();
const page = await s.map(lab.vm('g'), 0x1000n);
page.unmap();
if (workerData === 'terminate') { parentPort.postMessage('ready'); setInterval(() => {}, 1000); }
else { s.close(); await lab.close(); parentPort.postMessage('ready'); }
`);
  // The main thread never imports kvmmem or ffi-rs: before the pin this was a SIGSEGV at the worker's exit.
  const r = child('alone', `
import { Worker } from 'node:worker_threads';
const runs = [['exit'], ['terminate'], ['exit', 'exit', 'terminate', 'exit']];
const timer = setTimeout(() => { console.log('TIMEOUT waiting for workers'); process.exit(3); }, 60000);
for (const [i, modes] of runs.entries()) {
  await Promise.all(modes.map((mode) => new Promise((resolve) => {
    const w = ${startWorker(entry, 'mode')};
    w.on('error', (e) => console.log('WORKER ERROR ' + e.stack));
    w.on('message', () => { if (mode === 'terminate') void w.terminate(); });
    w.on('exit', resolve);
  })));
  await new Promise((r) => setTimeout(r, 50)); // a late fault would strike here
  console.log('round ' + i + ' done: main thread alive');
}
clearTimeout(timer);
`);
  t.is(r.signal, null, report(r));
  t.is(r.status, 0, report(r));
  t.regex(r.stdout, /round 2 done: main thread alive/, report(r));
});

test('a worker terminated mid-session leaves no fd, no lab directory and no recorded locked memory behind', (t) => {
  const entry = body('terminate', SESSION_BODY);
  const r = child('terminate', measuringMain(entry, { end: 'terminate', lockedMiB: 4 }, true));
  const f = figures(t, r);
  if (!f) return;
  t.log(`fds ${f.before.fds} -> ${f.ready.fds} -> ${f.after.fds} (memfds ${f.before.memfds} -> ${f.ready.memfds} -> ${f.after.memfds}); VmLck ${f.before.lockedKiB} -> ${f.ready.lockedKiB} -> ${f.after.lockedKiB} KiB; lab dirs ${f.before.labDirs} -> ${f.ready.labDirs} -> ${f.after.labDirs}`);
  t.true(f.ready.fds > f.before.fds && f.ready.labDirs === f.before.labDirs + 1, 'the worker held resources while running');
  // Node itself opens and closes an fd or two meanwhile: no growth, and none of the VM's memfds left.
  t.true(f.ready.memfds > f.before.memfds, "the worker's VM memory is a memfd");
  t.is(f.after.memfds, f.before.memfds, "the terminated worker's memfd is closed");
  t.true(f.after.fds <= f.before.fds, 'no fd of the terminated worker stays open');
  t.is(f.after.labDirs, f.before.labDirs, "the worker's lab directory is removed");
  t.true(f.ready.lockedKiB - f.after.lockedKiB >= 4096, 'the recorded 4 MiB locked mapping is unmapped');
  t.is(f.after.lockedKiB, f.before.lockedKiB, 'nothing stays locked: the sessions\' page windows are in the ledger too');
});

test('a worker that calls process.exit() or dies of an uncaught error mid-session cleans up after itself', (t) => {
  for (const end of ['process.exit', 'throw']) {
    const entry = body(`end-${end}`, SESSION_BODY);
    // The main thread does not import kvmmem here: the worker's own exit hooks do the work.
    const r = child(`end-${end}`, measuringMain(entry, { end, lockedMiB: 4 }, false));
    const f = figures(t, r);
    if (!f) return;
    t.log(`${end}: fds ${f.before.fds} -> ${f.ready.fds} -> ${f.after.fds}; VmLck ${f.before.lockedKiB} -> ${f.ready.lockedKiB} -> ${f.after.lockedKiB} KiB; lab dirs ${f.before.labDirs} -> ${f.ready.labDirs} -> ${f.after.labDirs}`);
    t.is(f.ready.labDirs, f.before.labDirs + 1, `${end}: the worker's lab was up when measured`);
    t.is(f.after.memfds, f.before.memfds, `${end}: the VM's memfd is closed`);
    t.true(f.after.fds <= f.before.fds, `${end}: no fd stays open`);
    t.is(f.after.labDirs, f.before.labDirs, `${end}: the lab directory is removed`);
    t.true(f.ready.lockedKiB - f.after.lockedKiB >= 4096, `${end}: the recorded locked mapping is released`);
    t.is(f.after.lockedKiB, f.before.lockedKiB, `${end}: nothing stays locked`);
  }
});

test('the ledger is shared with workers and reaped by the thread that created them', (t) => {
  const entry = body('ledger', `
import { parentPort } from 'node:worker_threads';
import * as libc from ${JSON.stringify(LIBC)};
import { recordFd, recordedByThisThread } from ${JSON.stringify(THREAD)};
const fd = libc.memfdCreate('kvmmem-ledger-test');
recordFd(fd);
parentPort.postMessage({ fd, own: recordedByThisThread() });
setInterval(() => {}, 1000);
`);
  const r = child('ledger', `
import { Worker } from 'node:worker_threads';
import { existsSync } from 'node:fs';
import { recordedByThisThread } from ${JSON.stringify(THREAD)};
const timer = setTimeout(() => { console.log('TIMEOUT waiting for the worker'); process.exit(3); }, 60000);
const w = ${startWorker(entry)};
w.on('message', (m) => { console.log('worker fd ' + m.fd + ' own ' + JSON.stringify(m.own) + ' open ' + existsSync('/proc/self/fd/' + m.fd)); globalThis.fd = m.fd; void w.terminate(); });
w.on('exit', () => setTimeout(() => { clearTimeout(timer); console.log('after exit open ' + existsSync('/proc/self/fd/' + globalThis.fd) + ' main own ' + JSON.stringify(recordedByThisThread())); }, 50));
`);
  t.is(r.status, 0, report(r));
  t.regex(r.stdout, /own \{"fds":1,"mappings":0\} open true/, report(r));
  t.regex(r.stdout, /after exit open false main own \{"fds":0,"mappings":0\}/, report(r));
});

test("the README's standalone ffi-rs reproduction still crashes, and its workaround does not", (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  const known = readme.slice(readme.indexOf('## Known issues'), readme.indexOf('## Reliability'));
  const block = /```js\n([\s\S]*?)```/.exec(known);
  if (!block) return t.fail('no ```js block in the README\'s "## Known issues" section');
  const path = join(dir, 'repro.cjs');
  writeFileSync(path, block[1]!);
  const run = (pin: boolean) => spawnSync(process.execPath, [path], {
    encoding: 'utf8', timeout: 60_000,
    env: { ...process.env, NODE_PATH: new URL('../node_modules', import.meta.url).pathname, ...(pin ? { PIN: '1' } : {}) },
  });
  const crash = run(false);
  t.is(crash.signal, 'SIGSEGV', `ffi-rs no longer crashes (status ${crash.status}, signal ${crash.signal}): update README "Known issues" and src/sys/thread.ts\n${crash.stderr}`);
  const pinned = run(true);
  t.is(pinned.status, 0, pinned.stderr);
  t.regex(pinned.stdout, /worker gone, process alive/);
});
