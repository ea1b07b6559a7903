// Property: random sequences of open / MAP / UNMAP / batch MAP / batch UNMAP /
// close / unhook / rehook over two driver files and two VMs behave exactly like
// a small reference state machine (the driver lists of RFC v4 kvmi_mem_guest.c, the host's
// {page, VM, gpa} list, tokens), checked after every step, including which
// introspector pages alias which guest page, live in both directions.
import test from 'ava';
import fc from 'fast-check';
import * as net from 'node:net';
import * as libc from '../src/sys/libc.js';
import { Window } from '../src/sys/window.js';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP, X86_64_USER_LIMIT, encodeMemMap } from '../src/abi/index.js';
import { ClosedError } from '../src/errors.js';
import { ModelHost, type ModelDevice, type ModelVm } from '../src/model/index.js';
import { adoptSocket } from '../src/model/sockets.js';
import { errnoOf, sinkAcceptor } from './helpers.js';

const PS = 4096;
const WPAGES = 6;
const VM_PAGES = [8, 6];
const RUNS = Number(process.env.KVMMEM_PROPERTY_RUNS ?? 1000);

// ---- operations ----

/** 0..5: window pages; 'H': a page in no mapping; 'U': a page never faulted in; 'L': past the user limit. */
type Where = number | 'H' | 'U' | 'L';
interface Addr { where: Where; off: number }
type Tok = 'fresh' | 'replay' | 'forged';
interface MapArgs { addr: Addr; vm: number; gpaPage: number; gpaOff: number; tok: Tok }
type Op =
  | { kind: 'open'; f: number }
  | { kind: 'close'; f: number }
  | ({ kind: 'map'; f: number } & MapArgs)
  | { kind: 'unmap'; f: number; addr: Addr }
  | { kind: 'batchMap'; f: number; items: MapArgs[] }
  | { kind: 'batchUnmap'; f: number; addrs: Addr[] }
  | { kind: 'unhook'; vm: number }
  | { kind: 'rehook'; vm: number };

