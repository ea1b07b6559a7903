// src/inspect against the model, through real sockets: IntrospectionServer (the
// tool's KVMI end) <-> ModelVm.attach (the device manager), KvmMem.open({ model })
// for the device. PhysicalReader, scan, page-table walks over a synthetic guest.
import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IntrospectionServer, type Vm } from '../src/channel/index.js';
import { KvmMem, type Session } from '../src/client/index.js';
import { GuestMemory, ModelHost, type MemoryRegion } from '../src/model/index.js';
import {
  AddressSpace, PhysicalReader, TranslationError, buildSyntheticGuest, canonical, isCanonical, readVirtual, scan, translate,
  type SyntheticTruth,
} from '../src/inspect/index.js';

const dir = mkdtempSync(join(tmpdir(), 'kvmmem-inspect-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
let sockN = 0;

const KiB = 1024n;
const MiB = 1024n * KiB;

interface Fixture {
  host: ModelHost;
  memory: GuestMemory;
  server: IntrospectionServer;
  vm: Vm;
  session: Session;
}

/** A model VM over `memory`, attached to a fresh server, and a session on the host's device. */
async function fixture(t: ExecutionContext, memory: GuestMemory, hostOpts: { tokenTtlMs?: number } = {}): Promise<Fixture> {
  const unix = join(dir, `s${++sockN}.sock`);
  const cookie = `cookie-${sockN}`;
  const server = await IntrospectionServer.listen({ unix }, { cookie });
  const host = new ModelHost({ cookie, ...hostOpts });
  const name = `vm${sockN}`;
  const mvm = host.createVm({ name, memory });
  const session = KvmMem.open({ model: host });
  t.teardown(async () => {
    session.close();
    host.close();
    await server.close();
    memory.close();
  });
  await mvm.attach({ unix, cookie });
  const vm = await server.waitForVm({ name });
  return { host, memory, server, vm, session };
}

/** Deterministic bytes (xorshift). */
function pseudoRandom(n: number, seed: number, alphabet = 256): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x % alphabet;
  }
  return b;
}

// ---------------------------------------------------------------------------
// PhysicalReader
// ---------------------------------------------------------------------------

test('PhysicalReader: hits, misses, evictions with a small cache; the host holds what the cache holds', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(1n * MiB));
  const r = new PhysicalReader(f.session, f.vm, { cachePages: 3 });
  await r.page(0x0000n);
  await r.page(0x1010n);
  await r.page(0x0fffn); // same page as 0x0000
  t.like(r.stats, { hits: 1, misses: 2, maps: 2, evictions: 0, cached: 2 });
  await r.page(0x2000n);
  await r.page(0x3000n); // evicts 0x1000 (LRU: 0x0000 was touched after it)
  t.like(r.stats, { hits: 1, misses: 4, maps: 4, evictions: 1, unmaps: 1, cached: 3, held: 3 });
  t.true(r.has(0x0000n));
  t.false(r.has(0x1000n));
  t.is(f.host.stats().mappings, 3);
  await r.page(0x1000n); // miss again, evicts 0x0000 (now the LRU)
  t.like(r.stats, { hits: 1, misses: 5, evictions: 2 });
  t.false(r.has(0x0000n));
  t.is(f.host.stats().mappings, 3);
  // more lookups of cached pages are hits and map nothing
  for (let i = 0; i < 10; i++) await r.readU32(0x3004n);
  t.like(r.stats, { hits: 11, maps: 5 });

  r.close();
  t.is(f.host.stats().mappings, 0, 'close() unmaps everything');
  t.like(r.stats, { cached: 0, held: 0, unmaps: 5 });
  t.notThrows(() => r.close(), 'close() is idempotent');
  await t.throwsAsync(r.page(0n), { code: 'EBADF' });
});

