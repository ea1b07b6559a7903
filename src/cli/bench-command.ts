/**
 * `kvmmem bench`: the benchmarks are not part of the library. They live in bench/
 * (a checkout, run through tsx) or dist/bench/ (an installed package: compiled by
 * `npm run build`), and are loaded only when this command runs. Results go to the
 * current directory (./kvmmem-bench/ or --out DIR), never into the package.
 */
import { accessSync, constants, existsSync, mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KvmmemError } from '../errors.js';
import { CliUsageError, output } from './common.js';

/** What this command needs from bench/index (bench/index.ts checks that it provides it). */
export interface BenchModule<R = unknown> {
  GROUP_NAMES: readonly string[];
  runBench(opts: { quick?: boolean; only?: string[] }): Promise<R>;
  formatTable(rep: R): string;
  writeReport(rep: R, paths: { json: string; markdown: string }): void;
}

/** The benchmarks next to this build of the CLI, or null when they are not installed. */
export async function loadBench(): Promise<BenchModule | null> {
  // Run from src/cli (a checkout, through tsx) the sources are ../../bench; from dist/cli, ../bench.
  const fromSource = import.meta.url.endsWith('.ts');
  const url = new URL(fromSource ? '../../bench/index.ts' : '../bench/index.js', import.meta.url);
  if (!existsSync(fileURLToPath(url))) return null;
  return (await import(url.href)) as BenchModule;
}

export interface BenchCommandOptions { quick?: boolean; json?: boolean; only?: string; out: string; write: boolean }

export async function benchCommand(o: BenchCommandOptions): Promise<void> {
  const bench = await loadBench();
  if (!bench) throw new CliUsageError('bench: the benchmarks are not installed with this package; run them from a checkout with `npm run bench`');
  const only = o.only === undefined ? [] : o.only.split(',').filter(Boolean);
  const unknown = only.filter((g) => !bench.GROUP_NAMES.includes(g));
  if (unknown.length > 0) throw new CliUsageError(`--only: unknown group '${unknown.join("', '")}' (have: ${bench.GROUP_NAMES.join(', ')})`);
  const dir = resolve(o.out);
  // Checked before the run (minutes), not after it.
  if (o.write) {
    try {
      mkdirSync(dir, { recursive: true });
      accessSync(dir, constants.W_OK);
    } catch (e) {
      throw new CliUsageError(`--out ${o.out}: cannot write there (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); give another --out DIR or --no-write`);
    }
  }
  const report = await bench.runBench({ quick: !!o.quick, only });
  const out = output(!!o.json);
  out.say(bench.formatTable(report));
  out.result(report);
  if (!o.write) return;
  const paths = { json: join(dir, 'latest.json'), markdown: join(dir, 'BENCHMARKS.md') };
  try {
    bench.writeReport(report, paths);
  } catch (e) {
    throw new KvmmemError(`bench: could not write the results into ${dir} (${(e as Error).message})`, { code: 'EIO' });
  }
  process.stderr.write(`kvmmem bench: wrote ${paths.json} and ${paths.markdown}\n`);
}
