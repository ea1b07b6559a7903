// The /dev/kvmmem driver model against RFC v4 02/18 kvmi_mem_guest.c, through the
// Device interface (ModelDevice) and the driver itself: every check, its order,
// its error code, the quirks, release, real aliasing, and batches.
import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as libc from '../src/sys/libc.js';
import { Window } from '../src/sys/window.js';
import {
  KVM_HC_MEM_MAP, KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP, X86_64_USER_LIMIT, decodeIoctl, encodeMemMap,
} from '../src/abi/index.js';
import { ClosedError, DeviceError, NotKvmmemDeviceError, UsageError } from '../src/errors.js';
import { GuestMemory, ModelDevice, ModelHost, type ModelHostOptions, type ModelVm } from '../src/model/index.js';
import { adoptSocket } from '../src/model/sockets.js';
import { errnoOf, sinkAcceptor } from './helpers.js';

const PS = 4096;
const ENOENT = -2, EFAULT = -14, EINVAL = -22, ENODEV = -19, ENOTTY = -25, EALREADY = -114, EBADF = -9;

// ---- fixtures ----

/** A unix socket "tool" that accepts connections and ignores what it gets: enough to hook a VM. */
async function acceptor(t: ExecutionContext): Promise<{ connect(): Promise<net.Socket> }> {
  const a = await sinkAcceptor('drv');
  t.teardown(() => a.close());
  return a;
}

/** Writes a recognisable tag at the start of every page of the VM. */
function tagPages(vm: ModelVm, pages: number): void {
  for (let i = 0; i < pages; i++) vm.memory.write(BigInt(i * PS), Buffer.from(tag(vm, i)));
}
const tag = (vm: ModelVm, i: number) => `${vm.name}:page:${String(i).padStart(4, '0')}`;

interface Fixture {
  host: ModelHost;
  vm: ModelVm;
  dev: ModelDevice;
  hook(vm: ModelVm): Promise<void>;
  win(pages: number): Window;
}

async function fixture(t: ExecutionContext, opts: ModelHostOptions & { pages?: number; ownMemory?: boolean } = {}): Promise<Fixture> {
  const { pages: _p, ownMemory, ...hostOpts } = opts;
  const host = new ModelHost({ tokenTtlMs: 60_000, ...hostOpts });
  const tool = await acceptor(t);
  const hook = async (vm: ModelVm) => {
    vm.hook({ fd: adoptSocket(await tool.connect()) });
  };
  // ownMemory: the test owns the memory (and may break its fd); the host will not close it.
  const memory = ownMemory ? GuestMemory.anonymous((opts.pages ?? 16) * PS) : (opts.pages ?? 16) * PS;
  const vm = host.createVm({ name: 'target', memory });
  tagPages(vm, opts.pages ?? 16);
  await hook(vm);
  const wins: Window[] = [];
  t.teardown(() => {
    host.close();
    for (const w of wins) w.free();
  });
  return {
    host, vm, dev: host.openDevice(), hook,
    win: (pages) => {
      const w = Window.alloc(pages * PS);
      w.buffer!.fill(0xee);
      wins.push(w);
      return w;
    },
  };
}

const rec = (token: Uint8Array, gpa: bigint, gva: bigint | number) => encodeMemMap({ token, gpa, gva: BigInt(gva) });
const forged = () => new Uint8Array(32).fill(0x42);


/**
 * A page that lies in no mapping and that nobody maps meanwhile: below the
 * (non-PIE) node executable, where the top-down mmap allocator never goes.
 */
function holePage(_t: ExecutionContext): number {
  const v = new Uint8Array(1);
  for (let a = 0x100000; a < 0x400000; a += PS) if (!libc.mincore(a, PS, v)) return a;
  throw new Error('test setup: no unmapped page below 4 MiB');
}

/** A mapped page that was never touched (not present). */
function untouchedPage(t: ExecutionContext): number {
  const a = libc.mmap(0, PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  t.teardown(() => libc.munmap(a, PS));
  return a;
}

/** VM_LOCKED ("lo" in VmFlags) on the mapping holding addr, from /proc/self/smaps. */
function vmaLocked(addr: number): boolean {
  let inside = false;
  for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (m) inside = parseInt(m[1]!, 16) <= addr && addr < parseInt(m[2]!, 16);
    else if (inside && line.startsWith('VmFlags:')) return line.split(/\s+/).includes('lo');
  }
  return false;
}

const resident = (addr: number) => {
  const v = new Uint8Array(1);
  return libc.mincore(addr, PS, v) && (v[0]! & 1) === 1;
};

// ---- init, dispatch ----

