// src/yara on the model: YARA-X rules over guest-physical memory through mapped
// pages. Each hit is checked against a direct YARA-X scan of the same bytes.
import test from 'ava';
import fc from 'fast-check';
import { compile as yaraCompile } from '@litko/yara-x';
import { ModelLab } from '../src/lab/index.js';
import { GuestMemory, type MemoryRegion } from '../src/model/index.js';
import { compileRules, loadRuleFiles, yaraScan, YaraCompileError, type YaraHit } from '../src/yara/index.js';
import { UsageError } from '../src/errors.js';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const MiB = 1n << 20n;
const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-yara-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

const RULES = `
rule banner : kernel { meta: what = "the kernel banner" strings: $b = "Linux version " condition: $b }
rule secret { strings: $s = "SECRET-TOKEN-" $r = /KEY\\[[0-9a-f]{8,40}\\]/ condition: any of them }
`;

/** Hits as comparable strings. */
const key = (h: { rule: string; string: string; gpa: bigint; length: number }) => `${h.rule}${h.string}@${h.gpa.toString(16)}+${h.length}`;

/** What YARA-X finds scanning the whole buffer at once (the ground truth for a contiguous image). */
function direct(rules: string, image: Buffer, base = 0n): string[] {
  const out: string[] = [];
  for (const r of yaraCompile(rules).scan(image)) for (const m of r.matches) out.push(key({ rule: r.ruleIdentifier, string: m.identifier, gpa: base + BigInt(m.offset), length: m.length }));
  return out.sort();
}

test('yaraScan: every match a direct scan finds, once, across page and chunk edges; meta, tags and context kept', async (t) => {
  const size = 4 * 1024 * 1024;
  const mem = GuestMemory.anonymous(BigInt(size));
  const lab = await ModelLab.start({ vms: [{ name: 'a', memory: mem }] });
  t.teardown(async () => { await lab.close(); mem.close(); });
  const plant = (gpa: number, s: string) => mem.write(BigInt(gpa), Buffer.from(s, 'latin1'));
  const spots = [0, 4090, 8192 - 7, 65536 - 3, 1048576 - 5, 1048576 + 4096 - 13, 2 * 1048576 - 1, size - 14];
  for (const [i, g] of spots.entries()) plant(g, i % 2 ? 'Linux version ' : 'SECRET-TOKEN-');
  // regex matches of varying length straddling chunk edges
  plant(3 * 1048576 - 20, 'KEY[0123456789abcdef0123456789abcdef]');
  plant(1048576 * 3 + 4096 - 10, 'KEY[deadbeefcafe]');
  const image = mem.read(0n, size);
  const want = direct(RULES, image);
  t.true(want.length >= spots.length + 2);
  const session = lab.open();
  const rules = compileRules(RULES);
  const seen: YaraHit[] = [];
  const res = await yaraScan(session, lab.vm('a'), rules, { to: size, chunkPages: 16, onHit: (h) => seen.push(h) });
  t.deepEqual(res.hits.map(key).sort(), want);
  t.is(seen.length, res.hits.length, 'onHit saw each hit');
  const b = res.hits.find((h) => h.rule === 'banner')!;
  t.deepEqual(b.tags, ['kernel']);
  t.is((b.meta as { what: string }).what, 'the kernel banner');
  t.is(b.data.toString('latin1'), 'Linux version ');
  const g = Number(b.gpa);
  t.deepEqual(b.before, image.subarray(Math.max(0, g - 16), g));
  t.deepEqual(b.after, image.subarray(g + 14, Math.min(size, g + 30)));
  t.deepEqual(res.rules.map((r) => r.rule).sort(), ['banner', 'secret']);
  t.is(res.scannedBytes, size);
  session.close();
});

