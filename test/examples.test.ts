/** Every example runs with one command against the demo guest and prints what it promises. */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const run = (file: string, ...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', `examples/${file}`, ...args], { cwd: root, encoding: 'utf8', timeout: 90_000 });

test('find-banner finds the synthetic banner', (t) => {
  const r = run('find-banner.ts');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /^0x[0-9a-f]+ {2}Linux version 6\.1\.0-kvmmem-synthetic/m);
  t.regex(r.stdout, /1 match\(es\) in 64 MiB/);
});

test('hexdump dumps the banner bytes', (t) => {
  const r = run('hexdump.ts', '--len', '32');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /4c 69 6e 75 78 20 76 65 72 73 69 6f 6e 20 36 2e {2}Linux version 6\./);
});

test('translate walks to the banner', (t) => {
  const r = run('translate.ts');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /-> gpa 0x[0-9a-f]+ \(2097152-byte page\)/);
  t.regex(r.stdout, /64 bytes there: "Linux version/);
});

test('watch-page sees the guest change the page live', (t) => {
  const r = run('watch-page.ts', '--seconds', '2');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /\+0xff0: "tick-1/);
  t.regex(r.stdout, /\+0xff0: "tick-2/);
});
