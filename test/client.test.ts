/**
 * The client against the model, end to end through real sockets: the tool's
 * IntrospectionServer, the model host's device manager (handshake, hook), the
 * KVMI protocol (tokens), the model /dev/kvmmem driver and real page remaps.
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { KVM_INTRO_MEM_MAP } from '../src/abi/ioctl.js';
import { ERRNO } from '../src/abi/errno.js';
import { KvmMem, UseAfterUnmapError, RetryExhaustedError, type TargetVm } from '../src/client/index.js';
import { ModelLab, type LabVmSpec } from '../src/lab/index.js';
import { VmGoneError, type Vm } from '../src/channel/index.js';
import { GuestMemory, ModelDevice, type ModelHostOptions } from '../src/model/index.js';
import type { Device, IoctlArg } from '../src/device/device.js';
import { ClosedError, DeviceError, KvmmemError, NoDeviceError } from '../src/errors.js';

const MiB = 1 << 20;
const PS = 4096;

async function lab(vms: LabVmSpec[] = [{ name: 'g1', memory: 16 * MiB }], host: ModelHostOptions = {}) {
  return ModelLab.start({ vms, host });
}

/** A TargetVm that forwards to `vm` but gets its tokens through `tokens` (to observe or disturb). */
function wrapVm(vm: Vm, tokens: (n: number) => Promise<(Uint8Array | Error)[]>): TargetVm {
  return {
    get uuid() { return vm.uuid; }, get name() { return vm.name; }, get state() { return vm.state; },
    on: (e, f) => (e === 'unhook' ? vm.on('unhook', f) : vm.on('gone', f)),
    off: (e, f) => (e === 'unhook' ? vm.off('unhook', f) : vm.off('gone', f)),
    getMapTokensSettled: tokens,
  };
}

test('full path: map, live aliasing both ways, unmap, close leaves nothing mapped', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const mem = l.modelVm('g1').memory;
  mem.write(0x5000n, Buffer.from('hello from the guest'));
  const s = l.open();
  const page = await s.map(l.vm('g1'), 0x5123n); // any gpa in the page
  t.is(page.gpa, 0x5123n, 'gpa is what was asked for, as MappedRange.gpa');
  t.is(page.pageGpa, 0x5000n);
  t.is(page.offset, 0x123);
  t.is(page.address % BigInt(PS), 0n);
  t.is(page.buffer.length, PS);
  t.is(page.buffer.toString('latin1', 0, 20), 'hello from the guest');
  // guest -> introspector, live
  mem.write(0x5000n, Buffer.from('HELLO'));
  t.is(page.buffer.toString('latin1', 0, 5), 'HELLO');
  // introspector -> guest
  page.buffer.write('written by the tool', 100, 'latin1');
  t.is(mem.read(0x5000n + 100n, 19).toString('latin1'), 'written by the tool');
  t.is(l.host.stats().mappings, 1);
  t.deepEqual(s.mappings().map((m) => [m.kind, m.gpa, m.address]), [['page', 0x5000n, page.address]]);
  const stale = page.buffer;
  page.unmap();
  t.false(page.mapped);
  t.is(l.host.stats().mappings, 0);
  // the address now holds a fresh zeroed page: a stale view reads zeros and never faults
  t.true(stale.every((b) => b === 0));
  t.is(mem.read(0x5000n, 5).toString('latin1'), 'HELLO');
  await s.map(l.vm('g1'), 0x6000n);
  await s.mapRange(l.vm('g1'), 0x10000n, 5 * PS);
  t.is(l.host.stats().mappings, 6);
  s.close();
  t.is(l.host.stats().mappings, 0, 'driver release unmapped everything this file mapped');
  t.is(l.host.driver.file_list.size, 0);
});