test('init: no paravirt -> EPERM (kvm_intro_guest_init)', (t) => {
  const host = new ModelHost({ paravirt: false });
  t.teardown(() => host.close());
  const e = t.throws(() => host.openDevice(), { instanceOf: DeviceError });
  t.is(e!.code, 'EPERM');
  t.is(e!.syscall, 'kvm_intro_guest_init');
});

test('dispatch table: MAP copies in 48 bytes, UNMAP takes the value; sizes decoded from the request numbers', async (t) => {
  const { host } = await fixture(t);
  t.deepEqual(host.driver.ioctls, [
    { cmd: 0x40306901, name: 'KVM_INTRO_MEM_MAP', dir: 1, size: 48, copyIn: true },
    { cmd: 0x40086902, name: 'KVM_INTRO_MEM_UNMAP', dir: 1, size: 8, copyIn: false },
  ]);
  t.is(decodeIoctl(KVM_INTRO_MEM_MAP).size, 48);
});

test('unknown request -> ENOTTY, a plain DeviceError (MAP/UNMAP never answer it)', async (t) => {
  const { dev } = await fixture(t);
  const e = t.throws(() => dev.ioctl(0x40306903, new Uint8Array(48)), { instanceOf: DeviceError });
  t.is(e!.errno, ENOTTY);
  t.false(e instanceof NotKvmmemDeviceError);
  // Same request number but another size: a different request, as in the C switch.
  t.is(errnoOf(() => dev.ioctl(0x40286901, new Uint8Array(48))), ENOTTY);
  t.true(dev.error(KVM_INTRO_MEM_MAP, ENOTTY) instanceof NotKvmmemDeviceError);
});

// ---- MAP: copy_from_user, access_ok ----

test('MAP: an argument shorter than 48 bytes -> EFAULT (copy_from_user)', async (t) => {
  const { dev, vm } = await fixture(t);
  const token = vm.getMapToken();
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, new Uint8Array(47))), EFAULT);
  t.is(vm.stats().tokensOutstanding, 1, 'no hypercall: the token is still there');
  void token;
});

test('MAP: a pointer argument is read from this process; an unmapped pointer -> EFAULT', async (t) => {
  const { dev, vm, win, host } = await fixture(t);
  const w = win(2);
  // The struct lives in page 1 of the window; the target page is page 0.
  rec(vm.getMapToken(), 2n * 4096n, w.address).copy(w.buffer!, PS);
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, w.address + PS), 0);
  t.is(w.buffer!.toString('latin1', 0, tag(vm, 2).length), tag(vm, 2));
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, BigInt(holePage(t)))), EFAULT);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, 0)), EFAULT);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, -1)), EFAULT, 'a pointer past the user limit');
  t.is(host.stats().mappings, 1);
  // A struct cut short by a PROT_NONE page: mapped, but copy_from_user cannot read it (as on the kernel module).
  const two = libc.mmap(0, 2 * PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  try {
    libc.mmap(two + PS, PS, libc.PROT_NONE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_FIXED);
    const before = host.counters().mapHypercalls;
    t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, two + PS - 16)), EFAULT, '16 bytes before a PROT_NONE page');
    t.is(host.counters().mapHypercalls, before);
  } finally {
    libc.munmap(two, 2 * PS);
  }
});

test('MAP: access_ok — a gva whose page reaches past 0x7ffffffff000 -> EINVAL, before any hypercall', async (t) => {
  const { dev, vm, host } = await fixture(t);
  const token = vm.getMapToken();
  const before = host.counters().mapHypercalls;
  for (const gva of [X86_64_USER_LIMIT - 4095n, X86_64_USER_LIMIT, 0xffff_8000_0000_0000n, (1n << 64n) - 1n]) {
    t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(token, 0n, gva))), EINVAL, `gva 0x${gva.toString(16)}`);
  }
  t.is(host.counters().mapHypercalls, before);
  t.is(vm.stats().tokensOutstanding, 1);
  // The last page below the limit passes access_ok (and, unmapped, hits the find_vma quirk).
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(token, 0n, X86_64_USER_LIMIT - 4096n)), 0);
  t.deepEqual(dev.mappings(), [{ gpa: 0n, vaddr: X86_64_USER_LIMIT - 4096n, paddr: 0n }]);
});

// ---- the quirks ----

