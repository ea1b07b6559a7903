/**
 * Every public entry checks its arguments and throws UsageError naming the
 * argument (nothing reaches the guest, nothing is opened or left mapped); and
 * sessions sharing one VM share its token budget fairly, without listener warnings.
 */
import test from 'ava';
import { KvmMem, UsageError, scan, type TargetVm } from '../src/index.js';
import { ModelLab } from '../src/lab/index.js';

const MiB = 1 << 20;
const PS = 4096;

async function lab() {
  return ModelLab.start({ vms: [{ name: 'g', memory: 8 * MiB }] });
}

test('bad arguments to the session are UsageErrors naming the argument; guest memory untouched', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  const vm = l.vm('g');
  const mem = l.modelVm('g').memory;
  mem.write(0x1000n, Buffer.from('unchanged'));
  const usage = async (p: Promise<unknown> | (() => unknown), re: RegExp) => {
    const e = await t.throwsAsync(async () => (typeof p === 'function' ? p() : p), { instanceOf: UsageError });
    t.is(e?.code, 'ERR_INVALID_ARG');
    t.regex(e!.message, re);
  };
  await usage(s.write(vm, 0x1000n, 'hello' as unknown as Uint8Array), /data must be a Buffer or Uint8Array, got string/);
  await usage(s.write(vm, 0x1000n, null as unknown as Uint8Array), /data must be a Buffer/);
  await usage(s.mapRange(vm, (1n << 64n) - 1n, 2), /runs past the end of the 64-bit/);
  await usage(s.read(vm, (1n << 64n) - 1n, 2), /runs past the end/);
  await usage(s.map(null as unknown as TargetVm, 0n), /map: vm must be a connected VM/);
  await usage(s.read(undefined as unknown as TargetVm, 0n, 1), /read: vm must be/);
  await usage(s.map(vm, ' 12'), /gpa " 12" is not an address/);
  await usage(s.map(vm, 1.5), /gpa 1.5 is not an integer/);
  await usage(s.map(vm, -1), /outside 0..2\^64-1/);
  await usage(s.mapRange(vm, 0n, 0), /length must be a positive integer/);
  await usage(s.mapRange(vm, 0n, '16' as unknown as number), /length must be a positive integer, got "16"/);
  await usage(s.read(vm, 0n, -1), /length must be a non-negative integer/);
  const page = await s.map(vm, 0x1000n);
  await usage(() => page.read(4000, 200), /not inside the page/);
  page.unmap();
  const range = await s.mapRange(vm, 0x1000n, 2 * PS);
  await usage(() => range.page(2), /page: index 2 is outside 0..1/);
  range.unmap();
  t.is((await s.read(vm, 0x1000n, 0)).length, 0, 'a read of 0 bytes is an empty Buffer');
  await s.write(vm, 0x1000n, Buffer.alloc(0));
  t.is(mem.read(0x1000n, 9).toString('latin1'), 'unchanged');
  t.is(l.host.stats().mappings, 0);
  s.close();
});

test('bad session options are refused before the device is opened', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const openFiles = () => l.host.driver.file_list.size;
  const before = openFiles();
  for (const [opts, re] of [
    [{ retryDelayMs: -1 }, /options.retryDelayMs must be an integer in 0..3600000, got -1/],
    [{ deadlineMs: NaN }, /options.deadlineMs must be an integer/],
    [{ retries: 0 }, /options.retries/],
    [{ maxTokensInFlight: 1.5 }, /options.maxTokensInFlight/],
    [{ maxTokensInFlight: '8' }, /options.maxTokensInFlight must be an integer in 1..4096, got "8"/],
  ] as const) {
    const e = t.throws(() => KvmMem.open({ model: l.host, ...(opts as object) }), { instanceOf: UsageError });
    t.regex(e!.message, re);
  }
  t.is(openFiles(), before, 'no device file was opened');
  t.is(typeof before, 'number');
});

test('scan arguments: from past to, bad callbacks, a non-session', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const s = l.open();
  t.teardown(() => s.close());
  const vm = l.vm('g');
  await t.throwsAsync(scan(s, vm, 'x', { from: 0x2000n, to: 0x1000n }), { instanceOf: UsageError, message: /from 0x2000 is past to 0x1000/ });
  await t.throwsAsync(scan(s, vm, 'x', { to: 0x1000n, onProgress: 5 as unknown as () => void }), { instanceOf: UsageError });
  await t.throwsAsync(scan({} as never, vm, 'x', { to: 0x1000n }), { instanceOf: UsageError, message: /session must be a Session/ });
  await t.throwsAsync(scan(s, null as never, 'x', { to: 0x1000n }), { instanceOf: UsageError, message: /scan: vm must be/ });
  t.deepEqual((await scan(s, vm, 'x', { from: 0x1000n, to: 0x1000n })).matches, [], 'an empty range is fine');
});

test.serial('sixteen sessions on one VM share its token budget: no refused tokens, no retries, no listener warnings', async (t) => {
  const l = await lab();
  t.teardown(() => l.close());
  const warnings: Error[] = [];
  const onWarning = (w: Error) => warnings.push(w);
  process.on('warning', onWarning);
  t.teardown(() => process.off('warning', onWarning));
  const vm = l.vm('g');
  const sessions = Array.from({ length: 16 }, () => l.open());
  // Each session maps 64 single pages and two ranges, all at once.
  await Promise.all(sessions.map(async (s, k) => {
    for (let i = 0; i < 64; i++) (await s.map(vm, BigInt(((k * 64 + i) % 2048) * PS))).unmap();
    const [a, b] = await Promise.all([s.mapRange(vm, BigInt(k * 16 * PS), 40 * PS), s.mapRange(vm, BigInt(k * 16 * PS + MiB), 24 * PS)]);
    a.unmap();
    b.unmap();
  }));
  await new Promise((r) => setImmediate(r));
  const stats = sessions.map((s) => s.stats);
  t.is(stats.reduce((n, x) => n + x.tokensRefused, 0), 0, 'the host never had to refuse a token request');
  t.is(stats.reduce((n, x) => n + x.retries, 0), 0);
  t.is(stats.reduce((n, x) => n + x.maps, 0), 16 * (64 + 64));
  t.deepEqual(warnings.map((w) => w.name), [], 'no MaxListenersExceededWarning or any other warning');
  t.is(l.host.stats().mappings, 0);
  for (const s of sessions) s.close();
});