test('mapRange of 1,000 pages is one contiguous live view equal to the VM memory', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const mem = l.modelVm('g1').memory;
  const data = randomBytes(1000 * PS);
  mem.write(0x200000n, data);
  const s = l.open();
  const r = await s.mapRange(l.vm('g1'), 0x200000n, data.length);
  t.is(r.pages, 1000);
  t.true(r.buffer.equals(data));
  t.is(s.stats.live, 1000);
  t.is(l.host.stats().mappings, 1000);
  mem.write(0x200000n + 999n * 4096n, Buffer.from('last page changed'));
  t.is(r.page(999).toString('latin1', 0, 17), 'last page changed');
  // unaligned ranges cover the pages they touch and view exactly what was asked for
  const u = await s.mapRange(l.vm('g1'), 0x200000n + 4090n, 10);
  t.is(u.pages, 2);
  t.true(u.buffer.equals(data.subarray(4090, 4100)));
  r.unmap();
  u.unmap();
  t.is(l.host.stats().mappings, 0);
  t.is(s.stats.live, 0);
  s.close();
});

test('read and write handle page crossings', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  const vm = l.vm('g1');
  const payload = randomBytes(3 * PS + 123);
  await s.write(vm, 0x3000n + 4000n, payload);
  t.true(l.modelVm('g1').memory.read(0x3000n + 4000n, payload.length).equals(payload));
  t.true((await s.read(vm, 0x3000n + 4000n, payload.length)).equals(payload));
  t.is(l.host.stats().mappings, 0, 'read/write leave nothing mapped');
  s.close();
});

test('tokens are pipelined: the host sees a whole batch outstanding at once', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const vm = l.vm('g1');
  let hostOutstandingPeak = 0;
  const spy = wrapVm(vm, async (n) => {
    const tokens = await vm.getMapTokensSettled(n);
    // issued by the host and not yet consumed: the requests overlapped on the host side
    hostOutstandingPeak = Math.max(hostOutstandingPeak, l.host.stats().tokensOutstanding);
    return tokens;
  });
  const s = l.open();
  const r = await s.mapRange(spy, 0n, 64 * PS);
  t.is(hostOutstandingPeak, 8, 'v6 host limit of 8 outstanding tokens reached by one round trip');
  t.true(vm.maxInFlight >= 8, `tool side had ${vm.maxInFlight} requests in flight`);
  t.is(s.stats.tokenRoundTrips, 8, '64 pages in 8 round trips, not 64');
  r.unmap();
  s.close();
});

test('a session asking for more tokens than the host allows backs off to the limit', async (t) => {
  const l = await lab(undefined, { tokenLimit: 3 });
  t.teardown(() => l.close());
  const s = l.open({ maxTokensInFlight: 16 });
  const r = await s.mapRange(l.vm('g1'), 0n, 20 * PS);
  t.is(r.pages, 20);
  t.is(l.host.stats().mappings, 20);
  s.close();
});

test('maxTokensInFlight above a v6 host\'s limit is clamped to it once seen: as few round trips as the default', async (t) => {
  const l = await lab([{ name: 'g1', memory: 32 * MiB }]);
  t.teardown(() => l.close());
  const pages = 2048;
  const rounds = async (maxTokensInFlight: number) => {
    const s = l.open({ maxTokensInFlight });
    for (let i = 0; i < 3; i++) (await s.mapRange(l.vm('g1'), 0n, pages * PS)).unmap();
    const st = { ...s.stats };
    s.close();
    return st;
  };
  const dflt = await rounds(8);
  const big = await rounds(256);
  t.is(dflt.tokensRefused, 0);
  t.is(dflt.tokenRoundTrips, 3 * pages / 8);
  // the first batch learns the limit (8 granted, the rest refused); every later batch asks for 8
  t.true(big.tokensRefused <= 256, `refused ${big.tokensRefused}`);
  t.true(big.tokenRoundTrips <= dflt.tokenRoundTrips + 2, `round trips ${big.tokenRoundTrips} vs ${dflt.tokenRoundTrips}`);
  t.is(l.host.stats().mappings, 0);
});