test('QUIRK find_vma: MAP of a gva in no mapping returns 0 without a hypercall and records the entry (paddr 0)', async (t) => {
  const { dev, vm, host } = await fixture(t);
  const hole = holePage(t);
  const c0 = host.counters();
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 4096n, hole)), 0);
  t.is(host.counters().mapHypercalls, c0.mapHypercalls, 'no hypercall');
  t.is(vm.stats().tokensOutstanding, 1, 'token not consumed');
  t.is(host.stats().mappings, 0);
  t.deepEqual(dev.mappings(), [{ gpa: 4096n, vaddr: BigInt(hole), paddr: 0n }]);
  // UNMAP finds it, calls the hypercall with the garbage paddr, ignores -ENOENT, returns 0.
  t.is(dev.ioctl(KVM_INTRO_MEM_UNMAP, BigInt(hole)), 0);
  t.is(host.counters().unmapHypercalls, c0.unmapHypercalls + 1);
  t.deepEqual(dev.mappings(), []);
});

test('QUIRK follow_page: MAP of a page never faulted in returns 0 without a hypercall; the page stays untouched', async (t) => {
  const { dev, vm, host } = await fixture(t);
  const p = untouchedPage(t);
  t.false(resident(p));
  const c0 = host.counters();
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, p)), 0);
  t.is(host.counters().mapHypercalls, c0.mapHypercalls);
  t.false(resident(p), 'not faulted in, not remapped');
  t.deepEqual(dev.mappings(), [{ gpa: 0n, vaddr: BigInt(p), paddr: 0n }]);
  t.is(host.stats().mappings, 0);
});

test('QUIRK exact match: UNMAP matches the very vaddr given to MAP, no page rounding', async (t) => {
  const { dev, vm, win, host } = await fixture(t);
  const w = win(1);
  const gva = BigInt(w.address + 0x10);
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 3n * 4096n, gva)), 0);
  t.deepEqual(dev.mappings(), [{ gpa: 3n * 4096n, vaddr: gva, paddr: BigInt(w.address) }], 'paddr is the page, vaddr exact');
  t.is(w.buffer!.toString('latin1', 0, 16), tag(vm, 3), 'the whole page is the target page');
  const e = t.throws(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, BigInt(w.address)), { instanceOf: DeviceError });
  t.is(e!.errno, ENOENT);
  t.regex(e!.message, /exactly this address/);
  t.is(host.stats().mappings, 1);
  t.is(dev.ioctl(KVM_INTRO_MEM_UNMAP, gva), 0);
  t.is(host.stats().mappings, 0);
});

test('UNMAP: an address not in this file\'s list -> ENOENT; a buffer argument passes its address, as ioctl(2) does', async (t) => {
  const { dev } = await fixture(t);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, 0x1234000n)), ENOENT);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, new Uint8Array(8))), ENOENT);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, (1n << 64n) - 1n)), ENOENT);
});

// ---- hypercall errors pass through ----

test('MAP: hypercall errors pass through and leave no entry (unknown token, gpa out of bounds, page already mapped)', async (t) => {
  const { dev, vm, win, host } = await fixture(t);
  const w = win(2);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(forged(), 0n, w.address))), ENOENT);
  const tk = vm.getMapToken();
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(tk, 16n * 4096n, w.address))), EFAULT);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(tk, 0n, w.address))), ENOENT, 'a failed MAP still used the token up');
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, w.address)), 0);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 1n * 4096n, w.address + 8))), EALREADY, 'same page, other offset');
  t.is(dev.mappings().length, 1);
  t.is(host.stats().mappings, 1);
  t.is(w.buffer!.toString('latin1', 0, 16), tag(vm, 0));
});

test('UNMAP ignores the hypercall result: entries whose host mapping was revoked still unmap with 0', async (t) => {
  const { dev, vm, win, host } = await fixture(t);
  const w = win(1);
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, w.address)), 0);
  vm.unhook();
  t.is(host.stats().mappings, 0, 'unhook revoked the page');
  t.deepEqual(w.buffer!.subarray(0, 64), Buffer.alloc(64), 'revoked: a fresh zeroed page');
  t.is(dev.mappings().length, 1, 'the driver does not know');
  const u0 = host.counters().unmapHypercalls;
  t.is(dev.ioctl(KVM_INTRO_MEM_UNMAP, BigInt(w.address)), 0);
  t.is(host.counters().unmapHypercalls, u0 + 1, 'the hypercall was made (and failed with -ENOENT)');
  t.deepEqual(dev.mappings(), []);
});