test('yaraScan: property: for random plants and chunk sizes, the hits equal a direct scan of the image', async (t) => {
  const size = 512 * 1024;
  const mem = GuestMemory.anonymous(BigInt(size));
  const lab = await ModelLab.start({ vms: [{ name: 'p', memory: mem }] });
  t.teardown(async () => { await lab.close(); mem.close(); });
  const rules = compileRules(RULES);
  const session = lab.open();
  const words = ['Linux version ', 'SECRET-TOKEN-', 'KEY[0123abcd]', 'KEY[0123456789abcdef0123456789abcdef01]'];
  await fc.assert(fc.asyncProperty(
    // positions near page (and so chunk) edges, where a chunked scan can go wrong
    fc.array(fc.tuple(fc.integer({ min: 1, max: size / 4096 - 1 }).chain((p) => fc.integer({ min: p * 4096 - 48, max: p * 4096 + 8 })), fc.integer({ min: 0, max: words.length - 1 })), { maxLength: 12 }),
    fc.integer({ min: 1, max: 40 }), fc.integer({ min: 64, max: 8192 }),
    async (plants, chunkPages, overlap) => {
      mem.write(0n, Buffer.alloc(size));
      for (const [g, w] of plants) mem.write(BigInt(g), Buffer.from(words[w]!, 'latin1'));
      const want = direct(RULES, mem.read(0n, size));
      const res = await yaraScan(session, lab.vm('p'), rules, { to: size, chunkPages, overlap });
      t.deepEqual(res.hits.map(key).sort(), want);
    }), { numRuns: 40 });
  session.close();
});

test('yaraScan: holes are skipped and no match spans one; from/to clip; maxMatches stops', async (t) => {
  const regions: MemoryRegion[] = [
    { gpa: 0n, size: 1n * MiB, fileOffset: 0n },
    { gpa: 2n * MiB, size: 2n * MiB, fileOffset: 2n * MiB },
  ];
  const mem = GuestMemory.anonymous(4n * MiB, { regions });
  const lab = await ModelLab.start({ vms: [{ name: 'h', memory: mem }] });
  t.teardown(async () => { await lab.close(); mem.close(); });
  mem.write(1n * MiB - 6n, Buffer.from('SECRET', 'latin1')); // the rest would be after the hole
  mem.write(2n * MiB, Buffer.from('-TOKEN-', 'latin1'));
  mem.write(2n * MiB + 100n, Buffer.from('SECRET-TOKEN-', 'latin1'));
  mem.write(3n * MiB, Buffer.from('SECRET-TOKEN-', 'latin1'));
  const session = lab.open();
  const rules = compileRules(RULES);
  const res = await yaraScan(session, lab.vm('h'), rules, { to: 5n * MiB });
  t.deepEqual(res.hits.map(key), [key({ rule: 'secret', string: '$s', gpa: 2n * MiB + 100n, length: 13 }), key({ rule: 'secret', string: '$s', gpa: 3n * MiB, length: 13 })]);
  t.is(res.skippedPages, 256 + 256, '1 MiB hole + 1 MiB past the end');
  const clipped = await yaraScan(session, lab.vm('h'), rules, { from: 2n * MiB + 101n, to: 4n * MiB });
  t.deepEqual(clipped.hits.map((h) => h.gpa), [3n * MiB]);
  const one = await yaraScan(session, lab.vm('h'), rules, { to: 4n * MiB, maxMatches: 1 });
  t.is(one.hits.length, 1);
  session.close();
});

test('yaraScan: an aborted scan leaves nothing mapped; bad arguments are UsageErrors', async (t) => {
  const mem = GuestMemory.anonymous(16n * MiB);
  const lab = await ModelLab.start({ vms: [{ name: 'x', memory: mem }] });
  t.teardown(async () => { await lab.close(); mem.close(); });
  const session = lab.open();
  const rules = compileRules(RULES);
  const ac = new AbortController();
  const p = yaraScan(session, lab.vm('x'), rules, { to: 16n * MiB, chunkPages: 64, signal: ac.signal, onProgress: (pr) => { if (pr.done >= 4 * 2 ** 20) ac.abort(); } });
  const e = await t.throwsAsync(p);
  t.is((e as { code?: string }).code, 'ABORT_ERR');
  t.is(lab.host.stats().mappings, 0, 'the host holds no mapping of the aborted scan');
  await t.throwsAsync(yaraScan(session, lab.vm('x'), {} as never, { to: 1 }), { instanceOf: UsageError });
  await t.throwsAsync(yaraScan(session, lab.vm('x'), rules, { to: 1, overlap: 0 }), { instanceOf: UsageError });
  await t.throwsAsync(yaraScan(session, lab.vm('x'), rules, { from: 2, to: 1 }), { instanceOf: UsageError });
  session.close();
});

