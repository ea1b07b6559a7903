// KVMI_READ_PHYSICAL / KVMI_WRITE_PHYSICAL: the wire layout (src/abi/kvmi.ts),
// the tool side (Vm.readPhysical / writePhysical, src/channel/vm.ts) and the
// model host's side (src/model/kvmi-server.ts), end to end and against hostile
// peers on either end.
import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import { once } from 'node:events';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse as uuidParse } from 'uuid';
import {
  AbiDecodeError, FrameReader, KVMI_IDS, INTROSPECTOR2QEMU_SIZE, PHYSICAL_MAX_SIZE, decodeReadPhysical, decodeWritePhysical,
  encodeErrorCode, encodeGetVersionReply, encodeMessage, encodeQemu2Introspector, encodeReadPhysical, encodeWritePhysical,
  physicalRangeProblem, type KvmiFrame, type KvmiProtocol,
} from '../src/abi/index.js';
import { ERRNO } from '../src/abi/errno.js';
import { IntrospectionServer, KvmiError, ProtocolError, TimeoutError, VmGoneError, type Vm } from '../src/channel/index.js';
import { GuestMemory, ModelHost } from '../src/model/index.js';

const COOKIE = 'read-physical-cookie';
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-rp-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const sockPath = () => join(dir, `r${++n}.sock`);
const PS = 4096;
const MiB = 1 << 20;
const MIB = 1n << 20n;

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------
// ABI
// ---------------------------------------------------------------------------
test('kvmi_vm_read_physical: golden bytes; the same bytes as the v4/v6 `__u64 size` layout for every valid size', (t) => {
  const b = encodeReadPhysical({ gpa: 0x1122334455667000n, size: 4096 });
  t.is(b.toString('hex'), '0070665544332211' + '0010' + '0000' + '00000000');
  t.deepEqual(decodeReadPhysical(b), { gpa: 0x1122334455667000n, size: 4096 });
  for (const size of [1, 2, 255, 256, 4095, 4096]) {
    const legacy = Buffer.alloc(16);
    legacy.writeBigUInt64LE(0x1000n, 0);
    legacy.writeBigUInt64LE(BigInt(size), 8); // struct kvmi_read_physical { __u64 gpa; __u64 size; }
    t.true(encodeReadPhysical({ gpa: 0x1000n, size }).equals(legacy), `size ${size}`);
  }
  const w = encodeWritePhysical(0x2ff0n, Buffer.from('0123456789abcdef'));
  t.is(w.length, 32);
  const d = decodeWritePhysical(w);
  t.is(d.gpa, 0x2ff0n);
  t.is(d.size, 16);
  t.is(d.data.toString(), '0123456789abcdef');
});

test('physical requests: size 0, over a page, crossing a page or a bad gpa are refused before the wire', (t) => {
  for (const [gpa, size] of [[0n, 0], [0n, 4097], [0xfffn, 2], [0x1800n, 0x801], [0n, 1.5], [0n, -1]] as const) {
    t.not(physicalRangeProblem(gpa, size), null, `${gpa} +${size}`);
    t.throws(() => encodeReadPhysical({ gpa, size }), { code: 'ERR_INVALID_ARG' });
  }
  t.is(physicalRangeProblem(0x1800n, 0x800), null);
  t.throws(() => encodeReadPhysical({ gpa: -1n, size: 1 }), { code: 'ERR_INVALID_ARG' });
  t.throws(() => encodeReadPhysical({ gpa: 1n << 64n, size: 1 }), { code: 'ERR_INVALID_ARG' });
  t.throws(() => encodeWritePhysical(0n, new Uint8Array(0)), { code: 'ERR_INVALID_ARG' });
  t.throws(() => encodeWritePhysical(0n, new Uint8Array(PS + 1)), { code: 'ERR_INVALID_ARG' });
});

