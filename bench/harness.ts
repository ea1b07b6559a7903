/**
 * The shared harness of the benchmarks (one file per group next to this one):
 * statistics, rows with their ratio per interleaved pair, the context a group
 * fills in, interleaved runs, the C baselines (native/bench/*.c built with the
 * system compiler into a temporary directory), and a model lab with its RAM
 * faulted in. Nothing in the test suite asserts on timings.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { ModelLab } from '../src/lab/model-lab.js';

export const PS = 4096;

/**
 * The package root: the nearest directory above this file with kvmmem's
 * package.json (bench/ in a checkout, dist/bench/ in an installed package).
 */
export const ROOT = ((): string => {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj) && (JSON.parse(readFileSync(pj, 'utf8')) as { name?: string }).name === 'kvmmem') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error(`bench: no kvmmem package.json above ${fileURLToPath(import.meta.url)}`);
    dir = up;
  }
})();

// ---------------------------------------------------------------- statistics

export interface Stat { min: number; median: number; max: number; samples: number[] }

export function stat(samples: number[]): Stat {
  const s = [...samples].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length === 0 ? NaN : s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { min: s[0] ?? NaN, median, max: s[s.length - 1] ?? NaN, samples: samples.map((x) => round(x)) };
}

export const round = (x: number) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : x);

/** One benchmark row: kvmmem (subject) against its baseline, ratio per interleaved pair. */
export interface Row {
  id: string;
  group: string;
  title: string;
  unit: string;
  subject: { label: string; stat: Stat };
  baseline?: { label: string; stat: Stat };
  /**
   * 'slowdown': subject/baseline (lower is better, 1 = as fast as the baseline);
   * 'speedup': baseline/subject (higher is better).
   */
  ratio?: { kind: 'slowdown' | 'speedup'; stat: Stat };
  /** met: null when the baseline could not be measured (e.g. no C compiler). */
  goal?: { text: string; op: '<=' | '>=' | '<'; target: number; met: boolean | null };
  note?: string;
}

function pairRatios(subject: number[], baseline: number[], kind: 'slowdown' | 'speedup'): Stat {
  const n = Math.min(subject.length, baseline.length);
  const r: number[] = [];
  for (let i = 0; i < n; i++) r.push(kind === 'slowdown' ? subject[i]! / baseline[i]! : baseline[i]! / subject[i]!);
  return stat(r);
}

export function row(o: {
  id: string; group: string; title: string; unit: string;
  subject: [string, number[]]; baseline?: [string, number[]] | undefined;
  kind?: 'slowdown' | 'speedup'; goal?: { text: string; op: '<=' | '>=' | '<'; target: number } | undefined; note?: string | undefined;
  /** The goal is on the subject's own value (no baseline), e.g. bytes per mapping. */
  absolute?: boolean;
}): Row {
  const r: Row = { id: o.id, group: o.group, title: o.title, unit: o.unit, subject: { label: o.subject[0], stat: stat(o.subject[1]) } };
  if (o.baseline && o.baseline[1].length > 0) {
    r.baseline = { label: o.baseline[0], stat: stat(o.baseline[1]) };
    const kind = o.kind ?? 'slowdown';
    r.ratio = { kind, stat: pairRatios(o.subject[1], o.baseline[1], kind) };
    if (o.goal) {
      const v = r.ratio.stat.median;
      const met = o.goal.op === '<=' ? v <= o.goal.target : o.goal.op === '>=' ? v >= o.goal.target : v < o.goal.target;
      r.goal = { ...o.goal, met };
    }
  } else if (o.goal && o.absolute) {
    const v = r.subject.stat.median;
    const met = o.goal.op === '<=' ? v <= o.goal.target : o.goal.op === '>=' ? v >= o.goal.target : v < o.goal.target;
    r.goal = { ...o.goal, met };
  } else if (o.goal) {
    r.goal = { ...o.goal, met: null };
  }
  if (o.note) r.note = o.note;
  return r;
}

// ---------------------------------------------------------------- plumbing

export interface BenchOptions {
  quick?: boolean;
  /** Only these groups (ioctl, model, libkvmi, tokens, scan, scale, physical). */
  only?: string[];
  /** Where the C baselines' sources are (default: native/bench in the package). */
  nativeDir?: string;
  /** Progress lines (default: stderr). */
  log?: (line: string) => void;
}