test('PhysicalReader: reads crossing pages equal GuestMemory.read; long reads map runs with one mapRange', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(2n * MiB));
  const data = pseudoRandom(2 * 1024 * 1024, 7);
  f.memory.write(0n, data);
  const r = new PhysicalReader(f.session, f.vm, { cachePages: 4 });
  // one read over 10 pages with a 4-page cache
  const long = await r.read(0x10_0123n, 10 * 4096 + 77);
  t.deepEqual(long, f.memory.read(0x10_0123n, 10 * 4096 + 77));
  t.true(r.stats.rangeMaps >= 2, `runs mapped as ranges (${r.stats.rangeMaps})`);
  t.is(r.stats.misses, 11, 'every page was a miss');
  t.true(r.stats.held <= 4 + 3, 'never much more held than the cache');
  await fc.assert(fc.asyncProperty(
    fc.integer({ min: 0, max: 2 * 1024 * 1024 - 1 }), fc.integer({ min: 0, max: 5 * 4096 }),
    async (at, len) => {
      len = Math.min(len, 2 * 1024 * 1024 - at);
      const got = await r.read(BigInt(at), len);
      return got.equals(f.memory.read(BigInt(at), len));
    }), { numRuns: 60 });
  t.is(f.host.stats().mappings, r.stats.held);
  t.true(r.stats.cached <= 4);
  // scalar helpers, also across a page boundary
  t.is(await r.readU64(0x1ffcn), f.memory.read(0x1ffcn, 8).readBigUInt64LE(0));
  t.is(await r.readU64(0x2008n), f.memory.read(0x2008n, 8).readBigUInt64LE(0));
  t.is(await r.readU32(0x2ffen), f.memory.read(0x2ffen, 4).readUInt32LE(0));
  f.memory.write(0x4ff8n, Buffer.from('cross-page\0tail', 'latin1'));
  t.is(await r.readCString(0x4ff8n, 64), 'cross-page');
  t.is(await r.readCString(0x4ff8n, 5), 'cross');
  r.close();
  t.is(f.host.stats().mappings, 0);
});

test('PhysicalReader: a one-page cache still reads across pages', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(1n * MiB));
  f.memory.write(0n, pseudoRandom(64 * 1024, 3));
  const r = new PhysicalReader(f.session, f.vm, { cachePages: 1 });
  t.deepEqual(await r.read(0xf00n, 5 * 4096), f.memory.read(0xf00n, 5 * 4096));
  t.like(r.stats, { misses: 6, maps: 6, evictions: 5, cached: 1, held: 1 });
  t.is(await r.readU64(0x1ffdn), f.memory.read(0x1ffdn, 8).readBigUInt64LE(0));
  r.close();
  t.is(f.host.stats().mappings, 0);
});

test('PhysicalReader (property): concurrent reads with a tiny cache all return the right bytes and leak nothing', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(256n * KiB));
  f.memory.write(0n, pseudoRandom(256 * 1024, 9));
  await fc.assert(fc.asyncProperty(
    fc.integer({ min: 1, max: 4 }),
    fc.array(fc.tuple(fc.integer({ min: 0, max: 256 * 1024 - 1 }), fc.integer({ min: 0, max: 3 * 4096 })), { minLength: 1, maxLength: 12 }),
    async (cachePages, reads) => {
      const r = new PhysicalReader(f.session, f.vm, { cachePages });
      try {
        const got = await Promise.all(reads.map(([at, len]) => r.read(BigInt(at), Math.min(len, 256 * 1024 - at))));
        const ok = got.every((b, i) => b.equals(f.memory.read(BigInt(reads[i]![0]), b.length)));
        const consistent = f.host.stats().mappings === r.stats.held && r.stats.cached <= cachePages;
        return ok && consistent;
      } finally {
        r.close();
        if (f.host.stats().mappings !== 0) t.log(`leaked ${f.host.stats().mappings}`);
      }
    }), { numRuns: 40 });
  t.is(f.host.stats().mappings, 0);
});

test('PhysicalReader: a cached page is live: a guest write shows up in the next read without a new map', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(1n * MiB));
  const r = new PhysicalReader(f.session, f.vm, { cachePages: 8 });
  f.memory.write(0x5000n, Buffer.from('before'));
  const view = await r.page(0x5000n);
  t.is((await r.read(0x5000n, 6)).toString(), 'before');
  const maps = r.stats.maps;
  f.memory.write(0x5000n, Buffer.from('after!'));
  t.is((await r.read(0x5000n, 6)).toString(), 'after!');
  t.is(view.toString('latin1', 0, 6), 'after!', 'the page() view itself changed');
  t.is(r.stats.maps, maps, 'no new map');
  // and the other way: a write through the view is the guest's memory
  view.write('tool', 0x10);
  t.is(f.memory.read(0x5010n, 4).toString(), 'tool');
  r.close();
});