test('compileRules: errors name the file and line; unreadable files are UsageErrors', (t) => {
  const f = join(dir, 'bad.yar');
  writeFileSync(f, 'rule ok { condition: true }\n\nrule bad {\n  strings: $a = "x"\n  condition: $b\n}\n');
  const e = t.throws(() => loadRuleFiles([f]), { instanceOf: YaraCompileError }) as YaraCompileError;
  t.is(e.file, f);
  t.is(e.line, 5);
  t.regex(e.message, /bad\.yar:5:\d+: .*unknown pattern `\$b`/);
  t.false(e.message.includes('\n'), 'one line');
  const s = t.throws(() => compileRules('rule { x'), { instanceOf: YaraCompileError }) as YaraCompileError;
  t.is(s.file, '-e');
  t.is(s.line, 1);
  t.throws(() => loadRuleFiles([join(dir, 'missing.yar')]), { instanceOf: UsageError, message: /missing\.yar/ });
  t.throws(() => compileRules([]), { instanceOf: UsageError });
  // two sources that each compile but clash together
  t.throws(() => compileRules(['rule a { condition: true }', 'rule a { condition: false }']), { instanceOf: YaraCompileError });
});

test('kvmmem yara: hits exit 0 (one line each, as found), none exit 1, a bad rule one line and exit 2', (t) => {
  const ram = join(dir, 'guest.ram');
  const img = Buffer.alloc(2 * 1024 * 1024);
  img.write('Linux version 6.1.0', 1048576 - 6, 'latin1'); // across a chunk edge
  img.write('SECRET-TOKEN-', 4096 * 3, 'latin1');
  writeFileSync(ram, img);
  const rulesFile = join(dir, 'r.yar');
  writeFileSync(rulesFile, RULES);
  const run = (...args: string[]) => {
    const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, NODE_DEBUG: '' } });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };
  const ok = run('yara', rulesFile, '--ram', ram);
  t.is(ok.code, 0, ok.stderr);
  t.deepEqual(ok.stdout.trim().split('\n').slice(0, 2), ['secret $s 0x3000 +13 "SECRET-TOKEN-"', 'banner $b 0xffffa +14 "Linux version "']);
  const json = run('yara', '-e', 'rule b { strings: $b = "Linux version " condition: $b }', '--ram', ram, '--json');
  t.is(json.code, 0);
  const doc = JSON.parse(json.stdout);
  t.deepEqual(doc.hits.map((h: { gpa: string }) => h.gpa), ['0xffffa']);
  t.is(doc.hits[0].after, Buffer.from('6.1.0').toString('hex') + '00'.repeat(11));
  const none = run('yara', '-e', 'rule n { strings: $n = "not in there" condition: $n }', '--ram', ram);
  t.is(none.code, 1);
  t.regex(none.stdout, /^0 hit\(s\)/m);
  const bad = run('yara', rulesFile, '-e', 'rule x {\n condition: $a }', '--ram', ram);
  t.is(bad.code, 2);
  t.regex(bad.stderr, /^kvmmem: -e:2:\d+: .*unknown pattern/);
  t.is(bad.stderr.trim().split('\n').length, 1, 'one line');
  const missing = run('yara', join(dir, 'nope.yar'), '--ram', ram);
  t.is(missing.code, 2);
  t.is(missing.stderr.trim().split('\n').length, 1);
  t.is(run('yara', '--ram', ram).code, 2, 'no rules at all');
});
