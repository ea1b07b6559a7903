/**
 * The model must never kill the process (docs/driver-model.md, deviations 11 and 12):
 * - a guest RAM file that shrinks while mapped gives ERR_GUEST_MEMORY_SHRUNK
 *   (errno -EFAULT), never SIGBUS: pages of RAM files are guarded by the batch
 *   helper's SIGBUS handler, MAPs past the file's end are refused, memfd RAM is
 *   sealed. Anything that could fault runs in a child process.
 * - many single-page mappings end in a typed ENOMEM before vm.max_map_count,
 *   not in std::bad_alloc.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as libc from '../src/sys/libc.js';
import { ModelLab } from '../src/lab/model-lab.js';
import { DeviceError } from '../src/errors.js';
import { ModelHost } from '../src/model/index.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));
const PRELOAD = fileURLToPath(new URL('./fixtures/truncate-ram-when-open.mjs', import.meta.url));
const dir = fs.mkdtempSync(join(tmpdir(), 'kvmmem-faults-'));
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));
const PS = 4096;

/** A RAM file of `mib` MiB, each page holding its own page number (u32 at offset 0). */
function ramFile(name: string, mib: number): string {
  const path = join(dir, name);
  const buf = Buffer.alloc(mib << 20);
  for (let p = 0; p < buf.length / PS; p++) buf.writeUInt32LE(p + 1, p * PS);
  fs.writeFileSync(path, buf);
  return path;
}

/** Runs an ESM snippet (cwd: the checkout) in a child; it prints one JSON line. */
function child(code: string, env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    cwd: root, encoding: 'utf8', timeout: 90_000, env: { ...process.env, NODE_DEBUG: '', ...env },
  });
  const out = r.stdout.trim().split('\n').filter((l) => l.startsWith('{'));
  return { status: r.status, signal: r.signal, stderr: r.stderr, json: out.length > 0 ? JSON.parse(out[out.length - 1]!) : undefined };
}

const PRELUDE = `
  import * as fs from 'node:fs';
  import { PhysicalReader, scan } from './src/index.js';
  import { ModelLab } from './src/lab/index.js';
  import { GuestMemory } from './src/model/index.js';
  import * as faults from './src/sys/faults.js';
  const errOf = (e) => ({ name: e.name, code: e.code, errno: e.errno, message: e.message });
  const path = process.env.RAM;
  const memory = GuestMemory.fromFile(path, { readOnly: process.env.RO === '1' });
  const lab = await ModelLab.start({ vms: [{ name: 'shrinking', memory }], host: { tokenLimit: 256 } });
  const session = lab.open({ maxTokensInFlight: 256 });
  const vm = lab.vm('shrinking');
  const finish = async (o) => {
    session.close();
    await lab.close();
    memory.close();
    console.log(JSON.stringify({ ...o, guarded: faults.guarded(), hostMappingsAfter: lab.host.stats().mappings }));
  };`;

test('memfd guest RAM is sealed: ftruncate fails with EPERM and the mapped page stays readable', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'anon', memory: 1 << 20 }] });
  t.teardown(() => lab.close());
  const mem = lab.modelVm('anon').memory;
  t.false(mem.mayShrink);
  mem.write(0x5000n, Buffer.from('sealed'));
  const seals = libc.fcntl(mem.fd, libc.F_GET_SEALS);
  t.is(seals & (libc.F_SEAL_SHRINK | libc.F_SEAL_GROW), libc.F_SEAL_SHRINK | libc.F_SEAL_GROW);
  const session = lab.open();
  t.teardown(() => session.close());
  const page = await session.map(lab.vm('anon'), 0x5000n);
  // Only once the shrink is known to fail is the page read (else this worker would SIGBUS).
  const shrink = t.throws(() => fs.ftruncateSync(mem.fd, PS), { code: 'EPERM' });
  t.throws(() => libc.ftruncate(mem.fd, 4 << 20), { code: 'EPERM' }, 'growing is sealed too: a guest\'s RAM never changes size');
  if (shrink !== undefined) t.is(page.buffer.toString('latin1', 0, 6), 'sealed');
  t.is(mem.currentFileSize(), 1 << 20);
  page.unmap();
});

