#!/usr/bin/env node
// The kvmmem command. Logic lives in program.ts (importable by tests).
import { run } from './program.js';

process.exitCode = await run(process.argv);
