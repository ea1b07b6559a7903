/**
 * `npm run bench` in a checkout: every benchmark (see bench/index.ts), printed
 * as a table; writes bench/results/latest.json and BENCHMARKS.md at the repo root.
 *   npm run bench                 # full run (~5 min at most)
 *   npm run bench -- --quick      # smaller sizes, fewer repetitions (< 1 min)
 *   npm run bench -- --json       # the report as one JSON document on stdout
 *   npm run bench -- --only tokens,model
 *   npm run bench -- --no-write   # print only, keep the committed results
 */
import { join } from 'node:path';
import { toJson } from '../src/cli/common.js';
import { ROOT } from './harness.js';
import { formatTable, runBench, writeReport } from './index.js';

const argv = process.argv.slice(2);
const onlyAt = argv.indexOf('--only');
const report = await runBench({
  quick: argv.includes('--quick'),
  ...(onlyAt >= 0 ? { only: (argv[onlyAt + 1] ?? '').split(',').filter(Boolean) } : {}),
});
process.stdout.write(argv.includes('--json') ? `${toJson(report)}\n` : `${formatTable(report)}\n`);
if (!argv.includes('--no-write')) {
  const paths = { json: join(ROOT, 'bench', 'results', 'latest.json'), markdown: join(ROOT, 'BENCHMARKS.md') };
  try {
    writeReport(report, paths);
    process.stderr.write(`bench: wrote ${paths.json} and ${paths.markdown}\n`);
  } catch (e) {
    process.stderr.write(`bench: could not write the results (${(e as Error).message}); use --json to keep them\n`);
    process.exitCode = 1;
  }
}
