// MapList (src/model/map-list.ts), the driver's fmp->map_list, against the C
// data structure it replaces: a plain array in list order searched from the head
// (kvm_dev_ioctl_unmap's list_for_each), with fast-check.
import test from 'ava';
import fc from 'fast-check';
import { MapList, NIL, type PageMap } from '../src/model/map-list.js';
import { CHUNK_BYTES } from '../src/model/page-index.js';

const PS = 4096;

// vaddrs that collide on purpose: the same few pages, aligned or not, in two
// adjacent chunks and one far away; gpas exact and not (>= 2^53); paddr 0 = the quirk.
const vaddrArb = fc.tuple(
  fc.constantFrom(0, CHUNK_BYTES - PS, CHUNK_BYTES, 0x7fff_fff0_0000),
  fc.integer({ min: 0, max: 2 }),
  fc.constantFrom(0, 0, 0, 0x10, PS - 1),
).map(([base, page, off]) => base + page * PS + off);
const gpaArb = fc.oneof(fc.bigInt({ min: 0n, max: 1n << 40n }), fc.bigInt({ min: 1n << 53n, max: (1n << 64n) - 1n }));
type Op = { kind: 'add'; gpa: bigint; vaddr: number; quirk: boolean } | { kind: 'unmap'; vaddr: number } | { kind: 'delAgain' };
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('add' as const), gpa: gpaArb, vaddr: vaddrArb, quirk: fc.boolean() }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('unmap' as const), vaddr: vaddrArb }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'delAgain' as const }) },
);

const paddrOf = (vaddr: number, quirk: boolean) => (quirk ? 0 : vaddr - (vaddr % PS));

test('property: list order, "first entry whose vaddr equals the argument", list_del and release order are the C list\'s', (t) => {
  fc.assert(fc.property(fc.array(opArb, { maxLength: 80 }), (ops) => {
    const l = new MapList();
    const c: PageMap[] = []; // the C list, head first
    let lastDeleted = NIL;
    for (const op of ops) {
      if (op.kind === 'add') {
        // (the driver passes an exact gpa as a number, a larger one as the bigint)
        const gpa = op.gpa < 1n << 53n ? Number(op.gpa) : op.gpa;
        l.list_add_tail(gpa, op.vaddr, paddrOf(op.vaddr, op.quirk));
        c.push({ gpa: op.gpa, vaddr: BigInt(op.vaddr), paddr: BigInt(paddrOf(op.vaddr, op.quirk)) });
        lastDeleted = NIL; // (its slot may be the one this entry took from the free list)
      } else if (op.kind === 'unmap') {
        const s = l.find(BigInt(op.vaddr));
        if (s !== l.findExact(op.vaddr)) return false;
        const i = c.findIndex((e) => e.vaddr === BigInt(op.vaddr)); // list_for_each from the head
        if ((s === NIL) !== (i < 0)) return false;
        if (s === NIL) continue;
        if (l.gpaOf(s) !== c[i]!.gpa || BigInt(l.paddrOf(s)) !== c[i]!.paddr) return false;
        l.list_del(s);
        c.splice(i, 1);
        lastDeleted = s;
      } else {
        l.list_del(lastDeleted); // a slot no longer listed (or NIL): ignored
      }
      const e = l.entries();
      if (l.size !== c.length || e.length !== c.length) return false;
      for (let k = 0; k < c.length; k++) {
        if (e[k]!.gpa !== c[k]!.gpa || e[k]!.vaddr !== c[k]!.vaddr || e[k]!.paddr !== c[k]!.paddr) return false;
      }
      if (l.paddrsInOrder().join() !== c.map((x) => x.paddr).join()) return false;
    }
    l.clear();
    return l.size === 0 && l.entries().length === 0 && l.find(0n) === NIL;
  }), { numRuns: 400 });
  t.pass('checked by fast-check: a counterexample fails this test before here');
});

test('find: vaddrs no entry can have are not found; an unaligned vaddr matches only itself', (t) => {
  const l = new MapList();
  const s = l.list_add_tail(7, 0x5010, 0x5000);
  t.is(l.find(0x5010n), s);
  t.is(l.find(0x5000n), NIL, 'no rounding: the C loop compares vaddrs exactly');
  t.is(l.find(0x5011n), NIL);
  t.is(l.find(1n << 60n), NIL);
  t.is(l.find((1n << 64n) - 1n), NIL);
  l.list_del(s);
  l.list_del(s);
  l.list_del(-1);
  l.list_del(99);
  t.is(l.size, 0);
  t.deepEqual(l.entries(), []);
});