test('readInto reads up to the first page that cannot be mapped and names it; read() names the gpa in its error', async (t) => {
  const M = BigInt(MiB);
  const mem = GuestMemory.anonymous(4n * M, { regions: [{ gpa: 0n, size: M, fileOffset: 0n }, { gpa: 2n * M, size: 2n * M, fileOffset: 2n * M }] });
  const l = await ModelLab.start({ vms: [{ name: 'h', memory: mem }] });
  t.teardown(async () => { await l.close(); mem.close(); });
  mem.write(M - 100n, Buffer.from('tail-of-ram'));
  const s = l.open();
  const into = Buffer.alloc(8192, 0xee);
  const r = await s.readInto(l.vm('h'), M - 100n, into);
  t.is(r.bytesRead, 100);
  t.is(r.error?.code, 'EFAULT');
  t.is(r.error?.gpa, M);
  t.regex(r.error!.message, /^gpa 0x100000 of vm h: /);
  t.is(into.subarray(0, 11).toString(), 'tail-of-ram');
  t.is(into[100], 0xee, 'nothing written past what was read');
  const whole = await s.readInto(l.vm('h'), 2n * M, Buffer.alloc(5000));
  t.deepEqual([whole.bytesRead, whole.error], [5000, null]);
  const none = await s.readInto(l.vm('h'), M + 5n, Buffer.alloc(10));
  t.is(none.bytesRead, 0);
  t.is(none.error?.gpa, M);
  const e = await t.throwsAsync(s.read(l.vm('h'), M - 100n, 8192));
  t.regex(e!.message, /gpa 0x100000 of vm h/);
  t.is(l.host.stats().mappings, 0, 'nothing left mapped');
  s.close();
});

test('an expired token (ENOENT) is replaced once; a second failure is a typed error', async (t) => {
  let clock = 1_000_000;
  const l = await lab(undefined, { now: () => clock });
  t.teardown(() => l.close());
  const vm = l.vm('g1');
  let expireNext = 1;
  const aging = wrapVm(vm, async (n) => {
    const tokens = await vm.getMapTokensSettled(n);
    if (expireNext-- > 0) clock += 10_000; // older than the 3 s lifetime by the time MAP uses them
    return tokens;
  });
  const s = l.open();
  const p = await s.map(aging, 0x1000n);
  t.is(s.stats.retries, 1);
  t.is(l.host.stats().mappings, 1);
  p.unmap();
  expireNext = 2;
  const e = await t.throwsAsync(s.map(aging, 0x1000n), { instanceOf: DeviceError });
  t.is(e?.code, 'ENOENT');
  t.is(e?.syscall, 'KVM_INTRO_MEM_MAP');
  t.regex(e!.message, /single-use/);
  t.is(l.host.stats().mappings, 0);
  t.deepEqual(s.mappings(), []);
  s.close();
});

/** A binding over the model device that fails the first `n` MAP records with `errno`. */
function flaky(inner: Device, errno: number, n: { left: number }): Device {
  return {
    get path() { return inner.path; },
    get closed() { return inner.closed; },
    ioctl(request: number, arg: IoctlArg) {
      if (request === KVM_INTRO_MEM_MAP && n.left > 0) { n.left--; throw inner.error(request, -errno); }
      return inner.ioctl(request, arg);
    },
    ioctlBatch(request, args, stride, count, results) {
      if (request !== KVM_INTRO_MEM_MAP || n.left === 0) return inner.ioctlBatch(request, args, stride, count, results);
      let ok = 0;
      for (let i = 0; i < count; i++) {
        if (n.left > 0) { n.left--; results[i] = -errno; continue; }
        const one = new Int32Array(1);
        ok += inner.ioctlBatch(request, args.subarray(i * stride, (i + 1) * stride), stride, 1, one);
        results[i] = one[0]!;
      }
      return ok;
    },
    error: (request, e) => inner.error(request, e),
    close: () => inner.close(),
  };
}

