/**
 * What long-lived and stopped processes leave behind (issue 9 items 7 and 8):
 * a lab's closed sessions, the CLI's kvmi.sock directory on SIGINT/SIGTERM/SIGHUP,
 * and directories of processes that died without cleaning up.
 */
import test from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelLab } from '../src/lab/model-lab.js';

const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-lifecycle-test-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

test('a lab keeps only its open sessions: 30,000 open + close cycles leave none and no heap behind', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 1 << 20 }] });
  try {
    const a = lab.open(), b = lab.open(), c = lab.open();
    t.is(lab.openSessions, 3);
    b.close();
    t.is(lab.openSessions, 2, 'a closed session leaves the lab');
    a.close();
    c[Symbol.dispose]();
    t.is(lab.openSessions, 0);

    const gc = (globalThis as { gc?: () => void }).gc;
    if (!gc) return t.fail('run with --expose-gc (the suite does)');
    // WeakRefs keep their targets to the end of the current job: measure after a turn of the loop.
    const settle = async () => { await new Promise((r) => setTimeout(r, 0)); gc(); };
    await settle();
    const before = process.memoryUsage().heapUsed;
    for (let i = 0; i < 30_000; i++) lab.open().close();
    t.is(lab.openSessions, 0);
    await settle();
    const grownMiB = (process.memoryUsage().heapUsed - before) / 2 ** 20;
    t.log(`heap growth over 30,000 open + close: ${grownMiB.toFixed(1)} MiB`);
    t.true(grownMiB < 16, `heap grew by ${grownMiB.toFixed(1)} MiB (each kept Session costs ~4 KiB)`);

    const open = lab.open();
    await lab.close();
    t.true(open.closed, 'close() still closes the sessions left open');
  } finally {
    await lab.close();
  }
});

/** A fresh TMPDIR for one child, so that its lab directories can be found and counted. */
const privateTmp = (name: string) => mkdtempSync(join(dir, `${name}-`));
const labDirsOf = (tmp: string, pid?: number) => readdirSync(tmp).filter((n) => n.startsWith(pid === undefined ? 'kvmmem-lab-' : `kvmmem-lab-${pid}-`));

async function waitFor(what: string, cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  test(`kvmmem scan stopped by ${sig} removes its kvmi.sock directory and exits ${128 + constants.signals[sig]}`, async (t) => {
    const tmp = privateTmp(sig);
    const ram = join(tmp, 'big.ram');
    writeFileSync(ram, '');
    spawnSync('truncate', ['-s', '512M', ram]); // sparse: a scan of it takes seconds, long enough to be stopped
    const child = spawn(process.execPath, [BIN, 'scan', '--ram', ram, '--pattern', 'no such bytes'], {
      env: { ...process.env, TMPDIR: tmp, NODE_DEBUG: '' }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    let done = false;
    void exited.then(() => { done = true; });
    try {
      await waitFor(`the child's kvmmem-lab-${child.pid}-* directory (output so far: ${out})`, () => done || labDirsOf(tmp, child.pid).length === 1, 30_000);
      t.false(done, `the scan ended before it could be stopped: ${out}`);
      const [labDir] = labDirsOf(tmp, child.pid);
      t.true(existsSync(join(tmp, labDir!, 'kvmi.sock')), 'the directory holds the listening socket');
      child.kill(sig);
      const r = await Promise.race([exited, new Promise<null>((r) => setTimeout(() => r(null), 30_000))]);
      if (r === null) return t.fail(`no exit within 30 s of ${sig}: ${out}`);
      t.deepEqual(r, { code: 128 + constants.signals[sig], signal: null }, out);
      t.deepEqual(labDirsOf(tmp), [], 'no lab directory is left');
    } finally {
      child.kill('SIGKILL');
    }
  });
}

test("the first lab of a process removes lab directories of dead kvmmem processes, and nothing else", (t) => {
  const tmp = privateTmp('stale');
  const dead = spawnSync('true').pid!; // exited: its pid is not alive (a reused pid only keeps the directory)
  const make = (name: string, withSocketFile = true) => {
    mkdirSync(join(tmp, name));
    if (withSocketFile) writeFileSync(join(tmp, name, 'kvmi.sock'), '');
    return name;
  };
  const stale = [make(`kvmmem-lab-${dead}-0-Ab12Cd`), make(`kvmmem-lab-${dead}-3-Ef34Gh`, false)];
  const kept = [
    make(`kvmmem-lab-${process.pid}-0-Ij56Kl`), // a live process (this one)
    make('kvmmem-lab-Mn78Op'), // an older kvmmem's name: the owner cannot be told
    make(`other-lab-${dead}-0-Qr90St`), // not kvmmem's
  ];
  writeFileSync(join(tmp, `kvmmem-lab-${dead}-0-file`), ''); // a file, not a directory
  const ram = join(tmp, 'small.ram');
  writeFileSync(ram, Buffer.alloc(1 << 20));
  const r = spawnSync(process.execPath, [BIN, 'scan', '--ram', ram, '--pattern', 'x'], {
    encoding: 'utf8', timeout: 60_000, env: { ...process.env, TMPDIR: tmp, NODE_DEBUG: '' },
  });
  t.is(r.status, 1, `scan without a match exits 1: ${r.stderr}`);
  for (const n of stale) t.false(existsSync(join(tmp, n)), `${n} (dead owner) is removed`);
  for (const n of kept) t.true(existsSync(join(tmp, n)), `${n} is kept`);
  t.true(existsSync(join(tmp, `kvmmem-lab-${dead}-0-file`)), 'a plain file is never removed');
  t.deepEqual(labDirsOf(tmp, r.pid), [], "the scan's own directory is gone too");
});