test('a RAM file truncated under a PhysicalReader\'s cached pages: ERR_GUEST_MEMORY_SHRUNK naming file, size and gpa; the process lives', (t) => {
  const path = ramFile('reader.ram', 4);
  const r = child(`${PRELUDE}
    const reader = new PhysicalReader(session, vm, { cachePages: 64 });
    const before = (await reader.read(0x40000n, 8 * 4096)).readUInt32LE(4096);
    const cached = reader.stats.cached;
    fs.truncateSync(path, 4096);
    let err, err2, zeros;
    try { await reader.read(0x40000n, 8 * 4096); } catch (e) { err = errOf(e); }
    const cachedAfter = reader.stats.cached;
    // A page that is not mapped yet: the host refuses it (past the end), the reader says why.
    try { await reader.read(0x200000n, 16); } catch (e) { err2 = errOf(e); }
    // A raw live view over guarded pages: the first access reads zeros instead of SIGBUS.
    const again = await (async () => { try { return await session.mapRange(vm, 0n, 2 * 4096); } catch (e) { return errOf(e); } })();
    reader.close();
    await finish({ before, cached, err, cachedAfter, err2, faults: faults.faultCount(), again: again.code ?? 'mapped' });`, { RAM: path, RO: '1' });
  t.is(r.signal, null, `the child died of ${r.signal}: ${r.stderr}`);
  t.is(r.status, 0, r.stderr);
  const j = r.json;
  t.is(j.before, 0x41 + 1);
  t.is(j.cached, 8);
  t.is(j.err?.code, 'ERR_GUEST_MEMORY_SHRUNK', JSON.stringify(j.err));
  t.is(j.err.errno, -14);
  t.is(j.err.name, 'GuestMemoryShrunkError');
  t.true(j.err.message.includes(path), j.err.message);
  t.regex(j.err.message, /shrank to 4096 bytes while mapped \(it had 4194304\)/);
  if (j.guarded) {
    t.regex(j.err.message, /gpa 0x4[0-7]000 is past its end/, 'the SIGBUS guard names the faulting page');
    t.true(j.faults >= 1);
  }
  t.is(j.cachedAfter, 0, 'the cache is emptied: no later read returns the zeros');
  t.is(j.err2?.code, 'ERR_GUEST_MEMORY_SHRUNK', JSON.stringify(j.err2));
  t.regex(j.err2.message, /gpa 0x200000 is past its end/);
  t.is(j.again, 'EFAULT', 'a page past the end is refused by the host: no memslot behind it');
  t.is(j.hostMappingsAfter, 0);
});

test('guarded pages of a shared RAM file read zeros after the truncation, and the fault is counted', (t) => {
  const path = ramFile('shared.ram', 2);
  const r = child(`${PRELUDE}
    if (!faults.guarded()) { await finish({ skipped: true }); process.exit(0); }
    const range = await session.mapRange(vm, 0x10000n, 4 * 4096);
    const before = [0, 1, 2, 3].map((i) => range.buffer.readUInt32LE(i * 4096));
    const n0 = faults.faultCount();
    const watch = faults.watch(vm.uuid);
    fs.truncateSync(path, 4096);
    const after = [0, 1, 2, 3].map((i) => range.buffer.readUInt32LE(i * 4096));
    const counted = faults.faultCount() - n0;
    let err;
    try { watch.check('read'); } catch (e) { err = errOf(e); }
    range.unmap();
    await finish({ before, after, counted, err });`, { RAM: path });
  t.is(r.signal, null, `the child died of ${r.signal}: ${r.stderr}`);
  t.is(r.status, 0, r.stderr);
  if (r.json.skipped) return t.pass('no batch helper with the SIGBUS guard (ABI 4) here');
  t.deepEqual(r.json.before, [0x11, 0x12, 0x13, 0x14]);
  t.deepEqual(r.json.after, [0, 0, 0, 0]);
  t.is(r.json.counted, 4);
  t.is(r.json.err?.code, 'ERR_GUEST_MEMORY_SHRUNK');
  t.regex(r.json.err.message, /gpa 0x10000 is past its end/);
  t.is(r.json.hostMappingsAfter, 0);
});

