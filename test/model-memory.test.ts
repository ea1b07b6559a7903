// GuestMemory: anonymous (memfd) and file-backed guest-physical memory, regions and holes.
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { UsageError } from '../src/errors.js';
import { GuestMemory } from '../src/model/memory.js';

const tmp = (name: string) => path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), `kvmmem-mem-${process.pid}-${name}`);

test('anonymous memory: one region from gpa 0, readable and writable through the fd', (t) => {
  const m = GuestMemory.anonymous(8 * 4096, { name: 't' });
  t.teardown(() => m.close());
  t.is(m.size, 32768n);
  t.is(m.end, 32768n);
  t.deepEqual(m.regions, [{ gpa: 0n, size: 32768n, fileOffset: 0n }]);
  t.true(fs.fstatSync(m.fd).isFile());
  m.write(4090n, Buffer.from('across a page'));
  t.is(m.read(4090n, 13).toString(), 'across a page');
  t.deepEqual(m.read(0n, 4), Buffer.alloc(4));
  const r = m.resolve(4096n, 4096)!;
  t.is(r.offset, 4096);
  t.is(r.fd, m.fd);
  t.true(r.writable);
});

test('anonymous memory: sizes must be page multiples', (t) => {
  t.throws(() => GuestMemory.anonymous(4095), { code: 'ERR_INVALID_ARG' });
  t.throws(() => GuestMemory.anonymous(0), { code: 'ERR_INVALID_ARG' });
});

test('resolve: bounds, holes and ranges running off a region', (t) => {
  const m = GuestMemory.anonymous(4 * 4096, {
    regions: [{ gpa: 0n, size: 4096n, fileOffset: 0n }, { gpa: 0x10000n, size: 3n * 4096n, fileOffset: 4096n }],
  });
  t.teardown(() => m.close());
  t.is(m.resolve(0n, 4096)!.offset, 0);
  t.is(m.resolve(4096n), null, 'hole');
  t.is(m.resolve(0x10000n, 4096)!.offset, 4096);
  t.is(m.resolve(0x12000n, 4096)!.offset, 3 * 4096);
  t.is(m.resolve(0x13000n), null, 'beyond the end');
  t.is(m.resolve(0xfffn, 2), null, "crosses into the hole");
  t.is(m.resolve(-1n), null);
  t.throws(() => m.read(0xff0n, 32), { instanceOf: UsageError, message: /gpa 0x1000 of VM .* is not RAM/ });
  m.write(0x10ffen, Buffer.from([1, 2, 3, 4]));
  t.deepEqual([...m.read(0x10ffen, 4)], [1, 2, 3, 4]);
});

test('regions are validated: alignment, overlap, file size', (t) => {
  t.throws(() => GuestMemory.anonymous(4096, { regions: [{ gpa: 1n, size: 4096n, fileOffset: 0n }] }), { code: 'ERR_INVALID_ARG' });
  t.throws(() => GuestMemory.anonymous(8192, { regions: [{ gpa: 0n, size: 8192n, fileOffset: 0n }, { gpa: 4096n, size: 4096n, fileOffset: 0n }] }), { message: /overlap/ });
  t.throws(() => GuestMemory.anonymous(4096, { regions: [{ gpa: 0n, size: 8192n, fileOffset: 0n }] }), { message: /past the end/ });
});

test('pcLayout: the VGA hole and RAM above 4 GiB (q35 and pc)', (t) => {
  const small = GuestMemory.pcLayout(256n << 20n);
  t.deepEqual(small, [
    { gpa: 0n, size: 0xa0000n, fileOffset: 0n },
    { gpa: 0x100000n, size: (256n << 20n) - 0x100000n, fileOffset: 0x100000n },
  ]);
  const big = GuestMemory.pcLayout(4n << 30n);
  t.deepEqual(big[2], { gpa: 0x1_0000_0000n, size: 2n << 30n, fileOffset: 0x8000_0000n }, 'q35 keeps 2 GiB low');
  const pc = GuestMemory.pcLayout(4n << 30n, { machine: 'pc' });
  t.deepEqual(pc[2], { gpa: 0x1_0000_0000n, size: 1n << 30n, fileOffset: 0xc000_0000n }, 'pc keeps 3 GiB low');
  t.deepEqual(GuestMemory.pcLayout(1n << 20n, { vgaHole: false }), [{ gpa: 0n, size: 1n << 20n, fileOffset: 0n }]);
});

test('a sparse memfd with the PC layout: RAM above 4 GiB lands after low RAM in the file', (t) => {
  // 3 GiB of sparse RAM: nothing is allocated until written.
  const ram = 3n << 30n;
  const m = GuestMemory.anonymous(ram, { regions: GuestMemory.pcLayout(ram) });
  t.teardown(() => m.close());
  t.is(m.resolve(0xb0000n), null, 'VGA hole');
  t.is(m.resolve(0x9_0000_0000n), null, 'far beyond');
  t.is(m.resolve(0x8000_0000n), null, 'PCI hole');
  t.is(m.resolve(0x1_0000_0000n)!.offset, 0x8000_0000);
  m.write(0x1_0000_1000n, Buffer.from('high'));
  t.is(m.read(0x1_0000_1000n, 4).toString(), 'high');
  const fd = fs.openSync(`/proc/self/fd/${m.fd}`, 'r');
  const b = Buffer.alloc(4);
  fs.readSync(fd, b, 0, 4, 0x8000_1000);
  fs.closeSync(fd);
  t.is(b.toString(), 'high');
});

test('file-backed memory: read-write and read-only over an existing image', (t) => {
  const p = tmp('img');
  const img = Buffer.alloc(4 * 4096);
  img.write('IMAGE', 8192);
  fs.writeFileSync(p, img);
  t.teardown(() => fs.rmSync(p, { force: true }));
  const rw = GuestMemory.fromFile(p);
  t.is(rw.size, 16384n);
  t.is(rw.path, p);
  t.is(rw.read(8192n, 5).toString(), 'IMAGE');
  rw.write(0n, Buffer.from('W'));
  rw.close();
  t.is(fs.readFileSync(p).subarray(0, 1).toString(), 'W');
  const ro = GuestMemory.fromFile(p, { readOnly: true });
  t.teardown(() => ro.close());
  t.false(ro.writable);
  t.false(ro.resolve(0n)!.writable);
  t.throws(() => ro.write(0n, Buffer.from('x')), { message: /read-only/ });
});

test('close: resolve answers null afterwards, read throws, close is idempotent', (t) => {
  const m = GuestMemory.anonymous(4096);
  m.close();
  m.close();
  t.true(m.closed);
  t.is(m.fd, -1);
  t.is(m.resolve(0n), null);
  t.throws(() => m.read(0n, 1), { message: /closed/ });
});
