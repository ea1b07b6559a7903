// src/abi: ioctl numbers, the C cross-check, codec round trips and
// rejections, errno tables and stream framing.

import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import { Buffer } from 'node:buffer';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as abi from '../src/abi/index.js';
import { UsageError } from '../src/errors.js';
import {
  AbiDecodeError, ERRNO, FrameReader, KVMI_IDS, type KvmiFrame, type MemMap, type Qemu2Introspector,
} from '../src/abi/index.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

const hexOf = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
const bytes = (h: string): Buffer => Buffer.from(h.replace(/\s+/g, ''), 'hex');
const seq = (n: number, start = 0): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (start + i) & 0xff);

/** Runs a fast-check property; a counterexample fails the test with fast-check's report. */
function prop<Ts>(t: ExecutionContext, p: fc.IProperty<Ts>, runs = 300): void {
  fc.assert(p, { numRuns: runs });
  t.pass();
}

function throwsDecode(t: ExecutionContext, fn: () => unknown, struct: string, message?: string | RegExp): void {
  const err = t.throws(fn, { instanceOf: AbiDecodeError });
  t.is(err?.code, 'ERR_KVMI_ABI');
  t.is(err?.struct, struct);
  if (typeof message === 'string') t.is(err?.message, message);
  else if (message) t.regex(err?.message ?? '', message);
}

// ---------------------------------------------------------------- ioctl

test('ioctl numbers: literal values', (t) => {
  t.is(abi.KVM_INTRO_MEM_MAP, 0x40306901);
  t.is(abi.KVM_INTRO_MEM_UNMAP, 0x40086902);
  t.is(abi.KVMIO, 0xae);
  t.is(abi.KVM_INTROSPECTION_HOOK, 0x4018aec3);
  t.is(abi.KVM_INTROSPECTION_UNHOOK, 0xaec4);
  t.is(abi.KVM_INTROSPECTION_PREUNHOOK, 0xaecc);
});

test('ioctl numbers: through the encoders, and sizes agree with the structs', (t) => {
  t.is(abi._IOW('i', 0x01, abi.MEM_MAP_SIZE), abi.KVM_INTRO_MEM_MAP);
  t.is(abi._IOW(0x69, 0x02, 8), abi.KVM_INTRO_MEM_UNMAP);
  t.is(abi._IOW(abi.KVMIO, 0xc3, abi.HOOK_SIZE), abi.KVM_INTROSPECTION_HOOK);
  t.is(abi._IO(abi.KVMIO, 0xc4), abi.KVM_INTROSPECTION_UNHOOK);
  t.is(abi._IO(abi.KVMIO, 0xcc), abi.KVM_INTROSPECTION_PREUNHOOK);
  t.deepEqual(abi.decodeIoctl(abi.KVM_INTRO_MEM_MAP), { dir: abi.IOC_WRITE, type: 0x69, nr: 1, size: 48 });
  t.deepEqual(abi.decodeIoctl(abi.KVM_INTROSPECTION_HOOK), { dir: abi.IOC_WRITE, type: 0xae, nr: 0xc3, size: 24 });
  t.deepEqual(abi.decodeIoctl(abi.KVM_INTROSPECTION_PREUNHOOK), { dir: abi.IOC_NONE, type: 0xae, nr: 0xcc, size: 0 });
  // Well-known mainline numbers as an independent check of the bit layout.
  t.is(abi._IO(abi.KVMIO, 0x00), 0xae00); // KVM_GET_API_VERSION
  t.is(abi._IOWR(abi.KVMIO, 0x02, 4), 0xc004ae02); // KVM_GET_MSR_INDEX_LIST
  t.is(abi._IOR('T', 0x13, 8), 0x80085413); // TIOCGWINSZ
});

test('_IOC: unsigned 32-bit result at the top of every field', (t) => {
  t.is(abi._IOC(3, 0xff, 0xff, 0x3fff), 0xffffffff);
  t.is(abi._IOC(abi.IOC_READ, 0, 0, 0), 0x80000000);
  t.true(abi._IOWR(abi.KVMIO, 0xff, 0x3fff) > 0);
});

test('_IOC: out-of-range fields are UsageErrors', (t) => {
  for (const fn of [
    () => abi._IOC(4, 'i', 0, 0),
    () => abi._IOC(-1, 'i', 0, 0),
    () => abi._IOC(0, 256, 0, 0),
    () => abi._IOC(0, 'ab', 0, 0),
    () => abi._IOC(0, '', 0, 0),
    () => abi._IOC(0, '\u0100', 0, 0),
    () => abi._IOC(0, 'i', 256, 0),
    () => abi._IOC(0, 'i', 1.5, 0),
    () => abi._IOC(0, 'i', 0, 0x4000),
    () => abi._IOW('i', 0, -1),
    () => abi.decodeIoctl(2 ** 32),
    () => abi.decodeIoctl(0.5),
  ]) {
    t.throws(fn, { instanceOf: UsageError });
  }
});

test('decodeIoctl inverts _IOC (property), also for int32-reinterpreted numbers', (t) => {
  prop(t, fc.property(
    fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 255 }),
    fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 0x3fff }),
    (dir, type, nr, size) => {
      const req = abi._IOC(dir, type, nr, size);
      const expected = { dir, type, nr, size };
      return req >= 0 && req <= 0xffffffff
        && JSON.stringify(abi.decodeIoctl(req)) === JSON.stringify(expected)
        && JSON.stringify(abi.decodeIoctl(req | 0)) === JSON.stringify(expected);
    },
  ));
});

test('ioctlName', (t) => {
  t.is(abi.ioctlName(abi.KVM_INTRO_MEM_MAP), 'KVM_INTRO_MEM_MAP');
  t.is(abi.ioctlName(abi.KVM_INTRO_MEM_UNMAP), 'KVM_INTRO_MEM_UNMAP');
  t.is(abi.ioctlName(abi.KVM_INTROSPECTION_HOOK), 'KVM_INTROSPECTION_HOOK');
  t.is(abi.ioctlName(abi.KVM_INTROSPECTION_UNHOOK), 'KVM_INTROSPECTION_UNHOOK');
  t.is(abi.ioctlName(abi.KVM_INTROSPECTION_PREUNHOOK), 'KVM_INTROSPECTION_PREUNHOOK');
  t.is(abi.ioctlName(0x40086903), 'KVM_GUEST_MEM_UNMAP (v2)'); // libkvmi's v2 device, named for the probe's message
  t.is(abi.ioctlName(0x40086904), '0x40086904');
  t.is(abi.ioctlName(0x5401), '0x00005401');
  t.is(abi.ioctlName(abi._IOWR('i', 1, 48) | 0), '0xc0306901');
});