test('QUIRK list order: with a stale and a live entry for one vaddr, UNMAP takes the first and unmaps the live page', async (t) => {
  const { dev, vm, win, host, hook } = await fixture(t);
  const w = win(1);
  const gva = BigInt(w.address);
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, gva)), 0);
  vm.unhook();
  await hook(vm);
  t.is(dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 5n * 4096n, gva)), 0, 'the host no longer has that page: a new mapping');
  t.deepEqual(dev.mappings().map((m) => m.gpa), [0n, 5n * 4096n]);
  t.is(dev.ioctl(KVM_INTRO_MEM_UNMAP, gva), 0);
  t.deepEqual(dev.mappings().map((m) => m.gpa), [5n * 4096n], 'the first (stale) entry went');
  t.is(host.stats().mappings, 0, '...but its paddr is the live page: the live mapping went with it');
  t.deepEqual(w.buffer!.subarray(0, 32), Buffer.alloc(32));
  t.is(dev.ioctl(KVM_INTRO_MEM_UNMAP, gva), 0);
  t.deepEqual(dev.mappings(), []);
});

// ---- active / ENODEV, release, close ----

test('ENODEV: a file being released answers MAP and UNMAP with -ENODEV (after the access_ok check)', async (t) => {
  const { host, vm, win } = await fixture(t);
  const drv = host.driver;
  const fmp = drv.kvm_dev_open('raw');
  const w = win(1);
  t.is(drv.kvm_dev_ioctl(fmp, KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, w.address)), 0);
  t.is(drv.kvm_dev_release(fmp), 0);
  t.is(fmp.active, 0);
  t.false(drv.file_list.has(fmp));
  // A thread that got hold of the file before release runs into active == 0.
  t.is(drv.kvm_dev_ioctl(fmp, KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, w.address)), ENODEV);
  t.is(drv.kvm_dev_ioctl(fmp, KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0n, X86_64_USER_LIMIT)), EINVAL, 'EINVAL comes first');
  t.is(drv.kvm_dev_ioctl(fmp, KVM_INTRO_MEM_UNMAP, BigInt(w.address)), ENODEV);
  t.is(drv.kvm_dev_ioctl(fmp, 0x1234, 0), ENOTTY);
  t.is(host.stats().mappings, 0);
});

test('release: closing the file unmaps everything it mapped, and only that; the host ends with zero mappings', async (t) => {
  const { host, vm, win } = await fixture(t);
  const a = host.openDevice(), b = host.openDevice();
  const w = win(4);
  t.is(host.driver.file_list.size, 3);
  for (let i = 0; i < 3; i++) a.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), BigInt(i * PS), w.address + i * PS));
  b.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 9n * 4096n, w.address + 3 * PS));
  t.is(errnoOf(() => b.ioctl(KVM_INTRO_MEM_UNMAP, BigInt(w.address))), ENOENT, 'mappings belong to the file that made them');
  t.is(host.stats().mappings, 4);
  a.close();
  t.true(a.closed);
  t.is(host.stats().mappings, 1);
  for (let i = 0; i < 3; i++) t.deepEqual(w.buffer!.subarray(i * PS, i * PS + 32), Buffer.alloc(32), `page ${i} fresh`);
  t.is(w.buffer!.toString('latin1', 3 * PS, 3 * PS + 16), tag(vm, 9));
  b.close();
  t.is(host.stats().mappings, 0);
  t.is(host.driver.file_list.size, 1);
});

test('after close every call throws ClosedError; closing the host closes its devices', async (t) => {
  const { host, dev } = await fixture(t);
  const other = host.openDevice();
  dev.close();
  dev.close();
  t.throws(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, 0n), { instanceOf: ClosedError });
  t.throws(() => dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, new Uint8Array(8), 0, 1, new Int32Array(1)), { instanceOf: ClosedError });
  host.close();
  t.true(other.closed);
  t.throws(() => other.ioctl(KVM_INTRO_MEM_UNMAP, 0n), { instanceOf: ClosedError });
  t.throws(() => host.openDevice(), { instanceOf: ClosedError });
});

test('device path and errors carry the hints the real device gives', async (t) => {
  const { dev, win } = await fixture(t);
  t.is(dev.path, 'model:kvmmem');
  const e = t.throws(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(forged(), 0n, win(1).address)), { instanceOf: DeviceError });
  t.is(e!.syscall, 'KVM_INTRO_MEM_MAP');
  t.is(e!.path, 'model:kvmmem');
  t.is(e!.code, 'ENOENT');
  t.regex(e!.hint!, /single-use/);
  t.notRegex(e!.message, /42424242/, 'no token bytes in messages');
});

// ---- real aliasing ----

