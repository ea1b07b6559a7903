/**
 * 4. tokens: KVMI_GET_MAP_TOKEN pipelined (one write of N requests, N replies) against
 * one request at a time, on a v6 host (8 tokens) and on a host with 256.
 */
import { PS, interleave, now, row, usPer, withLab, type Ctx } from './harness.js';

export async function benchTokens(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 3 : 9;
  const total = q ? 1024 : 4096;
  const seqTotal = q ? 256 : 1024;
  ctx.params.tokens = { reps, pipelinedTokens: total, sequentialTokens: seqTotal, note: 'host-side tokens are dropped after every batch (same for both ways) so the limit is never hit' };
  for (const limit of [8, 256]) {
    const pipe: number[] = [], seq: number[] = [];
    await withLab(limit === 8 ? undefined : limit, 16 * PS, async (lab) => {
      const vm = lab.vm('bench');
      const mvm = lab.modelVm('bench');
      const drop = () => lab.host._tokens.dropVm(mvm);
      const pipelined = async (out: number[]) => {
        const t0 = now();
        for (let n = 0; n < total; n += limit) {
          const got = await vm.getMapTokensSettled(limit);
          if (!(got[limit - 1] instanceof Uint8Array)) throw got[limit - 1] as Error;
          drop();
        }
        out.push(usPer(now() - t0, total));
      };
      const sequential = async (out: number[]) => {
        const t0 = now();
        for (let n = 0; n < seqTotal; n += limit) {
          for (let k = 0; k < limit; k++) await vm.getMapToken();
          drop();
        }
        out.push(usPer(now() - t0, seqTotal));
      };
      await pipelined([]); await sequential([]);
      await interleave(reps, [() => sequential(seq), () => pipelined(pipe)]);
    });
    ctx.rows.push(row({
      id: `tokens.${limit === 8 ? 'v6' : 't256'}`, group: '4. tokens', title: limit === 8 ? 'KVMI_GET_MAP_TOKEN, 8 per write (v6 limit) vs one request at a time' : 'KVMI_GET_MAP_TOKEN, 256 per write (host tokenLimit 256) vs one at a time',
      unit: 'us/token', subject: ['pipelined', pipe], baseline: ['sequential', seq], kind: 'speedup', goal: { text: '>= 5x faster', op: '>=', target: 5 },
    }));
  }
}