test('PhysicalReader: prefetch maps a run with one mapRange; concurrent lookups of one page map it once', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(1n * MiB));
  const r = new PhysicalReader(f.session, f.vm, { cachePages: 16 });
  await r.prefetch(0x8000n, 8 * 4096);
  t.like(r.stats, { maps: 8, rangeMaps: 1, hits: 0, misses: 0, cached: 8 });
  await r.read(0x8000n, 8 * 4096);
  t.like(r.stats, { maps: 8, hits: 8, misses: 0 });
  const views = await Promise.all([r.page(0x40000n), r.page(0x40008n), r.page(0x40ff0n)]);
  t.is(r.stats.maps, 9, 'one map for three concurrent lookups');
  t.is(views[0], views[1]);
  // evicting a page of the range keeps the range mapped until its last page goes
  t.true(r.evict(0x8000n));
  t.is(f.host.stats().mappings, 9, 'the range stays mapped while 7 of its pages are cached');
  for (let i = 1; i < 8; i++) r.evict(0x8000n + BigInt(i) * 4096n);
  t.is(f.host.stats().mappings, 1);
  r.close();
  t.is(f.host.stats().mappings, 0);
});

// ---------------------------------------------------------------------------
// scan
// ---------------------------------------------------------------------------

/** 3 MiB of RAM with a 1 MiB hole: [0, 1 MiB) and [2 MiB, 4 MiB) over a 4 MiB memfd. */
function holeyMemory(): GuestMemory {
  const regions: MemoryRegion[] = [
    { gpa: 0n, size: 1n * MiB, fileOffset: 0n },
    { gpa: 2n * MiB, size: 2n * MiB, fileOffset: 2n * MiB },
  ];
  return GuestMemory.anonymous(4n * MiB, { regions });
}

test('scan: finds every planted occurrence (page, chunk and hole edges), skips the hole and what lies past the end', async (t) => {
  const f = await fixture(t, holeyMemory());
  const pat = Buffer.from('kvmmem\x00NEEDLE\xff', 'latin1');
  const chunkPages = 16; // 64 KiB chunks
  const planted = [
    0x0n, // very first byte
    0x3000n - 5n, // straddles a page boundary
    0x1_0000n - 7n, // straddles a chunk boundary
    0x2_0000n - 1n, // one byte before a chunk boundary
    0x5_4321n,
    1n * MiB - BigInt(pat.length), // last bytes before the hole
    2n * MiB, // first bytes after the hole
    2n * MiB + 0x1_0000n * 3n - 3n, // chunk boundary in the second region
    4n * MiB - BigInt(pat.length), // very end of RAM
  ];
  for (const g of planted) f.memory.write(g, pat);
  // a prefix at the end of RAM before the hole, the rest after it: no match across a hole
  f.memory.write(1n * MiB - 6n, pat.subarray(0, 6));
  f.memory.write(2n * MiB + 0x8000n, pat.subarray(0, pat.length - 1)); // a truncated copy: no match
  const progress: { done: number; total: number; matches: number }[] = [];
  const res = await scan(f.session, f.vm, pat, { to: 5n * MiB, chunkPages, onProgress: (p) => progress.push(p) });
  // the "last bytes before the hole" plant was partly overwritten by the 6-byte prefix: it is gone
  const expected = planted.filter((g) => g !== 1n * MiB - BigInt(pat.length));
  t.deepEqual(res.matches, expected);
  t.is(res.skippedPages, 256 + 256, '1 MiB hole + 1 MiB past the end');
  t.is(res.scannedBytes, 3 * 1024 * 1024);
  t.true(progress.length >= 5 * 16);
  t.deepEqual(progress.at(-1), { done: 5 * 1024 * 1024, total: 5 * 1024 * 1024, matches: expected.length });
  for (let i = 1; i < progress.length; i++) t.true(progress[i]!.done > progress[i - 1]!.done);
  t.is(f.host.stats().mappings, 0, 'each chunk unmapped after its search');

  // the same with a string pattern, a regex, an unaligned window and maxMatches
  f.memory.write(2n * MiB + 0x2_0000n - 4n, Buffer.from('LABMARK-000042', 'latin1'));
  f.memory.write(0x7ff9n, Buffer.from('LABMARK-000007', 'latin1'));
  const s = await scan(f.session, f.vm, 'LABMARK-', { to: 4n * MiB, chunkPages: 8 });
  t.deepEqual(s.matches, [0x7ff9n, 2n * MiB + 0x2_0000n - 4n]);
  const re = await scan(f.session, f.vm, { regex: /LABMARK-(\d{6})/, maxLength: 14 }, { to: 4n * MiB, chunkPages: 1 });
  t.deepEqual(re.matches, [0x7ff9n, 2n * MiB + 0x2_0000n - 4n]);
  const win = await scan(f.session, f.vm, pat, { from: 0x3000n - 4n, to: 0x1_0000n, chunkPages: 2 });
  t.deepEqual(win.matches, [], 'a match must lie inside [from, to)');
  const win2 = await scan(f.session, f.vm, pat, { from: 0x3000n - 5n, to: 0x1_0000n - 7n + BigInt(pat.length), chunkPages: 2 });
  t.deepEqual(win2.matches, [0x3000n - 5n, 0x1_0000n - 7n]);
  const two = await scan(f.session, f.vm, pat, { to: 4n * MiB, maxMatches: 2 });
  t.deepEqual(two.matches, expected.slice(0, 2));
  t.is(f.host.stats().mappings, 0);
});

