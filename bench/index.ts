/**
 * The benchmarks of BENCHMARKS.md, each measured side by side with its baseline in the
 * same run (runs interleaved, repeated, min/median/max). One file per group over
 * the shared harness; `npm run bench` (bench/run.ts) in a checkout, `kvmmem bench`
 * (compiled into dist/bench by `npm run build`) from an installed package.
 *
 * Heap figures need a gc() (run with --expose-gc, as `npm run bench` does; the
 * CLI falls back to enabling it at run time).
 */
import { cpus, loadavg, release, totalmem } from 'node:os';
import { join } from 'node:path';
import type { BenchModule } from '../src/cli/bench-command.js';
import { KvmmemError } from '../src/errors.js';
import * as libc from '../src/sys/libc.js';
import { ROOT, buildC, getGc, round, type BenchOptions, type BenchReport, type Ctx, type Group } from './harness.js';
import { benchIoctl } from './ioctl.js';
import { benchLibkvmi } from './libkvmi.js';
import { benchLinux } from './linux.js';
import { benchModel } from './model.js';
import { benchPhysical } from './physical.js';
import { formatTable, writeReport } from './report.js';
import { benchScale } from './scale.js';
import { benchScan } from './scan.js';
import { benchTokens } from './tokens.js';
import { benchYara } from './yara.js';

export type { BenchOptions, BenchReport, Row, Stat } from './harness.js';
export { formatTable, markdown, writeReport, type ReportPaths } from './report.js';

const GROUPS: Record<string, Group> = {
  ioctl: benchIoctl, model: benchModel, libkvmi: benchLibkvmi, tokens: benchTokens, scan: benchScan, scale: benchScale, physical: benchPhysical, yara: benchYara, linux: benchLinux,
};

/** The groups, in the order a full run takes them. */
export const GROUP_NAMES: readonly string[] = Object.keys(GROUPS);

export async function runBench(opts: BenchOptions = {}): Promise<BenchReport> {
  const log = opts.log ?? ((l: string) => process.stderr.write(`${l}\n`));
  const quick = opts.quick ?? false;
  const groups = opts.only && opts.only.length > 0 ? opts.only : GROUP_NAMES;
  // Every group name is checked before anything runs (a typo must not cost a five-minute run).
  const unknown = groups.filter((g) => !Object.hasOwn(GROUPS, g));
  if (unknown.length > 0) throw new KvmmemError(`bench: unknown group '${unknown.join("', '")}' (have: ${GROUP_NAMES.join(', ')})`, { code: 'ERR_INVALID_ARG' });
  const t0 = Date.now();
  const loadStart = loadavg();
  const c = buildC(opts.nativeDir ?? join(ROOT, 'native', 'bench'), log);
  const ctx: Ctx = {
    quick, log, cbin: c.bins, cReason: c.reason, skipped: [], rows: [], extra: {}, params: {}, gc: getGc(),
  };
  if (!c.bins) {
    ctx.skipped.push(c.reason);
    log(`kvmmem bench: ${c.reason}`);
  }
  for (const g of groups) {
    const tg = Date.now();
    log(`bench: ${g} ...`);
    await GROUPS[g]!(ctx);
    log(`bench: ${g} done in ${((Date.now() - tg) / 1000).toFixed(1)} s`);
  }
  const cpu = cpus();
  return {
    version: 1,
    quick,
    date: new Date().toISOString(),
    durationSec: (Date.now() - t0) / 1000,
    machine: {
      cpu: cpu[0]?.model ?? 'unknown', cores: cpu.length, memGiB: round(totalmem() / 2 ** 30),
      node: process.version, kernel: release(), cc: c.cc, arch: process.arch,
      batchHelper: libc.batchAvailable() ? 'loaded' : 'absent', errnoMode: libc.errnoMode(),
      loadAvgStart: loadStart.map(round), loadAvgEnd: loadavg().map(round),
    },
    params: ctx.params,
    skipped: ctx.skipped,
    rows: ctx.rows,
    extra: ctx.extra,
  };
}

// What `kvmmem bench` loads from this module (checked here, where both sides are visible).
const contract: BenchModule<BenchReport> = { GROUP_NAMES, runBench, formatTable, writeReport };
void contract;
