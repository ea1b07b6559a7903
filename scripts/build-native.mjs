#!/usr/bin/env node
// Builds the optional native batch helper with the system C compiler. Never fails
// the install: without a compiler kvmmem works through its per-call path.
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = join(root, 'native', 'build', 'libkvmmem_batch.so');
const src = join(root, 'native', 'batch', 'kvmmem_batch.c');
const cc = process.env.CC || 'cc';
try {
  mkdirSync(dirname(out), { recursive: true });
  execFileSync(cc, ['-O2', '-Wall', '-Werror', '-shared', '-fPIC', '-o', out, src], { stdio: ['ignore', 'inherit', 'inherit'] });
  console.log(`kvmmem: built ${out}`);
} catch (e) {
  console.warn(`kvmmem: native batch helper not built (${e.code === 'ENOENT' ? `no C compiler '${cc}'` : e.message}); the per-call path will be used`);
}