test('aliasing both ways with another process writing the VM memory file; UNMAP leaves a fresh zero page, never a hole', async (t) => {
  const dir = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const file = path.join(dir, `kvmmem-alias-${process.pid}.ram`);
  fs.writeFileSync(file, Buffer.alloc(8 * PS));
  t.teardown(() => fs.rmSync(file, { force: true }));
  const { host, win, hook } = await fixture(t);
  const mem = GuestMemory.fromFile(file);
  t.teardown(() => mem.close());
  const vm = host.createVm({ name: 'qemu', memory: mem });
  await hook(vm);
  const dev = host.openDevice();
  const w = win(1);
  dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 0x3000n, w.address));
  t.true(vmaLocked(w.address), 'the mapped page is locked again after MAP_FIXED');
  // Another process writes the guest's RAM file: the introspector page shows it at once.
  const child = (code: string) => spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' });
  let r = child(`const fs=require('fs');const fd=fs.openSync(${JSON.stringify(file)},'r+');fs.writeSync(fd,Buffer.from('written by pid '+process.pid),0,null,0x3000+100);`);
  t.is(r.status, 0, r.stderr);
  t.regex(w.buffer!.toString('latin1', 100, 130), /^written by pid \d+/);
  // And the other way: what the introspector writes is in the file for everyone.
  w.buffer!.write('introspector was here', 2000, 'latin1');
  libc.memsetAt(w.address + 3000, 0x41, 4); // a native write too
  r = child(`const fs=require('fs');const b=Buffer.alloc(4096);fs.readSync(fs.openSync(${JSON.stringify(file)},'r'),b,0,4096,0x3000);process.stdout.write(b.toString('latin1',2000,2021)+'|'+b.toString('latin1',3000,3004));`);
  t.is(r.stdout, 'introspector was here|AAAA');
  t.is(vm.memory.read(0x3000n + 2000n, 21).toString(), 'introspector was here');
  // UNMAP: a new page, zeroed, usable (no SIGSEGV), and no longer the guest's.
  dev.ioctl(KVM_INTRO_MEM_UNMAP, BigInt(w.address));
  t.deepEqual(w.buffer!, Buffer.alloc(PS));
  w.buffer![0] = 7;
  t.is(vm.memory.read(0x3000n, 1)[0], 0);
  t.true(resident(w.address));
  t.true(vmaLocked(w.address), 'the fresh page is mlocked again');
});

test('two introspector pages over one gpa alias each other; a read-only image is live for reads and safe to write', async (t) => {
  const { host, vm, win, dev, hook } = await fixture(t);
  const w = win(2);
  dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 7n * 4096n, w.address));
  dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 7n * 4096n + 123n, w.address + PS));
  t.deepEqual(host.mappings().map((m) => m.gpa), [7n * 4096n, 7n * 4096n], 'gpa rounded down to its page');
  w.buffer!.write('shared', 50, 'latin1');
  t.is(w.buffer!.toString('latin1', PS + 50, PS + 56), 'shared');

  const file = path.join(os.tmpdir(), `kvmmem-ro-${process.pid}.img`);
  fs.writeFileSync(file, Buffer.alloc(2 * PS, 0x61));
  t.teardown(() => fs.rmSync(file, { force: true }));
  const ro = GuestMemory.fromFile(file, { readOnly: true });
  t.teardown(() => ro.close());
  const rovm = host.createVm({ name: 'dump', memory: ro });
  await hook(rovm);
  const w2 = win(1);
  dev.ioctl(KVM_INTRO_MEM_MAP, rec(rovm.getMapToken(), 4096n, w2.address));
  t.is(w2.buffer!.toString('latin1', 0, 4), 'aaaa');
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.from('live'), 0, 4, 4096);
  fs.closeSync(fd);
  t.is(w2.buffer!.toString('latin1', 0, 4), 'live');
  // A write through a read-only image's page never faults: it lands in a private copy.
  w2.buffer!.write('tool', 8, 'latin1');
  t.is(w2.buffer!.toString('latin1', 8, 12), 'tool');
  t.is(fs.readFileSync(file).toString('latin1', 4096 + 8, 4096 + 12), 'aaaa', 'the image is untouched');
});

test('tokens are bound to their VM: a token of VM A maps A\'s memory whatever the gpa says', async (t) => {
  const { host, vm, win, dev, hook } = await fixture(t);
  const b = host.createVm({ name: 'other', memory: 64 * PS });
  tagPages(b, 64);
  await hook(b);
  const w = win(2);
  dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 2n * 4096n, w.address));
  dev.ioctl(KVM_INTRO_MEM_MAP, rec(b.getMapToken(), 2n * 4096n, w.address + PS));
  t.is(w.buffer!.toString('latin1', 0, 16), tag(vm, 2));
  t.is(w.buffer!.toString('latin1', PS, PS + 15), tag(b, 2));
  // gpa 40 exists only in B: with A's token it is out of bounds.
  const w2 = win(1);
  t.is(errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 40n * 4096n, w2.address))), EFAULT);
  t.deepEqual(host.stats().vms.map((v) => [v.name, v.mappings]), [['target', 1], ['other', 1]]);
});

