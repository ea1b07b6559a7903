/**
 * 3. libkvmi way vs ours: page by page as libkvmi v1 does it (mmap, one token round
 * trip, MAP, UNMAP, munmap), re-enacted in TypeScript through the same model and
 * sockets, against one mapRange + unmap.
 */
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../src/abi/ioctl.js';
import { MEM_MAP_SIZE, encodeMemMap } from '../src/abi/structs.js';
import { Window } from '../src/sys/window.js';
import { PS, interleave, now, row, usPer, withLab, type Ctx } from './harness.js';

export async function benchLibkvmi(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 3 : 7;
  const pages = q ? 256 : 1024;
  ctx.params.libkvmi = { reps, pages, host: 'v6 (8 tokens)' };
  const lib: number[] = [], ours: number[] = [];
  await withLab(undefined, pages * PS, async (lab) => {
    const vm = lab.vm('bench');
    const s = lab.open();
    const dev = lab.host.openDevice();
    const rec = Buffer.alloc(MEM_MAP_SIZE);
    const libkvmi = async (out: number[]) => {
      const t0 = now();
      for (let p = 0; p < pages; p++) {
        // libkvmi v1: mmap(MAP_LOCKED|MAP_POPULATE) one page, one token round trip, MAP, ..., UNMAP, munmap
        const w = Window.alloc(PS);
        const token = await vm.getMapToken();
        encodeMemMap({ token, gpa: BigInt(p * PS), gva: BigInt(w.address) }, rec);
        dev.ioctl(KVM_INTRO_MEM_MAP, rec);
        dev.ioctl(KVM_INTRO_MEM_UNMAP, w.address);
        w.free();
      }
      out.push(usPer(now() - t0, pages));
    };
    const ourWay = async (out: number[]) => {
      const t0 = now();
      const r = await s.mapRange(vm, 0, pages * PS);
      r.unmap();
      out.push(usPer(now() - t0, pages));
    };
    await libkvmi([]); await ourWay([]);
    await interleave(reps, [() => libkvmi(lib), () => ourWay(ours)]);
    dev.close();
  });
  ctx.rows.push(row({
    id: 'libkvmi.v6', group: '3. libkvmi way vs ours', title: `${pages} pages on a v6 host: per-page mmap+token+MAP+UNMAP+munmap (libkvmi) vs mapRange+unmap (kvmmem)`,
    unit: 'us/page', subject: ['kvmmem', ours], baseline: ['libkvmi way (TS re-enactment)', lib], kind: 'speedup', goal: { text: '>= 5x faster', op: '>=', target: 5 },
  }));
}
