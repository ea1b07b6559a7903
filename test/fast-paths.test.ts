/**
 * The fast paths measured in BENCHMARKS.md: pointer arguments passed as
 * addresses (pinned buffers, or staged through libc's scratch arena), one native
 * call per single remap, one promise per token batch, two token batches in
 * flight. Each must behave exactly like the path it replaces. No timings here.
 */
import test from 'ava';
import { readFileSync } from 'node:fs';
import * as libc from '../src/sys/libc.js';
import { Window, remapFreshRaw, remapSharedRaw } from '../src/sys/window.js';
import type { TargetVm } from '../src/client/index.js';
import { ModelLab } from '../src/lab/index.js';
import { UsageError } from '../src/errors.js';

const PS = 4096;

/** The VMA line of /proc/self/smaps covering addr, plus its Locked: field. */
function vmaOf(addr: number): { perms: string; locked: boolean } {
  const lines = readFileSync('/proc/self/smaps', 'utf8').split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S+)/.exec(lines[i]!);
    if (!m || addr < parseInt(m[1]!, 16) || addr >= parseInt(m[2]!, 16)) continue;
    let locked = false;
    for (let k = i + 1; k < lines.length && !/^[0-9a-f]+-/.test(lines[k]!); k++) {
      const l = /^Locked:\s+(\d+)/.exec(lines[k]!);
      if (l) locked = Number(l[1]) > 0;
    }
    return { perms: m[3]!, locked };
  }
  throw new Error(`no VMA at 0x${addr.toString(16)}`);
}

test('pin() gives the address of a view, and addressOf agrees for any sub-view', (t) => {
  const w = Window.alloc(2 * PS);
  try {
    const v = w.view(PS, 64);
    t.is(libc.pin(v), w.address + PS);
    t.is(libc.addressOf(v.subarray(8)), w.address + PS + 8);
    const b = Buffer.alloc(4096);
    const a = libc.pin(b);
    t.is(libc.addressOf(b.subarray(100)), a + 100);
    t.is(libc.pin(Buffer.alloc(0)), -1);
  } finally {
    w.free();
  }
});

test('batch ioctls give the same per-record results whether buffers are pinned, staged or large', (t) => {
  if (!libc.batchAvailable()) {
    t.log('native batch helper absent (KVMMEM_NO_BATCH=1 or no compiler): nothing to check here');
    t.pass();
    return;
  }
  const fd = libc.open('/dev/null', libc.O_RDWR);
  try {
    for (const count of [1, 7, 2000]) { // 2000 * 48 bytes: above the staging limit, pinned on the fly
      const recs = Buffer.alloc(48 * count, 0xab);
      const vals = Buffer.alloc(8 * count);
      const res = new Int32Array(count).fill(123);
      t.is(libc.ioctlManyPtrRaw(fd, 0x40306901, recs, 48, count, res), 0);
      t.true(res.every((r) => r === -25));
      t.true(recs.every((b) => b === 0xab), 'records come back unchanged');
      res.fill(123);
      t.is(libc.ioctlManyValRaw(fd, 0x40086902, vals, count, res), 0);
      t.true(res.every((r) => r === -25));
      // pinned buffers take the address path directly
      const pr = new Int32Array(count);
      libc.pin(pr);
      t.is(libc.ioctlManyValRaw(fd, 0x40086902, vals, count, pr), 0);
      t.true(pr.every((r) => r === -25));
    }
    // a record that is a sub-view of a pooled buffer, and a bad fd: -EBADF per record
    const res = new Int32Array(2);
    t.is(libc.ioctlManyPtrRaw(987654, 0x40306901, Buffer.alloc(96).subarray(0, 96), 48, 2, res), 0);
    t.deepEqual([...res], [-9, -9]);
    t.is(libc.ioctlRaw(fd, 0x40306901, Buffer.alloc(200).subarray(52, 100)), -25);
  } finally {
    libc.close(fd);
  }
});

