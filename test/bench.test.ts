/**
 * `kvmmem bench` as an installed package runs it: a package directory made here
 * the way npm installs one (the "files" of package.json, dist/ compiled by the
 * build, dist/bench included), the command run from another directory. Results
 * go to the current directory or --out, never into the package; without
 * native/bench the C baselines are skipped with one line. No timing is asserted.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const tmp = mkdtempSync(join(tmpdir(), 'kvmmem-bench-pkg-'));
const pkg = join(tmp, 'node_modules', 'kvmmem');
test.after.always(() => rmSync(tmp, { recursive: true, force: true }));

const IOCTL_IDS = ['ioctl.batch.map', 'ioctl.batch.unmap', 'ioctl.single.map', 'ioctl.single.unmap', 'ioctl.one.map', 'ioctl.one.unmap'];

function sh(cmd: string, args: string[], cwd = root) {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status} ${r.signal ?? ''}\n${r.stdout}${r.stderr}`);
}

/** Every file under `dir` with its size and mtime: what a run must leave unchanged. */
function tree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.name === 'node_modules' && d === pkg) continue;
      if (e.isDirectory()) walk(p);
      else { const st = statSync(p); out.push(`${relative(dir, p)} ${st.size} ${st.mtimeMs}`); }
    }
  };
  walk(dir);
  return out.sort();
}

test.before(() => {
  mkdirSync(pkg, { recursive: true });
  const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { files: string[] };
  // What `npm pack` would put in: the "files" list (dist/ is built below, as prepack does).
  for (const f of manifest.files) if (f !== 'dist' && existsSync(join(root, f))) cpSync(join(root, f), join(pkg, f), { recursive: true });
  cpSync(join(root, 'package.json'), join(pkg, 'package.json'));
  sh(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json', '--outDir', join(pkg, 'dist')]);
  sh(process.execPath, [join(root, 'scripts', 'build-bench.mjs'), '--dist', join(pkg, 'dist')]);
  // The dependencies npm would install; postinstall's native helper when this checkout has it.
  symlinkSync(join(root, 'node_modules'), join(pkg, 'node_modules'));
  if (existsSync(join(root, 'native', 'build'))) cpSync(join(root, 'native', 'build'), join(pkg, 'native', 'build'), { recursive: true });
  writeFileSync(join(tmp, 'package.json'), '{"name":"app","private":true}\n');
});

/** `kvmmem ...` through the installed package's bin, run in `cwd`. */
function kvmmem(cwd: string, ...args: string[]) {
  mkdirSync(cwd, { recursive: true });
  const r = spawnSync(process.execPath, [join(pkg, 'bin', 'kvmmem.js'), ...args], { cwd, encoding: 'utf8', timeout: 120_000, env: { ...process.env, NODE_DEBUG: '' } });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, all: `exit ${r.status} ${r.signal ?? ''}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}` };
}