// ---- batches ----

type Tok = 'fresh' | 'used' | 'forged' | 'other';
interface Spec { page: number; gpa: bigint; tok: Tok; off?: number }

/** Runs the MAP specs one by one (real=false) or as one batch, on a fresh fixture; returns a normalised picture. */
async function runMaps(t: ExecutionContext, specs: Spec[], batch: boolean, opts: { breakFd?: boolean; quirkPage?: boolean } = {}) {
  const f = await fixture(t, { ownMemory: opts.breakFd ?? false });
  const other = f.host.createVm({ name: 'other', memory: 4 * PS });
  tagPages(other, 4);
  await f.hook(other);
  const w = f.win(8);
  const special = opts.quirkPage ? untouchedPage(t) : 0;
  const used = f.vm.getMapToken();
  f.host.hypercall(KVM_HC_MEM_MAP, used, 0n, 0n); // consume it (EFAULT on page 0, token gone)
  const buf = Buffer.alloc(48 * specs.length);
  specs.forEach((s, i) => {
    const token = s.tok === 'fresh' ? f.vm.getMapToken() : s.tok === 'used' ? used : s.tok === 'other' ? other.getMapToken() : forged();
    const gva = s.page === -1 ? special : s.page === -2 ? Number(X86_64_USER_LIMIT) : w.address + s.page * PS + (s.off ?? 0);
    rec(token, s.gpa, gva).copy(buf, 48 * i);
  });
  if (opts.breakFd) fs.closeSync(f.vm.memory.fd); // the next remaps from it fail with EBADF
  const results = new Int32Array(specs.length);
  const c0 = f.host.counters();
  let ok: number;
  if (batch) {
    ok = f.dev.ioctlBatch(KVM_INTRO_MEM_MAP, buf, 48, specs.length, results);
  } else {
    ok = 0;
    specs.forEach((_, i) => {
      results[i] = errnoOf(() => f.dev.ioctl(KVM_INTRO_MEM_MAP, buf.subarray(48 * i, 48 * i + 48)));
      if (results[i] === 0) ok++;
    });
  }
  const c1 = f.host.counters();
  const base = BigInt(w.address);
  const norm = (a: bigint) => (a === 0n ? 'null' : a === BigInt(special) ? 'special' : `w+${a - base}`);
  return {
    results: [...results], ok,
    driver: f.dev.mappings().map((m) => ({ gpa: m.gpa, vaddr: norm(m.vaddr), paddr: norm(m.paddr) })),
    host: f.host.mappings().map((m) => ({ page: norm(m.introspectorPage), vm: m.vm.name, gpa: m.gpa })).sort((x, y) => x.page.localeCompare(y.page)),
    tokens: f.host.stats().vms.map((v) => v.tokensOutstanding),
    pages: Array.from({ length: 8 }, (_, i) => w.buffer!.toString('latin1', i * PS, i * PS + 16)),
    hypercalls: c1.mapHypercalls - c0.mapHypercalls,
    remapCalls: c1.remapCalls - c0.remapCalls,
    f, w,
  };
}

const strip = ({ f: _f, w: _w, remapCalls: _r, ...rest }: Awaited<ReturnType<typeof runMaps>>) => rest;

test('batch MAP = the same records one by one: same per-record results and the same state, failures mixed in', async (t) => {
  const specs: Spec[] = [
    { page: 0, gpa: 0n, tok: 'fresh' },
    { page: 1, gpa: 1n * 4096n, tok: 'used' }, // ENOENT
    { page: 1, gpa: 99n * 4096n, tok: 'fresh' }, // EFAULT (out of bounds)
    { page: 1, gpa: 1n * 4096n, tok: 'fresh' },
    { page: 0, gpa: 2n * 4096n, tok: 'fresh', off: 8 }, // EALREADY (page 0 mapped in this batch)
    { page: 2, gpa: 3n * 4096n, tok: 'forged' }, // ENOENT
    { page: 2, gpa: 3n * 4096n + 5n, tok: 'other' }, // other VM's page 3
    { page: -1, gpa: 4n * 4096n, tok: 'fresh' }, // quirk: never faulted in
    { page: -2, gpa: 4n * 4096n, tok: 'fresh' }, // EINVAL
    { page: 3, gpa: 15n * 4096n, tok: 'fresh', off: 100 },
    { page: 4, gpa: 15n * 4096n, tok: 'fresh' },
  ];
  const one = await runMaps(t, specs, false, { quirkPage: true });
  const many = await runMaps(t, specs, true, { quirkPage: true });
  t.deepEqual(one.results, [0, ENOENT, EFAULT, 0, EALREADY, ENOENT, 0, 0, EINVAL, 0, 0]);
  t.deepEqual(strip(many), strip(one));
  t.is(many.ok, 6);
  t.is(one.pages[2], 'other:page:0003\0');
});

