#!/usr/bin/env node
// In a checkout (src/ present) runs the TypeScript sources through tsx, so the
// command never lags behind an edit; an installed package (no src/) runs dist/.
import { existsSync } from 'node:fs';

const src = new URL('../src/cli/main.ts', import.meta.url);
if (existsSync(src)) {
  const { register } = await import('tsx/esm/api');
  register();
  await import(src.href);
} else {
  await import(new URL('../dist/cli/main.js', import.meta.url).href);
}
