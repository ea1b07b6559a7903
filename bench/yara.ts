/**
 * 7. yara: a physical YARA scan of a RAM file through the full model stack
 * (yaraScan: mapRange per chunk, YARA-X on the live window) against its two
 * parts measured alone in the same run: the stack's remap floor (the same
 * chunk walk with nothing scanned) and the engine on the file itself (mmap'd
 * in-process, the same chunk size, no stack). Goal: within 1.3x of their sum.
 */
import { existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compile } from '@litko/yara-x';
import { openRam } from '../src/cli/common.js';
import { walkRange } from '../src/inspect/scan.js';
import * as libc from '../src/sys/libc.js';
import { compileRules, yaraScan } from '../src/yara/index.js';
import { interleave, now, round, row, stat, type Ctx } from './harness.js';
import { makeRamFile } from './scan.js';

const RULES = `
rule needle { strings: $n = "kvmmem-bench: Linux version" condition: $n }
rule elf { strings: $e = { 7f 45 4c 46 02 01 01 } condition: $e }
rule key { strings: $k = /KEY\\[[0-9a-f]{16,64}\\]/ condition: $k }
`;

export async function benchYara(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 2 : 5;
  const bytes = (q ? 64 : 256) * 2 ** 20;
  const chunk = 2 ** 20;
  const dir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const path = join(dir, `kvmmem-bench-yara-${process.pid}.ram`);
  const at = makeRamFile(path, bytes, 16);
  ctx.params.yara = { reps, bytes, chunkBytes: chunk, rules: 3, plantedMatches: at.length, engine: '@litko/yara-x (YARA-X)' };
  const full: number[] = [], floor: number[] = [], engine: number[] = [];
  const counts = { full: -1, engine: -1 };
  const rules = compileRules(RULES);
  const raw = compile(RULES);
  try {
    const ram = await openRam(path);
    try {
      const fullScan = async () => {
        const t0 = now();
        const r = await yaraScan(ram.session, ram.vm, rules, { to: ram.end });
        full.push(now() - t0);
        counts.full = r.hits.length;
      };
      const floorWalk = async () => {
        const t0 = now();
        await walkRange(ram.session, ram.vm, 'bench', { from: 0n, to: ram.end, chunkPages: chunk / 4096, stopped: () => false }, { feed() {}, flush() {} });
        floor.push(now() - t0);
      };
      const engineOnFile = () => {
        const t0 = now();
        const fd = libc.open(path, libc.O_RDONLY);
        const addr = libc.mmap(0, bytes, libc.PROT_READ, libc.MAP_SHARED, fd, 0);
        let n = 0;
        try {
          const v = libc.view(addr, bytes);
          for (let off = 0; off < bytes; off += chunk) for (const m of raw.scan(v.subarray(off, off + chunk))) n += m.matches.length;
        } finally {
          libc.munmap(addr, bytes);
          libc.close(fd);
        }
        engine.push(now() - t0);
        counts.engine = n;
      };
      await fullScan(); await floorWalk(); engineOnFile();
      full.length = 0; floor.length = 0; engine.length = 0;
      await interleave(reps, [fullScan, floorWalk, engineOnFile]);
    } finally {
      await ram.close();
    }
  } finally {
    rmSync(path, { force: true });
  }
  // The engine alone over whole chunks misses the needle planted across a chunk edge; yaraScan does not.
  if (counts.full !== at.length || counts.engine !== at.length - 1) {
    throw new Error(`yara bench: hit counts differ (planted ${at.length}, yaraScan ${counts.full}, engine per chunk ${counts.engine}, expected ${at.length - 1})`);
  }
  const sum = floor.map((f, i) => f + engine[i]!);
  const mib = bytes / 2 ** 20;
  const G = '7. yara';
  ctx.rows.push(
    row({ id: 'yara.parts', group: G, title: `YARA scan of a ${mib} MiB RAM file (3 rules): yaraScan (full model stack) vs remap floor + engine on the file, same run`, unit: 'ms', subject: ['yaraScan', full], baseline: ['floor + engine', sum], goal: { text: '<= 1.3x (floor + engine)', op: '<=', target: 1.3 } }),
    row({ id: 'yara.engine', group: G, title: `YARA scan of a ${mib} MiB RAM file: yaraScan vs the engine alone on the mmap'd file (the limit)`, unit: 'ms', subject: ['yaraScan', full], baseline: ['engine on the file', engine] }),
  );
  ctx.extra.yaraThroughputMiBs = { yaraScan: round(mib / (stat(full).median / 1000)), floor: round(mib / (stat(floor).median / 1000)), engine: round(mib / (stat(engine).median / 1000)) };
}