test('batch MAP coalesces adjacent pages into one mmap; release and batch UNMAP coalesce the fresh pages', async (t) => {
  const n = 64;
  const specs: Spec[] = Array.from({ length: 8 }, (_, i) => ({ page: i, gpa: BigInt(i * PS), tok: 'fresh' }));
  const one = await runMaps(t, specs, false);
  const many = await runMaps(t, specs, true);
  t.deepEqual(strip(many), strip(one));
  t.is(one.remapCalls, 8);
  t.is(many.remapCalls, 1, 'eight adjacent pages over eight adjacent gpas: one mmap');

  // 64 pages, gpas in two adjacent runs (0..31 and 40..71), records in reverse order.
  const { host, vm, dev, win } = await fixture(t, { pages: 128, tokenLimit: Infinity });
  const w = win(n);
  const buf = Buffer.alloc(48 * n);
  for (let k = 0; k < n; k++) {
    const i = n - 1 - k;
    rec(vm.getMapToken(), BigInt((i < 32 ? i : i + 8) * PS), w.address + i * PS).copy(buf, 48 * k);
  }
  let c = host.counters();
  t.is(dev.ioctlBatch(KVM_INTRO_MEM_MAP, buf, 48, n, new Int32Array(n)), n);
  t.is(host.counters().remapCalls - c.remapCalls, 2);
  for (let i = 0; i < n; i++) t.is(w.buffer!.toString('latin1', i * PS, i * PS + 16), tag(vm, i < 32 ? i : i + 8));
  // Batch UNMAP of the first 16 (values, stride 0): one fresh-page mmap.
  const vals = Buffer.alloc(8 * 16);
  for (let i = 0; i < 16; i++) vals.writeBigUInt64LE(BigInt(w.address + i * PS), 8 * i);
  c = host.counters();
  const res = new Int32Array(16);
  t.is(dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, vals, 0, 16, res), 16);
  t.is(host.counters().remapCalls - c.remapCalls, 1);
  t.is(host.counters().unmapHypercalls - c.unmapHypercalls, 16, 'still one hypercall per page');
  t.deepEqual(w.buffer!.subarray(0, 16 * PS), Buffer.alloc(16 * PS));
  // Release of the other 48: one more.
  c = host.counters();
  dev.close();
  t.is(host.counters().remapCalls - c.remapCalls, 1);
  t.is(host.stats().mappings, 0);
  t.deepEqual(w.buffer!, Buffer.alloc(n * PS));
});

test('batch UNMAP = the same values one by one (not found, stale duplicates, exact match)', async (t) => {
  const run = async (batch: boolean) => {
    const { host, vm, dev, win, hook } = await fixture(t);
    const w = win(4);
    for (let i = 0; i < 4; i++) dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), BigInt(i * PS), w.address + i * PS + (i === 3 ? 1 : 0)));
    vm.unhook();
    await hook(vm);
    dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 9n * 4096n, w.address)); // live entry behind a stale one
    dev.ioctl(KVM_INTRO_MEM_MAP, rec(vm.getMapToken(), 10n * 4096n, w.address + PS));
    const addrs = [w.address, w.address, w.address + PS, w.address + 3 * PS, w.address + 3 * PS + 1, 0x1000, w.address + PS];
    const res = new Int32Array(addrs.length);
    if (batch) {
      const vals = Buffer.alloc(8 * addrs.length);
      addrs.forEach((a, i) => vals.writeBigUInt64LE(BigInt(a), 8 * i));
      dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, vals, 0, addrs.length, res);
    } else {
      addrs.forEach((a, i) => { res[i] = errnoOf(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, BigInt(a))); });
    }
    const base = BigInt(w.address);
    return {
      res: [...res],
      driver: dev.mappings().map((m) => [m.gpa, m.vaddr - base]),
      host: host.mappings().map((m) => [m.introspectorPage - base, m.gpa]),
      pages: Array.from({ length: 4 }, (_, i) => w.buffer!.toString('latin1', i * PS, i * PS + 16)),
    };
  };
  const one = await run(false), many = await run(true);
  t.deepEqual(one.res, [0, 0, 0, ENOENT, 0, ENOENT, 0]);
  t.deepEqual(many, one);
  t.deepEqual(one.driver, [[8192n, 8192n]], 'the stale entry of page 2 was never unmapped');
  t.deepEqual(one.host, [], 'the first UNMAP of w and of w+PS took the live mappings with the stale entries');
});