test('physical requests decode as the host does: wrong length or non-zero padding is an AbiDecodeError', (t) => {
  const ok = encodeReadPhysical({ gpa: 0n, size: 8 });
  t.throws(() => decodeReadPhysical(ok.subarray(0, 15)), { instanceOf: AbiDecodeError });
  t.throws(() => decodeReadPhysical(Buffer.concat([ok, Buffer.alloc(1)])), { instanceOf: AbiDecodeError });
  for (const at of [10, 11, 12, 15]) {
    const bad = Buffer.from(ok);
    bad[at] = 1;
    t.throws(() => decodeReadPhysical(bad), { instanceOf: AbiDecodeError, message: /padding/ }, `byte ${at}`);
    t.throws(() => decodeWritePhysical(bad), { instanceOf: AbiDecodeError, message: /padding/ }, `write byte ${at}`);
  }
  t.throws(() => decodeWritePhysical(Buffer.alloc(15)), { instanceOf: AbiDecodeError });
  // Property: every valid request survives the round trip; arbitrary 16 bytes never throw anything but AbiDecodeError.
  fc.assert(fc.property(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), fc.integer({ min: 1, max: PS }), (gpa, size) => {
    const page = gpa & ~0xfffn;
    const g = page + BigInt(Math.min(Number(gpa & 0xfffn), PS - size));
    const r = decodeReadPhysical(encodeReadPhysical({ gpa: g, size }));
    return r.gpa === g && r.size === size;
  }));
  fc.assert(fc.property(fc.uint8Array({ minLength: 0, maxLength: 40 }), (bytes) => {
    try {
      decodeReadPhysical(bytes);
      decodeWritePhysical(bytes);
    } catch (e) {
      if (!(e instanceof AbiDecodeError)) throw e;
    }
  }));
});

// ---------------------------------------------------------------------------
// End to end on the model host
// ---------------------------------------------------------------------------
async function modelVm(t: ExecutionContext, opts: { memory?: GuestMemory | number; protocol?: KvmiProtocol; limits?: Record<string, number> } = {}) {
  const path = sockPath();
  const protocol = opts.protocol ?? 'v6';
  const server = await IntrospectionServer.listen({ unix: path }, { cookie: COOKIE, protocol, ...(opts.limits ? { limits: opts.limits } : {}) });
  const host = new ModelHost({ cookie: COOKIE, protocol });
  t.teardown(async () => {
    host.close();
    await server.close();
  });
  const mvm = host.createVm({ name: 'guest', memory: opts.memory ?? 4 * MiB });
  const vmP = server.waitForVm({ name: 'guest' }, 5000);
  await mvm.attach({ unix: path });
  return { server, host, mvm, vm: await vmP };
}

for (const protocol of ['v6', 'v4'] as const) {
  test(`readPhysical/writePhysical (${protocol}): any range, split per page, equal to the guest's memory`, async (t) => {
    const { mvm, vm } = await modelVm(t, { protocol });
    const content = randomBytes(256 * 1024);
    mvm.memory.write(0x10000n, content);
    // Unaligned start and end, crossing many pages.
    const got = await vm.readPhysical(0x10000n + 123n, 3 * PS + 7);
    t.true(got.equals(content.subarray(123, 123 + 3 * PS + 7)));
    // Longer than one window of pipelined requests.
    t.true((await vm.readPhysical(0x10000, content.length)).equals(content));
    t.is((await vm.readPhysical(0x10000n, 0)).length, 0);
    const data = randomBytes(5 * PS + 99);
    await vm.writePhysical(0x80000n + 4000n, data);
    t.true(mvm.memory.read(0x80000n + 4000n, data.length).equals(data));
    t.true((await vm.readPhysical(0x80000n + 4000n, data.length)).equals(data));
    const counts = mvm.connection!.counts;
    t.is(counts.physicalWrites, 7, 'one request per page piece');
    t.is(counts.framingErrors, 0);
    t.is(vm.state, 'connected');
  });
}