test('scan: abort mid-scan rejects with ABORT_ERR and leaves nothing mapped', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(16n * MiB));
  const ac = new AbortController();
  let calls = 0;
  const err = await t.throwsAsync(scan(f.session, f.vm, 'never-there', {
    to: 16n * MiB, chunkPages: 32, signal: ac.signal,
    onProgress: (p) => {
      calls++;
      if (p.done >= 1024 * 1024) ac.abort(new Error('enough'));
    },
  }), { code: 'ABORT_ERR' });
  t.is(err?.name, 'AbortError');
  t.true(calls >= 8 && calls < 128, `progress reported ${calls} times before the abort took effect`);
  t.is(f.host.stats().mappings, 0, 'the host holds no mapping');
  t.is(f.session.stats.live, 0);
  // aborted before it starts
  await t.throwsAsync(scan(f.session, f.vm, 'x', { to: 1n * MiB, signal: AbortSignal.abort() }), { code: 'ABORT_ERR' });
  // aborted while a hole is being probed page by page
  const g = await fixture(t, holeyMemory());
  const ac2 = new AbortController();
  const tokens0 = g.session.stats.tokens;
  const watch = () => {
    if (g.session.stats.tokens >= tokens0 + 40) ac2.abort();
    else if (!ac2.signal.aborted) setImmediate(watch);
  };
  setImmediate(watch);
  await t.throwsAsync(scan(g.session, g.vm, 'y', { from: 1n * MiB, to: 2n * MiB, chunkPages: 256, signal: ac2.signal }), { code: 'ABORT_ERR' });
  t.true(ac2.signal.aborted);
  t.is(g.host.stats().mappings, 0);
});

test('scan: bad arguments are usage errors', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(1n * MiB));
  await t.throwsAsync(scan(f.session, f.vm, '', { to: 4096n }), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(scan(f.session, f.vm, 'x', undefined as never), { code: 'ERR_INVALID_ARG' });
  // No `to`: the VM's memory size (KVMI_GET_MAX_GFN), or a usage error for a VM that cannot tell it.
  t.is((await scan(f.session, f.vm, 'x', {})).scannedBytes, Number(MiB));
  const mute = { uuid: f.vm.uuid, name: f.vm.name, state: f.vm.state, getMapTokensSettled: (n: number) => f.vm.getMapTokensSettled(n), on: () => mute, off: () => mute };
  await t.throwsAsync(scan(f.session, mute, 'x', {}), { code: 'ERR_INVALID_ARG', message: /\{ to \} is required .*does not tell its memory size/ });
  await t.throwsAsync(scan(f.session, f.vm, 'x', { to: 4096n, chunkPages: 0 }), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(scan(f.session, f.vm, { regex: /x/, maxLength: 0 }, { to: 4096n }), { code: 'ERR_INVALID_ARG' });
  // from > to is a mistake, not an empty scan (an empty range is from === to)
  await t.throwsAsync(scan(f.session, f.vm, 'x', { from: 8192n, to: 4096n }), { code: 'ERR_INVALID_ARG', message: /from 0x2000 is past to 0x1000/ });
  t.deepEqual(await scan(f.session, f.vm, 'x', { from: 4096n, to: 4096n }), { matches: [], scannedBytes: 0, skippedPages: 0 });
});