test('EAGAIN/EBUSY are retried with fresh tokens and bounded backoff, then a typed error', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const vm = l.vm('g1');
  const left = { left: 5 };
  const s = KvmMem.open({ binding: flaky(ModelDevice.open(l.host), ERRNO.EBUSY, left), retryDelayMs: 20 });
  const r = await s.mapRange(vm, 0n, 4 * PS);
  t.is(left.left, 0);
  t.is(r.pages, 4);
  t.true(s.stats.retries >= 5);
  t.is(l.host.stats().mappings, 4);
  t.is(s.stats.tokens, 4 + 5, 'every try used a fresh token: no token reuse');
  s.close();

  const s2 = KvmMem.open({ binding: flaky(ModelDevice.open(l.host), ERRNO.EAGAIN, { left: 1000 }), retries: 4, retryDelayMs: 5 });
  const e = await t.throwsAsync(s2.map(vm, 0n), { instanceOf: RetryExhaustedError });
  t.is(e?.code, 'EAGAIN');
  t.regex(e!.message, /after 4 tries/);
  t.is(l.host.stats().mappings, 0);
  s2.close();
});

test('a failure in the middle of mapRange unmaps the pages already mapped', async (t) => {
  const l = await lab([{ name: 'g1', memory: 1 * MiB }]);
  t.teardown(() => l.close());
  const s = l.open();
  // pages 0..255 exist, 256.. are beyond the 1 MiB VM: EFAULT from the host
  const e = await t.throwsAsync(s.mapRange(l.vm('g1'), 0xf0000n, 32 * PS), { instanceOf: DeviceError });
  t.is(e?.code, 'EFAULT');
  t.regex(e!.message, /outside the target VM's memory/);
  t.is(l.host.stats().mappings, 0);
  t.deepEqual(s.mappings(), []);
  t.is(s.stats.live, 0);
  s.close();
});

test('unhook in the middle of a mapRange: zero host mappings and VmGoneError; other VMs untouched', async (t) => {
  const l = await lab([{ name: 'a', memory: 16 * MiB }, { name: 'b', memory: 16 * MiB }]);
  t.teardown(() => l.close());
  const s = l.open();
  const other = await s.map(l.vm('b'), 0x1000n);
  l.modelVm('b').memory.write(0x1000n, Buffer.from('vm b'));
  const a = l.vm('a');
  let batches = 0;
  const trigger = wrapVm(a, (n) => {
    if (++batches === 4) void l.modelVm('a').preunhook(); // the device manager wants to migrate the VM
    return a.getMapTokensSettled(n);
  });
  const e = await t.throwsAsync(s.mapRange(trigger, 0n, 2000 * PS), { instanceOf: VmGoneError });
  t.is(e?.code, 'VM_GONE');
  await new Promise((r) => setTimeout(r, 50));
  t.is(l.host.stats().vms.find((v) => v.name === 'a')!.mappings, 0);
  t.is(a.state, 'gone');
  t.true(other.mapped);
  t.is(other.buffer.toString('latin1', 0, 4), 'vm b');
  t.is(l.host.stats().mappings, 1);
  await t.throwsAsync(s.map(a, 0n), { instanceOf: VmGoneError });
  t.is(s.stats.revoked > 0 || batches >= 4, true);
  s.close();
  t.is(l.host.stats().mappings, 0);
});

test('pages mapped before an unhook are revoked and throw use-after-unmap', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  const p = await s.map(l.vm('g1'), 0x1000n);
  const r = await s.mapRange(l.vm('g1'), 0x10000n, 3 * PS);
  const stale = p.buffer;
  await l.modelVm('g1').preunhook();
  t.false(p.mapped);
  t.false(r.mapped);
  const e = t.throws(() => p.buffer, { instanceOf: UseAfterUnmapError });
  t.is(e?.code, 'USE_AFTER_UNMAP');
  t.regex(e!.message, /revoked when its VM was unhooked/);
  t.throws(() => r.page(0), { instanceOf: UseAfterUnmapError });
  t.true(stale.every((b) => b === 0));
  t.is(s.stats.revoked, 4);
  t.is(l.host.stats().mappings, 0);
  t.deepEqual(s.mappings(), []);
  s.close();
});

