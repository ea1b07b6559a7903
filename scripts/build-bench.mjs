#!/usr/bin/env node
// Compiles bench/ (except run.ts, the checkout's entry point) into dist/bench/, so that
// `kvmmem bench` works from an installed package. bench/*.ts import the library as
// '../src/X.js'; dist/ mirrors src/ (tsc rootDir src, outDir dist), so from dist/bench/
// the same module is '../X.js'. Types are checked by `npm run typecheck` (tsconfig.test.json).
//   node scripts/build-bench.mjs [--dist DIR]    (default: dist, after `tsc -p tsconfig.json`)
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const distAt = process.argv.indexOf('--dist');
const dist = resolve(distAt >= 0 ? process.argv[distAt + 1] : join(root, 'dist'));
const srcDir = join(root, 'bench');
const outDir = join(dist, 'bench');
if (!existsSync(join(dist, 'index.js'))) throw new Error(`build-bench: ${dist} has no compiled library (run tsc -p tsconfig.json first)`);

const mapSpecifier = (spec) => (spec.startsWith('../src/') ? `../${spec.slice('../src/'.length)}` : spec);

/** Rewrites the module specifiers of the emitted JS (static imports, re-exports, dynamic imports). */
const rewrite = (ctx) => (sf) => {
  const f = ctx.factory;
  const lit = (node) => f.createStringLiteral(mapSpecifier(node.text));
  const visit = (node) => {
    if (ts.isImportDeclaration(node) && ts.isStringLiteral(node.moduleSpecifier)) {
      return f.updateImportDeclaration(node, node.modifiers, node.importClause, lit(node.moduleSpecifier), node.attributes);
    }
    if (ts.isExportDeclaration(node) && node.moduleSpecifier && ts.isStringLiteral(node.moduleSpecifier)) {
      return f.updateExportDeclaration(node, node.modifiers, node.isTypeOnly, node.exportClause, lit(node.moduleSpecifier), node.attributes);
    }
    if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword && node.arguments[0] && ts.isStringLiteral(node.arguments[0])) {
      return f.updateCallExpression(node, node.expression, node.typeArguments, [lit(node.arguments[0]), ...node.arguments.slice(1)]);
    }
    return ts.visitEachChild(node, visit, ctx);
  };
  return ts.visitNode(sf, visit);
};

const { config } = ts.readConfigFile(join(root, 'tsconfig.json'), ts.sys.readFile);
const { options } = ts.convertCompilerOptionsFromJson({ ...config.compilerOptions, rootDir: undefined, outDir: undefined, module: 'ES2022', moduleResolution: 'Bundler', declaration: false, sourceMap: false }, root);

mkdirSync(outDir, { recursive: true });
const specifiers = /\b(?:from|import)\s*\(?\s*(['"])([^'"]+)\1/g;
for (const name of readdirSync(srcDir).sort()) {
  if (name.endsWith('.md')) { copyFileSync(join(srcDir, name), join(outDir, name)); continue; }
  if (!name.endsWith('.ts') || name === 'run.ts') continue;
  const input = readFileSync(join(srcDir, name), 'utf8');
  const r = ts.transpileModule(input, { compilerOptions: options, fileName: name, reportDiagnostics: true, transformers: { after: [rewrite] } });
  if (r.diagnostics?.length) throw new Error(`build-bench: ${name}: ${ts.flattenDiagnosticMessageText(r.diagnostics[0].messageText, '\n')}`);
  // Every relative import of the output must resolve: a sibling compiled here, or a module of dist.
  for (const [, , spec] of r.outputText.matchAll(specifiers)) {
    const ok = spec.startsWith('./') ? spec !== './run.js' && existsSync(join(srcDir, spec.replace(/\.js$/, '.ts')))
      : spec.startsWith('../') ? existsSync(join(outDir, spec)) : !spec.startsWith('.');
    if (!ok) throw new Error(`build-bench: ${name} imports '${spec}', which is not in ${dist}`);
  }
  writeFileSync(join(outDir, name.replace(/\.ts$/, '.js')), r.outputText);
}
console.log(`build-bench: bench/ -> ${outDir}`);
