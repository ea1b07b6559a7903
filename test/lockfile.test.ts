/**
 * CI installs with `npm ci`, which refuses a lock file that lacks an entry for
 * any optional dependency. A package whose platform builds are not all on the
 * registry this project installs from (@litko/yara-x's darwin builds) leaves
 * such holes when `npm install` writes the lock; this keeps them filled.
 */
import test from 'ava';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

interface LockEntry {
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
}

test('every dependency in package-lock.json has its own entry (npm ci accepts it)', (t) => {
  const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as {
    packages: Record<string, LockEntry>;
  };
  const missing: string[] = [];
  for (const [at, entry] of Object.entries(lock.packages)) {
    for (const name of Object.keys({ ...entry.dependencies, ...entry.optionalDependencies })) {
      // npm resolves upward from the dependent's own node_modules.
      let dir = at;
      let found = false;
      for (;;) {
        const key = dir === '' ? `node_modules/${name}` : `${dir}/node_modules/${name}`;
        if (lock.packages[key] !== undefined) { found = true; break; }
        if (dir === '') break;
        const cut = dir.lastIndexOf('/node_modules/');
        dir = cut < 0 ? '' : dir.slice(0, cut);
      }
      if (!found) missing.push(`${at || '(root)'} -> ${name}`);
    }
  }
  t.deepEqual(missing, [], 'add the missing entries (optional, with os/cpu) or run npm install where the registry has them');
});