const addrArb: fc.Arbitrary<Addr> = fc.record({
  where: fc.oneof(
    { weight: 8, arbitrary: fc.integer({ min: 0, max: WPAGES - 1 }) },
    { weight: 1, arbitrary: fc.constantFrom<Where>('H', 'U', 'L') },
  ),
  off: fc.constantFrom(0, 0, 0, 0x10),
});
const mapArgsArb: fc.Arbitrary<MapArgs> = fc.record({
  addr: addrArb,
  vm: fc.integer({ min: 0, max: 1 }),
  gpaPage: fc.integer({ min: 0, max: 9 }), // 8 and 9 are outside both VMs, 6 and 7 outside B
  gpaOff: fc.constantFrom(0, 0, 0x123),
  tok: fc.constantFrom<Tok>('fresh', 'fresh', 'fresh', 'fresh', 'replay', 'forged'),
});
const fArb = fc.integer({ min: 0, max: 1 });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('open' as const), f: fArb }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('close' as const), f: fArb }) },
  { weight: 8, arbitrary: fc.tuple(fArb, mapArgsArb).map(([f, m]) => ({ kind: 'map' as const, f, ...m })) },
  { weight: 5, arbitrary: fc.record({ kind: fc.constant('unmap' as const), f: fArb, addr: addrArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('batchMap' as const), f: fArb, items: fc.array(mapArgsArb, { minLength: 1, maxLength: 6 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('batchUnmap' as const), f: fArb, addrs: fc.array(addrArb, { minLength: 1, maxLength: 6 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('unhook' as const), vm: fc.integer({ min: 0, max: 1 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('rehook' as const), vm: fc.integer({ min: 0, max: 1 }) }) },
);

// ---- the reference state machine ----

interface RefEntry { gpa: bigint; vaddr: bigint; paddr: bigint }
class Ref {
  files: { open: boolean; list: RefEntry[] }[] = [{ open: false, list: [] }, { open: false, list: [] }];
  /** introspector page -> { vm, gpa page } */
  host = new Map<bigint, { vm: number; gpa: bigint }>();
  hooked = [true, true];
  outstanding: Set<string>[] = [new Set(), new Set()];
  /** Contents of window pages that are not mapped: the original fill, or a fresh zero page. */
  pageState: ('orig' | 'zero')[] = new Array(WPAGES).fill('orig');

  /** KVM_HC_MEM_UNMAP */
  unmapHc(paddr: bigint, pageIndex: (p: bigint) => number): void {
    if (this.host.delete(paddr)) this.pageState[pageIndex(paddr)] = 'zero';
  }
}

// ---- the real thing ----

interface World {
  host: ModelHost;
  vms: ModelVm[];
  win: Window;
  hole: number;
  untouched: number;
  connect(): Promise<net.Socket>;
}

const ORIG = 0xee;
const origPage = Buffer.alloc(PS, ORIG);
const zeroPage = Buffer.alloc(PS);
const tag = (vm: number, page: number) => `vm${vm}:page:${page}`.padEnd(16, '.');

async function makeWorld(): Promise<World & { dispose(): void }> {
  const host = new ModelHost({ tokenTtlMs: 3_600_000 }); // v6 limit of 8; no expiry during a run
  const sink = await sinkAcceptor('prop');
  const vms = VM_PAGES.map((n, i) => host.createVm({ name: `vm${i}`, memory: n * PS }));
  const win = Window.alloc(WPAGES * PS);
  const untouched = libc.mmap(0, PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  return {
    host, vms, win, hole: lowHole(), untouched,
    connect: sink.connect,
    dispose: () => {
      host.close();
      win.free();
      libc.munmap(untouched, PS);
      sink.close();
    },
  };
}

/**
 * A page in no mapping that nobody will map meanwhile: below the (non-PIE)
 * executable, where the kernel's top-down mmap allocator never goes. (A gap
 * between our own pages would be the first place the next 1-page mmap lands.)
 */
function lowHole(): number {
  const v = new Uint8Array(1);
  for (let a = 0x100000; a < 0x400000; a += PS) if (!libc.mincore(a, PS, v)) return a;
  throw new Error('test setup: no unmapped page below 4 MiB');
}

function addrOf(w: World, a: Addr): bigint {
  if (a.where === 'H') return BigInt(w.hole + a.off);
  if (a.where === 'U') return BigInt(w.untouched + a.off);
  if (a.where === 'L') return X86_64_USER_LIMIT - 4096n + 1n + BigInt(a.off);
  return BigInt(w.win.address + a.where * PS + a.off);
}

const hexOf = (tk: Uint8Array) => Buffer.from(tk).toString('hex');
const forged = () => new Uint8Array(32).fill(0x5a);

/** Runs one op on both the model and the reference; throws (an assertion) on any difference. */
class Runner {
  readonly devs: (ModelDevice | null)[] = [null, null];
  readonly used: Uint8Array[] = [];
  constructor(readonly w: World, readonly ref: Ref, readonly log: string[]) {}

  pageIndex = (p: bigint) => Number((p - BigInt(this.w.win.address)) / BigInt(PS));

  /** Get a token as the op asks, mirroring what the host must answer. */
  token(vm: number, kind: Tok): Uint8Array {
    const { ref } = this;
    if (kind === 'forged' || (kind === 'replay' && this.used.length === 0)) return forged();
    if (kind === 'replay') return this.used[this.used.length - 1]!;
    const v = this.w.vms[vm]!;
    if (!ref.hooked[vm]) {
      expectThrows(() => v.getMapToken(), 'ENOTCONN');
      return forged();
    }
    if (ref.outstanding[vm]!.size >= 8) {
      expectThrows(() => v.getMapToken(), 'EAGAIN');
      return forged();
    }
    const tk = v.getMapToken();
    ref.outstanding[vm]!.add(hexOf(tk));
    return tk;
  }

  /** The reference MAP (driver + host) for one record; returns the expected result. */
  refMap(f: number, m: MapArgs, token: Uint8Array, gva: bigint): number {
    const { ref } = this;
    const file = ref.files[f]!;
    if (gva + 4096n > X86_64_USER_LIMIT) return -22; // access_ok
    const gpa = BigInt(m.gpaPage * PS + m.gpaOff);
    if (m.addr.where === 'H' || m.addr.where === 'U') { // find_vma / follow_page NULL: 0, no hypercall
      file.list.push({ gpa, vaddr: gva, paddr: 0n });
      return 0;
    }
    // KVM_HC_MEM_MAP
    const hex = hexOf(token);
    const owner = ref.outstanding.findIndex((s) => s.has(hex));
    if (owner < 0) return -2;
    ref.outstanding[owner]!.delete(hex);
    this.used.push(token);
    if (!ref.hooked[owner]) return -2;
    const gpaPage = BigInt(m.gpaPage * PS);
    if (m.gpaPage >= VM_PAGES[owner]!) return -14;
    const page = gva - (gva % 4096n);
    if (ref.host.has(page)) return -114;
    ref.host.set(page, { vm: owner, gpa: gpaPage });
    file.list.push({ gpa, vaddr: gva, paddr: page });
    return 0;
  }

  refUnmap(f: number, vaddr: bigint): number {
    const file = this.ref.files[f]!;
    const i = file.list.findIndex((e) => e.vaddr === vaddr); // the C list walk
    if (i < 0) return -2;
    const [e] = file.list.splice(i, 1);
    this.ref.unmapHc(e!.paddr, this.pageIndex);
    return 0;
  }

  async step(op: Op): Promise<void> {
    const { w, ref } = this;
    switch (op.kind) {
      case 'open': {
        if (ref.files[op.f]!.open) return;
        this.devs[op.f] = w.host.openDevice();
        ref.files[op.f] = { open: true, list: [] };
        return;
      }
      case 'close': {
        const dev = this.devs[op.f];
        if (dev === null || dev === undefined) return;
        dev.close();
        const file = ref.files[op.f]!;
        if (file.open) for (const e of file.list) ref.unmapHc(e.paddr, this.pageIndex);
        ref.files[op.f] = { open: false, list: [] };
        return;
      }
      case 'map': {
        const dev = this.devs[op.f];
        if (!dev) return;
        if (op.addr.where === 'H') assertHole(w);
        const token = this.token(op.vm, op.tok);
        const gva = addrOf(w, op.addr);
        const buf = encodeMemMap({ token, gpa: BigInt(op.gpaPage * PS + op.gpaOff), gva });
        if (!ref.files[op.f]!.open) {
          expectThrows(() => dev.ioctl(KVM_INTRO_MEM_MAP, buf), 'closed');
          return;
        }
        const want = this.refMap(op.f, op, token, gva);
        eq(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, buf)), want, 'MAP result');
        return;
      }
      case 'unmap': {
        const dev = this.devs[op.f];
        if (!dev) return;
        const vaddr = addrOf(w, op.addr);
        if (!ref.files[op.f]!.open) {
          expectThrows(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, vaddr), 'closed');
          return;
        }
        eq(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, vaddr)), this.refUnmap(op.f, vaddr), 'UNMAP result');
        return;
      }
      case 'batchMap': {
        const dev = this.devs[op.f];
        if (!dev || !ref.files[op.f]!.open) return;
        if (op.items.some((m) => m.addr.where === 'H')) assertHole(w);
        const buf = Buffer.alloc(48 * op.items.length);
        // Every token is fetched before the batch consumes any (as a caller must do it),
        // so the reference counts them all outstanding before it plays the records.
        const tokens = op.items.map((m) => this.token(m.vm, m.tok));
        const want = op.items.map((m, i) => {
          const gva = addrOf(w, m.addr);
          encodeMemMap({ token: tokens[i]!, gpa: BigInt(m.gpaPage * PS + m.gpaOff), gva }, buf, 48 * i);
          return this.refMap(op.f, m, tokens[i]!, gva);
        });
        const res = new Int32Array(op.items.length);
        const ok = dev.ioctlBatch(KVM_INTRO_MEM_MAP, buf, 48, op.items.length, res);
        eq([...res], want, 'batch MAP results');
        eq(ok, want.filter((r) => r === 0).length, 'batch MAP count');
        return;
      }
      case 'batchUnmap': {
        const dev = this.devs[op.f];
        if (!dev || !ref.files[op.f]!.open) return;
        const vals = Buffer.alloc(8 * op.addrs.length);
        const want = op.addrs.map((a, i) => {
          const v = addrOf(w, a);
          vals.writeBigUInt64LE(v, 8 * i);
          return this.refUnmap(op.f, v);
        });
        const res = new Int32Array(op.addrs.length);
        dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, vals, 0, op.addrs.length, res);
        eq([...res], want, 'batch UNMAP results');
        return;
      }
      case 'unhook': {
        eq(w.vms[op.vm]!.unhook(), 0, 'UNHOOK');
        for (const [page, m] of [...ref.host]) if (m.vm === op.vm) ref.unmapHc(page, this.pageIndex);
        ref.outstanding[op.vm]!.clear();
        ref.hooked[op.vm] = false;
        return;
      }
      case 'rehook': {
        if (ref.hooked[op.vm]) return;
        w.vms[op.vm]!.hook({ fd: adoptSocket(await w.connect()) });
        ref.hooked[op.vm] = true;
        return;
      }
    }
  }

  /** Compares everything observable with the reference. */
  check(): void {
    const { w, ref } = this;
    ref.files.forEach((file, f) => {
      const dev = this.devs[f];
      if (file.open) eq(dev!.mappings(), file.list, `driver list of file ${f}`);
      else if (dev) eq(dev.closed, true, `file ${f} closed`);
    });
    const host = w.host.mappings().map((m) => ({ page: m.introspectorPage, vm: w.vms.indexOf(m.vm), gpa: m.gpa }))
      .sort((a, b) => (a.page < b.page ? -1 : 1));
    const want = [...ref.host].map(([page, m]) => ({ page, vm: m.vm, gpa: m.gpa })).sort((a, b) => (a.page < b.page ? -1 : 1));
    eq(host, want, 'host list');
    const stats = w.host.stats();
    eq(stats.mappings, ref.host.size, 'host mapping counter');
    eq(stats.vms.map((v) => [v.hooked, v.tokensOutstanding, v.mappings]),
      [0, 1].map((i) => [ref.hooked[i], ref.outstanding[i]!.size, [...ref.host.values()].filter((m) => m.vm === i).length]), 'per-VM stats');
    // Page contents: aliases are live both ways; the others are the original fill or a fresh zero page.
    const buf = w.win.buffer!;
    for (let i = 0; i < WPAGES; i++) {
      const page = BigInt(w.win.address + i * PS);
      const m = ref.host.get(page);
      const view = buf.subarray(i * PS, (i + 1) * PS);
      if (m !== undefined) {
        const vm = w.vms[m.vm]!;
        eq(view.toString('latin1', 0, 16), tag(m.vm, Number(m.gpa / 4096n)), `page ${i} shows vm${m.vm} gpa ${m.gpa}`);
        const x = 1 + ((i * 37 + Number(m.gpa)) % 250);
        view[100 + i] = x; // introspector -> guest
        eq(vm.memory.read(m.gpa + BigInt(100 + i), 1)[0], x, `write through page ${i} reaches the guest`);
        vm.memory.write(m.gpa + 200n, Buffer.from([x])); // guest -> introspector
        eq(view[200], x, `guest write visible in page ${i}`);
        view[100 + i] = 0;
        vm.memory.write(m.gpa + 200n, Buffer.from([0]));
      } else {
        const expect = ref.pageState[i] === 'orig' ? origPage : zeroPage;
        eq(view.equals(expect), true, `page ${i} is ${ref.pageState[i]}`);
      }
    }
  }
}

