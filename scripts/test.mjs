#!/usr/bin/env node
// Runs the ava suite in TAP mode, echoes it, and ends with the one summary line
// CI reads: `tests: N passed, N failed, N skipped`. Extra arguments go to ava.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const ava = join(root, 'node_modules', 'ava', 'entrypoints', 'cli.mjs');
const child = spawn(process.execPath, [ava, '--tap', ...process.argv.slice(2)], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });

let passed = 0, failed = 0, skipped = 0;
const rl = createInterface({ input: child.stdout });
rl.on('line', (line) => {
  console.log(line);
  const m = /^(not ok|ok) \d+/.exec(line);
  if (!m) return;
  if (/#\s*(SKIP|TODO)\b/i.test(line)) skipped++;
  else if (m[1] === 'ok') passed++;
  else failed++;
});
child.on('close', (code, signal) => {
  // A crashed worker or uncaught exception makes ava exit non-zero without a "not ok" line.
  if ((code !== 0 || signal) && failed === 0) failed = 1;
  console.log(`tests: ${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(code ?? 1);
});
