/**
 * Shared plumbing of the kvmmem commands: exit codes, address options, output
 * in text or JSON, progress bars, and opening a RAM file through the full model
 * stack (server, device manager, tokens, driver, page remaps).
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { InvalidArgumentError } from 'commander';
import { SingleBar, Presets } from 'cli-progress';
import { ModelLab } from '../lab/model-lab.js';
import type { Session } from '../client/session.js';
import { toAddress } from '../client/address.js';
import { GuestMemory } from '../model/index.js';
import type { Vm } from '../channel/index.js';
import { KvmmemError, UsageError } from '../errors.js';

/** Exit codes (documented in `kvmmem --help` and the README). */
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2 } as const;

/** A bad command line: one line on stderr, exit 2. */
export class CliUsageError extends UsageError {}

/** commander argument parser for addresses in hex (0x...) or decimal. */
export function parseAddress(value: string): bigint {
  try {
    return toAddress(value);
  } catch {
    throw new InvalidArgumentError(`'${value}' is not an address (hex 0x... or decimal)`);
  }
}

export function parseCount(value: string): number {
  const n = Number(value.startsWith('0x') ? parseInt(value, 16) : value);
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError(`'${value}' is not a positive integer`);
  return n;
}

/** JSON with bigints as hex strings (addresses read best that way). */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v), 2);
}

export interface Output {
  json: boolean;
  /** Human text (suppressed under --json). */
  say(line?: string): void;
  /** The one JSON document (under --json). */
  result(value: unknown): void;
}

export function output(json: boolean): Output {
  return {
    json,
    say(line = '') { if (!json) process.stdout.write(`${line}\n`); },
    result(value) { if (json) process.stdout.write(`${toJson(value)}\n`); },
  };
}

/** A byte count as people read it: B under 1 KiB, KiB under 1 MiB, then MiB and GiB (one decimal). */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 2 ** 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 2 ** 30) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  return `${(n / 2 ** 30).toFixed(2)} GiB`;
}

/** A progress bar on a TTY (never under --json or when stderr is not a terminal): bytes done of total, rate and ETA. */
export function progressBar(json: boolean, total: number): { update(done: number, extra?: string): void; stop(): void } {
  if (json || !process.stderr.isTTY) return { update() {}, stop() {} };
  const t0 = performance.now();
  const bar = new SingleBar({
    stream: process.stderr,
    format: '{bar} {percentage}% | {doneText} of {totalText} | {rate}/s | ETA {eta_formatted} | {extra}',
    hideCursor: true,
    clearOnComplete: true,
    etaBuffer: 20,
  }, Presets.shades_classic);
  const payload = (done: number, extra: string) => {
    const s = (performance.now() - t0) / 1000;
    return { doneText: formatBytes(done), totalText: formatBytes(total), rate: s > 0 ? formatBytes(Math.round(done / s)) : '-', extra };
  };
  bar.start(total, 0, payload(0, ''));
  return {
    update(done, extra = '') { bar.update(done, payload(done, extra)); },
    stop() { bar.stop(); },
  };
}

export interface RamTarget {
  lab: ModelLab;
  session: Session;
  vm: Vm;
  memory: GuestMemory;
  /** One past the last guest-physical byte. */
  end: bigint;
  close(): Promise<void>;
}

/**
 * Attaches the model host to a guest RAM file (a QEMU memory-backend-file with
 * share=on, or a raw image: file offset = guest-physical address) and opens a
 * session on it, through the whole stack. Read-only unless `writable`.
 */
export async function openRam(path: string, opts: { writable?: boolean; tokens?: number } = {}): Promise<RamTarget> {
  if (!existsSync(path)) throw new CliUsageError(`--ram ${path}: no such file`);
  const st = statSync(path);
  if (!st.isFile() || st.size === 0) throw new CliUsageError(`--ram ${path}: not a non-empty regular file`);
  if (st.size % 4096 !== 0) throw new CliUsageError(`--ram ${path}: size ${st.size} is not a whole number of 4 KiB pages`);
  const memory = GuestMemory.fromFile(path, { readOnly: !opts.writable });
  // The CLI's own model host may hand out more unconsumed tokens than a v6 host's 8,
  // so that one token round trip covers a whole scan chunk.
  const tokens = opts.tokens ?? 256;
  let lab: ModelLab;
  try {
    lab = await ModelLab.start({ vms: [{ name: 'ram', memory }], host: { tokenLimit: tokens } });
  } catch (e) {
    memory.close();
    throw e;
  }
  const session = lab.open({ maxTokensInFlight: tokens });
  return {
    lab, session, memory, vm: lab.vm('ram'), end: BigInt(st.size),
    async close() { session.close(); await lab.close(); memory.close(); },
  };
}

