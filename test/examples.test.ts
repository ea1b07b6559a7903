/** Every example runs with one command against the demo guest and prints what it promises. */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

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

test('an example given bad input prints one line, no stack (translate --ram without --cr3, with a CR3 of another boot)', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'kvmmem-ex-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ram = join(dir, 'g.ram');
  writeFileSync(ram, Buffer.alloc(1 << 20));
  const missing = run('translate.ts', '--ram', ram);
  t.is(missing.status, 2);
  t.regex(missing.stderr, /^translate\.ts: --cr3 is required with --ram: it is CR3 of a vCPU: QEMU monitor `info registers`/);
  const other = run('translate.ts', '--ram', ram, '--cr3', '0x2a3c000', '--va', '0xffffffff9e11ffe0');
  t.is(other.status, 1);
  t.regex(other.stderr, /^translate\.ts: gpa 0x2a3c000 of vm .*EFAULT/);
  for (const r of [missing, other]) t.is(r.stderr.trim().split('\n').length, 1, r.stderr);
});