test('scan of a RAM file truncated between chunks rejects with ERR_GUEST_MEMORY_SHRUNK and leaves nothing mapped', (t) => {
  const path = ramFile('scan.ram', 16);
  const r = child(`${PRELUDE}
    let chunks = 0, err;
    try {
      await scan(session, vm, 'no such needle in here', { to: 16n << 20n, onProgress: () => { if (++chunks === 2) fs.truncateSync(path, 4096); } });
    } catch (e) { err = errOf(e); }
    await finish({ chunks, err });`, { RAM: path, RO: '1' });
  t.is(r.signal, null, `the child died of ${r.signal}: ${r.stderr}`);
  t.is(r.status, 0, r.stderr);
  t.is(r.json.err?.code, 'ERR_GUEST_MEMORY_SHRUNK', JSON.stringify(r.json));
  t.regex(r.json.err.message, /^scan: the guest RAM file .*scan\.ram of VM shrinking shrank to 4096 bytes/);
  t.is(r.json.chunks, 2, 'no chunk after the truncation completes');
  t.is(r.json.hostMappingsAfter, 0);
});

test('without the batch helper: the per-chunk size check gives the same typed error', (t) => {
  const path = ramFile('nobatch.ram', 8);
  const r = child(`${PRELUDE}
    const reader = new PhysicalReader(session, vm, { cachePages: 64 });
    await reader.read(0x10000n, 4 * 4096);
    fs.truncateSync(path, 4096);
    let err, scanErr, chunks = 0;
    // Cached pages are past the end now: the fstat before the copy says so before touching them.
    try { await reader.read(0x10000n, 4 * 4096); } catch (e) { err = errOf(e); }
    reader.close();
    try { await scan(session, vm, 'x', { to: 8n << 20n, onProgress: () => chunks++ }); } catch (e) { scanErr = errOf(e); }
    await finish({ err, scanErr, chunks });`, { RAM: path, KVMMEM_NO_BATCH: '1' });
  t.is(r.signal, null, `the child died of ${r.signal}: ${r.stderr}`);
  t.is(r.status, 0, r.stderr);
  t.false(r.json.guarded);
  t.is(r.json.err?.code, 'ERR_GUEST_MEMORY_SHRUNK', JSON.stringify(r.json));
  t.is(r.json.scanErr?.code, 'ERR_GUEST_MEMORY_SHRUNK');
  t.is(r.json.chunks, 0);
  t.is(r.json.hostMappingsAfter, 0);
});

test('kvmmem scan --ram F while F is truncated: exit 1 with one typed line, not 135 (SIGBUS)', (t) => {
  const path = ramFile('cli.ram', 16);
  for (const cmd of [['scan', '--ram', path, '--pattern', 'no such needle'], ['read', '--ram', path, '--gpa', '0x100000', '--len', '64']]) {
    fs.truncateSync(path, 16 << 20);
    const r = spawnSync(process.execPath, ['--import', PRELOAD, BIN, ...cmd], {
      encoding: 'utf8', timeout: 90_000, env: { ...process.env, NODE_DEBUG: '', KVMMEM_TEST_TRUNCATE: path },
    });
    t.is(r.signal, null, `${cmd[0]}: died of ${r.signal}: ${r.stderr}`);
    t.true(r.stderr.includes('test preload: truncated'), r.stderr);
    const lines = r.stderr.split('\n').filter((l) => l !== '' && !l.startsWith('test preload:'));
    t.is(r.status, 1, `${cmd[0]}: ${r.stderr}`);
    t.is(lines.length, 1, r.stderr);
    t.regex(lines[0]!, new RegExp(`^kvmmem: ${cmd[0]}: the guest RAM file .*cli\\.ram of VM ram shrank to 4096 bytes while mapped \\(it had 16777216\\); gpa 0x[0-9a-f]+ is past its end: `));
  }
});