test('readPhysical: holes and gpas beyond the memory are ENOENT naming the piece; the connection stays open', async (t) => {
  const mem = GuestMemory.anonymous(8 * MiB, { name: 'holes', regions: [{ gpa: 0n, size: 1n * MIB, fileOffset: 0n }, { gpa: 4n * MIB, size: 4n * MIB, fileOffset: 1n * MIB }] });
  t.teardown(() => mem.close());
  const { vm } = await modelVm(t, { memory: mem });
  const hole = await t.throwsAsync(vm.readPhysical(2n * MIB, 16), { instanceOf: KvmiError });
  t.is(hole!.code, 'ENOENT');
  t.regex(hole!.message, /KVMI_READ_PHYSICAL\(gpa 0x200000, 16 bytes\)/);
  t.regex(hole!.hint!, /hole/);
  // A read that starts in RAM and runs into the hole fails at the first piece in the hole.
  const runInto = await t.throwsAsync(vm.readPhysical(1n * MIB - 8n, 16), { instanceOf: KvmiError });
  t.regex(runInto!.message, /gpa 0x100000, 8 bytes/);
  await t.throwsAsync(vm.readPhysical(8n * MIB, 1), { code: 'ENOENT' });
  await t.throwsAsync(vm.readPhysical(0xffff_ffff_ffff_f000n, PS), { code: 'ENOENT' });
  await t.throwsAsync(vm.writePhysical(9n * MIB, Buffer.from('x')), { code: 'ENOENT' });
  t.is(vm.state, 'connected');
  t.is((await vm.readPhysical(4n * MIB, 4)).length, 4);
});

test('writePhysical to a read-only image is EPERM; the image is unchanged', async (t) => {
  const file = join(dir, 'ro.img');
  writeFileSync(file, Buffer.alloc(MiB, 0x41));
  const mem = GuestMemory.fromFile(file, { readOnly: true });
  t.teardown(() => mem.close());
  const { vm } = await modelVm(t, { memory: mem });
  t.is((await vm.readPhysical(0x1000n, 4)).toString(), 'AAAA');
  await t.throwsAsync(vm.writePhysical(0x1000n, Buffer.from('BBBB')), { instanceOf: KvmiError, code: 'EPERM' });
  t.is(mem.read(0x1000n, 4).toString(), 'AAAA');
});

test('readPhysical arguments: bad gpa, length or data are UsageErrors; maxPhysicalBytes bounds one call', async (t) => {
  const { vm } = await modelVm(t, { limits: { maxPhysicalBytes: 64 * 1024 } });
  for (const gpa of [-1, -1n, 1n << 64n, 1.5, Number.MAX_SAFE_INTEGER + 2, '0x1000' as unknown as bigint]) {
    await t.throwsAsync(vm.readPhysical(gpa, 1), { code: 'ERR_INVALID_ARG' }, String(gpa));
  }
  for (const len of [-1, 1.5, NaN, 64 * 1024 + 1]) await t.throwsAsync(vm.readPhysical(0n, len), { code: 'ERR_INVALID_ARG' }, String(len));
  await t.throwsAsync(vm.readPhysical((1n << 64n) - 4n, 8), { code: 'ERR_INVALID_ARG', message: /64-bit/ });
  await t.throwsAsync(vm.writePhysical(0n, 'text' as unknown as Uint8Array), { code: 'ERR_INVALID_ARG' });
  t.is((await vm.readPhysical(0n, 64 * 1024)).length, 64 * 1024);
});