test('hypercall numbers and KVM_E* values', (t) => {
  t.is(abi.KVM_HC_MEM_MAP, 32);
  t.is(abi.KVM_HC_MEM_UNMAP, 33);
  t.is(abi.KVM_HC_XEN_HVM_OP, 34);
  t.is(abi.hypercallName(32), 'KVM_HC_MEM_MAP');
  t.is(abi.hypercallName(33), 'KVM_HC_MEM_UNMAP');
  t.is(abi.hypercallName(34), 'KVM_HC_XEN_HVM_OP');
  t.is(abi.hypercallName(5), 'KVM_HC_KICK_CPU');
  t.is(abi.hypercallName(99), 'hypercall 99');
  const kvmE = {
    KVM_ENOSYS: 1000, KVM_EFAULT: 14, KVM_EPERM: 1, KVM_EAGAIN: 11, KVM_EBUSY: 16,
    KVM_EINVAL: 22, KVM_ENOENT: 2, KVM_ENOMEM: 12, KVM_EOPNOTSUPP: 95, KVM_E2BIG: 7,
  };
  for (const [name, value] of Object.entries(kvmE)) t.is((abi as Record<string, unknown>)[name], value, name);
  // Apart from KVM_ENOSYS they are plain Linux errnos.
  for (const [name, value] of Object.entries(kvmE)) {
    if (name !== 'KVM_ENOSYS') t.is(ERRNO[name.slice(4)], value, name);
  }
});

// ---------------------------------------------------------------- C cross-check

/** Decided at load time so that a missing compiler is a visible skip, not a pass. */
function findCompiler(): string | undefined {
  const candidates = [process.env['CC'], 'cc', 'gcc', 'clang'].filter((c): c is string => !!c);
  return candidates.find((cc) => spawnSync(cc, ['--version'], { stdio: 'ignore' }).status === 0);
}
const CC = findCompiler();

/** Every name abi_check.c may print, with the value src/abi gives it. */
function expectedCTable(): Map<string, number> {
  const m = new Map<string, number>();
  const set = (k: string, v: number): void => {
    if (m.has(k)) throw new Error(`duplicate table entry ${k}`);
    m.set(k, v);
  };
  for (const L of [...abi.DEVICE_STRUCT_LAYOUTS, ...abi.KVMI_STRUCT_LAYOUTS]) {
    set(`sizeof.${L.name}`, L.size);
    for (const [f, { offset, size }] of Object.entries(L.fields)) {
      set(`offsetof.${L.name}.${f}`, offset);
      set(`sizeof.${L.name}.${f}`, size);
    }
  }
  const constants: Record<string, number> = {
    KVM_INTRO_MEM_MAP: abi.KVM_INTRO_MEM_MAP,
    KVM_INTRO_MEM_UNMAP: abi.KVM_INTRO_MEM_UNMAP,
    KVM_INTROSPECTION_HOOK: abi.KVM_INTROSPECTION_HOOK,
    KVM_INTROSPECTION_UNHOOK: abi.KVM_INTROSPECTION_UNHOOK,
    KVM_INTROSPECTION_PREUNHOOK: abi.KVM_INTROSPECTION_PREUNHOOK,
    KVMIO: abi.KVMIO,
    KVM_HC_MEM_MAP: abi.KVM_HC_MEM_MAP,
    KVM_HC_MEM_UNMAP: abi.KVM_HC_MEM_UNMAP,
    KVM_HC_XEN_HVM_OP: abi.KVM_HC_XEN_HVM_OP,
    KVM_ENOSYS: abi.KVM_ENOSYS,
    KVM_EFAULT: abi.KVM_EFAULT,
    KVM_EINVAL: abi.KVM_EINVAL,
    KVM_E2BIG: abi.KVM_E2BIG,
    KVM_EPERM: abi.KVM_EPERM,
    KVM_EOPNOTSUPP: abi.KVM_EOPNOTSUPP,
    KVM_EAGAIN: abi.KVM_EAGAIN,
    KVM_EBUSY: abi.KVM_EBUSY,
    KVM_ENOENT: abi.KVM_ENOENT,
    KVM_ENOMEM: abi.KVM_ENOMEM,
    KVMI_VERSION: abi.KVMI_VERSION,
    KVMI_EVENT_UNHOOK: abi.KVMI_EVENT_UNHOOK,
    KVMI_EVENT_ACTION_CONTINUE: abi.KVMI_EVENT_ACTION_CONTINUE,
    KVMI_EVENT_ACTION_RETRY: abi.KVMI_EVENT_ACTION_RETRY,
    KVMI_EVENT_ACTION_CRASH: abi.KVMI_EVENT_ACTION_CRASH,
  };
  for (const [k, v] of Object.entries(constants)) set(k, v);
  for (const proto of ['v4', 'v6'] as const) {
    for (const [k, v] of Object.entries(KVMI_IDS[proto])) {
      if (v !== null) set(`KVMI_${proto.toUpperCase()}_${k}`, v);
    }
  }
  return m;
}

/** Compares "NAME VALUE" pairs the C compiler produced with src/abi's table, in one assertion. */
function checkCValues(t: ExecutionContext, pairs: string[]): void {
  const table = expectedCTable();
  const printed = new Set<string>();
  const mismatched: string[] = [];
  const unchecked: string[] = []; // printed by C, absent from the TS table
  const malformed: string[] = [];
  for (const line of pairs) {
    const m = /^(\S+) (-?\d+)$/.exec(line);
    if (!m || printed.has(m[1]!)) {
      malformed.push(line);
      continue;
    }
    const name = m[1]!;
    const value = Number(m[2]);
    printed.add(name);
    const expected = table.get(name);
    if (expected === undefined) unchecked.push(name);
    else if (value !== expected) mismatched.push(`${name}: C ${value}, TS ${expected}`);
  }
  const notPrinted = [...table.keys()].filter((k) => !printed.has(k));
  // One assertion so that a failure lists every discrepancy at once.
  t.deepEqual({ mismatched, unchecked, notPrinted, malformed }, { mismatched: [], unchecked: [], notPrinted: [], malformed: [] });
  t.true(printed.size > 100, `only ${printed.size} values printed`);
}

