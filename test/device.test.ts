import test from 'ava';
import { LinuxDevice, classifyProbe } from '../src/device/linux-device.js';
import { KVM_GUEST_MEM_UNMAP_V2, KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../src/abi/ioctl.js';
import { ERRNO } from '../src/abi/errno.js';
import { encodeMemMap } from '../src/abi/structs.js';
import { ClosedError, DeviceError, KvmmemV2DeviceError, NoDeviceError, NotKvmmemDeviceError, UsageError } from '../src/errors.js';
import * as libc from '../src/sys/libc.js';
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const req = () => encodeMemMap({ token: new Uint8Array(32), gpa: 0x1000n, gva: 0x7f0000000000n });


test('a missing device node says to use the model', (t) => {
  const e = t.throws(() => LinuxDevice.open('/dev/kvmmem-does-not-exist'), { instanceOf: NoDeviceError });
  t.is(e?.code, 'ENOENT');
  t.is(e?.errno, -2);
  t.is(e?.syscall, 'open');
  t.regex(e!.message, /not an introspector VM with the kvmmem driver loaded; use the built-in model/);
});

test('MAP and UNMAP on /dev/null: ENOTTY, "is not a kvmmem device"', (t) => {
  const dev = LinuxDevice.open('/dev/null');
  try {
    const m = t.throws(() => dev.ioctl(KVM_INTRO_MEM_MAP, req()), { instanceOf: NotKvmmemDeviceError });
    t.is(m?.code, 'ENOTTY');
    t.is(m?.errno, -25);
    t.is(m?.syscall, 'KVM_INTRO_MEM_MAP');
    t.regex(m!.message, /\/dev\/null is not a kvmmem device/);
    const u = t.throws(() => dev.ioctl(KVM_INTRO_MEM_UNMAP, 0x7f0000000000n), { instanceOf: NotKvmmemDeviceError });
    t.is(u?.syscall, 'KVM_INTRO_MEM_UNMAP');
    // an unknown request on a real fd is a plain ENOTTY DeviceError
    const o = t.throws(() => dev.ioctl(0x1234, 0), { instanceOf: DeviceError });
    t.is(o?.code, 'ENOTTY');
  } finally {
    dev.close();
  }
});

test('probe() tells a kvmmem device from anything else without side effects', (t) => {
  const dev = LinuxDevice.open('/dev/null');
  try {
    const e = t.throws(() => dev.probe(), { instanceOf: NotKvmmemDeviceError });
    t.regex(e!.message, /\/dev\/null is not a kvmmem device/);
  } finally {
    dev.close();
  }
});

test('the batch path reports every record and matches the per-call path', (t) => {
  const dev = LinuxDevice.open('/dev/null');
  try {
    const n = 64;
    const recs = Buffer.alloc(48 * n);
    for (let i = 0; i < n; i++) encodeMemMap({ token: new Uint8Array(32), gpa: BigInt(i) << 12n, gva: 0x7f0000000000n + (BigInt(i) << 12n) }, recs, i * 48);
    const res = new Int32Array(n).fill(1);
    t.is(dev.ioctlBatch(KVM_INTRO_MEM_MAP, recs, 48, n, res), 0);
    t.true(res.every((r) => r === -25));
    const vals = Buffer.alloc(8 * n);
    const res2 = new Int32Array(n).fill(1);
    t.is(dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, vals, 0, n, res2), 0);
    t.true(res2.every((r) => r === -25));
    t.throws(() => dev.ioctlBatch(KVM_INTRO_MEM_MAP, recs, 48, n + 1, res), { instanceOf: UsageError });
    t.log(`native batch helper: ${libc.batchAvailable() ? 'loaded' : 'absent (per-call fallback)'}`);
  } finally {
    dev.close();
  }
});

test('use after close is an EBADF-style error, never a stale fd', (t) => {
  const dev = LinuxDevice.open('/dev/null');
  dev.close();
  t.true(dev.closed);
  const e = t.throws(() => dev.ioctl(KVM_INTRO_MEM_MAP, req()), { instanceOf: ClosedError });
  t.is(e?.code, 'EBADF');
  t.throws(() => dev.ioctlBatch(KVM_INTRO_MEM_MAP, req(), 48, 1, new Int32Array(1)), { instanceOf: ClosedError });
  t.notThrows(() => dev.close());
});

test('permission errors carry a hint (as an unprivileged user)', (t) => {
  // Root bypasses file modes, so open a root-only node from a child that drops to nobody.
  const dir = mkdtempSync(join(tmpdir(), 'kvmmem-perm-'));
  const node = join(dir, 'kvmmem');
  writeFileSync(node, '');
  chmodSync(node, 0o600);
  chmodSync(dir, 0o755);
  // Load the module first (the checkout may be unreadable to nobody), then drop to nobody.
  const code = `
    const { LinuxDevice } = await import(${JSON.stringify(new URL('../src/device/linux-device.ts', import.meta.url).href)});
    if (process.getuid() === 0) process.setuid(65534);
    try { LinuxDevice.open(${JSON.stringify(node)}); console.log('opened'); }
    catch (e) { console.log(JSON.stringify({ code: e.code, errno: e.errno, message: e.message })); }`;
  const out = execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { encoding: 'utf8' });
  rmSync(dir, { recursive: true });
  const r = JSON.parse(out.trim().split('\n').pop()!);
  t.is(r.code, 'EACCES');
  t.is(r.errno, -13);
  t.regex(r.message, /run as root, or give your user read-write access/);
});

test('probe classification: v1 driver, libkvmi remote mapping v2 (same device name), or no kvmmem at all', (t) => {
  const never = () => { throw new Error('v2 must not be probed'); };
  t.is(classifyProbe(-ERRNO.ENOENT!, never), 'v1', 'UNMAP(0): nothing mapped there');
  t.is(classifyProbe(0, never), 'v1');
  t.is(classifyProbe(-ERRNO.EINVAL!, never), 'other', 'another error is reported as it is');
  t.is(classifyProbe(-ERRNO.ENOTTY!, () => -ERRNO.EINVAL!), 'v2', "libkvmi's rule: anything but ENOTTY on the v2 UNMAP");
  t.is(classifyProbe(-ERRNO.ENOTTY!, () => -ERRNO.ENOTTY!), 'other');
  t.is(KVM_GUEST_MEM_UNMAP_V2, 0x40086903);
  const e = new KvmmemV2DeviceError('/dev/kvmmem');
  t.is(e.code, 'ENOTTY');
  t.regex(e.message, /remote mapping v2.*kvmmem speaks the v1 interface/);
});