test('an unguarded SIGBUS still kills the process as before (the handler passes it on)', (t) => {
  const path = ramFile('unguarded.ram', 1);
  const code = (how: string) => `
    import * as fs from 'node:fs';
    import * as libc from './src/sys/libc.js';
    import { ModelLab } from './src/lab/index.js';
    import { GuestMemory } from './src/model/index.js';
    // Install the guard: one guarded MAP of a file-backed guest.
    const memory = GuestMemory.fromFile(process.env.RAM);
    const lab = await ModelLab.start({ vms: [{ name: 'g', memory }] });
    const s = lab.open();
    const p = await s.map(lab.vm('g'), 0n);
    const installed = libc.faultGuardAvailable() ? libc.faultState().readUInt32LE(8) : 0;
    const guardedHere = libc.faultGuardAvailable() && libc.faultGuarded(Number(p.address));
    console.log(JSON.stringify({ installed, guardedHere }));
    ${how}
    console.log(JSON.stringify({ survived: true }));`;
  // A file mapping the model did not make: its SIGBUS is not the model's to hide.
  const own = child(code(`
    const fd = fs.openSync(process.env.RAM, 'r');
    const a = libc.mmap(0, 8192, libc.PROT_READ, libc.MAP_SHARED, fd, 0);
    fs.truncateSync(process.env.RAM, 0);
    libc.view(a, 8192)[4096];`), { RAM: path });
  t.is(own.signal, 'SIGBUS', own.stderr);
  const killed = child(code(`process.kill(process.pid, 'SIGBUS');`), { RAM: ramFile('kill.ram', 1) });
  t.is(killed.signal, 'SIGBUS', killed.stderr);
  if (libc.faultGuardAvailable()) {
    t.deepEqual(killed.json, { installed: 1, guardedHere: true });
  }
});

// ---- item 4: vm.max_map_count ----

test('the VMA limit is vm.max_map_count by default, less 10%', (t) => {
  const host = new ModelHost();
  t.teardown(() => host.close());
  const limit = Number(fs.readFileSync('/proc/sys/vm/max_map_count', 'utf8'));
  const v = host.vmas();
  t.is(v.limit, limit);
  t.is(v.threshold, limit - Math.ceil(limit / 10));
  t.true(v.estimate > 10 && v.estimate < v.threshold, JSON.stringify(v));
  t.throws(() => new ModelHost({ maxMapCount: 10 }), { code: 'ERR_INVALID_ARG' });
});

test.serial('single pages at non-adjacent gpas: a typed ENOMEM with the hint before the VMA limit; unmapping makes room again', async (t) => {
  const countMaps = () => fs.readFileSync('/proc/self/maps', 'latin1').split('\n').length - 1;
  // A low limit (the process's own VMAs + ~3000) so that this runs in well under a second.
  const limit = countMaps() + 3000;
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 64 << 20 }], host: { maxMapCount: limit, tokenLimit: 256 } });
  t.teardown(() => lab.close());
  const session = lab.open({ maxTokensInFlight: 256 });
  const vm = lab.vm('g');
  const pages = [];
  let err: unknown;
  for (let i = 0; i < 4000 && err === undefined; i++) {
    try {
      pages.push(await session.map(vm, BigInt(i * 2 * PS))); // every other gpa: no two pages can merge
    } catch (e) {
      err = e;
    }
  }
  t.true(err instanceof DeviceError, String(err));
  const e = err as DeviceError;
  t.is(e.code, 'ENOMEM');
  t.is(e.errno, -12);
  t.regex(e.hint!, /vm\.max_map_count/);
  t.regex(e.hint!, /map ranges/);
  const v = lab.host.vmas();
  t.true(countMaps() < limit, `the process stays below the limit: ${countMaps()} of ${limit}`);
  t.true(v.estimate <= limit, JSON.stringify(v));
  t.true(pages.length > 1000, `${pages.length} single pages mapped before ENOMEM`);
  t.true(v.measurements <= 4, `counts of /proc/self/maps: ${v.measurements}`);
  // Nothing leaked: each refused MAP left nothing behind.
  t.is(lab.host.stats().mappings, pages.length);
  // A second try without unmapping anything is refused at once (no recount).
  await t.throwsAsync(session.map(vm, 1n << 20n), { code: 'ENOMEM' });
  t.is(lab.host.vmas().measurements, v.measurements);
  // Unmap everything: the pages map again (all but a few VMAs' worth: V8 and the test
  // runner map memory of their own meanwhile, and the count says so).
  for (const p of pages) p.unmap();
  t.is(lab.host.stats().mappings, 0);
  t.is(lab.host.vmas().mappings, 0);
  const again = [];
  for (let i = 0; i < pages.length - 200; i++) again.push(await session.map(vm, BigInt(i * 2 * PS)));
  t.is(lab.host.stats().mappings, pages.length - 200);
  // A range of adjacent pages is one VMA: 1,024 pages still fit where single pages did not.
  for (const p of again.splice(0, 600)) p.unmap();
  const range = await session.mapRange(vm, 32n << 20n, 1024 * PS);
  t.is(range.pages, 1024);
  range.unmap();
  for (const p of again) p.unmap();
  session.close();
  t.is(lab.host.stats().mappings, 0);
});

