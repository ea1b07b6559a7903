/**
 * 7. physical reads: 4 MiB of guest-physical memory copied out through
 * session.mapRange() (tokens + MAP of the whole run, one live view, one copy,
 * UNMAP) against KVMI_READ_PHYSICAL 4 KiB at a time, each awaited before the
 * next (how LibVMI reads a KVM guest), and against readPhysical() pipelined
 * (this library's per-page requests in windows), and a range kept mapped read
 * again. All on the model, over the lab's unix socket (host, device manager
 * and tool share one process and event loop: the host's copies count against
 * readPhysical here, as a real host kernel's would not), ratios from
 * interleaved runs.
 */
import { PS, interleave, now, row, withLab, type Ctx } from './harness.js';

export async function benchPhysical(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 3 : 7;
  const bytes = 4 << 20;
  const pages = bytes / PS;
  ctx.params.physical = { reps, bytes, pages };
  const mapV6: number[] = [], map256: number[] = [], perPage: number[] = [], pipelined: number[] = [], reread: number[] = [];
  let check = 0;
  await withLab(undefined, bytes, async (labV6) => withLab(256, bytes, async (lab256) => {
    const vm6 = labV6.vm('bench');
    const vm256 = lab256.vm('bench');
    const s6 = labV6.open();
    const s256 = lab256.open({ maxTokensInFlight: 256 });
    const viaMap = (s: typeof s6, vm: typeof vm6, out: number[]) => async () => {
      const t0 = now();
      const r = await s.mapRange(vm, 0, bytes);
      const copy = Buffer.from(r.buffer);
      r.unmap();
      out.push(now() - t0);
      check ^= copy[bytes - 1]!;
    };
    const libvmi = async () => {
      const out = Buffer.allocUnsafe(bytes);
      const t0 = now();
      for (let p = 0; p < pages; p++) (await vm6.readPhysical(p * PS, PS)).copy(out, p * PS);
      perPage.push(now() - t0);
      check ^= out[bytes - 1]!;
    };
    const piped = async () => {
      const t0 = now();
      const out = await vm6.readPhysical(0, bytes);
      pipelined.push(now() - t0);
      check ^= out[bytes - 1]!;
    };
    // A mapping kept: reading it again is a memory copy (the view is live, no request at all).
    const kept = await s6.mapRange(vm6, 0, bytes);
    const again = async () => {
      const t0 = now();
      const copy = Buffer.from(kept.buffer);
      reread.push(now() - t0);
      check ^= copy[bytes - 1]!;
    };
    // warm-up (JIT, windows, memfd pages)
    for (const f of [viaMap(s6, vm6, []), viaMap(s256, vm256, []), libvmi, piped, again]) await f();
    perPage.length = 0;
    pipelined.length = 0;
    reread.length = 0;
    await interleave(reps, [viaMap(s6, vm6, mapV6), viaMap(s256, vm256, map256), libvmi, piped, again]);
    kept.unmap();
    s6.close();
    s256.close();
  }));
  ctx.extra.physicalCheck = check; // keeps the copies observable
  const G = '7. physical reads (4 MiB)';
  const L: [string, number[]] = ['readPhysical 4 KiB at a time (LibVMI)', perPage];
  ctx.rows.push(
    row({ id: 'physical.map.v6', group: G, title: 'copy 4 MiB out: mapRange + copy + unmap (v6 host: 8 tokens per round trip) vs KVMI_READ_PHYSICAL per 4 KiB page, each awaited', unit: 'ms', subject: ['kvmmem mapRange', mapV6], baseline: L, kind: 'speedup' }),
    row({ id: 'physical.map.t256', group: G, title: 'the same, host with tokenLimit 256', unit: 'ms', subject: ['kvmmem mapRange', map256], baseline: L, kind: 'speedup' }),
    row({ id: 'physical.pipelined', group: G, title: 'readPhysical(4 MiB) pipelined (per-page requests in windows) vs one request awaited at a time', unit: 'ms', subject: ['kvmmem readPhysical', pipelined], baseline: L, kind: 'speedup' }),
    row({ id: 'physical.reread', group: G, title: 'reading the 4 MiB again: copy from a range kept mapped (live view) vs readPhysical(4 MiB) pipelined again', unit: 'ms', subject: ['kvmmem kept mapping', reread], baseline: ['kvmmem readPhysical', pipelined], kind: 'speedup' }),
    row({ id: 'physical.map.vs.pipelined', group: G, title: 'mapRange + copy (v6 host) vs readPhysical(4 MiB) pipelined', unit: 'ms', subject: ['kvmmem mapRange', mapV6], baseline: ['kvmmem readPhysical', pipelined], kind: 'speedup' }),
  );
}
