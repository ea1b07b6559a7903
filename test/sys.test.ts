import test from 'ava';
import { readFileSync, readlinkSync } from 'node:fs';
import * as libc from '../src/sys/libc.js';
import { Window, remapFreshRaw, remapSharedRaw } from '../src/sys/window.js';
import { SyscallError, UsageError } from '../src/errors.js';

const PS = libc.pageSize();

test('pageSize is 4096 on x86-64', (t) => {
  t.is(PS, 4096);
});

test('open of a missing path throws a SystemError-like ENOENT', (t) => {
  const e = t.throws(() => libc.open('/nonexistent/kvmmem-test', libc.O_RDONLY), { instanceOf: SyscallError });
  t.is(e?.code, 'ENOENT');
  t.is(e?.errno, -2);
  t.is(e?.syscall, 'open');
  t.is(e?.path, '/nonexistent/kvmmem-test');
  t.regex(e!.message, /No such file or directory/);
});

test('every fd is opened with FD_CLOEXEC', (t) => {
  const fd = libc.open('/dev/null', libc.O_RDWR);
  try {
    t.is(libc.fcntl(fd, libc.F_GETFD) & libc.FD_CLOEXEC, libc.FD_CLOEXEC);
    t.is(readlinkSync(`/proc/self/fd/${fd}`), '/dev/null');
  } finally {
    libc.close(fd);
  }
  const mfd = libc.memfdCreate('kvmmem-test');
  try {
    t.is(libc.fcntl(mfd, libc.F_GETFD) & libc.FD_CLOEXEC, libc.FD_CLOEXEC);
  } finally {
    libc.close(mfd);
  }
});

test('close of a bad fd gives EBADF', (t) => {
  const e = t.throws(() => libc.close(987654), { instanceOf: SyscallError });
  t.is(e?.code, 'EBADF');
  t.is(e?.errno, -9);
});

test('ioctlRaw returns -errno: ENOTTY on /dev/null, EBADF on a bad fd, both arg kinds', (t) => {
  const fd = libc.open('/dev/null', libc.O_RDWR);
  try {
    t.is(libc.ioctlRaw(fd, 0x40306901, Buffer.alloc(48)), -25);
    t.is(libc.ioctlRaw(fd, 0x40086902, 0x7f0000001000), -25);
    t.is(libc.ioctlRaw(fd, 0x40086902, 0x7f0000001000n), -25);
  } finally {
    libc.close(fd);
  }
  t.is(libc.ioctlRaw(987654, 0x40306901, Buffer.alloc(48)), -9);
  // the throwing form: a SystemError-like error
  const e = t.throws(() => libc.ioctl(987654, 0x40086902, 0), { instanceOf: SyscallError });
  t.is(e?.code, 'EBADF');
  t.is(e?.errno, -9);
  t.is(e?.syscall, 'ioctl');
});

test('a window is page-aligned, pre-faulted and locked', (t) => {
  const w = Window.alloc(4 * PS);
  try {
    t.is(w.address % PS, 0);
    t.is(w.buffer!.length, 4 * PS);
    const vec = new Uint8Array(4);
    t.true(libc.mincore(w.address, w.length, vec));
    t.deepEqual([...vec].map((b) => b & 1), [1, 1, 1, 1]);
    const smaps = readFileSmaps(w.address);
    t.truthy(smaps, 'window appears in /proc/self/smaps');
    t.regex(smaps!, /\bLocked:\s+16 kB/);
  } finally {
    w.free();
  }
  t.true(w.freed);
  t.throws(() => Window.alloc(100), { instanceOf: UsageError });
});

test('a live view sees a native write, and native code sees a JS write', (t) => {
  const w = Window.alloc(PS);
  try {
    const v = libc.view(w.address, PS);
    libc.memsetAt(w.address + 100, 0x42, 8);
    t.is(v[100], 0x42);
    t.is(w.buffer![107], 0x42);
    v.write('kvmmem', 200);
    t.is(libc.memcmpAt(w.address + 200, Buffer.from('kvmmem')), 0);
    t.is(libc.addressOf(v), w.address);
  } finally {
    w.free();
  }
  t.throws(() => libc.view(4096, 2 ** 32 + 1), { instanceOf: UsageError, message: /4 GiB/ });
});

test('remapSharedRaw aliases a file page live; remapFreshRaw gives back a zeroed page', (t) => {
  const fd = libc.memfdCreate('kvmmem-remap');
  const w = Window.alloc(2 * PS);
  try {
    libc.ftruncate(fd, 2 * PS);
    const file = libc.view(libc.mmap(0, 2 * PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, 0), 2 * PS);
    file.write('guest page one', PS);
    t.is(remapSharedRaw(w.address, PS, fd, PS), 0);
    const page = w.buffer!;
    t.is(page.toString('latin1', 0, 14), 'guest page one');
    page.write('from introspector', 20);
    t.is(file.toString('latin1', PS + 20, PS + 37), 'from introspector');
    t.is(remapFreshRaw(w.address, PS), 0);
    t.true(page.subarray(0, PS).every((b) => b === 0));
    t.is(file.toString('latin1', PS, PS + 14), 'guest page one');
  } finally {
    w.free();
    libc.close(fd);
  }
});

test('mincore answers false (ENOMEM) for an unmapped range', (t) => {
  const w = Window.alloc(PS);
  const addr = w.address;
  w.free();
  t.false(libc.mincore(addr, PS, new Uint8Array(1)));
});

function readFileSmaps(addr: number): string | undefined {
  const text = readFileSync('/proc/self/smaps', 'latin1');
  const hex = addr.toString(16);
  const start = text.search(new RegExp(`^0*${hex}-`, 'm'));
  if (start < 0) return undefined;
  const rest = text.slice(start);
  const body = rest.indexOf('\n') + 1;
  const next = rest.slice(body).search(/^[0-9a-f]+-[0-9a-f]+ /m);
  return next < 0 ? rest : rest.slice(0, body + next);
}

test('bad arguments to src/sys are UsageErrors (ERR_INVALID_ARG), before any call', async (t) => {
  const usage = (fn: () => unknown, message: RegExp) => t.throws(fn, { instanceOf: UsageError, code: 'ERR_INVALID_ARG', message });
  usage(() => libc.view(0, 16), /view: bad address 0/);
  usage(() => libc.sockaddrVm(-1), /vsock port must be a u32/);
  usage(() => libc.sockaddrVm(1024, 2 ** 32), /vsock cid must be a u32/);
  usage(() => libc.sockaddrUn('x'.repeat(108)), /unix socket path must be 1\.\.107 bytes/);
  usage(() => libc.readRaw(0, new Uint8Array(4), 5), /read: len 5 exceeds the 4-byte buffer/);
  usage(() => libc.writeRaw(1, new Uint8Array(4), 5), /write: len 5 exceeds the 4-byte buffer/);
  await t.throwsAsync(libc.pollRaw(Buffer.alloc(8), 2, 0), { instanceOf: UsageError, message: /poll: 2 pollfds do not fit in 8 bytes/ });
});