/** Every occurrence (overlapping) of `pat` in RAM between from and to, byte by byte over GuestMemory.read. */
function naiveSearch(memory: GuestMemory, pat: Buffer, from: bigint, to: bigint): bigint[] {
  const out: bigint[] = [];
  for (const r of memory.regions) {
    const s = r.gpa > from ? r.gpa : from;
    const e = r.gpa + r.size < to ? r.gpa + r.size : to;
    if (e - s < BigInt(pat.length)) continue;
    const bytes = memory.read(s, Number(e - s));
    outer: for (let i = 0; i + pat.length <= bytes.length; i++) {
      for (let j = 0; j < pat.length; j++) if (bytes[i + j] !== pat[j]) continue outer;
      out.push(s + BigInt(i));
    }
  }
  return out;
}

test('scan (property): random planted patterns are found exactly where a naive search over GuestMemory.read finds them', async (t) => {
  // 96 KiB of RAM with a 16 KiB hole, over a small alphabet so patterns also occur by chance
  const regions: MemoryRegion[] = [{ gpa: 0n, size: 32n * KiB, fileOffset: 0n }, { gpa: 48n * KiB, size: 64n * KiB, fileOffset: 48n * KiB }];
  const f = await fixture(t, GuestMemory.anonymous(112n * KiB, { regions }));
  const end = 112 * 1024;
  await fc.assert(fc.asyncProperty(
    fc.record({
      seed: fc.integer({ min: 1, max: 2 ** 31 }),
      alphabet: fc.integer({ min: 2, max: 6 }),
      pattern: fc.uint8Array({ minLength: 1, maxLength: 24 }),
      plants: fc.array(fc.integer({ min: 0, max: end - 1 }), { maxLength: 12 }),
      chunkPages: fc.integer({ min: 1, max: 6 }),
      from: fc.integer({ min: 0, max: end }),
      span: fc.integer({ min: 0, max: end + 8192 }),
    }),
    async ({ seed, alphabet, pattern, plants, chunkPages, from, span }) => {
      const pat = Buffer.from(pattern.map((b) => b % (alphabet + 1)));
      f.memory.write(0n, pseudoRandom(32 * 1024, seed, alphabet));
      f.memory.write(48n * KiB, pseudoRandom(64 * 1024, seed + 1, alphabet));
      for (const p of plants) {
        const g = BigInt(p);
        const r = f.memory.regionOf(g);
        if (r && g + BigInt(pat.length) <= r.gpa + r.size) f.memory.write(g, pat);
      }
      const to = BigInt(from + span);
      const got = await scan(f.session, f.vm, pat, { from: BigInt(from), to, chunkPages });
      const want = naiveSearch(f.memory, pat, BigInt(from), to);
      if (got.matches.length !== want.length || got.matches.some((m, i) => m !== want[i])) {
        t.log({ pat: pat.toString('hex'), from, to, chunkPages, got: got.matches.slice(0, 10), want: want.slice(0, 10) });
        return false;
      }
      const m = f.host.stats().mappings;
      if (m !== 0) t.log(`host mappings after scan: ${m}`, f.host.mappings().map((x) => x.gpa), { from, span, chunkPages, pat: pat.length, live: f.session.stats.live, n: f.session.mappings().length });
      return m === 0;
    }), { numRuns: 60 });
  t.pass();
});

test('scan (property): regex matches equal a global regex over the concatenated RAM stretches', async (t) => {
  const f = await fixture(t, GuestMemory.anonymous(64n * KiB));
  await fc.assert(fc.asyncProperty(
    fc.integer({ min: 1, max: 2 ** 31 }), fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 5 }),
    async (seed, chunkPages, maxRun) => {
      // text over "ab." with runs of a/b; regex: a run of 'a' then 'b' (bounded length)
      const bytes = pseudoRandom(64 * 1024, seed, 3).map((x) => [0x61, 0x62, 0x2e][x]!);
      f.memory.write(0n, Buffer.from(bytes));
      const re = new RegExp(`a{1,${maxRun}}b`, 'g');
      const text = Buffer.from(bytes).toString('latin1');
      const want = [...text.matchAll(re)].map((m) => BigInt(m.index!));
      const got = await scan(f.session, f.vm, { regex: new RegExp(`a{1,${maxRun}}b`), maxLength: maxRun + 1 }, { to: 64n * KiB, chunkPages });
      return got.matches.length === want.length && got.matches.every((m, i) => m === want[i]);
    }), { numRuns: 12 });
  t.pass();
});