test('batch MAP: a remap that fails at the end is rolled back on both sides and reported per record, as one by one', async (t) => {
  const specs: Spec[] = [
    { page: 0, gpa: 0n, tok: 'fresh' },
    { page: 1, gpa: 4096n, tok: 'other' }, // the other VM's memory is fine
    { page: 2, gpa: 8192n, tok: 'fresh' },
    { page: 3, gpa: 8192n, tok: 'used' },
  ];
  // Warm up everything that might open a file descriptor, so the closed fd number cannot be reused meanwhile.
  libc.batchAvailable();
  const one = await runMaps(t, specs, false, { breakFd: true });
  const many = await runMaps(t, specs, true, { breakFd: true });
  t.deepEqual(one.results, [EBADF, 0, EBADF, ENOENT]);
  t.deepEqual(strip(many), strip(one));
  t.deepEqual(many.driver, [{ gpa: 4096n, vaddr: `w+${PS}`, paddr: `w+${PS}` }]);
  t.deepEqual(many.host.map((h) => h.vm), ['other']);
  t.deepEqual(many.pages[0], '\0'.repeat(16), 'a failed page is a fresh page, never a hole');
  t.deepEqual(many.tokens, [0, 0]);
});

test('batch results match the per-call path for a stride that is not 48 and for requests with no batch path', async (t) => {
  const { dev, vm, win } = await fixture(t);
  const w = win(2);
  const buf = Buffer.alloc(64 * 2);
  rec(vm.getMapToken(), 0n, w.address).copy(buf, 0);
  rec(vm.getMapToken(), 4096n, w.address + PS).copy(buf, 64);
  const res = new Int32Array(2);
  t.is(dev.ioctlBatch(KVM_INTRO_MEM_MAP, buf, 64, 2, res), 2);
  t.deepEqual(dev.mappings().map((m) => m.gpa), [0n, 4096n]);
  const res2 = new Int32Array(2);
  t.is(dev.ioctlBatch(0x1234, new Uint8Array(16), 0, 2, res2), 0);
  t.deepEqual([...res2], [ENOTTY, ENOTTY]);
  t.throws(() => dev.ioctlBatch(KVM_INTRO_MEM_MAP, new Uint8Array(47), 48, 1, new Int32Array(1)), { instanceOf: UsageError });
});

test('batch MAP looks pages up once per span; a span with a hole or an untouched page still answers per page', async (t) => {
  const run = async (batch: boolean) => {
    const { host, vm, dev } = await fixture(t);
    // Five pages: 0 and 4 touched, 1 untouched, 2 a hole, 3 touched.
    const a = libc.mmap(0, 5 * PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
    t.teardown(() => { for (const i of [0, 1, 3, 4]) libc.munmap(a + i * PS, PS); });
    libc.munmap(a + 2 * PS, PS);
    for (const i of [0, 3, 4]) libc.memsetAt(a + i * PS, 1, 1);
    const order = [4, 2, 0, 1, 3, 0];
    const buf = Buffer.alloc(48 * order.length);
    order.forEach((p, i) => rec(vm.getMapToken(), BigInt(i * PS), a + p * PS).copy(buf, 48 * i));
    const res = new Int32Array(order.length);
    const c0 = host.counters().mapHypercalls;
    if (batch) dev.ioctlBatch(KVM_INTRO_MEM_MAP, buf, 48, order.length, res);
    else order.forEach((_, i) => { res[i] = errnoOf(() => dev.ioctl(KVM_INTRO_MEM_MAP, buf.subarray(48 * i, 48 * i + 48))); });
    const base = BigInt(a);
    return {
      res: [...res],
      hypercalls: host.counters().mapHypercalls - c0,
      driver: dev.mappings().map((m) => [m.gpa, m.vaddr - base, m.paddr === 0n ? null : m.paddr - base]),
      resident: [0, 1, 3, 4].map((i) => resident(a + i * PS)),
    };
  };
  const one = await run(false), many = await run(true);
  t.deepEqual(one.res, [0, 0, 0, 0, 0, EALREADY]);
  t.is(one.hypercalls, 4, 'the hole and the untouched page: no hypercall');
  t.deepEqual(one.resident, [true, false, true, true]);
  t.deepEqual(many, one);
});