function eq(actual: unknown, expected: unknown, what: string): void {
  const a = JSON.stringify(actual, big), b = JSON.stringify(expected, big);
  if (a !== b) throw new Error(`${what}: got ${a}, expected ${b}`);
}
const big = (_k: string, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v);


function expectThrows(fn: () => unknown, code: 'closed' | string): void {
  try {
    fn();
  } catch (e) {
    if (code === 'closed' ? e instanceof ClosedError : (e as { code?: string }).code === code) return;
    throw new Error(`expected ${code}, got ${String(e)}`);
  }
  throw new Error(`expected ${code}, got success`);
}

function assertHole(w: World): void {
  const v = new Uint8Array(1);
  if (libc.mincore(w.hole, PS, v)) throw new Error('test setup: the hole page got mapped by someone else');
}

/** Back to the initial state between runs: no files, no mappings, both VMs hooked afresh, pages refilled. */
async function reset(w: World, devs: (ModelDevice | null)[]): Promise<void> {
  for (const d of devs) d?.close();
  if (w.host.stats().mappings !== 0) throw new Error('closing every file must leave the host with zero mappings');
  for (const vm of w.vms) {
    vm.unhook();
    vm.hook({ fd: adoptSocket(await w.connect()) });
  }
  w.win.buffer!.fill(ORIG);
  w.vms.forEach((vm, i) => {
    vm.memory.write(0n, Buffer.alloc(VM_PAGES[i]! * PS));
    for (let p = 0; p < VM_PAGES[i]!; p++) vm.memory.write(BigInt(p * PS), Buffer.from(tag(i, p)));
  });
}