test('mincore through the staged vector reports each page, and ENOMEM for a hole', (t) => {
  const w = Window.alloc(8 * PS);
  const hole = libc.mmap(0, PS, libc.PROT_READ, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  libc.munmap(hole, PS);
  try {
    const vec = new Uint8Array(8).fill(0xee);
    t.true(libc.mincore(w.address, 8 * PS, vec));
    t.true(vec.every((b) => (b & 1) === 1), `all resident: ${[...vec]}`);
    // pages never touched are not resident: per-page answers come back through the arena
    const a = libc.mmap(0, 4 * PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
    libc.memsetAt(a + PS, 1, 1);
    libc.memsetAt(a + 3 * PS, 1, 1);
    const v4 = new Uint8Array(4);
    t.true(libc.mincore(a, 4 * PS, v4));
    t.deepEqual([...v4].map((b) => b & 1), [0, 1, 0, 1]);
    libc.munmap(a, 4 * PS);
    t.false(libc.mincore(hole, PS, new Uint8Array(1)));
    const big = Window.alloc(100_000 * PS, { lock: false }); // a vector above the staging limit
    try {
      const v = new Uint8Array(100_000);
      t.true(libc.mincore(big.address, big.length, v));
      t.true(v.every((b) => (b & 1) === 1));
    } finally {
      big.free();
    }
  } finally {
    w.free();
  }
});

test('single remaps (one native call) alias the file read-write (locked) or a read-only image (private, live), and give fresh pages back', (t) => {
  const fd = libc.memfdCreate('kvmmem-fast-paths');
  libc.ftruncate(fd, 2 * PS);
  const file = Window.alloc(PS); // scratch to write the file through a shared mapping
  const w = Window.alloc(2 * PS);
  try {
    const m = libc.mmap(0, 2 * PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, 0);
    const fv = libc.view(m, 2 * PS);
    fv.write('page zero', 0, 'latin1');
    fv.write('page one', PS, 'latin1');
    t.is(remapSharedRaw(w.address, PS, fd, PS), 0);
    t.is(w.buffer!.toString('latin1', 0, 8), 'page one');
    w.buffer!.write('PAGE', 0, 'latin1');
    t.is(fv.toString('latin1', PS, PS + 4), 'PAGE', 'writes reach the file');
    t.true(vmaOf(w.address).locked);
    t.is(vmaOf(w.address).perms.slice(0, 2), 'rw');
    t.is(remapSharedRaw(w.address + PS, PS, fd, 0, false), 0);
    t.is(w.buffer!.toString('latin1', PS, PS + 9), 'page zero');
    // a read-only image: a private copy-on-write mapping, live for reads, a write stays local
    t.is(vmaOf(w.address + PS).perms.slice(0, 4), 'rw-p', 'read-only image mapping is private');
    fv.write('PAGE ZERO', 0, 'latin1');
    t.is(w.buffer!.toString('latin1', PS, PS + 9), 'PAGE ZERO', 'live until written locally');
    w.buffer!.write('local', PS + 100, 'latin1');
    t.is(fv.toString('latin1', 100, 105), '\0'.repeat(5), 'the write never reaches the file');
    t.is(remapFreshRaw(w.address, 2 * PS), 0);
    t.true(w.buffer!.every((b) => b === 0));
    t.true(vmaOf(w.address).locked);
    t.is(remapSharedRaw(w.address, PS, 987654, 0), -9, 'EBADF as -errno, no throw');
    // the same through remapMany, kind REMAP_SHARED_RO (the helper, or its per-call stand-in for ABI 1)
    if (!libc.batchAvailable()) { libc.munmap(m, 2 * PS); return; }
    const res = new Int32Array(1);
    t.is(libc.remapManyRaw(libc.REMAP_SHARED_RO, BigUint64Array.of(BigInt(w.address)), BigUint64Array.of(BigInt(PS)), fd, BigInt64Array.of(BigInt(PS)), 1, res), 1);
    t.is(res[0], 0);
    t.is(vmaOf(w.address).perms.slice(0, 4), 'rw-p');
    t.is(w.buffer!.toString('latin1', 0, 4), 'PAGE');
    t.is(remapFreshRaw(w.address, PS), 0);
    libc.munmap(m, 2 * PS);
  } finally {
    w.free();
    file.free();
    libc.close(fd);
  }
});

test('token batches: one result per request, copies that do not alias, errors in place, bad counts reject', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 64 * PS }], host: { tokenLimit: 5 } });
  t.teardown(() => lab.close());
  const vm = lab.vm('g');
  const got = await vm.getMapTokensSettled(8);
  t.is(got.length, 8);
  const tokens = got.filter((x): x is Uint8Array => x instanceof Uint8Array);
  t.is(tokens.length, 5, 'the host issues 5, refuses the rest');
  t.true(got.slice(5).every((x) => x instanceof Error && (x as { code?: string }).code === 'EAGAIN'));
  t.is(new Set(tokens.map((x) => Buffer.from(x).toString('hex'))).size, 5);
  t.true(tokens.every((x) => x.length === 32 && x.byteOffset === 0 && x.buffer.byteLength === 32), 'each token owns its bytes');
  t.is(vm.inFlight, 0);
  await t.throwsAsync(vm.getMapTokensSettled(-1), { instanceOf: UsageError });
  await t.throwsAsync(vm.getMapTokens(2), { message: /KVMI_GET_MAP_TOKEN/ });
  t.deepEqual(await vm.getMapTokensSettled(0), []);
});

test('with a large token budget two batches are in flight, never more tokens outstanding than the budget', async (t) => {
  const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 1024 * PS }], host: { tokenLimit: 256 } });
  t.teardown(() => lab.close());
  const vm = lab.vm('g');
  let peakOutstanding = 0;
  let peakRequested = 0;
  let requested = 0;
  const spy: TargetVm = {
    get uuid() { return vm.uuid; }, get name() { return vm.name; }, get state() { return vm.state; },
    on: (e, f) => vm.on(e as 'gone', f), off: (e, f) => vm.off(e as 'gone', f),
    async getMapTokensSettled(n) {
      requested += n;
      peakRequested = Math.max(peakRequested, requested);
      const r = await vm.getMapTokensSettled(n);
      requested -= n;
      peakOutstanding = Math.max(peakOutstanding, lab.host.stats().tokensOutstanding);
      return r;
    },
  };
  const s = lab.open({ maxTokensInFlight: 256 });
  const mem = lab.modelVm('g').memory;
  mem.write(1000n * BigInt(PS), Buffer.from('page 1000'));
  const r = await s.mapRange(spy, 0n, 1024 * PS);
  t.is(s.stats.tokenRoundTrips, 8, '1024 pages in batches of 128');
  t.is(peakRequested, 256, 'two batches of 128 requested at once');
  t.true(peakOutstanding <= 256, `host held ${peakOutstanding} unconsumed tokens`);
  t.is(r.page(1000).toString('latin1', 0, 9), 'page 1000');
  t.is(lab.host.stats().mappings, 1024);
  r.unmap();
  t.is(lab.host.stats().mappings, 0);
  s.close();
});