export interface BenchReport {
  version: 1;
  quick: boolean;
  date: string;
  durationSec: number;
  machine: Record<string, unknown>;
  params: Record<string, unknown>;
  skipped: string[];
  rows: Row[];
  extra: Record<string, unknown>;
}

/** What a group gets: its sizes (quick or full), the C baselines if built, and where its results go. */
export interface Ctx {
  quick: boolean;
  log: (line: string) => void;
  cbin: Map<string, string> | null;
  cReason: string;
  skipped: string[];
  rows: Row[];
  extra: Record<string, unknown>;
  params: Record<string, unknown>;
  gc: () => void;
}

/** One benchmark group: measures, then pushes its rows (and params, extra figures) into the context. */
export type Group = (ctx: Ctx) => Promise<void>;

export const now = () => performance.now();

export function getGc(): () => void {
  const g = (globalThis as { gc?: () => void }).gc;
  if (typeof g === 'function') return g;
  setFlagsFromString('--expose_gc');
  return runInNewContext('gc') as () => void;
}

/**
 * Builds the C baselines (every .c in `srcDir`, normally native/bench) with the system
 * compiler into a temp dir; null + the one-line reason when impossible (no sources, no
 * compiler, a build error): the C comparisons are then skipped, the rest still runs.
 */
export function buildC(srcDir: string, log: (l: string) => void): { bins: Map<string, string> | null; reason: string; cc: string } {
  const cc = process.env.CC || 'cc';
  const sources = existsSync(srcDir) ? readdirSync(srcDir).filter((n) => n.endsWith('.c')) : [];
  if (sources.length === 0) return { bins: null, reason: `no C baseline sources (${srcDir} is absent from this installation): C baselines skipped`, cc: '' };
  let version = '';
  try {
    version = execFileSync(cc, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n')[0]!;
  } catch (e) {
    return { bins: null, reason: `no C compiler '${cc}' (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}): C baselines skipped`, cc: '' };
  }
  const out = mkdtempSync(join(tmpdir(), 'kvmmem-bench-c-'));
  const bins = new Map<string, string>();
  try {
    for (const f of sources) {
      const bin = join(out, basename(f, '.c'));
      execFileSync(cc, ['-O2', '-Wall', '-Werror', '-o', bin, join(srcDir, f)], { stdio: ['ignore', 'ignore', 'pipe'] });
      bins.set(basename(f, '.c'), bin);
    }
  } catch (e) {
    const msg = ((e as { stderr?: Buffer }).stderr?.toString() ?? (e as Error).message).trim().split('\n')[0];
    return { bins: null, reason: `building ${srcDir} with ${cc} failed (${msg}): C baselines skipped`, cc: version };
  }
  log(`C baselines built with ${version}`);
  process.once('exit', () => rmSync(out, { recursive: true, force: true }));
  return { bins, reason: '', cc: version };
}

export function runC<T>(ctx: Ctx, name: string, args: string[]): T {
  const bin = ctx.cbin!.get(name);
  if (bin === undefined) throw new Error(`C baseline ${name} was not built`);
  return JSON.parse(execFileSync(bin, args, { encoding: 'utf8' })) as T;
}

/** Runs `reps` interleaved rounds of (baseline, subject); the order alternates each round. */
export async function interleave(reps: number, fns: (() => Promise<void> | void)[]): Promise<void> {
  for (let r = 0; r < reps; r++) {
    const order = r % 2 === 0 ? fns : [...fns].reverse();
    for (const f of order) await f();
  }
}

export const usPer = (ms: number, n: number) => (ms * 1000) / n;

/** A model lab with one VM of `memBytes` (optionally a host token limit), its RAM faulted in; closed after `f`. */
export async function withLab<T>(tokenLimit: number | undefined, memBytes: number, f: (lab: ModelLab) => Promise<T>): Promise<T> {
  const lab = await ModelLab.start({ vms: [{ name: 'bench', memory: memBytes }], ...(tokenLimit === undefined ? {} : { host: { tokenLimit } }) });
  try {
    // Fault the VM's RAM in once: a running guest's memory exists before anyone maps it.
    const m = lab.modelVm('bench').memory;
    const chunk = Buffer.alloc(1 << 20, 0x5a);
    for (let off = 0; off < memBytes; off += chunk.length) m.write(BigInt(off), chunk.subarray(0, Math.min(chunk.length, memBytes - off)));
    return await f(lab);
  } finally {
    await lab.close();
  }
}
