#!/usr/bin/env node
// The kvmmem command. Logic lives in program.ts (importable by tests).
import { run } from './program.js';
import { exitOnSignals } from './signals.js';

exitOnSignals();
process.exitCode = await run(process.argv);
