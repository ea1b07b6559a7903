/**
 * YARA rules, compiled by YARA-X (@litko/yara-x: the Rust rewrite of YARA by
 * VirusTotal, N-API, prebuilt for linux-x64). Chosen over @automattic/yara
 * (classic libyara): it scans a Buffer in place (no copy of the mapped
 * window), it has no native build step, and each scan is independent, which
 * is what a chunked scan of live memory needs.
 */
import { readFileSync } from 'node:fs';
import * as yarax from '@litko/yara-x';
import { KvmmemError, UsageError } from '../errors.js';

/** One rule source: text, and the file it came from (for error messages). */
export interface RuleSource {
  text: string;
  /** Shown in compile errors; default '-e' for inline text. */
  file?: string;
}

/** A rule set did not compile: the first error, with the file and line it points at. */
export class YaraCompileError extends KvmmemError {
  readonly file: string;
  readonly line: number | undefined;
  readonly column: number | undefined;
  /** Every error YARA-X reported, one line each. */
  readonly errors: string[];
  constructor(file: string, line: number | undefined, column: number | undefined, errors: string[]) {
    const where = line === undefined ? file : `${file}:${line}${column === undefined ? '' : `:${column}`}`;
    super(`${where}: ${errors[0] ?? 'the rules do not compile'}`, {
      code: 'ERR_YARA_COMPILE',
      hint: 'fix the rule at that line (YARA-X syntax: https://virustotal.github.io/yara-x/docs/writing_rules/)',
    });
    this.name = 'YaraCompileError';
    this.file = file;
    this.line = line;
    this.column = column;
    this.errors = errors;
  }
}

/** Compiled rules, ready to scan. */
export class YaraRules {
  /** @internal */
  readonly _engine: yarax.YaraX;
  readonly sources: readonly RuleSource[];
  /** @internal */
  constructor(engine: yarax.YaraX, sources: RuleSource[]) {
    this._engine = engine;
    this.sources = sources;
  }
  /** Compiler warnings, one line each. */
  warnings(): string[] {
    return this._engine.getWarnings().map((w) => firstLine(w.message));
  }
}

/** "error[E025]: unknown pattern `$b`\n --> line:3:13 ..." -> its first line, and line 3, column 13. */
function parseDiagnostic(message: string): { text: string; line?: number; column?: number } {
  const m = /-->\s*line:(\d+):(\d+)/.exec(message);
  return { text: firstLine(message), line: m ? Number(m[1]) : undefined, column: m ? Number(m[2]) : undefined };
}

function firstLine(s: string): string {
  return s.split('\n', 1)[0]!.replace(/^Compilation error \([A-Z0-9]+\): /, '').trim();
}

/**
 * Compiles rule sources (all into one rule set, each in the default
 * namespace). Each source is validated alone first so that an error names
 * its file and line; throws YaraCompileError, never a raw engine error.
 */
export function compileRules(sources: RuleSource | string | readonly (RuleSource | string)[]): YaraRules {
  const list = (Array.isArray(sources) ? sources : [sources]).map((s: RuleSource | string) => (typeof s === 'string' ? { text: s } : s));
  if (list.length === 0) throw new UsageError('compileRules: give at least one rule source');
  for (const s of list) {
    if (s === null || typeof s !== 'object' || typeof s.text !== 'string') throw new UsageError('compileRules: a source is a string or { text, file? }');
    const file = s.file ?? '-e';
    const v = yarax.validate(s.text);
    if (v.errors.length > 0) {
      const first = parseDiagnostic(v.errors[0]!.message);
      throw new YaraCompileError(file, v.errors[0]!.line ?? first.line, v.errors[0]!.column ?? first.column, v.errors.map((e) => parseDiagnostic(e.message).text));
    }
  }
  const text = list.map((s) => s.text).join('\n');
  let engine: yarax.YaraX;
  try {
    engine = yarax.compile(text);
  } catch (e) {
    // Each source compiled alone but not together (e.g. a rule name used twice).
    const d = parseDiagnostic(e instanceof Error ? e.message : String(e));
    throw new YaraCompileError(list.length === 1 ? (list[0]!.file ?? '-e') : 'the rule set', list.length === 1 ? d.line : undefined, undefined, [d.text]);
  }
  return new YaraRules(engine, list);
}

/** compileRules() of rule files (read as UTF-8); a file that cannot be read is a UsageError naming it. */
export function loadRuleFiles(paths: readonly string[]): YaraRules {
  const sources = paths.map((file) => {
    try {
      return { file, text: readFileSync(file, 'utf8') };
    } catch (e) {
      throw new UsageError(`yara: cannot read rule file ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, 'give the path of a readable .yar file');
    }
  });
  return compileRules(sources);
}
