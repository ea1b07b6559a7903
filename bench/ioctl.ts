/**
 * 1. ioctl path: kvmmem's batch and single-page ioctls on /dev/null (ENOTTY after a
 * real syscall) against a C loop issuing the same syscalls (native/bench/ioctl_loop.c).
 */
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../src/abi/ioctl.js';
import { MEM_MAP_SIZE } from '../src/abi/structs.js';
import { LinuxDevice } from '../src/device/linux-device.js';
import * as libc from '../src/sys/libc.js';
import { PS, interleave, now, round, row, runC, stat, usPer, type Ctx } from './harness.js';

export async function benchIoctl(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 3 : 7;
  const cCount = q ? 100_000 : 400_000;
  const singleCount = q ? 5_000 : 20_000;
  const batch = 4096;
  const batchCalls = q ? 12 : 48;
  ctx.params.ioctl = { reps, cCount, singleCount, batch, batchCalls, fd: '/dev/null' };
  const dev = LinuxDevice.open('/dev/null');
  const recs = Buffer.alloc(MEM_MAP_SIZE * batch);
  const vals = Buffer.alloc(8 * batch);
  for (let i = 0; i < batch; i++) {
    recs.writeBigUInt64LE(BigInt(i * PS), i * MEM_MAP_SIZE + 32);
    recs.writeBigUInt64LE(0x7f0000000000n + BigInt(i * PS), i * MEM_MAP_SIZE + 40);
    vals.writeBigUInt64LE(0x7f0000000000n + BigInt(i * PS), i * 8);
  }
  const res = new Int32Array(batch);
  const one = recs.subarray(0, MEM_MAP_SIZE);
  const s = { cMap: [] as number[], cUnmap: [] as number[], sMap: [] as number[], sUnmap: [] as number[], s1Map: [] as number[], s1Unmap: [] as number[], bMap: [] as number[], bUnmap: [] as number[] };
  let enotty = 0;
  const fns: (() => void)[] = [];
  if (ctx.cbin) {
    fns.push(() => {
      const r = runC<{ map_ns: number; unmap_ns: number; map_errno: number }>(ctx, 'ioctl_loop', ['/dev/null', String(cCount)]);
      s.cMap.push(r.map_ns); s.cUnmap.push(r.unmap_ns);
    });
  }
  fns.push(() => {
    // single-page path: Device.ioctl(), which throws the typed ENOTTY error on /dev/null
    let t0 = now();
    for (let i = 0; i < singleCount; i++) {
      try { dev.ioctl(KVM_INTRO_MEM_MAP, one); } catch { enotty++; }
    }
    let t1 = now();
    s.sMap.push(usPer(t1 - t0, singleCount) * 1000);
    t0 = now();
    for (let i = 0; i < singleCount; i++) {
      try { dev.ioctl(KVM_INTRO_MEM_UNMAP, 0x7f0000000000 + i * PS); } catch { enotty++; }
    }
    t1 = now();
    s.sUnmap.push(usPer(t1 - t0, singleCount) * 1000);
    // single page, no throw: ioctlBatch of one record (the fixed cost of one call)
    t0 = now();
    for (let i = 0; i < singleCount; i++) dev.ioctlBatch(KVM_INTRO_MEM_MAP, one, MEM_MAP_SIZE, 1, res);
    t1 = now();
    s.s1Map.push(usPer(t1 - t0, singleCount) * 1000);
    t0 = now();
    for (let i = 0; i < singleCount; i++) dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, vals, 0, 1, res);
    t1 = now();
    s.s1Unmap.push(usPer(t1 - t0, singleCount) * 1000);
  });
  fns.push(() => {
    let t0 = now();
    for (let c = 0; c < batchCalls; c++) dev.ioctlBatch(KVM_INTRO_MEM_MAP, recs, MEM_MAP_SIZE, batch, res);
    let t1 = now();
    s.bMap.push(usPer(t1 - t0, batch * batchCalls) * 1000);
    if (res[0] !== -25) throw new Error(`ioctl bench: expected ENOTTY from /dev/null, got ${res[0]}`);
    t0 = now();
    for (let c = 0; c < batchCalls; c++) dev.ioctlBatch(KVM_INTRO_MEM_UNMAP, vals, 0, batch, res);
    t1 = now();
    s.bUnmap.push(usPer(t1 - t0, batch * batchCalls) * 1000);
  });
  await interleave(reps, fns);
  dev.close();
  const C: [string, number[]] | undefined = ctx.cbin ? ['C loop', s.cMap] : undefined;
  const CU: [string, number[]] | undefined = ctx.cbin ? ['C loop', s.cUnmap] : undefined;
  const helper = libc.batchAvailable() ? 'native batch helper' : 'per-call fallback (no helper)';
  ctx.rows.push(
    row({ id: 'ioctl.batch.map', group: '1. ioctl path', title: `MAP, batch path (ioctlBatch ×${batch}, ${helper})`, unit: 'ns/ioctl', subject: ['kvmmem', s.bMap], baseline: C, goal: { text: '<= 1.5x C', op: '<=', target: 1.5 } }),
    row({ id: 'ioctl.batch.unmap', group: '1. ioctl path', title: `UNMAP, batch path (ioctlBatch ×${batch})`, unit: 'ns/ioctl', subject: ['kvmmem', s.bUnmap], baseline: CU, goal: { text: '<= 1.5x C', op: '<=', target: 1.5 } }),
    row({ id: 'ioctl.single.map', group: '1. ioctl path', title: 'MAP, single-page path (Device.ioctl, throws the typed ENOTTY error)', unit: 'ns/ioctl', subject: ['kvmmem', s.sMap], baseline: C, note: 'fixed per-call cost = kvmmem - C' }),
    row({ id: 'ioctl.single.unmap', group: '1. ioctl path', title: 'UNMAP, single-page path (Device.ioctl, throws)', unit: 'ns/ioctl', subject: ['kvmmem', s.sUnmap], baseline: CU }),
    row({ id: 'ioctl.one.map', group: '1. ioctl path', title: 'MAP, one record per call, no throw (ioctlBatch ×1)', unit: 'ns/ioctl', subject: ['kvmmem', s.s1Map], baseline: C }),
    row({ id: 'ioctl.one.unmap', group: '1. ioctl path', title: 'UNMAP, one record per call, no throw (ioctlBatch ×1)', unit: 'ns/ioctl', subject: ['kvmmem', s.s1Unmap], baseline: CU }),
  );
  const med = (a: number[]) => stat(a).median;
  if (ctx.cbin) {
    ctx.extra.ioctlFixedCostNs = { map: round(med(s.sMap) - med(s.cMap)), unmap: round(med(s.sUnmap) - med(s.cUnmap)), mapNoThrow: round(med(s.s1Map) - med(s.cMap)), unmapNoThrow: round(med(s.s1Unmap) - med(s.cUnmap)) };
  }
}