test('the model host refuses hostile requests as KVMI does: EINVAL for bad sizes and padding, closes on a malformed body', async (t) => {
  const { mvm, vm } = await modelVm(t);
  const ids = KVMI_IDS.v6;
  const raw = (gpa: bigint, size: bigint, pad = 0) => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(gpa, 0);
    b.writeBigUInt64LE(size, 8); // the v6 `__u64 size` reading
    if (pad) b[12] = pad;
    return b;
  };
  const code = async (id: number, body: Buffer) => (await vm.request(id, body).then(() => 'OK', (e: KvmiError) => e.code));
  t.is(await code(ids.READ_PHYSICAL, raw(0x1000n, 0n)), 'EINVAL', 'size 0');
  t.is(await code(ids.READ_PHYSICAL, raw(0x1000n, 4097n)), 'EINVAL', 'size over a page');
  t.is(await code(ids.READ_PHYSICAL, raw(0x1000n, 1n << 32n)), 'EINVAL', 'a u64 size past the u16 field: non-zero padding');
  t.is(await code(ids.READ_PHYSICAL, raw(0x1ff0n, 32n)), 'EINVAL', 'crossing a page');
  t.is(await code(ids.READ_PHYSICAL, raw(0x1000n, 8n, 1)), 'EINVAL', 'padding');
  t.is(await code(ids.READ_PHYSICAL, raw(0xffff_ffff_ffff_fff0n, 16n)), 'ENOENT', 'top of the address space');
  const w = (gpa: bigint, size: number, data: Buffer) => Buffer.concat([raw(gpa, BigInt(size)), data]);
  t.is(await code(ids.WRITE_PHYSICAL, w(0x1000n, 8, Buffer.alloc(4))), 'EINVAL', 'data shorter than size');
  t.is(await code(ids.WRITE_PHYSICAL, w(0x1000n, 4, Buffer.alloc(8))), 'EINVAL', 'data longer than size');
  t.is(await code(ids.WRITE_PHYSICAL, w(0x1000n, 0, Buffer.alloc(0))), 'EINVAL', 'empty write');
  t.is(await code(ids.WRITE_PHYSICAL, w(0x1ffen, 4, Buffer.from('abcd'))), 'EINVAL', 'write crossing a page');
  t.is(mvm.memory.read(0x1ffen, 4).toString('hex'), '00000000', 'nothing written by a refused request');
  t.is(await code(ids.WRITE_PHYSICAL, w(0x1000n, 4, Buffer.from('abcd'))), 'OK');
  t.is(mvm.memory.read(0x1000n, 4).toString(), 'abcd');
  t.is(vm.state, 'connected');
  t.is(mvm.connection!.counts.framingErrors, 0);
  // A body that is not a kvmi_vm_read_physical is a framing error: the host drops the connection.
  const gone = once(vm, 'gone');
  await t.throwsAsync(vm.request(ids.READ_PHYSICAL, Buffer.alloc(15)), { instanceOf: VmGoneError });
  await within(gone, 3000, 'the VM going');
});

// ---------------------------------------------------------------------------
// A hostile host on the tool's end
// ---------------------------------------------------------------------------
/** A device manager + host that handshakes and answers set-up, then hands READ/WRITE_PHYSICAL frames to `onPhysical`. */
async function fakeHost(t: ExecutionContext, onPhysical: (f: KvmiFrame, send: (b: Buffer) => void) => void) {
  const path = sockPath();
  const server = await IntrospectionServer.listen({ unix: path }, { cookie: COOKIE, requestTimeoutMs: 500 });
  t.teardown(() => server.close());
  const ids = KVMI_IDS.v6;
  const sock = net.connect(path);
  sock.on('error', () => {});
  t.teardown(() => sock.destroy());
  await once(sock, 'connect');
  const reader = new FrameReader();
  let handshook = false;
  let pre = Buffer.alloc(0);
  const send = (b: Buffer) => { sock.write(b); };
  sock.on('data', (c: Buffer) => {
    if (!handshook) {
      pre = Buffer.concat([pre, c]);
      if (pre.length < INTROSPECTOR2QEMU_SIZE) return;
      handshook = true;
      c = pre.subarray(INTROSPECTOR2QEMU_SIZE);
    }
    reader.push(c);
    for (let f = reader.next(); f !== null; f = reader.next()) {
      const frame = { hdr: f.hdr, body: Buffer.from(f.body) };
      if (f.hdr.id === ids.GET_VERSION) send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), encodeGetVersionReply('v6', { version: 1 })])));
      else if (f.hdr.id === ids.CONTROL_VM_EVENTS) send(encodeMessage(f.hdr, encodeErrorCode(0)));
      else onPhysical(frame, send);
    }
  });
  const vmP = server.waitForVm({}, 5000);
  sock.write(encodeQemu2Introspector({ uuid: uuidParse(randomUUID()), name: 'hostile', startTime: 1n }));
  return { vm: await vmP, sock };
}

test('a host answering READ_PHYSICAL with the wrong amount of data is a protocol violation: closed, the read rejects', async (t) => {
  for (const extra of [-1, 1, 4096]) {
    const { vm } = await fakeHost(t, (f, send) => {
      const size = decodeReadPhysical(f.body).size;
      send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), Buffer.alloc(Math.max(0, size + extra))])));
    });
    const gone = new Promise<{ reason: string; error?: Error }>((r) => vm.once('gone', r));
    await t.throwsAsync(vm.readPhysical(0n, 64), { instanceOf: VmGoneError });
    const info = await within(gone, 3000, 'gone');
    t.true(info.error instanceof ProtocolError, info.reason);
    t.regex(info.reason, /KVMI_READ_PHYSICAL/);
  }
});