/** The lines of a /proc/self/maps text whose VMA overlaps [lo, hi). */
function vmasOver(maps: string, lo: number, hi: number): number {
  let n = 0;
  for (const m of maps.matchAll(/^([0-9a-f]+)-([0-9a-f]+) /gm)) if (parseInt(m[1]!, 16) < hi && parseInt(m[2]!, 16) > lo) n++;
  return n;
}

test.serial('the VMA estimate is an upper bound of the real count: single pages cost one each, a range one for all', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 16 << 20 }], host: { tokenLimit: 256 } });
  t.teardown(() => lab.close());
  const session = lab.open({ maxTokensInFlight: 256 });
  t.teardown(() => session.close());
  const vm = lab.vm('g');
  const singles = async (n: number) => {
    const out = [];
    for (let i = 0; i < n; i++) out.push(await session.map(vm, BigInt(i * 2 * PS)));
    return out;
  };
  // Warm the session's page pool first, so that the count below sees only the remaps.
  for (const p of await singles(300)) p.unmap();
  t.is(lab.host.vmas().mappings, 0);
  const mapsBefore = fs.readFileSync('/proc/self/maps', 'latin1');
  const pages = await singles(300);
  const est = lab.host.vmas().mappings;
  // The VMAs the mappings added: those over the span of the introspector pages (and the
  // window pieces either side). V8 maps heap pages of its own meanwhile, elsewhere.
  const mapped = lab.host.mappings().map((m) => Number(m.introspectorPage));
  const lo = Math.min(...mapped) - PS, hi = Math.max(...mapped) + 2 * PS;
  const real = vmasOver(fs.readFileSync('/proc/self/maps', 'latin1'), lo, hi) - vmasOver(mapsBefore, lo, hi);
  t.true(est >= 300 && est <= 2 * 300, `estimate ${est} for 300 non-adjacent single pages`);
  t.true(real <= est, `real VMAs added ${real} <= estimate ${est}`);
  for (const p of pages) p.unmap();
  t.is(lab.host.vmas().mappings, 0);
  // (the same span; a few VMAs of slack)
  const left = vmasOver(fs.readFileSync('/proc/self/maps', 'latin1'), lo, hi) - vmasOver(mapsBefore, lo, hi);
  t.true(left <= 8, `fresh pages merge back into their window: ${left} VMAs more than before`);
  const range = await session.mapRange(vm, 0n, 256 * PS);
  t.true(lab.host.vmas().mappings <= 2, `a range of adjacent gpas: ${lab.host.vmas().mappings} VMAs`);
  range.unmap();
  t.is(lab.host.vmas().mappings, 0);
});
