// PageIndex (src/model/page-index.ts), the 2 MiB chunked page index under the
// driver's map_list and the host's list of mappings: checked against a plain
// Map model with fast-check, plus its contract edges (spare reuse, misuse).
import test from 'ava';
import fc from 'fast-check';
import { CHUNK_BYTES, CHUNK_PAGES, PageIndex, pageSlot } from '../src/model/page-index.js';

const PS = 4096;
const USER_LIMIT = 0x7ffffffff000;
const chunkKey = (a: number) => Math.floor(a / CHUNK_BYTES);

/**
 * An owner as the driver and host are: one counter cell per page, so a chunk's
 * cells are all 0 again when its last entry goes (the contract for reuse).
 */
class CountingOwner {
  made = 0;
  readonly index = new PageIndex<Int32Array>(() => {
    this.made++;
    return new Int32Array(CHUNK_PAGES);
  });
  add(a: number): void { this.index.add(a)[pageSlot(a)]!++; }
  remove(a: number): void {
    this.index.chunk(a)![pageSlot(a)]!--;
    this.index.remove(a);
  }
}

// Addresses from a few chunks (adjacent ones, one far away, the last below the
// user limit), any page in them, any offset in the page.
const addrArb = fc.tuple(
  fc.constantFrom(0, 1, 2, 7, 4096, chunkKey(USER_LIMIT - 1)),
  fc.integer({ min: 0, max: CHUNK_PAGES - 1 }),
  fc.constantFrom(0, 0, 1, 0x800, PS - 1),
).map(([key, page, off]) => Math.min(key * CHUNK_BYTES + page * PS + off, USER_LIMIT - 1));
type Op = { add: true; a: number } | { add: false; pick: number };
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 3, arbitrary: addrArb.map((a) => ({ add: true as const, a })) },
  { weight: 2, arbitrary: fc.nat().map((pick) => ({ add: false as const, pick })) },
);

test('pageSlot: the page of an address within its 2 MiB chunk', (t) => {
  fc.assert(fc.property(fc.integer({ min: 0, max: USER_LIMIT - 1 }), (a) => {
    const s = pageSlot(a);
    return Number.isInteger(s) && s >= 0 && s < CHUNK_PAGES && chunkKey(a) * CHUNK_BYTES + s * PS + (a % PS) === a;
  }), { numRuns: 1000 });
  t.is(CHUNK_BYTES, 2 * 1024 * 1024);
  t.is(pageSlot(CHUNK_BYTES - 1), CHUNK_PAGES - 1);
  t.is(pageSlot(CHUNK_BYTES), 0);
  t.is(pageSlot(USER_LIMIT - 1), CHUNK_PAGES - 2, 'the last user page lies one page below 2^47');
});

