/**
 * A view must never show a mapping other than its own, and local memory stays
 * bounded: a Buffer kept after unmap reads zeros and its address is not reused
 * while it is reachable (many VMs, sessions and GC cycles); locked memory is
 * given back on close and kept within RLIMIT_MEMLOCK (as an unprivileged user).
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { localMemoryStats, type MappedPage } from '../src/client/index.js';
import { ModelLab } from '../src/lab/index.js';

const MiB = 1 << 20;
const PS = 4096;

const gc = (globalThis as { gc?: () => void }).gc;
/** A few GC cycles with the event loop turning, so FinalizationRegistry callbacks run. */
async function collect(rounds = 4): Promise<void> {
  for (let i = 0; i < rounds; i++) {
    gc!();
    await new Promise((r) => setTimeout(r, 5));
  }
}

const vmLocked = (): number => Number(/^VmLck:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'latin1'))![1]) * 1024;

test.serial('a Buffer kept after unmap never shows another VM\'s page, across sessions, VMs and GC cycles', async (t) => {
  t.truthy(gc, 'the suite runs node with --expose-gc');
  const names = ['a', 'b', 'c'];
  const lab = await ModelLab.start({ vms: names.map((name) => ({ name, memory: 8 * MiB })) });
  t.teardown(() => lab.close());
  // Every page of b and c holds a secret naming its VM and page.
  for (const n of ['b', 'c']) {
    const mem = lab.modelVm(n).memory;
    for (let p = 0; p < 1024; p++) mem.write(BigInt(p * PS), Buffer.from(`secret of ${n} page ${p}`));
  }
  const sa = lab.open();
  const pageA = await sa.map(lab.vm('a'), 0x3000n);
  const keptAddress = pageA.address;
  const kept = pageA.buffer;
  const keptSub = kept.subarray(100, 200); // any view derived from it counts
  pageA.unmap();
  t.true(kept.every((b) => b === 0), 'after unmap a stale view reads zeros');

  const seen = new Set<bigint>();
  for (let round = 0; round < 12; round++) {
    const s = lab.open(); // a new session each round: one per-process pool behind them all
    const vm = lab.vm(round % 2 ? 'b' : 'c');
    const pages: MappedPage[] = [];
    for (let k = 0; k < 80; k++) pages.push(await s.map(vm, BigInt(((round * 80 + k) % 1024) * PS)));
    const range = await s.mapRange(vm, BigInt((round * 37 % 900) * PS), 64 * PS);
    for (const p of pages) seen.add(p.address);
    for (let i = 0; i < 64; i++) seen.add(range.address + BigInt(i * PS));
    for (const p of pages) p.unmap();
    if (round % 3 === 0) range.unmap(); // the rest are torn down by close()
    s.close();
    await collect(2);
    t.true(kept.every((b) => b === 0) && keptSub.every((b) => b === 0), `round ${round}: the stale view still reads zeros`);
  }
  t.false(seen.has(keptAddress), 'the kept view\'s address was not reused while it was reachable');
  // A write through the stale view reaches no guest.
  kept.fill(0x41);
  for (const n of ['a', 'b', 'c']) {
    const mem = lab.modelVm(n).memory;
    for (let p = 0; p < 1024; p++) t.not(mem.read(BigInt(p * PS), 4).toString('latin1'), 'AAAA', `vm ${n} page ${p} untouched`);
  }
  sa.close();
});

test.serial('only the Buffer kept: the mapping lives while it is reachable, and goes when it is collected', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 8 * MiB }, { name: 'h', memory: 8 * MiB }] });
  t.teardown(() => lab.close());
  const mem = lab.modelVm('g').memory;
  mem.write(0x5000n, Buffer.from('live page'));
  const s = lab.open();
  let buf: Buffer | null = (await s.map(lab.vm('g'), 0x5000n)).buffer; // the MappedPage is dropped at once
  await collect();
  t.is(buf.toString('latin1', 0, 9), 'live page', 'still its own mapping after the MappedPage is collected');
  mem.write(0x5000n, Buffer.from('LIVE'));
  t.is(buf.toString('latin1', 0, 4), 'LIVE', 'and still live');
  t.is(s.stats.live, 1);
  // Other VMs' maps do not take its address.
  const s2 = lab.open();
  const hMem = lab.modelVm('h').memory;
  for (let p = 0; p < 256; p++) {
    hMem.write(BigInt(p * PS), Buffer.from(`h${p}`));
    (await s2.map(lab.vm('h'), BigInt(p * PS))).unmap();
  }
  t.is(buf.toString('latin1', 0, 4), 'LIVE');
  buf = null;
  await collect(8);
  t.is(s.stats.live, 0, 'collected: unmapped');
  t.is(lab.host.stats().mappings, 0);
  s.close();
  s2.close();
});