test.serial('installed: bench --out DIR writes its results into DIR and nothing into the package', (t) => {
  t.false(existsSync(join(pkg, 'src')), 'the package runs dist/, as installed');
  t.true(existsSync(join(pkg, 'dist', 'bench', 'index.js')), 'the build compiled bench/ into dist/bench');
  const before = tree(pkg);
  const out = join(tmp, 'results');
  const r = kvmmem(join(tmp, 'work'), 'bench', '--quick', '--only', 'ioctl', '--out', out);
  t.is(r.code, 0, r.all);
  const rep = JSON.parse(readFileSync(join(out, 'latest.json'), 'utf8')) as { rows: { id: string; baseline?: unknown }[]; skipped: string[]; machine: { cc: string } };
  t.deepEqual(rep.rows.map((x) => x.id), IOCTL_IDS);
  const md = readFileSync(join(out, 'BENCHMARKS.md'), 'utf8');
  t.regex(md, /Raw figures: `latest\.json`/, 'the markdown points at the JSON next to it');
  t.regex(md, /## How to read this/, 'with the notes');
  if (rep.machine.cc) t.true(rep.rows.every((x) => x.baseline !== undefined), 'native/bench is shipped: the C loop is the baseline');
  else t.regex(rep.skipped.join('\n'), /no C compiler/);
  t.regex(r.stderr, new RegExp(`wrote ${out.replace(/[/.]/g, '\\$&')}/latest\\.json`));
  t.deepEqual(tree(pkg), before, 'nothing written or changed inside the package');
  t.deepEqual(readdirSync(join(tmp, 'work')), [], 'with --out, nothing in the current directory either');
});

test.serial('installed: without --out the results go to ./kvmmem-bench; --json --no-write writes nothing', (t) => {
  const cwd = join(tmp, 'cwd-default');
  const r = kvmmem(cwd, 'bench', '--quick', '--only', 'ioctl');
  t.is(r.code, 0, r.all);
  t.deepEqual(readdirSync(join(cwd, 'kvmmem-bench')).sort(), ['BENCHMARKS.md', 'latest.json']);
  const quiet = join(tmp, 'cwd-no-write');
  const j = kvmmem(quiet, 'bench', '--quick', '--only', 'ioctl', '--json', '--no-write');
  t.is(j.code, 0, j.all);
  t.deepEqual((JSON.parse(j.stdout) as { rows: { id: string }[] }).rows.map((x) => x.id), IOCTL_IDS);
  t.deepEqual(readdirSync(quiet), []);
});

test.serial('installed without native/bench: the C baselines are skipped with one line, the rest runs', (t) => {
  const nb = join(pkg, 'native', 'bench');
  renameSync(nb, `${nb}.away`);
  try {
    const out = join(tmp, 'no-native');
    const r = kvmmem(tmp, 'bench', '--quick', '--only', 'ioctl', '--out', out);
    t.is(r.code, 0, r.all);
    const lines = r.stderr.split('\n').filter((l) => /C baselines/.test(l));
    t.is(lines.length, 1, r.all);
    t.regex(lines[0]!, /^kvmmem bench: no C baseline sources \(.*native\/bench is absent from this installation\): C baselines skipped$/);
    const rep = JSON.parse(readFileSync(join(out, 'latest.json'), 'utf8')) as { rows: { id: string; baseline?: unknown }[]; skipped: string[] };
    t.deepEqual(rep.rows.map((x) => x.id), IOCTL_IDS);
    t.true(rep.rows.every((x) => x.baseline === undefined));
    t.is(rep.skipped.length, 1);
  } finally {
    renameSync(`${nb}.away`, nb);
  }
});

test.serial('bad input is refused before anything runs (exit 2, one line)', (t) => {
  const cwd = join(tmp, 'bad');
  const g = kvmmem(cwd, 'bench', '--only', 'ioctl,nope');
  t.is(g.code, 2, g.all);
  t.regex(g.stderr, /^kvmmem: --only: unknown group 'nope' \(have: ioctl, model, libkvmi, tokens, scan, scale, physical, yara, linux\)\n$/);
  writeFileSync(join(cwd, 'a-file'), '');
  const o = kvmmem(cwd, 'bench', '--only', 'ioctl', '--out', 'a-file/sub');
  t.is(o.code, 2, o.all);
  t.regex(o.stderr, /^kvmmem: --out a-file\/sub: cannot write there \(ENOTDIR\)/);
  t.notRegex(o.stderr, /bench: ioctl/, 'refused before the run');
  // A package built without the benchmarks says where they run.
  const b = join(pkg, 'dist', 'bench');
  renameSync(b, `${b}.away`);
  try {
    const n = kvmmem(cwd, 'bench', '--quick');
    t.is(n.code, 2, n.all);
    t.is(n.stderr, 'kvmmem: bench: the benchmarks are not installed with this package; run them from a checkout with `npm run bench`\n');
  } finally {
    renameSync(`${b}.away`, b);
  }
});

test('checkout: kvmmem bench runs bench/ from the sources and writes to --out, not into the repository', (t) => {
  const out = join(tmp, 'checkout-out');
  const r = spawnSync(process.execPath, [join(root, 'bin', 'kvmmem.js'), 'bench', '--quick', '--only', 'ioctl', '--out', out], { cwd: tmp, encoding: 'utf8', timeout: 120_000 });
  t.is(r.status, 0, r.stdout + r.stderr);
  t.deepEqual((JSON.parse(readFileSync(join(out, 'latest.json'), 'utf8')) as { rows: { id: string }[] }).rows.map((x) => x.id), IOCTL_IDS);
  t.false(existsSync(join(root, 'kvmmem-bench')));
});
