/**
 * 2. model map+unmap: single pages and 4,096-page ranges through the whole model stack
 * (tokens over the socket, driver model, host model) against the C remap floors
 * (native/bench/remap_loop.c: one page at a time, and the whole run at once).
 */
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../src/abi/ioctl.js';
import { MEM_MAP_SIZE, encodeMemMap } from '../src/abi/structs.js';
import type { Session } from '../src/client/session.js';
import type { TargetVm } from '../src/client/target.js';
import { Window } from '../src/sys/window.js';
import { PS, interleave, now, row, runC, usPer, withLab, type Ctx } from './harness.js';

function recordsFor(tokens: (Uint8Array | Error)[], gpa0: number, addr0: number, addrStride: number, into: Buffer): void {
  for (let k = 0; k < tokens.length; k++) {
    const t = tokens[k];
    if (!(t instanceof Uint8Array)) throw t ?? new Error('no token');
    encodeMemMap({ token: t, gpa: BigInt(gpa0 + k * PS), gva: BigInt(addr0 + k * addrStride) }, into, k * MEM_MAP_SIZE);
  }
}

export async function benchModel(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 3 : 7;
  const pages = 4096;
  const singlePages = q ? 256 : 1024;
  const sessionSingle = q ? 128 : 512;
  ctx.params.model = { reps, rangePages: pages, devicePages: singlePages, sessionPages: sessionSingle, vmBytes: pages * PS };
  const cPage: number[] = [], cRun: number[] = [];
  const cFns: (() => void)[] = [];
  if (ctx.cbin) {
    cFns.push(() => {
      const r = runC<{ total_ns: number }>(ctx, 'remap_loop', ['page', String(pages)]);
      cPage.push(r.total_ns / 1000);
    });
    cFns.push(() => {
      const r = runC<{ total_ns: number }>(ctx, 'remap_loop', ['run', String(pages)]);
      cRun.push(r.total_ns / 1000);
    });
  }
  // v6 host (8 tokens) and a host with 256 (labelled), interleaved with the C floors.
  const dev1: number[] = [], sess1: number[] = [], rangeV6: number[] = [], range256: number[] = [], range4k: number[] = [];
  const mem = pages * PS;
  await withLab(undefined, mem, async (labV6) => withLab(256, mem, async (lab256) => withLab(4096, mem, async (lab4k) => {
    const vm6 = labV6.vm('bench');
    const s6 = labV6.open();
    const s256 = lab256.open({ maxTokensInFlight: 256 });
    const s4k = lab4k.open({ maxTokensInFlight: 4096 });
    const dev = labV6.host.openDevice();
    const win = Window.alloc(8 * PS);
    const rec = Buffer.alloc(MEM_MAP_SIZE * 8);
    const one = async () => {
      // device-level single page: MAP then UNMAP, one ioctl each (tokens fetched 8 at a time beforehand, untimed)
      let t = 0;
      for (let p = 0; p < singlePages; p += 8) {
        const toks = await vm6.getMapTokensSettled(8);
        recordsFor(toks, p * PS, win.address, 0, rec);
        const t0 = now();
        for (let k = 0; k < 8; k++) {
          dev.ioctl(KVM_INTRO_MEM_MAP, rec.subarray(k * MEM_MAP_SIZE, (k + 1) * MEM_MAP_SIZE));
          dev.ioctl(KVM_INTRO_MEM_UNMAP, win.address);
        }
        t += now() - t0;
      }
      dev1.push(usPer(t, singlePages));
    };
    const sessOne = async () => {
      const t0 = now();
      for (let p = 0; p < sessionSingle; p++) (await s6.map(vm6, p * PS)).unmap();
      sess1.push(usPer(now() - t0, sessionSingle));
    };
    const range = (s: Session, vm: TargetVm, out: number[]) => async () => {
      const t0 = now();
      const r = await s.mapRange(vm, 0, pages * PS);
      r.unmap();
      out.push(usPer(now() - t0, pages));
    };
    // warm-up (JIT, windows, memfd pages)
    await range(s6, vm6, [])();
    await range(s256, lab256.vm('bench'), [])();
    await range(s4k, lab4k.vm('bench'), [])();
    await one();
    dev1.length = 0;
    await interleave(reps, [...cFns, one, sessOne, range(s6, vm6, rangeV6), range(s256, lab256.vm('bench'), range256), range(s4k, lab4k.vm('bench'), range4k)]);
    dev.close();
    win.free();
  })));
  const CP: [string, number[]] | undefined = ctx.cbin ? ['C per-page remap floor', cPage] : undefined;
  const CR: [string, number[]] | undefined = ctx.cbin ? ['C one-run remap (physical limit)', cRun] : undefined;
  const G = '2. model map+unmap';
  ctx.rows.push(
    row({ id: 'model.single.device', group: G, title: 'single page MAP+UNMAP through the model device (driver + host + remaps; token fetched beforehand)', unit: 'us/page', subject: ['kvmmem', dev1], baseline: CP, goal: { text: '<= 1.5x C per-page floor', op: '<=', target: 1.5 } }),
    row({ id: 'model.single.session', group: G, title: 'single page Session.map()+unmap() (full stack: one token round trip per page)', unit: 'us/page', subject: ['kvmmem', sess1], baseline: CP }),
    row({ id: 'model.range.v6', group: G, title: `mapRange+unmap of ${pages} contiguous pages, v6 host (8 tokens per round trip)`, unit: 'us/page', subject: ['kvmmem', rangeV6], baseline: CP, kind: 'speedup', goal: { text: '>= 5x faster than C per-page floor', op: '>=', target: 5 } }),
    row({ id: 'model.range.t256', group: G, title: `mapRange+unmap of ${pages} pages, host with tokenLimit 256 (maxTokensInFlight 256)`, unit: 'us/page', subject: ['kvmmem', range256], baseline: CP, kind: 'speedup', goal: { text: '>= 5x faster than C per-page floor', op: '>=', target: 5 } }),
    row({ id: 'model.range.t4096', group: G, title: `mapRange+unmap of ${pages} pages, host with tokenLimit 4096 (one round trip)`, unit: 'us/page', subject: ['kvmmem', range4k], baseline: CP, kind: 'speedup', goal: { text: '>= 5x faster than C per-page floor', op: '>=', target: 5 } }),
    row({ id: 'model.range.limit', group: G, title: `mapRange+unmap of ${pages} pages (tokenLimit 256) vs C remapping the whole run at once`, unit: 'us/page', subject: ['kvmmem', range256], baseline: CR, note: 'how far the model stack is from the kernel\'s cost for the same coalesced remaps' }),
  );
}