if (CC === undefined) {
  test.skip('C cross-check: SKIPPED, no C compiler found ($CC, cc, gcc, clang)', () => {});
} else {
  test(`C cross-check: native/abi_check.c (${CC}) agrees with src/abi on every value`, (t) => {
    const dir = mkdtempSync(path.join(tmpdir(), 'kvmmem-abi-'));
    try {
      const exe = path.join(dir, 'abi_check');
      execFileSync(CC, [
        '-Wall', '-Werror', `-I${path.join(ROOT, 'native/include')}`,
        path.join(ROOT, 'native/abi_check.c'), '-o', exe,
      ], { stdio: ['ignore', 'pipe', 'pipe'] });
      checkCValues(t, execFileSync(exe, { encoding: 'utf8' }).trim().split('\n'));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

/**
 * The guest kernel's build tree (KHEADERS=) from scripts/lab/provision-kmod.sh
 * --no-download, which exits 3 when the lab kernel's headers are not there.
 */
function guestKernelHeaders(): { ok: true; dir: string } | { ok: false; reason: string } {
  const r = spawnSync('bash', [path.join(ROOT, 'scripts/lab/provision-kmod.sh'), '--no-download'], { encoding: 'utf8', timeout: 300_000 });
  const dir = /^KHEADERS=(.*)$/m.exec(r.stdout ?? '')?.[1];
  if (r.status === 0 && dir) return { ok: true, dir };
  if (r.status === 3) return { ok: false, reason: (r.stderr ?? '').trim().split('\n').pop() ?? 'not provisioned' };
  throw new Error(`scripts/lab/provision-kmod.sh --no-download failed (${r.status ?? r.signal}): ${r.stderr}`);
}
const KHEADERS = guestKernelHeaders();

if (!KHEADERS.ok) {
  test.skip(`C cross-check in kernel context: SKIPPED (${KHEADERS.reason})`, () => {});
} else {
  const kdir = KHEADERS.dir;
  test('C cross-check in kernel context: native/abi_check.c built by kbuild against the lab guest kernel\'s headers agrees with src/abi', (t) => {
    // kvmi_mem.h next to the kernel's own linux/kvm.h and linux/kvm_para.h, with the kernel's flags (-Werror):
    // the asm-offsets trick turns each value into a "->NAME VALUE" line of the assembly.
    const dir = mkdtempSync(path.join(tmpdir(), 'kvmmem-kabi-'));
    try {
      execFileSync('cp', [path.join(ROOT, 'native/abi_check.c'), dir]);
      writeFileSync(path.join(dir, 'Kbuild'), `obj-m := abi_check.o\nccflags-y := -I${path.join(ROOT, 'native/include')} -Werror\n`);
      execFileSync('make', ['-s', '-C', kdir, `M=${dir}`, 'abi_check.s'], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
      const asm = readFileSync(path.join(dir, 'abi_check.s'), 'utf8');
      checkCValues(t, [...asm.matchAll(/->([^"]*)"/g)].map((m) => m[1]!));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('layouts are self-consistent and agree with the exported sizes', (t) => {
  for (const L of [...abi.DEVICE_STRUCT_LAYOUTS, ...abi.KVMI_STRUCT_LAYOUTS]) {
    // Members in declaration order, no overlap, inside the struct.
    let end = 0;
    for (const [f, { offset, size }] of Object.entries(L.fields)) {
      t.true(offset >= end, `${L.name}.${f} overlaps`);
      end = offset + size;
    }
    t.true(end <= L.size, `${L.name} fields exceed its size`);
  }
  const sizes: [abi.StructLayout, number][] = [
    [abi.KVMI_MAP_MEM_TOKEN_LAYOUT, abi.MEM_TOKEN_SIZE],
    [abi.KVMI_MEM_MAP_LAYOUT, abi.MEM_MAP_SIZE],
    [abi.KVM_INTROSPECTION_HOOK_LAYOUT, abi.HOOK_SIZE],
    [abi.KVMI_MSG_HDR_LAYOUT, abi.MSG_HDR_SIZE],
    [abi.KVMI_ERROR_CODE_LAYOUT, abi.ERROR_CODE_SIZE],
    [abi.KVMI_QEMU2INTROSPECTOR_LAYOUT, abi.QEMU2INTROSPECTOR_SIZE],
    [abi.KVMI_INTROSPECTOR2QEMU_LAYOUT, abi.INTROSPECTOR2QEMU_SIZE],
    [abi.KVMI_GET_VERSION_REPLY_LAYOUT, abi.GET_VERSION_REPLY_SIZE.v6],
    [abi.KVMI_GET_VERSION_REPLY_V4_LAYOUT, abi.GET_VERSION_REPLY_SIZE.v4],
    [abi.KVMI_CONTROL_VM_EVENTS_LAYOUT, abi.CONTROL_VM_EVENTS_SIZE],
    [abi.KVMI_EVENT_LAYOUT, abi.EVENT_SIZE],
    [abi.KVMI_EVENT_REPLY_LAYOUT, abi.EVENT_REPLY_SIZE],
    [abi.KVMI_READ_PHYSICAL_LAYOUT, abi.PHYSICAL_REQUEST_SIZE],
    [abi.KVMI_WRITE_PHYSICAL_LAYOUT, abi.PHYSICAL_REQUEST_SIZE],
  ];
  for (const [L, size] of sizes) t.is(L.size, size, L.name);
  t.is(abi.MAP_TOKEN_REPLY_SIZE, 40);
  t.is(abi.PAGE_SIZE, 1 << abi.PAGE_SHIFT);
  t.is(abi.X86_64_USER_LIMIT, (1n << 47n) - BigInt(abi.PAGE_SIZE));
});

// ---------------------------------------------------------------- device structs

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });

test('kvmi_mem_map: golden bytes', (t) => {
  const buf = abi.encodeMemMap({ token: seq(32), gpa: 0x1122334455667788n, gva: 0x7f0000001000n });
  t.is(buf.length, 48);
  t.is(hexOf(buf), hexOf(seq(32)) + '8877665544332211' + '00100000007f0000');
  t.deepEqual(abi.decodeMemMap(buf), { token: seq(32), gpa: 0x1122334455667788n, gva: 0x7f0000001000n });
});

test('kvmi_mem_map: round trip (property), in place at any offset', (t) => {
  prop(t, fc.property(
    fc.uint8Array({ minLength: 32, maxLength: 32 }), u64, u64, fc.integer({ min: 0, max: 100 }),
    (token, gpa, gva, offset) => {
      const m: MemMap = { token, gpa, gva };
      const fresh = abi.encodeMemMap(m);
      const into = Buffer.alloc(offset + 48 + 7, 0xee);
      const ret = abi.encodeMemMap(m, into, offset);
      return ret === into
        && fresh.equals(into.subarray(offset, offset + 48))
        && into.subarray(0, offset).every((b) => b === 0xee)
        && into.subarray(offset + 48).every((b) => b === 0xee)
        && JSON.stringify(abi.decodeMemMap(into, offset), (_, v: unknown) => (typeof v === 'bigint' ? `${v}n` : v))
          === JSON.stringify({ token, gpa, gva }, (_, v: unknown) => (typeof v === 'bigint' ? `${v}n` : v))
        && hexOf(abi.decodeMemMap(fresh).token) === hexOf(token);
    },
  ));
});

test('kvmi_mem_map: batches of records in one Buffer', (t) => {
  const n = 5;
  const batch = Buffer.alloc(n * abi.MEM_MAP_SIZE);
  for (let i = 0; i < n; i++) {
    abi.encodeMemMap({ token: seq(32, i), gpa: BigInt(i) << 12n, gva: 0x10000n + (BigInt(i) << 12n) }, batch, i * 48);
  }
  for (let i = 0; i < n; i++) {
    const m = abi.decodeMemMap(batch, i * 48);
    t.is(m.gpa, BigInt(i) << 12n);
    t.is(m.gva, 0x10000n + (BigInt(i) << 12n));
    t.is(hexOf(m.token), hexOf(seq(32, i)));
  }
});

test('kvmi_mem_map: decoded token is a detached copy', (t) => {
  const buf = abi.encodeMemMap({ token: seq(32), gpa: 1n, gva: 2n });
  const m = abi.decodeMemMap(buf);
  buf.fill(0);
  t.is(hexOf(m.token), hexOf(seq(32)));
  t.false(Buffer.isBuffer(m.token));
});

test('kvmi_mem_map: rejections', (t) => {
  throwsDecode(t, () => abi.decodeMemMap(Buffer.alloc(47)), 'kvmi_mem_map', /need 48 bytes at offset 0, buffer has 47/);
  throwsDecode(t, () => abi.decodeMemMap(Buffer.alloc(96), 49), 'kvmi_mem_map');
  t.throws(() => abi.decodeMemMap(Buffer.alloc(48), -1), { instanceOf: UsageError });
  const ok: MemMap = { token: new Uint8Array(32), gpa: 0n, gva: 0n };
  t.throws(() => abi.encodeMemMap({ ...ok, token: new Uint8Array(31) }), { instanceOf: UsageError, message: /token must be 32 bytes/ });
  t.throws(() => abi.encodeMemMap({ ...ok, token: new Uint8Array(33) }), { instanceOf: UsageError });
  t.throws(() => abi.encodeMemMap({ ...ok, gpa: -1n }), { instanceOf: UsageError, message: /gpa/ });
  t.throws(() => abi.encodeMemMap({ ...ok, gpa: 1n << 64n }), { instanceOf: UsageError, message: /gpa/ });
  t.throws(() => abi.encodeMemMap({ ...ok, gva: 1n << 64n }), { instanceOf: UsageError, message: /gva/ });
  t.throws(() => abi.encodeMemMap({ ...ok, gpa: 4096 as unknown as bigint }), { instanceOf: UsageError });
  t.throws(() => abi.encodeMemMap(ok, Buffer.alloc(47)), { instanceOf: UsageError });
  t.throws(() => abi.encodeMemMap(ok, Buffer.alloc(96), 49), { instanceOf: UsageError });
  t.notThrows(() => abi.encodeMemMap({ ...ok, gpa: (1n << 64n) - 1n }, Buffer.alloc(96), 48));
});

test('kvm_introspection_hook: golden bytes, round trip, padding kept', (t) => {
  const uuid = seq(16, 0xa0);
  const buf = abi.encodeHook({ fd: -1, uuid });
  t.is(hexOf(buf), 'ffffffff' + '00000000' + hexOf(uuid));
  t.deepEqual(abi.decodeHook(buf), { fd: -1, padding: 0, uuid });
  const padded = abi.encodeHook({ fd: 7, padding: 1, uuid });
  t.deepEqual(abi.decodeHook(padded), { fd: 7, padding: 1, uuid }); // the host, not the codec, says EINVAL
  prop(t, fc.property(
    fc.integer({ min: -0x80000000, max: 0x7fffffff }), fc.nat({ max: 0xffffffff }), fc.uint8Array({ minLength: 16, maxLength: 16 }),
    (fd, padding, u) => {
      const d = abi.decodeHook(abi.encodeHook({ fd, padding, uuid: u }));
      return d.fd === fd && d.padding === padding && hexOf(d.uuid) === hexOf(u);
    },
  ));
});

test('kvm_introspection_hook: rejections', (t) => {
  const uuid = new Uint8Array(16);
  t.throws(() => abi.encodeHook({ fd: 2 ** 31, uuid }), { instanceOf: UsageError, message: /fd/ });
  t.throws(() => abi.encodeHook({ fd: -(2 ** 31) - 1, uuid }), { instanceOf: UsageError });
  t.throws(() => abi.encodeHook({ fd: 1.5, uuid }), { instanceOf: UsageError });
  t.throws(() => abi.encodeHook({ fd: 3, padding: -1, uuid }), { instanceOf: UsageError });
  t.throws(() => abi.encodeHook({ fd: 3, uuid: new Uint8Array(15) }), { instanceOf: UsageError, message: /uuid/ });
  throwsDecode(t, () => abi.decodeHook(Buffer.alloc(23)), 'kvm_introspection_hook');
});

// ---------------------------------------------------------------- KVMI messages

test('KVMI ids and names', (t) => {
  t.deepEqual({ ...KVMI_IDS.v4 }, { EVENT_REPLY: 24, EVENT: 23, GET_VERSION: 1, CONTROL_VM_EVENTS: null, GET_MAP_TOKEN: 15, READ_PHYSICAL: 13, WRITE_PHYSICAL: 14, GET_MAX_GFN: null });
  t.deepEqual({ ...KVMI_IDS.v6 }, { EVENT_REPLY: 0, EVENT: 1, GET_VERSION: 2, CONTROL_VM_EVENTS: 8, GET_MAP_TOKEN: 22, READ_PHYSICAL: 17, WRITE_PHYSICAL: 18, GET_MAX_GFN: 29 });
  t.is(abi.decodeMaxGfnReply(abi.encodeMaxGfnReply(0x3ffffn)), 0x3ffffn);
  t.throws(() => abi.decodeMaxGfnReply(new Uint8Array(4)), { code: 'ERR_KVMI_ABI' });
  t.true(Object.isFrozen(KVMI_IDS) && Object.isFrozen(KVMI_IDS.v6));
  t.is(abi.kvmiMessageName('v6', 22), 'KVMI_GET_MAP_TOKEN');
  t.is(abi.kvmiMessageName('v4', 15), 'KVMI_GET_MAP_TOKEN');
  t.is(abi.kvmiMessageName('v6', 8), 'KVMI_CONTROL_VM_EVENTS');
  t.is(abi.kvmiMessageName('v4', 8), 'unknown message 8');
  t.is(abi.kvmiMessageName('v6', 0), 'KVMI_EVENT_REPLY');
  t.is(abi.kvmiMessageName('v4', 24), 'KVMI_EVENT_REPLY');
  t.throws(() => abi.kvmiMessageName('v5' as abi.KvmiProtocol, 1), { instanceOf: UsageError });
  t.is(abi.KVMI_VERSION, 1);
  t.is(abi.KVMI_EVENT_UNHOOK, 0);
  t.deepEqual([abi.KVMI_EVENT_ACTION_CONTINUE, abi.KVMI_EVENT_ACTION_RETRY, abi.KVMI_EVENT_ACTION_CRASH], [0, 1, 2]);
});

test('kvmi_msg_hdr: golden bytes, round trip (property), rejections', (t) => {
  t.is(hexOf(abi.encodeMsgHdr({ id: 22, size: 0, seq: 0x01020304 })), '1600' + '0000' + '04030201');
  prop(t, fc.property(
    fc.nat({ max: 0xffff }), fc.nat({ max: 0xffff }), fc.nat({ max: 0xffffffff }), fc.nat({ max: 16 }),
    (id, size, s, offset) => {
      const into = Buffer.alloc(offset + 8);
      abi.encodeMsgHdr({ id, size, seq: s }, into, offset);
      const d = abi.decodeMsgHdr(into, offset);
      return d.id === id && d.size === size && d.seq === s;
    },
  ));
  t.throws(() => abi.encodeMsgHdr({ id: 0x10000, size: 0, seq: 0 }), { instanceOf: UsageError, message: /kvmi_msg_hdr\.id must be a u16/ });
  t.throws(() => abi.encodeMsgHdr({ id: 0, size: -1, seq: 0 }), { instanceOf: UsageError });
  t.throws(() => abi.encodeMsgHdr({ id: 0, size: 0, seq: 2 ** 32 }), { instanceOf: UsageError });
  throwsDecode(t, () => abi.decodeMsgHdr(Buffer.alloc(7)), 'kvmi_msg_hdr');
});

test('encodeMessage: header + body in one buffer, u16 size limit', (t) => {
  const msg = abi.encodeMessage({ id: 2, seq: 7 }, Buffer.from('abc'));
  t.is(hexOf(msg), '0200' + '0300' + '07000000' + '616263');
  t.is(abi.encodeMessage({ id: 1, seq: 0 }, new Uint8Array(0)).length, 8);
  t.is(abi.encodeMessage({ id: 1, seq: 0 }, new Uint8Array(0xffff)).readUInt16LE(2), 0xffff);
  t.throws(() => abi.encodeMessage({ id: 1, seq: 0 }, new Uint8Array(0x10000)), { instanceOf: UsageError });
  t.throws(() => abi.encodeMessage({ id: -1, seq: 0 }, new Uint8Array(1)), { instanceOf: UsageError });
});

test('kvmi_error_code: s32 err, padding must be zero', (t) => {
  t.is(hexOf(abi.encodeErrorCode(-abi.KVM_ENOSYS)), '18fcffff' + '00000000');
  t.is(hexOf(abi.encodeErrorCode(0)), '0000000000000000');
  for (const err of [0, -1000, -22, -0x80000000, 0x7fffffff]) t.is(abi.decodeErrorCode(abi.encodeErrorCode(err)), err);
  t.throws(() => abi.encodeErrorCode(2 ** 31), { instanceOf: UsageError });
  t.throws(() => abi.encodeErrorCode(-(2 ** 31) - 1), { instanceOf: UsageError });
  throwsDecode(t, () => abi.decodeErrorCode(bytes('00000000 01000000')), 'kvmi_error_code',
    'kvmi_error_code: padding must be 0, got 0x1');
  throwsDecode(t, () => abi.decodeErrorCode(Buffer.alloc(4)), 'kvmi_error_code');
  t.is(abi.decodeErrorCode(bytes('ffffffff ffffffff eaffffff 00000000'), 8), -22);
});

test('get_version reply: v6 and v4 layouts', (t) => {
  t.is(hexOf(abi.encodeGetVersionReply('v6', { version: 1 })), '01000000' + '00000000');
  t.is(hexOf(abi.encodeGetVersionReply('v6', { version: 1, commands: 5, events: 6 })), '0100000000000000');
  t.is(hexOf(abi.encodeGetVersionReply('v4', { version: 1, commands: 0xffff, events: 3 })),
    '01000000' + 'ffff0000' + '03000000' + '00000000');
  t.is(hexOf(abi.encodeGetVersionReply('v4', { version: 1 })), '01000000' + '00'.repeat(12));
  t.deepEqual(abi.decodeGetVersionReply('v6', abi.encodeGetVersionReply('v6', { version: 1 })), { version: 1 });
  t.deepEqual(abi.decodeGetVersionReply('v4', abi.encodeGetVersionReply('v4', { version: 1, commands: 2, events: 3 })),
    { version: 1, commands: 2, events: 3 });
  throwsDecode(t, () => abi.decodeGetVersionReply('v6', bytes('01000000 02000000')), 'kvmi_get_version_reply',
    'kvmi_get_version_reply: padding must be 0, got 0x2');
  throwsDecode(t, () => abi.decodeGetVersionReply('v4', bytes('01000000 00000000 00000000 00000001')),
    'kvmi_get_version_reply_v4', /padding must be 0, got 0x1000000/);
  throwsDecode(t, () => abi.decodeGetVersionReply('v4', Buffer.alloc(8)), 'kvmi_get_version_reply_v4');
  t.throws(() => abi.encodeGetVersionReply('v6', { version: -1 }), { instanceOf: UsageError });
  t.throws(() => abi.encodeGetVersionReply('v4', { version: 1, commands: 2 ** 32 }), { instanceOf: UsageError });
});

test('kvmi_control_vm_events: codec and paddings', (t) => {
  t.is(hexOf(abi.encodeControlVmEvents({ eventId: abi.KVMI_EVENT_UNHOOK, enable: true })), '0000' + '01' + '00' + '00000000');
  t.is(hexOf(abi.encodeControlVmEvents({ eventId: 0x1234, enable: false })), '3412' + '00' + '00' + '00000000');
  for (const eventId of [0, 1, 0xffff]) {
    for (const enable of [true, false]) {
      t.deepEqual(abi.decodeControlVmEvents(abi.encodeControlVmEvents({ eventId, enable })), { eventId, enable });
    }
  }
  t.deepEqual(abi.decodeControlVmEvents(bytes('0000 02 00 00000000')), { eventId: 0, enable: true });
  throwsDecode(t, () => abi.decodeControlVmEvents(bytes('0000 01 00 01000000')), 'kvmi_control_vm_events',
    'kvmi_control_vm_events: padding2 must be 0, got 0x1');
  throwsDecode(t, () => abi.decodeControlVmEvents(bytes('0000 01 ff 00000000')), 'kvmi_control_vm_events',
    'kvmi_control_vm_events: padding1 must be 0, got 0xff');
  throwsDecode(t, () => abi.decodeControlVmEvents(Buffer.alloc(7)), 'kvmi_control_vm_events');
  t.throws(() => abi.encodeControlVmEvents({ eventId: 0x10000, enable: true }), { instanceOf: UsageError });
  t.throws(() => abi.encodeControlVmEvents({ eventId: 0, enable: 1 as unknown as boolean }), { instanceOf: UsageError });
});

test('kvmi_event (common part): codec, size and padding rules', (t) => {
  t.is(hexOf(abi.encodeEvent({ vcpu: 3, event: abi.KVMI_EVENT_UNHOOK })), '0800' + '0300' + '00' + '000000');
  t.is(hexOf(abi.encodeEvent({ vcpu: 0x102, event: 7, size: 0x40 })), '4000' + '0201' + '07' + '000000');
  t.deepEqual(abi.decodeEvent(abi.encodeEvent({ vcpu: 0xffff, event: 0xff, size: 0xffff })), { size: 0xffff, vcpu: 0xffff, event: 0xff });
  const stale = Buffer.alloc(8, 0xff);
  abi.encodeEvent({ vcpu: 1, event: 1 }, stale); // padding must be rewritten in a reused buffer
  t.deepEqual(abi.decodeEvent(stale), { size: 8, vcpu: 1, event: 1 });
  throwsDecode(t, () => abi.decodeEvent(bytes('0700 0000 00 000000')), 'kvmi_event', 'kvmi_event: size must be at least 8, got 7');
  throwsDecode(t, () => abi.decodeEvent(bytes('0800 0000 00 000100')), 'kvmi_event', 'kvmi_event: padding must be 0, got 0x100');
  throwsDecode(t, () => abi.decodeEvent(bytes('0800 0000 00 0000')), 'kvmi_event');
  t.throws(() => abi.encodeEvent({ vcpu: 0, event: 0, size: 7 }), { instanceOf: UsageError });
  t.throws(() => abi.encodeEvent({ vcpu: 0x10000, event: 0 }), { instanceOf: UsageError });
  t.throws(() => abi.encodeEvent({ vcpu: 0, event: 256 }), { instanceOf: UsageError });
});

test('kvmi_event_reply: codec and paddings', (t) => {
  t.is(hexOf(abi.encodeEventReply({ action: abi.KVMI_EVENT_ACTION_CRASH, event: 0 })), '02' + '00' + '0000' + '00000000');
  for (const action of [0, 1, 2, 255]) {
    t.deepEqual(abi.decodeEventReply(abi.encodeEventReply({ action, event: 9 })), { action, event: 9 });
  }
  throwsDecode(t, () => abi.decodeEventReply(bytes('00 00 0100 00000000')), 'kvmi_event_reply', 'kvmi_event_reply: padding1 must be 0, got 0x1');
  throwsDecode(t, () => abi.decodeEventReply(bytes('00 00 0000 00000080')), 'kvmi_event_reply', 'kvmi_event_reply: padding2 must be 0, got 0x80000000');
  t.throws(() => abi.encodeEventReply({ action: 256, event: 0 }), { instanceOf: UsageError });
});

test('GET_MAP_TOKEN reply: error code then token', (t) => {
  const token = seq(32, 0x40);
  const ok = abi.encodeMapTokenReply(token);
  t.is(ok.length, 40);
  t.is(hexOf(ok), '0000000000000000' + hexOf(token));
  const d = abi.decodeMapTokenReply(ok);
  t.is(d.err, 0);
  t.is(hexOf(d.token!), hexOf(token));
  ok.fill(0);
  t.is(hexOf(d.token!), hexOf(token), 'token is a copy');
  t.deepEqual(abi.decodeMapTokenReply(abi.encodeErrorCode(-abi.KVM_EAGAIN)), { err: -11 });
  throwsDecode(t, () => abi.decodeMapTokenReply(abi.encodeErrorCode(0)), 'kvmi_map_mem_token');
  throwsDecode(t, () => abi.decodeMapTokenReply(Buffer.alloc(4)), 'kvmi_error_code');
  t.throws(() => abi.encodeMapTokenReply(new Uint8Array(16)), { instanceOf: UsageError });
});

// ---------------------------------------------------------------- handshake

const q2iArb = fc.record({
  uuid: fc.uint8Array({ minLength: 16, maxLength: 16 }),
  startTime: fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }),
  name: fc.string({ unit: 'binary', maxLength: 63 })
    .filter((s) => !s.includes('\0') && Buffer.byteLength(s, 'utf8') <= 63),
});

test('kvmi_qemu2introspector: golden bytes', (t) => {
  const buf = abi.encodeQemu2Introspector({ uuid: seq(16, 1), startTime: 0x0102030405060708n, name: 'vm1' });
  t.is(buf.length, 96);
  t.is(hexOf(buf), '60000000' + hexOf(seq(16, 1)) + '00000000' + '0807060504030201' + '766d31' + '00'.repeat(61));
  t.deepEqual(abi.decodeQemu2Introspector(buf),
    { structSize: 96, uuid: seq(16, 1), padding: 0, startTime: 0x0102030405060708n, name: 'vm1' });
});

test('kvmi_qemu2introspector: round trip (property), also from newer (larger) peers', (t) => {
  prop(t, fc.property(
    q2iArb, fc.oneof(fc.constant(96), fc.integer({ min: 96, max: 4096 })), fc.nat({ max: 0xffffffff }),
    (h, structSize, padding) => {
      const buf = abi.encodeQemu2Introspector({ ...h, structSize, padding });
      if (buf.length !== structSize || buf.readUInt32LE(0) !== structSize) return false;
      if (!buf.subarray(96).every((b) => b === 0)) return false;
      const d: Qemu2Introspector = abi.decodeQemu2Introspector(buf);
      return d.structSize === structSize && d.padding === padding && d.startTime === h.startTime
        && d.name === h.name && hexOf(d.uuid) === hexOf(h.uuid);
    },
  ));
});

test('kvmi_qemu2introspector: older (shorter) peers are zero-filled', (t) => {
  const h = { uuid: seq(16, 1), startTime: -5n, padding: 9, name: 'abcdefghij' };
  const at = (structSize: number) => abi.decodeQemu2Introspector(abi.encodeQemu2Introspector({ ...h, structSize }));
  t.deepEqual(at(4), { structSize: 4, uuid: new Uint8Array(16), padding: 0, startTime: 0n, name: '' });
  t.deepEqual(at(20), { structSize: 20, uuid: seq(16, 1), padding: 0, startTime: 0n, name: '' });
  t.deepEqual(at(32), { structSize: 32, uuid: seq(16, 1), padding: 9, startTime: -5n, name: '' });
  t.deepEqual(at(36), { structSize: 36, uuid: seq(16, 1), padding: 9, startTime: -5n, name: 'abcd' });
  t.is(at(10).uuid[5], 6); // bytes 4..9 arrived: uuid[0..5]
  t.is(at(10).uuid[6], 0);
});

test('kvmi_qemu2introspector: struct_size and field rejections', (t) => {
  const base = { uuid: new Uint8Array(16), startTime: 0n, name: 'x' };
  const withSize = (size: number, len = size) => {
    const b = Buffer.alloc(len);
    if (len >= 4) b.writeUInt32LE(size, 0);
    return b;
  };
  throwsDecode(t, () => abi.decodeQemu2Introspector(withSize(3, 4)), 'kvmi_qemu2introspector',
    'kvmi_qemu2introspector: struct_size must be in 4..4096, got 3');
  throwsDecode(t, () => abi.decodeQemu2Introspector(withSize(4097, 4097)), 'kvmi_qemu2introspector', /got 4097/);
  throwsDecode(t, () => abi.decodeQemu2Introspector(withSize(96, 95)), 'kvmi_qemu2introspector', /struct_size is 96 but 95 bytes/);
  throwsDecode(t, () => abi.decodeQemu2Introspector(withSize(96, 97)), 'kvmi_qemu2introspector');
  throwsDecode(t, () => abi.decodeQemu2Introspector(Buffer.alloc(3)), 'kvmi_qemu2introspector');
  t.is(abi.decodeQemu2Introspector(withSize(4096)).structSize, 4096);
  const unterminated = abi.encodeQemu2Introspector(base);
  unterminated.fill(0x41, 32, 96);
  throwsDecode(t, () => abi.decodeQemu2Introspector(unterminated), 'kvmi_qemu2introspector', /name is not NUL-terminated/);
  t.is(abi.decodeQemu2Introspector(abi.encodeQemu2Introspector({ ...base, name: 'n'.repeat(63) })).name, 'n'.repeat(63));
  t.throws(() => abi.encodeQemu2Introspector({ ...base, name: 'n'.repeat(64) }), { instanceOf: UsageError });
  t.throws(() => abi.encodeQemu2Introspector({ ...base, name: 'é'.repeat(32) }), { instanceOf: UsageError }); // 64 bytes
  t.throws(() => abi.encodeQemu2Introspector({ ...base, name: 'a\0b' }), { instanceOf: UsageError });
  t.throws(() => abi.encodeQemu2Introspector({ ...base, structSize: 3 }), { instanceOf: UsageError });
  t.throws(() => abi.encodeQemu2Introspector({ ...base, structSize: 4097 }), { instanceOf: UsageError });
  t.throws(() => abi.encodeQemu2Introspector({ ...base, startTime: 1n << 63n }), { instanceOf: UsageError });
  t.throws(() => abi.encodeQemu2Introspector({ ...base, uuid: new Uint8Array(17) }), { instanceOf: UsageError });
});

test('kvmi_introspector2qemu: codec and struct_size rules', (t) => {
  const hash = seq(20, 0xc0);
  const buf = abi.encodeIntrospector2Qemu({ cookieHash: hash });
  t.is(hexOf(buf), '18000000' + hexOf(hash));
  t.deepEqual(abi.decodeIntrospector2Qemu(buf), { structSize: 24, cookieHash: hash });
  const big = abi.encodeIntrospector2Qemu({ cookieHash: hash, structSize: 100 });
  t.is(big.length, 100);
  t.deepEqual(abi.decodeIntrospector2Qemu(big), { structSize: 100, cookieHash: hash });
  const small = abi.encodeIntrospector2Qemu({ cookieHash: hash, structSize: 14 });
  t.deepEqual(abi.decodeIntrospector2Qemu(small), { structSize: 14, cookieHash: Uint8Array.from([...hash.subarray(0, 10), ...new Uint8Array(10)]) });
  throwsDecode(t, () => abi.decodeIntrospector2Qemu(bytes('02000000')), 'kvmi_introspector2qemu');
  throwsDecode(t, () => abi.decodeIntrospector2Qemu(buf.subarray(0, 23)), 'kvmi_introspector2qemu');
  t.throws(() => abi.encodeIntrospector2Qemu({ cookieHash: new Uint8Array(32) }), { instanceOf: UsageError });
  t.throws(() => abi.encodeIntrospector2Qemu({ cookieHash: hash, structSize: 0 }), { instanceOf: UsageError });
});

test('readStructSized', (t) => {
  const s = abi.encodeIntrospector2Qemu({ cookieHash: seq(20) });
  const stream = Buffer.concat([Buffer.from([9, 9]), s, Buffer.from([1, 2, 3])]);
  t.is(abi.readStructSized(stream.subarray(0, 5), 2), null); // 3 bytes
  t.is(abi.readStructSized(stream.subarray(0, 2 + 23), 2), null); // 23 of 24
  const r = abi.readStructSized(stream, 2);
  t.truthy(r);
  t.is(r!.consumed, 24);
  t.true(r!.struct.equals(s));
  t.is(r!.struct.buffer, stream.buffer, 'a view, not a copy');
  throwsDecode(t, () => abi.readStructSized(bytes('03000000 00')), 'handshake', /struct_size must be in 4\.\.4096, got 3/);
  throwsDecode(t, () => abi.readStructSized(bytes('01100000')), 'handshake', /got 4097/);
  t.deepEqual(abi.readStructSized(bytes('04000000'))?.consumed, 4);
});

// ---------------------------------------------------------------- framing

const frameArb = fc.record({
  id: fc.nat({ max: 0xffff }),
  seq: fc.nat({ max: 0xffffffff }),
  body: fc.oneof(
    { weight: 4, arbitrary: fc.uint8Array({ maxLength: 64 }) },
    { weight: 1, arbitrary: fc.uint8Array({ minLength: 200, maxLength: 3000 }) },
  ),
});

/** Cuts `stream` at the given (unsorted, possibly repeated) points. */
function chunkAt(stream: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of [...points, stream.length]) {
    out.push(stream.subarray(prev, p)); // empty chunks included on purpose
    prev = p;
  }
  return out;
}

const frameText = (f: KvmiFrame): string => `${f.hdr.id}/${f.hdr.size}/${f.hdr.seq}/${hexOf(f.body)}`;

function drain(r: FrameReader, into: KvmiFrame[]): void {
  for (let f = r.next(); f !== null; f = r.next()) into.push(f);
}

test('FrameReader: any chunking of a stream yields the same messages (property)', (t) => {
  prop(t, fc.property(
    fc.array(frameArb, { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 40 }), fc.boolean(),
    (frames, cuts, drainEachPush) => {
      const wire = frames.map((f) => abi.encodeMessage(f, f.body));
      const stream = Buffer.concat(wire);
      const expected = frames.map((f) => `${f.id}/${f.body.length}/${f.seq}/${hexOf(f.body)}`);

      const whole = new FrameReader();
      whole.push(stream);
      const one: KvmiFrame[] = [];
      drain(whole, one);

      const r = new FrameReader();
      const got: KvmiFrame[] = [];
      for (const c of chunkAt(stream, cuts)) {
        r.push(c);
        if (drainEachPush) drain(r, got);
      }
      drain(r, got);
      return JSON.stringify(one.map(frameText)) === JSON.stringify(expected)
        && JSON.stringify(got.map(frameText)) === JSON.stringify(expected)
        && r.buffered === 0 && whole.buffered === 0;
    },
  ), 400);
});

test('FrameReader: handshake struct then messages across arbitrary chunks (property)', (t) => {
  prop(t, fc.property(
    q2iArb, fc.integer({ min: 4, max: 200 }), fc.array(frameArb, { maxLength: 5 }), fc.array(fc.nat(), { maxLength: 20 }),
    (h, structSize, frames, cuts) => {
      const hs = abi.encodeQemu2Introspector({ ...h, structSize });
      const stream = Buffer.concat([hs, ...frames.map((f) => abi.encodeMessage(f, f.body))]);
      const r = new FrameReader();
      let got: Buffer | null = null;
      const msgs: KvmiFrame[] = [];
      for (const c of chunkAt(stream, cuts)) {
        r.push(c);
        if (got === null) got = r.nextStructSized();
        if (got !== null) drain(r, msgs);
      }
      return got !== null && got.equals(hs)
        && msgs.map(frameText).join() === frames.map((f) => `${f.id}/${f.body.length}/${f.seq}/${hexOf(f.body)}`).join();
    },
  ), 200);
});

test('FrameReader: partial data returns null and never throws', (t) => {
  const msg = abi.encodeMessage({ id: 1, seq: 42 }, seq(100));
  const r = new FrameReader();
  for (let i = 0; i < msg.length - 1; i++) {
    r.push(msg.subarray(i, i + 1));
    t.is(r.next(), null);
    t.is(r.buffered, i + 1);
  }
  r.push(msg.subarray(msg.length - 1));
  const f = r.next();
  t.deepEqual(f?.hdr, { id: 1, size: 100, seq: 42 });
  t.is(hexOf(f!.body), hexOf(seq(100)));
  t.is(r.next(), null);
  t.is(r.buffered, 0);
});

test('FrameReader: a message inside one chunk is returned without copying', (t) => {
  const a = abi.encodeMessage({ id: 1, seq: 1 }, seq(10));
  const b = abi.encodeMessage({ id: 2, seq: 2 }, seq(0));
  const chunk = Buffer.concat([a, b]);
  const r = new FrameReader();
  r.push(chunk);
  const f1 = r.next()!;
  t.is(f1.body.buffer, chunk.buffer);
  t.is(f1.body.byteOffset, chunk.byteOffset + 8);
  const f2 = r.next()!;
  t.is(f2.hdr.id, 2);
  t.is(f2.body.length, 0);
  t.is(r.next(), null);
});

test('FrameReader: maxMessageSize', (t) => {
  const r = new FrameReader({ maxMessageSize: 8 + 16 });
  r.push(abi.encodeMessage({ id: 1, seq: 1 }, new Uint8Array(16)));
  t.is(r.next()?.body.length, 16);
  r.push(abi.encodeMsgHdr({ id: 3, size: 17, seq: 5 })); // header alone is enough to know
  throwsDecode(t, () => r.next(), 'kvmi_msg_hdr', /size 17 \(id 3, seq 0x5\) exceeds the 16-byte body limit/);
  t.throws(() => new FrameReader({ maxMessageSize: 7 }), { instanceOf: UsageError });
  const dflt = new FrameReader();
  t.is(dflt.maxMessageSize, 0xffff + 8);
  dflt.push(abi.encodeMsgHdr({ id: 0, size: 0xffff, seq: 0 }));
  t.is(dflt.next(), null);
});

test('FrameReader: many tiny chunks stay linear and compact', (t) => {
  const frames = Array.from({ length: 300 }, (_, i) => abi.encodeMessage({ id: i, seq: i }, seq(i % 50)));
  const stream = Buffer.concat(frames);
  const r = new FrameReader();
  const got: KvmiFrame[] = [];
  for (let i = 0; i < stream.length; i++) {
    r.push(stream.subarray(i, i + 1));
    drain(r, got);
  }
  t.is(got.length, 300);
  t.true(got.every((f, i) => f.hdr.id === i && f.body.length === i % 50));
  t.is(r.buffered, 0);
});

// ---------------------------------------------------------------- errno

test('errno: table matches the platform (Node os.constants.errno) and covers the required names', (t) => {
  t.true(Object.isFrozen(ERRNO));
  const required = ('EPERM ENOENT ESRCH EINTR EIO ENXIO E2BIG EBADF EAGAIN ENOMEM EACCES EFAULT EBUSY EEXIST '
    + 'ENODEV ENOTDIR EISDIR EINVAL ENFILE EMFILE ENOTTY EFBIG ENOSPC ESPIPE EROFS EPIPE ERANGE ENOSYS '
    + 'EOVERFLOW ENOTSOCK EMSGSIZE EPROTO EOPNOTSUPP EADDRINUSE ECONNRESET ENOBUFS ETIMEDOUT ECONNREFUSED EALREADY')
    .split(' ');
  for (const name of required) t.is(typeof ERRNO[name], 'number', name);
  t.is(ERRNO['KVM_ENOSYS'], 1000);
  if (process.platform === 'linux') {
    const platform = osConstants.errno as Record<string, number>;
    for (const [name, value] of Object.entries(ERRNO)) {
      if (name in platform) t.is(value, platform[name], name);
    }
    for (const name of required) t.is(ERRNO[name], platform[name], name);
  }
});

test('errno: names, numbers, messages', (t) => {
  t.is(abi.errnoName(2), 'ENOENT');
  t.is(abi.errnoName(-2), 'ENOENT');
  t.is(abi.errnoName(11), 'EAGAIN');
  t.is(abi.errnoName(95), 'EOPNOTSUPP');
  t.is(abi.errnoName(-1000), 'KVM_ENOSYS');
  t.is(abi.errnoName(4242), 'E4242');
  t.is(abi.errnoNumber('ENOTTY'), 25);
  t.is(abi.errnoNumber('EWOULDBLOCK'), 11);
  t.is(abi.errnoNumber('ENOTSUP'), 95);
  t.is(abi.errnoNumber('KVM_ENOSYS'), 1000);
  t.throws(() => abi.errnoNumber('ENOPE'), { instanceOf: RangeError });
  t.throws(() => abi.errnoNumber('toString'), { instanceOf: RangeError });
  for (const [name, n] of Object.entries(ERRNO)) {
    t.is(abi.errnoName(n), name);
    t.is(abi.errnoNumber(name), n);
    t.is(abi.errnoName(-n), name);
  }
  t.is(abi.strerror(2), 'No such file or directory');
  t.is(abi.strerror(-2), 'No such file or directory');
  t.is(abi.strerror(25), 'Inappropriate ioctl for device');
  t.is(abi.strerror(114), 'Operation already in progress');
  t.is(abi.strerror(1000), 'KVM: hypercall not implemented');
  t.is(abi.strerror(11), 'Resource temporarily unavailable');
  t.is(abi.strerror(14), 'Bad address');
  t.is(abi.strerror(0), 'Success');
  t.is(abi.strerror(41), 'Unknown error 41');
});

test('AbiDecodeError shape', (t) => {
  const e = new AbiDecodeError('kvmi_event', 'size', 'must be at least 8, got 0');
  t.true(e instanceof Error);
  t.is(e.name, 'AbiDecodeError');
  t.is(e.code, 'ERR_KVMI_ABI');
  t.is(e.struct, 'kvmi_event');
  t.is(e.field, 'size');
  t.is(e.message, 'kvmi_event: size must be at least 8, got 0');
});
