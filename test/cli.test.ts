/**
 * The kvmmem command, run as a user would: `node bin/kvmmem.js ...` in a child
 * process, against the built-in model and RAM files made here.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GuestMemory } from '../src/model/index.js';
import { buildSyntheticGuest } from '../src/inspect/index.js';

const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-cli-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

function kvmmem(...args: string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, NODE_DEBUG: '' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A raw RAM image with a synthetic guest in it (file offset = gpa). */
function ramWithGuest(name: string, mib = 64) {
  const path = join(dir, name);
  writeFileSync(path, '');
  spawnSync('truncate', ['-s', `${mib}M`, path]);
  const mem = GuestMemory.fromFile(path);
  const truth = buildSyntheticGuest(mem, { seed: 42 });
  return { path, mem, truth };
}

test('demo: the main job runs and agrees with the ground truth', (t) => {
  const r = kvmmem('demo');
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^ok: every result above agrees/m);
  t.regex(r.stdout, /after close the host holds 0 mappings, 0 outstanding tokens, 0 open driver files/);
  const j = kvmmem('demo', '--json', '--seed', '7');
  t.is(j.code, 0, j.stderr);
  const doc = JSON.parse(j.stdout);
  t.true(doc.ok);
  t.is(doc.host.afterClose.mappings, 0);
  t.is(doc.translate.gpa, doc.scan.matches[0]);
});

test('scan, read and translate a RAM file through the full stack', (t) => {
  const { path, mem, truth } = ramWithGuest('guest.ram');
  mem.write(0x123ffcn, Buffer.from('NEEDLE-across-a-page-boundary'));
  mem.close();

  const s = kvmmem('scan', '--ram', path, '--pattern', 'NEEDLE-across', '--json');
  t.is(s.code, 0, s.stderr);
  t.deepEqual(JSON.parse(s.stdout).matches, ['0x123ffc']);
  const text = kvmmem('scan', '--ram', path, '--hex', Buffer.from('NEEDLE').toString('hex'));
  t.regex(text.stdout, /^0x123ffc$/m);
  t.regex(text.stdout, /1 match\(es\)/);
  t.is(kvmmem('scan', '--ram', path, '--pattern', 'no such bytes anywhere').code, 1, 'no match: exit 1, like grep');

  const rd = kvmmem('read', '--ram', path, '--gpa', '0x123ffc', '--len', '32');
  t.is(rd.code, 0, rd.stderr);
  t.regex(rd.stdout, /^00123ffc: 4e45 4544 4c45 2d61 6372 6f73 732d 612d  NEEDLE-across-a-$/m);
  const rj = JSON.parse(kvmmem('read', '--ram', path, '--gpa', String(0x123ffc), '--len', '6', '--json').stdout);
  t.is(Buffer.from(rj.hex, 'hex').toString(), 'NEEDLE');

  for (const tr of truth.translations) {
    const out = JSON.parse(kvmmem('translate', '--ram', path, '--cr3', `0x${truth.cr3.toString(16)}`, '--va', `0x${tr.va.toString(16)}`, '--json').stdout);
    t.is(BigInt(out.gpa), tr.gpa, `va 0x${tr.va.toString(16)}`);
    t.is(out.pageSize, tr.pageSize);
  }
  const np = truth.notPresent[0]!;
  const bad = kvmmem('translate', '--ram', path, '--cr3', `0x${truth.cr3.toString(16)}`, '--va', `0x${np.va.toString(16)}`);
  t.is(bad.code, 1);
  t.regex(bad.stderr, new RegExp(np.level));
});

test('selftest --model passes every check; a path that is not kvmmem fails clearly', (t) => {
  const r = kvmmem('selftest', '--model', '--json');
  t.is(r.code, 0, r.stdout + r.stderr);
  const doc = JSON.parse(r.stdout);
  t.true(doc.ok);
  t.true(doc.results.length >= 9);
  t.true(doc.results.every((c: { status: string }) => c.status === 'pass'));
  const n = kvmmem('selftest', '--device', '/dev/null', '--listen', `unix:${join(dir, 'st.sock')}`, '--wait', '1', '--cookie', 'cli-test');
  t.is(n.code, 1);
  t.regex(n.stderr, /\/dev\/null is not a kvmmem device/);
  const m = kvmmem('selftest', '--device', '/dev/kvmmem-missing', '--listen', `unix:${join(dir, 'st.sock')}`, '--cookie', 'cli-test');
  t.is(m.code, 1);
  t.regex(m.stderr, /use the built-in model/);
});