// ---------------------------------------------------------------------------
// page tables over the synthetic guest
// ---------------------------------------------------------------------------

async function syntheticFixture(t: ExecutionContext, seed: number): Promise<Fixture & { truth: SyntheticTruth; reader: PhysicalReader }> {
  const f = await fixture(t, GuestMemory.anonymous(64n * MiB));
  const truth = buildSyntheticGuest(f.memory, { seed });
  const reader = new PhysicalReader(f.session, f.vm, { cachePages: 64 });
  t.teardown(() => reader.close());
  return { ...f, truth, reader };
}

test('synthetic guest: deterministic for a seed, different for another', (t) => {
  const a = GuestMemory.anonymous(64n * MiB);
  const b = GuestMemory.anonymous(64n * MiB);
  const c = GuestMemory.anonymous(64n * MiB);
  try {
    const ta = buildSyntheticGuest(a, { seed: 42 });
    const tb = buildSyntheticGuest(b, { seed: 42 });
    const tc = buildSyntheticGuest(c, { seed: 43 });
    t.deepEqual(ta, tb);
    t.true(a.read(0n, 64 * 1024 * 1024).equals(b.read(0n, 64 * 1024 * 1024)), 'byte-identical memory');
    t.not(ta.bannerGpa, tc.bannerGpa);
    t.true(ta.banner.startsWith('Linux version 6.1.0-kvmmem-synthetic (kvmmem@model)'));
    t.true(ta.banner.includes('#1 SMP PREEMPT_DYNAMIC'));
    const sizes = new Set(ta.translations.map((x) => x.pageSize));
    t.deepEqual([...sizes].sort((x, y) => x - y), [4096, 2097152, 1073741824]);
  } finally {
    a.close(); b.close(); c.close();
  }
});

for (const seed of [1, 2, 0xdecaf]) {
  test(`translate (seed ${seed}): every truth translation (4 KiB, 2 MiB, 1 GiB), through PhysicalReader over the socket`, async (t) => {
    const f = await syntheticFixture(t, seed);
    for (const x of f.truth.translations) {
      const got = await translate(f.reader, f.truth.cr3, x.va);
      t.is(got.gpa, x.gpa, `va 0x${x.va.toString(16)}`);
      t.is(got.pageSize, x.pageSize);
      t.is(got.entries.length, x.pageSize === 4096 ? 4 : x.pageSize === 2097152 ? 3 : 2);
    }
    // PCID bits and flags in CR3 are ignored
    const k = f.truth.translations[0]!;
    t.is((await translate(f.reader, f.truth.cr3 | 0x5n, k.va)).gpa, k.gpa);
    // the direct map reaches every byte
    t.is((await translate(f.reader, f.truth.cr3, f.truth.layout.pageOffset + f.truth.bannerGpa)).gpa, f.truth.bannerGpa);
  });
}

test('translate: a missing entry names its level, entry gpa and value; non-canonical addresses are refused', async (t) => {
  const f = await syntheticFixture(t, 7);
  t.deepEqual(f.truth.notPresent.map((x) => x.level), ['PML4', 'PDPT', 'PD', 'PT']);
  for (const x of f.truth.notPresent) {
    const e = await t.throwsAsync(translate(f.reader, f.truth.cr3, x.va), { instanceOf: TranslationError, code: 'ERR_PAGE_NOT_PRESENT' });
    t.is(e!.level, x.level);
    t.is(e!.va, x.va);
    t.is(await f.reader.readU64(e!.entryGpa!), e!.entryValue!);
    t.is(e!.entryValue! & 1n, 0n);
    t.regex(e!.message, new RegExp(`${x.level} entry at gpa 0x[0-9a-f]+ is not present`));
  }
  const swapped = f.truth.notPresent.find((x) => x.level === 'PT')!;
  const e = await t.throwsAsync(translate(f.reader, f.truth.cr3, swapped.va), { instanceOf: TranslationError });
  t.not(e!.entryValue, 0n, 'a not-present PTE with other bits set (like a swap entry)');
  const nc = await t.throwsAsync(translate(f.reader, f.truth.cr3, 0x0000_8000_0000_0000n), { instanceOf: TranslationError, code: 'ERR_NON_CANONICAL' });
  t.is(nc!.level, undefined);
  await t.throwsAsync(readVirtual(f.reader, f.truth.cr3, 0xffff_7fff_ffff_f000n, 16), { code: 'ERR_NON_CANONICAL' });
  t.true(isCanonical(0xffff_8000_0000_0000n));
  t.false(isCanonical(0xff00_8000_0000_0000n));
  t.true(isCanonical(0xff00_8000_0000_0000n, 5));
  t.is(canonical(0x8000_0000_0000n), 0xffff_8000_0000_0000n);
  await t.throwsAsync(translate(f.reader, f.truth.cr3, 0n, { levels: 3 as never }), { code: 'ERR_INVALID_ARG' });
});

