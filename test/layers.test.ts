/**
 * The layer map of README "Layers", kept: every import in src/ points down (or
 * sideways where the map allows it), and no module cycle exists.
 */
import test from 'ava';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const SRC = join(dirname(fileURLToPath(import.meta.url)), '..', 'src');

/**
 * Each layer and what it may import (besides itself). src/errors.ts is the one
 * error hierarchy, importable from everywhere; the package entry points
 * (src/index.ts and each layer's index.ts re-exports) are only read by users.
 */
const MAY_IMPORT: Record<string, readonly string[]> = {
  abi: ['errors'],
  errors: ['abi'], // errno names and texts for messages
  sys: ['errors', 'abi'],
  device: ['errors', 'abi', 'sys'],
  channel: ['errors', 'abi', 'sys'],
  model: ['errors', 'abi', 'sys', 'device'],
  client: ['errors', 'abi', 'sys', 'device', 'channel'],
  inspect: ['errors', 'abi', 'sys', 'client'], // sys: the guest-memory fault watch (sys/faults.ts)
  os: ['errors', 'abi', 'client', 'inspect'],
  yara: ['errors', 'abi', 'client', 'inspect', 'os'],
  live: ['errors', 'abi', 'sys', 'client', 'channel'],
  lab: ['errors', 'abi', 'sys', 'device', 'channel', 'model', 'client', 'live'],
  cli: ['errors', 'abi', 'sys', 'device', 'channel', 'model', 'client', 'inspect', 'os', 'yara', 'live', 'lab'],
  entry: ['errors', 'abi', 'sys', 'device', 'channel', 'model', 'client', 'inspect', 'os', 'yara', 'live', 'lab'],
};

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : p.endsWith('.ts') ? [p] : [];
  });
}

function layerOf(file: string): string {
  const rel = relative(SRC, file);
  if (rel === 'index.ts') return 'entry';
  if (rel === 'errors.ts') return 'errors';
  return rel.split('/')[0]!;
}

interface Dep { readonly path: string; readonly typeOnly: boolean }

/** Relative imports of a module (static, re-exports and dynamic), resolved to .ts files. */
function importsOf(file: string): Dep[] {
  const src = readFileSync(file, 'utf8');
  const out: Dep[] = [];
  for (const m of src.matchAll(/(?:^|[\s;])((?:import|export)\s[^'"]*?)from\s+'(\.[^']+)'|import\(\s*'(\.[^']+)'\s*\)|^import\s+'(\.[^']+)'/gm)) {
    const spec = m[2] ?? m[3] ?? m[4]!;
    // `import type` is erased at run time: it counts for layering, not for cycles.
    out.push({ path: resolve(dirname(file), spec.replace(/\.js$/, '.ts')), typeOnly: m[1] !== undefined && /^(import|export)\s+type\s/.test(m[1]) });
  }
  return out;
}

const all = files(SRC);
const graph = new Map(all.map((f) => [f, importsOf(f)]));

test('every import points down the layer map', (t) => {
  const bad: string[] = [];
  for (const [file, deps] of graph) {
    const from = layerOf(file);
    const allowed = MAY_IMPORT[from];
    t.truthy(allowed, `${relative(SRC, file)}: layer '${from}' is not in the map`);
    for (const { path: d } of deps) {
      const to = layerOf(d);
      if (to === from) continue;
      // A layer's own index.ts is its public face: importing another layer through it is fine.
      if (!allowed!.includes(to)) bad.push(`${relative(SRC, file)} (${from}) imports ${relative(SRC, d)} (${to})`);
    }
  }
  t.deepEqual(bad, []);
});

test('no import cycles between modules (run-time imports)', (t) => {
  // Tarjan's strongly connected components over the module graph.
  let index = 0;
  const idx = new Map<string, number>(), low = new Map<string, number>(), on = new Set<string>(), stack: string[] = [];
  const cycles: string[][] = [];
  const visit = (v: string): void => {
    idx.set(v, index); low.set(v, index); index++;
    stack.push(v); on.add(v);
    for (const { path: w, typeOnly } of graph.get(v) ?? []) {
      if (typeOnly || !graph.has(w)) continue;
      if (!idx.has(w)) { visit(w); low.set(v, Math.min(low.get(v)!, low.get(w)!)); }
      else if (on.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!));
    }
    if (low.get(v) === idx.get(v)) {
      const scc: string[] = [];
      let w: string;
      do { w = stack.pop()!; on.delete(w); scc.push(relative(SRC, w)); } while (w !== v);
      if (scc.length > 1) cycles.push(scc.sort());
    }
  };
  for (const v of graph.keys()) if (!idx.has(v)) visit(v);
  t.deepEqual(cycles, []);
});

test('every relative import resolves to a source file', (t) => {
  const missing: string[] = [];
  for (const [file, deps] of graph) for (const { path: d } of deps) if (!graph.has(d)) missing.push(`${relative(SRC, file)} -> ${relative(SRC, d)}`);
  t.deepEqual(missing, []);
});

test('only src/sys imports ffi-rs (README "Layers")', (t) => {
  const bad = all.filter((f) => layerOf(f) !== 'sys' && /(?:from\s+|import\s*\(\s*|import\s+)'ffi-rs'/.test(readFileSync(f, 'utf8')));
  t.deepEqual(bad.map((f) => relative(SRC, f)), []);
  t.true(all.some((f) => /from\s+'ffi-rs'/.test(readFileSync(f, 'utf8'))), 'the check sees the import where it is');
});