test('use after unmap and after close throw typed errors and never crash', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  const p = await s.map(l.vm('g1'), 0n);
  const r = await s.mapRange(l.vm('g1'), 0x4000n, 2 * PS);
  p.unmap();
  for (const f of [() => p.buffer, () => p.address, () => p.read(0, 4)]) {
    t.is(t.throws(f, { instanceOf: UseAfterUnmapError })?.code, 'USE_AFTER_UNMAP');
  }
  // unmap() is idempotent, as close() is
  t.notThrows(() => p.unmap());
  t.notThrows(() => p[Symbol.dispose]());
  const staleRange = r.buffer;
  s.close();
  t.true(s.closed);
  for (const f of [() => r.buffer, () => r.page(0)]) {
    const e = t.throws(f, { instanceOf: UseAfterUnmapError });
    t.regex(e!.message, /torn down when its session closed/);
  }
  t.notThrows(() => r.unmap());
  t.is(staleRange.readUInt32LE(0), 0); // still readable, zeroed: no SIGSEGV
  const c = await t.throwsAsync(s.map(l.vm('g1'), 0n), { instanceOf: ClosedError });
  t.is(c?.code, 'EBADF');
  t.notThrows(() => s.close());
});

test('close during a mapRange in flight: ClosedError, nothing left mapped', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  const pending = s.mapRange(l.vm('g1'), 0n, 500 * PS);
  await new Promise((r) => setTimeout(r, 5));
  s.close();
  await t.throwsAsync(pending, { instanceOf: ClosedError });
  t.is(l.host.stats().mappings, 0);
});

test('`using` unmaps at scope exit', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  {
    using p = await s.map(l.vm('g1'), 0n);
    t.is(l.host.stats().mappings, 1);
    t.true(p.mapped);
  }
  t.is(l.host.stats().mappings, 0);
  s.close();
});

test('a page dropped without unmap() is unmapped by the finalizer', async (t) => {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) { t.fail('run with --expose-gc (ava nodeArguments)'); return; }
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  await (async () => { await s.map(l.vm('g1'), 0x2000n); })();
  t.is(l.host.stats().mappings, 1);
  for (let i = 0; i < 20 && l.host.stats().mappings > 0; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 20));
  }
  t.is(l.host.stats().mappings, 0);
  t.deepEqual(s.mappings(), []);
  s.close();
});

test('bad input: typed errors, nothing half-done', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  const vm = l.vm('g1');
  t.is((await t.throwsAsync<KvmmemError>(s.map(vm, -1)))?.code, 'ERR_INVALID_ARG');
  t.is((await t.throwsAsync<KvmmemError>(s.map(vm, 'not an address')))?.code, 'ERR_INVALID_ARG');
  t.is((await t.throwsAsync<KvmmemError>(s.mapRange(vm, 0n, 0)))?.code, 'ERR_INVALID_ARG');
  t.is((await t.throwsAsync<KvmmemError>(s.mapRange(vm, 0n, 5 * 2 ** 30)))?.code, 'ERR_INVALID_ARG');
  const far = await t.throwsAsync(s.map(vm, 1n << 40n), { instanceOf: DeviceError });
  t.is(far?.code, 'EFAULT');
  t.is(l.host.stats().mappings, 0);
  t.is(l.host.stats().tokensOutstanding, 0);
  t.deepEqual(s.mappings(), []);
  s.close();
});

test('KvmMem.open() without /dev/kvmmem points at the model', (t) => {
  const e = t.throws(() => KvmMem.open({ device: '/dev/kvmmem-missing' }), { instanceOf: NoDeviceError });
  t.regex(e!.message, /use the built-in model/);
});

test('another process writing the VM memory file is seen live through a mapped page', async (t) => {
  const path = `/dev/shm/kvmmem-client-test-${process.pid}.ram`;
  execFileSync('truncate', ['-s', String(4 * MiB), path]);
  const mem = GuestMemory.fromFile(path);
  const l = await lab([{ name: 'file', memory: mem }]);
  t.teardown(async () => { await l.close(); mem.close(); execFileSync('rm', ['-f', path]); });
  const s = l.open();
  const p = await s.map(l.vm('file'), 0x3000n);
  execFileSync('sh', ['-c', `printf 'written by dd' | dd of=${path} bs=1 seek=${0x3000 + 64} conv=notrunc status=none`]);
  t.is(p.buffer.toString('latin1', 64, 77), 'written by dd');
  s.close();
});