test('readVirtual: the banner, a task comm straddling two non-adjacent frames, and the whole task list', async (t) => {
  const f = await syntheticFixture(t, 11);
  const { truth, reader } = f;
  const banner = await readVirtual(reader, truth.cr3, truth.bannerVa, truth.banner.length + 1);
  t.is(banner.toString('latin1'), truth.banner + '\n');
  const L = truth.taskLayout;
  const straddler = truth.tasks[1]!;
  const commVa = straddler.va + BigInt(L.comm);
  t.true((commVa & 0xfffn) > 4096n - 16n, 'comm crosses a virtual page boundary');
  const commGpa1 = (await translate(reader, truth.cr3, commVa)).gpa;
  const commGpa2 = (await translate(reader, truth.cr3, (commVa | 0xfffn) + 1n)).gpa;
  t.not(commGpa2, commGpa1 + (4096n - (commVa & 0xfffn)), 'the two frames are not adjacent');
  const comm = await readVirtual(reader, truth.cr3, commVa, L.commLength);
  t.is(comm.toString('latin1').replace(/\0.*$/s, ''), straddler.comm);

  // walk the circular list both ways through an AddressSpace
  const as = new AddressSpace(reader, truth.cr3);
  const seen: { va: bigint; pid: number; comm: string }[] = [];
  let va = truth.tasks[0]!.va;
  do {
    seen.push({ va, pid: await as.readU32(va + BigInt(L.pid)), comm: await as.readCString(va + BigInt(L.comm), L.commLength) });
    va = await as.readU64(va + BigInt(L.next));
  } while (va !== truth.tasks[0]!.va && seen.length <= truth.tasks.length);
  t.deepEqual(seen, truth.tasks.map((x) => ({ va: x.va, pid: x.pid, comm: x.comm })));
  const back: bigint[] = [];
  va = truth.tasks[0]!.va;
  do {
    back.push(va);
    va = await as.readU64(va + BigInt(L.prev));
  } while (va !== truth.tasks[0]!.va && back.length <= truth.tasks.length);
  t.deepEqual(back, [truth.tasks[0]!.va, ...truth.tasks.slice(1).map((x) => x.va).reverse()]);
  for (const task of truth.tasks) t.is(await as.gpaOf(task.va), task.gpa);
  t.is(await as.gpaOf(truth.notPresent[0]!.va), null);

  // the banner is found by a physical scan too, exactly once
  const found = await scan(f.session, f.vm, truth.banner, { to: 64n * MiB });
  t.deepEqual(found.matches, [truth.bannerGpa]);
});

test('PhysicalReader: pages revoked by an unhook are dropped, the next lookup says why, close() still works', async (t) => {
  const memory = GuestMemory.anonymous(1n * MiB);
  const f = await fixture(t, memory);
  const r = new PhysicalReader(f.session, f.vm, { cachePages: 8 });
  await r.read(0n, 3 * 4096);
  await r.page(0x10_000n);
  t.is(f.host.stats().mappings, 4);
  const mvm = f.host.findVm(f.vm.uuid)!;
  mvm.unhook();
  t.is(f.host.stats().mappings, 0, 'the host revoked every page of the VM');
  // the tool learns it when the KVMI connection closes
  for (let i = 0; i < 200 && f.vm.state === 'connected'; i++) await new Promise((res) => setTimeout(res, 10));
  t.not(f.vm.state, 'connected');
  t.false(r.has(0n), 'the session revoked the cached pages');
  await t.throwsAsync(r.page(0n), { code: 'VM_GONE' });
  t.notThrows(() => r.close());
  t.is(r.stats.held, 0);
  await t.throwsAsync(scan(f.session, f.vm, 'x', { to: 1n * MiB }), { code: 'VM_GONE' });
});