test('a host answering an error with data, or a write with data, is a violation; silence is a TimeoutError', async (t) => {
  {
    const { vm } = await fakeHost(t, (f, send) => send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(-ERRNO.ENOENT!), Buffer.alloc(8)]))));
    await t.throwsAsync(vm.readPhysical(0n, 8), { instanceOf: VmGoneError });
    t.is(vm.state, 'gone');
  }
  {
    const { vm } = await fakeHost(t, (f, send) => send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), Buffer.alloc(4)]))));
    await t.throwsAsync(vm.writePhysical(0n, Buffer.alloc(8)), { instanceOf: VmGoneError });
  }
  {
    const { vm } = await fakeHost(t, () => {});
    const e = await t.throwsAsync(vm.readPhysical(0n, 3 * PS), { instanceOf: TimeoutError });
    t.regex(e!.message, /KVMI_READ_PHYSICAL/);
    t.is(vm.state, 'connected');
  }
  {
    // One piece refused among good ones: the error names that piece.
    const { vm } = await fakeHost(t, (f, send) => {
      const r = decodeReadPhysical(f.body);
      if (r.gpa === 0x2000n) send(encodeMessage(f.hdr, encodeErrorCode(-ERRNO.EINVAL!)));
      else send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), Buffer.alloc(r.size, 7)])));
    });
    const e = await t.throwsAsync(vm.readPhysical(0x1800n, 2 * PS), { instanceOf: KvmiError, code: 'EINVAL' });
    t.regex(e!.message, /gpa 0x2000, 4096 bytes/);
    t.is(vm.state, 'connected');
  }
});

test('writePhysical keeps what waits to be written under the high-water mark (a host that reads slowly never stalls the tool)', async (t) => {
  let maxQueued = 0;
  let vmRef: Vm | undefined;
  const { vm } = await fakeHost(t, (f, send) => {
    if (vmRef) maxQueued = Math.max(maxQueued, vmRef.buffered.write);
    decodeWritePhysical(f.body);
    setTimeout(() => send(encodeMessage(f.hdr, encodeErrorCode(0))), 1);
  });
  vmRef = vm;
  await vm.writePhysical(0n, Buffer.alloc(2 * MiB, 1));
  t.is(vm.state, 'connected');
  t.true(maxQueued <= 256 * 1024, `${maxQueued} bytes queued`);
});

// ---------------------------------------------------------------------------
// Fuzz: hostile replies on the tool's end, hostile requests on the host's end
// ---------------------------------------------------------------------------
type ReplyKind = 'good' | 'short' | 'long' | 'error' | 'errorWithData' | 'garbage' | 'silent' | 'split';

test('fuzz: whatever a host answers to readPhysical, the call settles with the right bytes or a typed error; nothing leaks', async (t) => {
  const kinds: ReplyKind[] = ['good', 'short', 'long', 'error', 'errorWithData', 'garbage', 'silent', 'split'];
  let runs = 0;
  await fc.assert(fc.asyncProperty(
    fc.array(fc.constantFrom(...kinds), { minLength: 1, maxLength: 6 }),
    fc.integer({ min: 0, max: 3 * PS }), fc.integer({ min: 1, max: 3 * PS }), fc.integer({ min: 0, max: 0xffff_ffff }),
    async (plan, offset, length, seed) => {
      runs++;
      let i = 0;
      let rnd = seed;
      const next = () => (rnd = (Math.imul(rnd, 1103515245) + 12345) >>> 0);
      const { vm } = await fakeHost(t, (f, send) => {
        const r = decodeReadPhysical(f.body);
        const kind = plan[i++ % plan.length]!;
        const data = Buffer.alloc(r.size, 0x5a);
        const ok = encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), data]));
        switch (kind) {
          case 'good': send(ok); break;
          case 'split': { const at = 1 + (next() % (ok.length - 1)); send(ok.subarray(0, at)); setImmediate(() => send(ok.subarray(at))); break; }
          case 'short': send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), data.subarray(1)]))); break;
          case 'long': send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(0), data, Buffer.alloc(1)]))); break;
          case 'error': send(encodeMessage(f.hdr, encodeErrorCode(-(1 + (next() % 200))))); break;
          case 'errorWithData': send(encodeMessage(f.hdr, Buffer.concat([encodeErrorCode(-2), Buffer.alloc(1 + (next() % 64))]))); break;
          case 'garbage': send(randomBytes(1 + (next() % 64))); break;
          case 'silent': break;
        }
      });
      const r = await within(vm.readPhysical(BigInt(offset), length).then((b) => b, (e: unknown) => e), 5000, 'readPhysical settling');
      if (r instanceof Buffer) {
        if (r.length !== length || r.some((b) => b !== 0x5a)) return false;
      } else if (!(r instanceof KvmiError || r instanceof VmGoneError || r instanceof TimeoutError)) {
        throw r;
      }
      if (vm.inFlight !== 0 && vm.state !== 'gone') {
        // Only timed-out requests may stay (abandoned); none is pending once the call settled.
        return false;
      }
      vm.close();
      return true;
    },
  ), { numRuns: 40 });
  t.is(runs, 40);
});

