// docs/driver-model.md cites the model by name (`file.ts:Name`), never by line
// number: every cited name must exist where the document says, so a rename or a
// move that leaves the document behind fails here.
import test from 'ava';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const DOC = 'docs/driver-model.md';
const doc = readFileSync(join(ROOT, DOC), 'utf8');
const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\#]/g, '\\$&');

/** Where `name` (a member when `owner` is given) is declared in `src`, or -1. */
function declaredAt(src: string, name: string, from = 0): number {
  const decl = name === 'constructor'
    ? /^\s*(?:private\s+|protected\s+)?constructor\s*\(/m
    : new RegExp(`^\\s*(?:export\\s+)?(?:(?:default|async|static|readonly|private|protected|public|abstract|declare|get|set|function\\*?|class|interface|type|const|let|var|enum)\\s+)*\\*?${esc(name)}(?:\\s*[(<:=;{]|\\s+(?:implements|extends)\\b)`, 'm');
  const m = decl.exec(src.slice(from));
  return m === null ? -1 : from + m.index;
}

const cites = [...doc.matchAll(/`((?:[\w-]+\/)*[\w-]+\.ts):(#?[\w$]+(?:\.#?[\w$]+)?)`/g)].map((m) => ({ file: m[1]!, name: m[2]! }));

test(`every \`file.ts:Name\` that ${DOC} cites exists`, (t) => {
  t.true(cites.length >= 50, `${cites.length} citations found: the pattern still matches the document`);
  const missing: string[] = [];
  for (const { file, name } of cites) {
    const path = join(ROOT, file.includes('/') ? file : join('src/model', file));
    if (!existsSync(path)) {
      missing.push(`${file}:${name} (no such file)`);
      continue;
    }
    const src = readFileSync(path, 'utf8');
    const [owner, member] = name.includes('.') ? name.split('.') as [string, string] : [undefined, name];
    const at = owner === undefined ? 0 : declaredAt(src, owner);
    if (at < 0 || declaredAt(src, member, at) < 0) missing.push(`${file}:${name}`);
  }
  t.deepEqual(missing, []);
});

test(`${DOC} cites no line numbers of the model's files (they move with every edit)`, (t) => {
  // (C line numbers of kvmi_mem_guest.c are a fixed text and stay; they sit in their own column)
  const byLine = [...doc.matchAll(/\.ts`?\)?\s+(?:lines?\s+)?\d{2,4}(?:[–-]\d{2,4})?\b/g)].map((m) => m[0]);
  t.deepEqual(byLine, []);
});