test.serial('locked memory is bounded across mapRange of 1..600 pages and given back when the last session closes', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 16 * MiB }] });
  t.teardown(() => lab.close());
  await collect();
  const before = localMemoryStats();
  t.is(before.sessions, 0);
  const s = lab.open();
  let peak = 0;
  for (let n = 1; n <= 600; n += 7) {
    const r = await s.mapRange(lab.vm('g'), 0n, n * PS);
    r.unmap();
    peak = Math.max(peak, localMemoryStats().lockedBytes);
  }
  for (let n = 1; n <= 600; n += 13) await s.read(lab.vm('g'), 0n, n * PS);
  // Live pages + free pages (4 MiB) + cached windows (32 MiB) + unlocked-past-16-MiB quarantine + one range.
  t.true(peak <= (4 + 32 + 16) * MiB + 2 * 600 * PS, `peak locked ${peak} bytes`);
  s.close();
  const after = localMemoryStats();
  t.is(after.lockedBytes, 0, 'nothing stays locked once no session is open');
  t.is(after.freePages, 0);
  t.is(after.cachedWindowBytes, 0);
  await collect();
  t.is(localMemoryStats().lockedBytes, 0);
  t.true(vmLocked() < 4 * MiB, `VmLck ${vmLocked()} after close`);
});

test('RLIMIT_MEMLOCK as an unprivileged user: churn stays within it; a range over it is a typed ENOMEM; nothing stays locked', (t) => {
  const src = (p: string) => JSON.stringify(new URL(`../src/${p}`, import.meta.url).href);
  const code = `
    const { localMemoryStats } = await import(${src('client/index.ts')});
    const { ModelLab } = await import(${src('lab/index.ts')});
    const { readFileSync } = await import('node:fs');
    await import(${src('model/index.ts')});
    if (process.getuid() === 0) process.setuid(65534); // drops CAP_IPC_LOCK: the 8 MiB default applies
    const out = {};
    const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 32 << 20 }] });
    try {
      const s = lab.open();
      out.limit = localMemoryStats().limitBytes;
      let maps = 0;
      for (let n = 1; n <= 600; n += 3) { (await s.mapRange(lab.vm('g'), 0n, n * 4096)).unmap(); maps++; }
      for (let i = 0; i < 3000; i++) { (await s.map(lab.vm('g'), BigInt((i % 8000) * 4096))).unmap(); maps++; }
      out.maps = maps;
      try { await s.mapRange(lab.vm('g'), 0n, 3000 * 4096); out.big = 'mapped'; }
      catch (e) { out.big = { code: e.code, errno: e.errno, name: e.name, hint: e.hint }; }
      out.mappingsAfterFailure = lab.host.stats().mappings;
      out.still = (await s.read(lab.vm('g'), 0n, 16)).length;
      s.close();
      out.lockedAfterClose = localMemoryStats().lockedBytes;
      out.vmLck = Number(/^VmLck:\\s+(\\d+) kB/m.exec(readFileSync('/proc/self/status', 'latin1'))[1]);
    } finally { await lab.close(); }
    console.log(JSON.stringify(out));`;
  // The limit set explicitly (root may lower it): what an unprivileged user gets by default.
  const stdout = execFileSync('bash', ['-c', 'ulimit -l 8192 && exec "$0" "$@"', process.execPath, '--expose-gc', '--import', 'tsx', '--input-type=module', '-e', code], { encoding: 'utf8' });
  const r = JSON.parse(stdout.trim().split('\n').pop()!);
  t.is(r.limit, 8 * MiB, 'the default RLIMIT_MEMLOCK of an unprivileged user');
  t.is(r.maps, 200 + 3000, 'every map of the churn succeeded within the limit');
  t.is(r.big.code, 'ENOMEM');
  t.is(r.big.errno, -12);
  t.is(r.big.name, 'LockedMemoryError');
  t.regex(r.big.hint, /ulimit -l/);
  t.is(r.mappingsAfterFailure, 0, 'the failed range left nothing mapped');
  t.is(r.still, 16, 'the session still works after the typed error');
  t.is(r.lockedAfterClose, 0);
  t.is(r.vmLck, 0, 'VmLck of the process after close');
});