test('fuzz: random READ/WRITE_PHYSICAL bodies never hurt the model host: error codes or the exact bytes, guest memory only changed by valid writes', async (t) => {
  const { mvm, vm } = await modelVm(t, { memory: 64 * 1024 });
  const ids = KVMI_IDS.v6;
  const shadow = Buffer.from(mvm.memory.read(0n, 64 * 1024));
  await fc.assert(fc.asyncProperty(
    fc.boolean(), fc.bigInt({ min: 0n, max: 0x20000n }), fc.integer({ min: 0, max: 0x1100 }), fc.integer({ min: 0, max: 3 }), fc.integer({ min: -2, max: 2 }),
    async (write, gpa, size, padAt, skew) => {
      const b = Buffer.alloc(16);
      b.writeBigUInt64LE(gpa, 0);
      b.writeUInt16LE(size & 0xffff, 8);
      if (padAt > 0) b[8 + 2 * padAt + 1] = 1; // bytes 11, 13, 15: padding
      const data = randomBytes(Math.max(0, size + skew));
      const body = write ? Buffer.concat([b, data]) : b;
      const valid = padAt === 0 && size >= 1 && size <= PS && Number(gpa & 0xfffn) + size <= PS && (!write || data.length === size);
      const inRam = gpa + BigInt(size) <= 64n * 1024n;
      const r = await vm.request(write ? ids.WRITE_PHYSICAL : ids.READ_PHYSICAL, body).then((d) => d, (e: KvmiError) => e);
      if (!valid) return r instanceof KvmiError && r.code === 'EINVAL';
      if (!inRam) return r instanceof KvmiError && r.code === 'ENOENT';
      if (r instanceof Error) return false;
      if (write) {
        data.copy(shadow, Number(gpa));
        return r.length === 0;
      }
      return r.equals(shadow.subarray(Number(gpa), Number(gpa) + size));
    },
  ), { numRuns: 300 });
  t.true(mvm.memory.read(0n, 64 * 1024).equals(shadow), 'guest memory = the valid writes, nothing else');
  t.is(mvm.connection!.counts.framingErrors, 0);
  t.is(vm.state, 'connected');
});

test('KVMI_GET_MAX_GFN: v6 answers the last frame of RAM (holes below it included); v4 has no such command', async (t) => {
  const regions = GuestMemory.pcLayout(64n * MIB, { machine: 'q35' });
  const memory = GuestMemory.anonymous(64n * MIB, { regions });
  t.teardown(() => memory.close());
  const { vm } = await modelVm(t, { memory });
  t.is(await vm.getMaxGfn(), 64n * MIB / 4096n - 1n);
  t.is(await vm.memorySize(), memory.end);
  t.is(await vm.memorySize(), memory.end, 'asked once, kept');
  const v4 = await modelVm(t, { protocol: 'v4' });
  const e = await t.throwsAsync(v4.vm.memorySize(), { instanceOf: KvmiError });
  t.regex(e!.message, /KVMI_GET_MAX_GFN/);
  t.regex(e!.hint ?? '', /v4 protocol has no KVMI_GET_MAX_GFN/);
});