test('property: any sequence of add/remove answers as a Map of per-page counts, and reuses the chunk that emptied last', (t) => {
  fc.assert(fc.property(fc.array(opArb, { maxLength: 120 }), (ops) => {
    const o = new CountingOwner();
    const model = new Map<number, number>(); // page -> entries
    const chunkOf = new Map<number, Int32Array>(); // key -> the chunk object, while it holds entries
    let spare: Int32Array | undefined, made = 0;
    const live: number[] = []; // addresses added and not removed yet
    const touched = new Set<number>();
    for (const op of ops) {
      let a: number;
      const perChunkBefore = (k: number) => [...model].reduce((n, [p, c]) => n + (chunkKey(p) === k ? c : 0), 0);
      if (op.add) {
        a = op.a;
        const k = chunkKey(a);
        const fresh = perChunkBefore(k) === 0;
        o.add(a);
        const c = o.index.chunk(a)!;
        if (fresh) {
          // a new chunk: the spare if there is one, else a newly made one
          if (spare !== undefined ? c !== spare : o.made !== ++made) return false;
          spare = undefined;
          chunkOf.set(k, c);
        } else if (c !== chunkOf.get(k)) return false;
        live.push(a);
      } else {
        if (live.length === 0) continue;
        a = live.splice(op.pick % live.length, 1)[0]!;
        o.remove(a);
        const k = chunkKey(a);
        if (perChunkBefore(k) === 1) {
          spare = chunkOf.get(k);
          chunkOf.delete(k);
        }
      }
      if (o.made !== made) return false;
      touched.add(a);
      const page = a - (a % PS);
      model.set(page, (model.get(page) ?? 0) + (op.add ? 1 : -1));
      // After every step: size, per-chunk presence, per-page cells, the chunk list.
      let total = 0;
      for (const n of model.values()) total += n;
      if (o.index.size !== total) return false;
      for (const x of touched) {
        const c = o.index.chunk(x);
        if (c !== chunkOf.get(chunkKey(x))) return false;
        if (c !== undefined && c[pageSlot(x)] !== (model.get(x - (x % PS)) ?? 0)) return false;
      }
      const listed = [...o.index.chunks()];
      if (listed.length !== chunkOf.size) return false;
      for (const [base, c] of listed) if (base % CHUNK_BYTES !== 0 || chunkOf.get(base / CHUNK_BYTES) !== c) return false;
    }
    return true;
  }), { numRuns: 300 });
  t.pass('checked by fast-check: a counterexample fails this test before here');
});

test('property: one chunk object per 2 MiB while it holds entries, shared by all its addresses', (t) => {
  fc.assert(fc.property(fc.array(addrArb, { minLength: 1, maxLength: 40 }), (addrs) => {
    const o = new CountingOwner();
    const byKey = new Map<number, Int32Array>();
    for (const a of addrs) {
      const c = o.index.add(a);
      const seen = byKey.get(chunkKey(a));
      if (seen !== undefined && seen !== c) return false;
      byKey.set(chunkKey(a), c);
    }
    for (const a of addrs) if (o.index.chunk(a) !== byKey.get(chunkKey(a))) return false;
    // distinct keys, distinct chunks; and the index made exactly one per key
    return new Set(byKey.values()).size === byKey.size && o.made === byKey.size && o.index.size === addrs.length;
  }), { numRuns: 200 });
  t.pass('checked by fast-check: a counterexample fails this test before here');
});

test('a MAP/UNMAP pair on a fresh 2 MiB allocates nothing: the emptied chunk is the next new one', (t) => {
  const o = new CountingOwner();
  o.add(0x1000);
  const first = o.index.chunk(0x1000)!;
  o.remove(0x1000);
  t.is(o.index.chunk(0x1000), undefined, 'the chunk went with its last entry');
  t.is(o.index.size, 0);
  o.add(40 * CHUNK_BYTES + 0x3000);
  t.is(o.index.chunk(40 * CHUNK_BYTES), first, 'reused for another 2 MiB');
  t.is(o.made, 1);
  t.deepEqual([...o.index.chunks()].map(([b]) => b), [40 * CHUNK_BYTES]);
});

test('remove() where nothing is counted is an owner bug: it throws and changes nothing', (t) => {
  const o = new CountingOwner();
  o.add(CHUNK_BYTES + 5);
  t.throws(() => o.index.remove(0x1000), { message: /no entry is counted in the chunk of 0x1000/ });
  t.is(o.index.size, 1);
  t.not(o.index.chunk(CHUNK_BYTES), undefined);
});

test('clear() forgets every chunk and the spare', (t) => {
  const o = new CountingOwner();
  o.add(0);
  o.add(CHUNK_BYTES);
  o.remove(CHUNK_BYTES); // (a spare now)
  o.index.clear();
  t.is(o.index.size, 0);
  t.is(o.index.chunk(0), undefined);
  t.deepEqual([...o.index.chunks()], []);
  o.add(3 * CHUNK_BYTES);
  t.is(o.made, 3, 'a new chunk: the spare went with clear()');
});
