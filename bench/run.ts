/**
 * `npm run bench`: every benchmark of issue 6 (see src/cli/bench.ts), printed
 * as a table; writes bench/results/latest.json and BENCHMARKS.md.
 *   npm run bench                 # full run (~5 min at most)
 *   npm run bench -- --quick      # smaller sizes, fewer repetitions (< 1 min)
 *   npm run bench -- --json       # the report as one JSON document on stdout
 *   npm run bench -- --only tokens,model
 */
import { formatTable, runBench } from '../src/cli/bench.js';
import { toJson } from '../src/cli/common.js';

const argv = process.argv.slice(2);
const onlyAt = argv.indexOf('--only');
const report = await runBench({
  quick: argv.includes('--quick'),
  ...(onlyAt >= 0 ? { only: (argv[onlyAt + 1] ?? '').split(',').filter(Boolean) } : {}),
  ...(argv.includes('--no-write') ? { write: false } : {}),
});
process.stdout.write(argv.includes('--json') ? `${toJson(report)}\n` : `${formatTable(report)}\n`);