test.serial(`model = reference state machine over random op sequences (${RUNS} runs)`, async (t) => {
  const world = await makeWorld();
  t.teardown(() => world.dispose());
  let last: Runner | null = null;
  let runs = 0, steps = 0;
  const started = Date.now();
  await fc.assert(
    fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40, size: 'medium' }), async (ops) => {
      await reset(world, last?.devs ?? []);
      const log: string[] = [];
      const r = new Runner(world, new Ref(), log);
      last = r;
      runs++;
      for (const f of [0, 1]) await r.step({ kind: 'open', f }); // both files open to start with
      r.check();
      for (const op of ops) {
        log.push(JSON.stringify(op));
        await r.step(op);
        steps++;
        r.check();
      }
    }),
    {
      numRuns: RUNS, verbose: 1,
      // Replay a reported failure: KVMMEM_PROPERTY_SEED=<seed> KVMMEM_PROPERTY_PATH=<path>
      ...(process.env.KVMMEM_PROPERTY_SEED ? { seed: Number(process.env.KVMMEM_PROPERTY_SEED), path: process.env.KVMMEM_PROPERTY_PATH, endOnFailure: true } : {}),
    },
  );
  await reset(world, (last as Runner | null)?.devs ?? []);
  t.log(`${runs} runs, ${steps} steps checked in ${Date.now() - started} ms (native batch helper: ${libc.batchAvailable()})`);
  t.is(world.host.stats().mappings, 0);
});
