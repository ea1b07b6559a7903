// Smoke test of the live target: a real stock Debian kernel under QEMU/TCG
// whose RAM lives in /dev/shm/NAME.ram. Skipped (with the reason and the
// provisioning command logged) when the target is not provisioned.
import test from 'ava';
import * as fs from 'node:fs';
import { bootLiveTarget, liveTargetAvailable, type LiveTarget } from '../src/live/target.js';

const avail = liveTargetAvailable();

function readAt(path: string, pos: bigint | number, len: number): Buffer {
  const fd = fs.openSync(path, 'r');
  try {
    const buf = Buffer.alloc(len);
    const n = fs.readSync(fd, buf, 0, len, Number(pos));
    return buf.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

/** Highest LABMARK-NNNNNN counter anywhere in the RAM image (0 if none). */
function maxMarker(ram: Buffer): number {
  const needle = Buffer.from('LABMARK-');
  let best = 0;
  for (let i = ram.indexOf(needle); i >= 0; i = ram.indexOf(needle, i + 1)) {
    const digits = ram.toString('latin1', i + 8, i + 14);
    if (/^\d{6}$/.test(digits)) best = Math.max(best, Number(digits));
  }
  return best;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// A skipped test's body never runs, so the reason goes into the title and to stderr.
const title = avail.ok
  ? 'live target: boots a stock kernel and its RAM file is the live guest memory'
  : `live target: skipped (${avail.reason}; provision with: ${avail.provision})`;
if (!avail.ok) console.warn(`live-target smoke test skipped: ${avail.reason}; provision with: ${avail.provision}`);

(avail.ok ? test : test.skip)(title, async (t) => {
  if (avail.ok === false) {
    t.log(`live target unavailable: ${avail.reason}; provision with: ${avail.provision}`);
    t.pass();
    return;
  }
  const name = 'kvmmem-smoke';
  const started = Date.now();
  const target: LiveTarget = await bootLiveTarget(name, { memMb: 256 });
  t.teardown(() => target.stop());
  t.log(`booted ${name} (pid ${target.pid}) in ${Date.now() - started} ms`);

  const { truth } = target;
  t.true(truth.banner.startsWith('Linux version'), truth.banner);
  t.log(`banner: ${truth.banner}`);
  t.log(`kernel code (physical load address): 0x${truth.kernelCode.toString(16)}`);
  for (const s of ['_text', 'linux_banner', 'init_uts_ns', 'jiffies_64', 'init_task']) {
    t.true(truth.symbols.has(s), `symbol ${s} in truth`);
  }

  // The RAM file is the guest's RAM.
  t.is(fs.statSync(target.ramPath).size, target.memBytes);
  t.is(target.memBytes, 256 * 1024 * 1024);

  const bannerBytes = Buffer.from(truth.banner, 'latin1');
  let ram = fs.readFileSync(target.ramPath);
  t.true(ram.indexOf(bannerBytes) >= 0, 'full banner string present in RAM');

  // Kernel-image symbols: phys = va - _text + kernel code start.
  const text = truth.symbols.get('_text')!;
  const phys = (sym: string) => truth.symbols.get(sym)! - text + truth.kernelCode;
  const bannerPhys = phys('linux_banner');
  t.deepEqual(ram.subarray(Number(bannerPhys), Number(bannerPhys) + bannerBytes.length), bannerBytes, 'linux_banner at its physical address');

  // Liveness: jiffies_64 advances, and the init's marker counter moves on in RAM.
  const jiffiesPhys = phys('jiffies_64');
  const j0 = readAt(target.ramPath, jiffiesPhys, 8).readBigUInt64LE(0);
  const m0 = maxMarker(ram);
  t.true(m0 > 0, 'LABMARK marker present in RAM');
  ram = Buffer.alloc(0);
  await sleep(2500);
  const j1 = readAt(target.ramPath, jiffiesPhys, 8).readBigUInt64LE(0);
  t.true(j1 > j0, `jiffies_64 advances (${j0} -> ${j1})`);
  t.log(`jiffies_64 advanced by ${j1 - j0} in ~2.5 s`);
  const m1 = maxMarker(fs.readFileSync(target.ramPath));
  t.true(m1 > m0, `marker advances in RAM (${m0} -> ${m1})`);

  // QEMU's own view: CR3 and its gva->gpa translation agree with the RAM file.
  const cr3 = await target.cr3();
  t.log(`CR3=0x${cr3.toString(16)}`);
  const pgd = cr3 & ~0xfffn & ((1n << 52n) - 1n);
  t.true(pgd !== 0n, 'CR3 non-zero');
  t.true(pgd < BigInt(target.memBytes), 'CR3 points into guest RAM');

  const gpa = await target.gva2gpa(truth.symbols.get('linux_banner')!);
  t.not(gpa, null);
  t.is(gpa, bannerPhys, 'QEMU translates linux_banner to the same physical address');
  t.deepEqual(readAt(target.ramPath, gpa!, bannerBytes.length), bannerBytes, 'RAM at gva2gpa(linux_banner) holds the banner');

  const status = await target.qmp('query-status');
  t.is(status.status, 'running');

  await target.stop();
  t.false(fs.existsSync(target.ramPath), 'RAM file removed by stop()');
  let alive = true;
  try {
    process.kill(target.pid, 0);
  } catch {
    alive = false;
  }
  t.false(alive, 'qemu gone after stop()');
});