test('bad input: one line on stderr and exit 2', (t) => {
  const cases: string[][] = [
    ['bogus'],
    ['scan', '--ram', join(dir, 'missing.ram'), '--pattern', 'x'],
    ['read', '--ram', join(dir, 'x'), '--gpa', 'zz', '--len', '1'],
    ['read', '--gpa', '0x1000', '--len', '1'],
    ['translate', '--ram', join(dir, 'x'), '--cr3', '1', '--va', '2', '--levels', '3'],
    ['selftest', '--listen', 'tcp:localhost'],
    ['scan', '--pattern', 'x'],
    ['selftest'],
  ];
  for (const args of cases) {
    const r = kvmmem(...args);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.true(r.stderr.trim().length > 0);
    t.notRegex(r.stderr, /\n\s+at /, 'no stack trace');
  }
  const path = join(dir, 'small.ram');
  writeFileSync(path, Buffer.alloc(1 << 20));
  const past = kvmmem('read', '--ram', path, '--gpa', '0xfff00', '--len', '0x200');
  t.is(past.code, 2);
  t.regex(past.stderr, /past the end/);
  const h = kvmmem('scan', '--help');
  t.is(h.code, 0);
  t.regex(h.stdout, /Examples:/);
  t.regex(kvmmem('--help').stdout, /Exit codes:/);
});

test('every command prints its --help (and `help CMD`), exit 0, with its examples', async (t) => {
  const { buildProgram } = await import('../src/cli/program.js');
  const names = buildProgram().commands.map((c) => c.name()).filter((n) => n !== 'help');
  t.true(names.length >= 6, `commands: ${names.join(', ')}`);
  for (const name of names) {
    for (const args of [[name, '--help'], ['help', name]]) {
      const r = kvmmem(...args);
      t.is(r.code, 0, `kvmmem ${args.join(' ')}: ${r.stderr.split('\n')[0]}`);
      t.regex(r.stdout, new RegExp(`Usage: kvmmem ${name}`), `kvmmem ${args.join(' ')} prints its usage`);
      t.regex(r.stdout, /Examples:/, `kvmmem ${args.join(' ')} has examples`);
    }
  }
});

test('--hex says what is wrong with it: a non-hex digit, empty, odd length (one line, exit 2)', (t) => {
  const { path: ram, mem } = ramWithGuest('hex.ram', 16);
  t.teardown(() => mem.close());
  for (const [hex, re] of [['zz', /'z' is not a hex digit/], ['0g', /'g' is not a hex digit/], ['', /must not be empty/], ['abc', /odd number of hex digits/]] as const) {
    const r = kvmmem('scan', '--ram', ram, '--hex', hex);
    t.is(r.code, 2, `--hex '${hex}'`);
    t.regex(r.stderr, re);
    t.is(r.stderr.trim().split('\n').length, 1, 'one line');
  }
});

test('commander\'s own errors are one line, exit 2; no command at all is exit 2 with the help on stderr', (t) => {
  for (const args of [['nosuch'], ['scan', '--from', 'zz'], ['read', '--bogus']]) {
    const r = kvmmem(...args);
    t.is(r.code, 2, args.join(' '));
    t.is(r.stderr.trim().split('\n').length, 1, `one line for ${args.join(' ')}: ${r.stderr}`);
    t.regex(r.stderr, /^kvmmem: .*\(see kvmmem --help\)$/m);
  }
  const none = kvmmem();
  t.is(none.code, 2);
  t.regex(none.stderr, /Usage: kvmmem/);
  t.is(none.stdout, '');
});

test('bad input never shows a stack: demo --memory too big, selftest --gpa past RAM, translate --cr3 past the file (one line, exit 2)', (t) => {
  const big = kvmmem('demo', '--memory', '10000000');
  t.is(big.code, 2);
  t.regex(big.stderr, /^kvmmem: demo: --memory 10000000 MiB is more than this machine can spare \(\d+ MiB available\)/);
  const gpa = kvmmem('selftest', '--model', '--gpa', '0x100000000');
  t.is(gpa.code, 2);
  t.regex(gpa.stderr, /^kvmmem: selftest: --gpa 0x100000000 is past the model VM's 16 MiB/);
  const ram = join(dir, 'small.ram');
  writeFileSync(ram, Buffer.alloc(1 << 20));
  const cr3 = kvmmem('translate', '--ram', ram, '--cr3', '0x2000000', '--va', '0xffffffff81000000');
  t.is(cr3.code, 2);
  t.regex(cr3.stderr, /^kvmmem: --cr3 0x2000000 is past the end of .*small\.ram \(0x100000\)/);
  for (const r of [big, gpa, cr3]) {
    t.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    t.false(/\n\s+at /.test(r.stderr), 'no stack trace');
  }
});
