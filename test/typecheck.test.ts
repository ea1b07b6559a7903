/** The whole tree (sources, tests, benchmarks, examples) type-checks under strict TypeScript. */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

test('tsc --noEmit -p tsconfig.test.json is clean', (t) => {
  t.timeout(180_000);
  const root = fileURLToPath(new URL('..', import.meta.url));
  const tsc = fileURLToPath(new URL('../node_modules/typescript/bin/tsc', import.meta.url));
  const r = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.test.json'], { cwd: root, encoding: 'utf8' });
  t.is(r.status, 0, r.stdout + r.stderr);
});