/** Runs `body` on a RAM file opened with openRam(), and always tears the stack down after. */
export async function withRam<T>(path: string, body: (ram: RamTarget) => Promise<T>): Promise<T> {
  const ram = await openRam(path);
  try {
    return await body(ram);
  } finally {
    await ram.close();
  }
}

/**
 * The KVMI cookie from `--cookie TEXT`, `--cookie-file PATH` (one trailing
 * newline dropped) or the KVMMEM_COOKIE environment variable, in that order;
 * exactly one source, non-empty. There is no default. A command line is
 * readable by every local user (/proc/PID/cmdline); a file or the environment
 * (/proc/PID/environ: same user or root only) is not.
 */
export function resolveCookie(o: { cookie?: string; cookieFile?: string }, env: NodeJS.ProcessEnv = process.env): string {
  if (o.cookie !== undefined && o.cookieFile !== undefined) throw new CliUsageError('give --cookie or --cookie-file, not both');
  let cookie: string;
  let from: string;
  if (o.cookie !== undefined) {
    cookie = o.cookie;
    from = '--cookie';
  } else if (o.cookieFile !== undefined) {
    from = `--cookie-file ${o.cookieFile}`;
    try {
      cookie = readFileSync(o.cookieFile, 'utf8').replace(/\r?\n$/, '');
    } catch (e) {
      throw new CliUsageError(`${from}: ${(e as Error).message}`);
    }
  } else if (env.KVMMEM_COOKIE !== undefined) {
    cookie = env.KVMMEM_COOKIE;
    from = 'KVMMEM_COOKIE';
  } else {
    throw new CliUsageError('a KVMI cookie is required with --listen: --cookie-file PATH, KVMMEM_COOKIE=... or --cookie TEXT (the secret the device manager was configured with)');
  }
  if (cookie.length === 0) throw new CliUsageError(`${from}: the cookie is empty`);
  return cookie;
}

/** Runs a command body with the CLI's error conventions. */
export async function runCommand(body: () => Promise<number | void>): Promise<void> {
  try {
    process.exitCode = (await body()) ?? EXIT.OK;
  } catch (e) {
    if (e instanceof CliUsageError || (e instanceof KvmmemError && e.code === 'ERR_INVALID_ARG')) {
      process.stderr.write(`kvmmem: ${e.message}\n`);
      process.exitCode = EXIT.USAGE;
    } else if (e instanceof KvmmemError) {
      process.stderr.write(`kvmmem: ${e.message}\n`);
      process.exitCode = EXIT.FAILED;
    } else {
      // Not one of ours: still one line for the user; the stack only when debugging.
      const debugging = /\bkvmmem\b/.test(process.env.NODE_DEBUG ?? '');
      const text = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
      process.stderr.write(debugging && e instanceof Error ? `kvmmem: ${e.stack}\n` : `kvmmem: ${text.split('\n', 1)[0]} (an unexpected error: NODE_DEBUG=kvmmem shows its stack; please report it)\n`);
      process.exitCode = EXIT.FAILED;
    }
  }
}

/** xxd-style hex dump: address, 16 bytes in groups of 2, ASCII. */
export function hexdump(buf: Uint8Array, base: bigint): string {
  const lines: string[] = [];
  for (let off = 0; off < buf.length; off += 16) {
    const row = buf.subarray(off, Math.min(off + 16, buf.length));
    let hexs = '';
    for (let i = 0; i < 16; i++) {
      hexs += i < row.length ? row[i]!.toString(16).padStart(2, '0') : '  ';
      if (i % 2 === 1) hexs += ' ';
    }
    const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${(base + BigInt(off)).toString(16).padStart(8, '0')}: ${hexs} ${ascii}`);
  }
  return lines.join('\n');
}
