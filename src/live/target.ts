/**
 * Live target: a stock Debian Linux kernel booted under QEMU (TCG) with its
 * guest RAM in a shared file under /dev/shm, so the live guest-physical memory
 * can be read from that file (file offset = guest-physical address, below the
 * PCI hole). Provisioned by `scripts/live-target/provision.sh`; see
 * shared/reference/live-target.md for the measured recipe.
 *
 * Self-contained on purpose: imports nothing from the rest of src/.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

/** Ground truth printed by the guest's /init on the serial console. */
export interface Truth {
  /** Contents of the guest's /proc/version (no trailing newline). */
  banner: string;
  /** Start of "Kernel code" in /proc/iomem: the kernel's physical load address. */
  kernelCode: bigint;
  /** Kernel symbols from /proc/kallsyms (kptr_restrict=0), e.g. _text, linux_banner, init_uts_ns, jiffies_64, init_task. */
  symbols: Map<string, bigint>;
  /** Every other `KVMMEM-TRUTH <key> <value>` line, in console order (e.g. from a /kvmmem-truth.sh hook). */
  extra: { key: string; value: string }[];
}

export interface LiveTarget {
  name: string;
  /** /dev/shm/NAME.ram: the guest RAM (memory-backend-file, share=on). */
  ramPath: string;
  /** Serial console log (ttyS0). */
  consolePath: string;
  /** QMP unix socket. */
  qmpPath: string;
  /** QEMU's pid. */
  pid: number;
  /** Guest RAM size in bytes (= size of ramPath). */
  memBytes: number;
  truth: Truth;
  /** Run a QMP command; resolves to its `return` value, rejects on `error`. */
  qmp(cmd: string, args?: object): Promise<any>;
  /** Run an HMP command through QMP `human-monitor-command`; resolves to its output. */
  hmp(commandLine: string): Promise<string>;
  /** CR3 of the (only) vCPU, from HMP `info registers`. */
  cr3(): Promise<bigint>;
  /** QEMU's own translation of a guest-virtual address (HMP `gva2gpa`); null when unmapped. */
  gva2gpa(va: bigint): Promise<bigint | null>;
  /** Current console log text (the last text seen, after stop()). */
  consoleText(): string;
  /** Kill QEMU, wait for it to exit and remove the RAM file and run files. Idempotent. */
  stop(): Promise<void>;
}

export type LiveTargetAvailability =
  | { ok: true }
  | { ok: false; reason: string; provision: string };

export interface BootOptions {
  /** Guest RAM in MiB (default 256; at most 2816 so the file stays below the PCI hole). */
  memMb?: number;
  /** How long to wait for the guest's `KVMMEM-TRUTH ready` line (default 60000). */
  timeoutMs?: number;
  /** gzip'ed newc cpio archives appended to the provisioned initramfs (later files win), e.g. a /kvmmem-truth.sh hook. */
  extraInitrd?: string[];
  /** QEMU -cpu model (default QEMU's own; 'max' gives LA57, i.e. 5-level paging). */
  cpu?: string;
  /** Extra kernel command-line words (e.g. 'nokaslr'). */
  append?: string;
}

/** The command that provisions the live target (run from the repository root). */
export const PROVISION_COMMAND = 'bash scripts/live-target/provision.sh';

/** Cache directory shared with the shell scripts: $KVMMEM_LIVE_DIR or ~/.cache/kvmmem-live. */
export function liveTargetDir(): string {
  const env = process.env.KVMMEM_LIVE_DIR;
  if (env && env.length > 0) return path.resolve(env);
  return path.join(process.env.HOME || os.homedir(), '.cache', 'kvmmem-live');
}

function findOnPath(bin: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, bin);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      /* not here */
    }
  }
  return null;
}

function nonEmptyFile(p: string): boolean {
  try {
    return fs.statSync(p).size > 0;
  } catch {
    return false;
  }
}

/** Synchronous check: QEMU on PATH and the provisioned kernel/initrd in the cache dir. */
export function liveTargetAvailable(): LiveTargetAvailability {
  const no = (reason: string): LiveTargetAvailability => ({ ok: false, reason, provision: PROVISION_COMMAND });
  if (process.platform !== 'linux') return no(`live target needs Linux (platform is ${process.platform})`);
  if (!findOnPath('qemu-system-x86_64')) return no('qemu-system-x86_64 not found on PATH');
  const dir = liveTargetDir();
  const kernel = path.join(dir, 'vmlinuz');
  const initrd = path.join(dir, 'initrd.cpio.gz');
  if (!nonEmptyFile(kernel)) return no(`provisioned kernel missing: ${kernel}`);
  if (!nonEmptyFile(initrd)) return no(`provisioned initrd missing: ${initrd}`);
  try {
    fs.accessSync('/dev/shm', fs.constants.W_OK);
  } catch {
    return no('/dev/shm is not writable');
  }
  return { ok: true };
}

/** Parse the `KVMMEM-TRUTH ...` lines of a console log. Throws if the essentials are missing. */
export function parseTruth(consoleText: string): Truth {
  let banner: string | undefined;
  let kernelCode: bigint | undefined;
  const symbols = new Map<string, bigint>();
  const extra: { key: string; value: string }[] = [];
  for (const raw of consoleText.split('\n')) {
    const line = raw.replace(/\r/g, '');
    const at = line.indexOf('KVMMEM-TRUTH ');
    if (at < 0) continue;
    const rest = line.slice(at + 'KVMMEM-TRUTH '.length);
    const sp = rest.indexOf(' ');
    const key = sp < 0 ? rest : rest.slice(0, sp);
    const val = sp < 0 ? '' : rest.slice(sp + 1);
    if (key === 'banner') {
      banner ??= val.replace(/\s+$/, '');
    } else if (key === 'kernel_code') {
      const m = /^(?:0x)?([0-9a-fA-F]+)\s*$/.exec(val);
      if (m) kernelCode ??= BigInt('0x' + m[1]);
    } else if (key === 'sym') {
      const m = /^(\S+)\s+(?:0x)?([0-9a-fA-F]+)\s*$/.exec(val);
      if (m && !symbols.has(m[1]!)) symbols.set(m[1]!, BigInt('0x' + m[2]));
    } else if (key !== 'ready') {
      extra.push({ key, value: val });
    }
  }
  if (banner === undefined || !banner.startsWith('Linux version')) throw new Error('truth: no banner line');
  if (kernelCode === undefined) throw new Error('truth: no kernel_code line');
  if (!symbols.has('_text')) throw new Error('truth: no _text symbol');
  if (symbols.get('_text') === 0n) throw new Error('truth: kallsyms addresses are zero (kptr_restrict?)');
  return { banner, kernelCode, symbols, extra };
}

// ---------------------------------------------------------------- QMP

class QmpClient {
  private sock: net.Socket | null = null;
  private connecting: Promise<void> | null = null;
  private buf = '';
  private nextId = 1;
  private pending = new Map<number, { resolve: (v: any) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private greeted: (() => void) | null = null;
  private closed = false;

  constructor(private readonly socketPath: string, private readonly timeoutMs = 15000) {}

  private failAll(err: Error): void {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
  }

  private onLine(line: string): void {
    if (!line.trim()) return;
    let msg: any;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    if (msg.QMP) {
      this.greeted?.();
      return;
    }
    if (msg.event) return; // asynchronous events are not needed here
    const id = typeof msg.id === 'number' ? msg.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p) return;
    this.pending.delete(id!);
    clearTimeout(p.timer);
    if ('error' in msg) p.reject(new Error(`QMP error: ${msg.error?.class ?? ''}: ${msg.error?.desc ?? JSON.stringify(msg.error)}`));
    else p.resolve(msg.return);
  }

  private connect(): Promise<void> {
    if (this.closed) return Promise.reject(new Error('QMP connection closed'));
    if (this.sock && !this.sock.destroyed) return Promise.resolve();
    if (this.connecting) return this.connecting;
    this.connecting = new Promise<void>((resolve, reject) => {
      const sock = net.createConnection(this.socketPath);
      sock.setEncoding('utf8');
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error(`QMP: no greeting from ${this.socketPath}`));
      }, this.timeoutMs);
      this.greeted = () => {
        this.greeted = null;
        clearTimeout(timer);
        this.sock = sock;
        // Negotiate capabilities before anything else.
        this.send('qmp_capabilities').then(() => resolve(), reject);
      };
      sock.on('data', (chunk: string) => {
        this.buf += chunk;
        let nl: number;
        while ((nl = this.buf.indexOf('\n')) >= 0) {
          const line = this.buf.slice(0, nl);
          this.buf = this.buf.slice(nl + 1);
          this.onLine(line);
        }
      });
      sock.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
        this.failAll(e);
      });
      sock.on('close', () => {
        clearTimeout(timer);
        this.sock = null;
        this.connecting = null;
        this.buf = '';
        this.failAll(new Error('QMP connection closed'));
      });
      sock.unref(); // never keep the process alive on our account
    });
    const c = this.connecting;
    c.catch(() => {
      if (this.connecting === c) this.connecting = null;
    });
    return c;
  }

  private send(cmd: string, args?: object): Promise<any> {
    const sock = this.sock;
    if (!sock) return Promise.reject(new Error('QMP not connected'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP command ${cmd} timed out`));
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      const msg: Record<string, unknown> = { execute: cmd, id };
      if (args !== undefined) msg.arguments = args;
      sock.write(JSON.stringify(msg) + '\n');
    });
  }

  async execute(cmd: string, args?: object): Promise<any> {
    await this.connect();
    return this.send(cmd, args);
  }

  close(): void {
    this.closed = true;
    this.failAll(new Error('QMP connection closed'));
    this.sock?.destroy();
    this.sock = null;
  }
}

// ---------------------------------------------------------------- process safety net

interface Running {
  child: ChildProcess;
  /** Removed when the process is cleaned up (RAM file, sockets, logs). */
  files: string[];
}
const running = new Set<Running>();
let exitHookInstalled = false;

function cleanupSync(r: Running): void {
  try {
    if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
  } catch {
    /* already gone */
  }
  for (const f of r.files) {
    try {
      fs.rmSync(f, { force: true });
    } catch {
      /* ignore */
    }
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const r of running) cleanupSync(r);
    running.clear();
  });
}

/** A child process this module spawned and cleans up after (see spawnTracked). */
export interface TrackedChild {
  child: ChildProcess;
  /** The child's pid (the program itself, or the setpriv wrapper that exec'd it: the same process). */
  pid: number;
  /** True once the process has exited (or could not be spawned). */
  exited(): boolean;
  /** "code N" / "signal S" / the spawn error, for messages. */
  exitDescription(): string;
  /** SIGTERM, then SIGKILL after `graceMs`; waits for the exit and removes `files`. Idempotent. */
  stop(graceMs?: number): Promise<void>;
}

/**
 * Spawn a long-running helper (QEMU, virtiofsd) the way the live target runs
 * QEMU: stdout and stderr into `logPath`, under `setpriv --pdeathsig KILL`
 * when available so it dies with this process, unref'd, and killed with its
 * `files` removed by a process 'exit' hook if nobody stopped it.
 */
export function spawnTracked(program: string, args: string[], opts: { logPath: string; files: string[]; env?: NodeJS.ProcessEnv }): TrackedChild {
  const setpriv = findOnPath('setpriv');
  const [cmd, argv] = setpriv ? [setpriv, ['--pdeathsig', 'KILL', '--', program, ...args]] : [program, args];
  installExitHook();
  const logFd = fs.openSync(opts.logPath, 'w');
  let child: ChildProcess;
  try {
    child = spawn(cmd, argv, { stdio: ['ignore', logFd, logFd], ...(opts.env ? { env: opts.env } : {}) });
  } finally {
    fs.closeSync(logFd);
  }
  const rec: Running = { child, files: [...opts.files, opts.logPath] };
  running.add(rec);
  child.unref(); // a forgotten helper must not hang the process; the exit hook kills it
  let spawnError: Error | null = null;
  child.on('error', (e) => {
    spawnError = e;
  });
  let stopping: Promise<void> | null = null;
  const exited = () => spawnError !== null || child.exitCode !== null || child.signalCode !== null;
  return {
    child,
    pid: child.pid ?? -1,
    exited,
    exitDescription: () => (spawnError ? String(spawnError) : `code ${child.exitCode} signal ${child.signalCode}`),
    stop(graceMs = 5000) {
      stopping ??= (async () => {
        if (!exited() && child.pid !== undefined) {
          try {
            child.kill('SIGTERM');
          } catch {
            /* gone */
          }
          if (!(await waitExit(child, graceMs))) {
            try {
              child.kill('SIGKILL');
            } catch {
              /* gone */
            }
            await waitExit(child, 5000);
          }
        }
        cleanupSync(rec); // SIGKILL if somehow still there + remove the files
        running.delete(rec);
      })();
      return stopping;
    },
  };
}

/** A QEMU started by spawnQemu: its process, QMP and serial console. */
export interface QemuProcess extends TrackedChild {
  /** Run a QMP command; resolves to its `return` value. */
  qmp(cmd: string, args?: object): Promise<any>;
  /** The console log now (the last text seen, after stop()). */
  consoleText(): string;
  /**
   * Wait until the console contains `marker`; resolves to the console text.
   * On QEMU's exit or the timeout, stops QEMU and rejects with the QEMU log and the console's tail.
   */
  waitConsole(marker: string, timeoutMs: number): Promise<string>;
}

export interface QemuSpec {
  /** For messages. */
  name: string;
  /** Arguments after the binary; spawnQemu adds -serial, -qmp and -pidfile. */
  args: string[];
  env?: NodeJS.ProcessEnv;
  consolePath: string;
  qmpPath: string;
  pidPath: string;
  logPath: string;
  /** Also removed at stop (e.g. the RAM file). */
  files: string[];
}

/** Start QEMU (TCG) with a file console and a QMP socket; see spawnTracked for its lifetime. */
export function spawnQemu(spec: QemuSpec): QemuProcess {
  const qemu = findOnPath('qemu-system-x86_64');
  if (!qemu) throw new Error('qemu-system-x86_64 not found on PATH; run: ' + PROVISION_COMMAND);
  for (const f of [spec.consolePath, spec.qmpPath, spec.pidPath, spec.logPath]) fs.rmSync(f, { force: true });
  const args = [...spec.args, '-serial', `file:${spec.consolePath}`, '-qmp', `unix:${spec.qmpPath},server,nowait`, '-pidfile', spec.pidPath];
  const tracked = spawnTracked(qemu, args, {
    logPath: spec.logPath, files: [...spec.files, spec.qmpPath, spec.pidPath, spec.consolePath], ...(spec.env ? { env: spec.env } : {}),
  });
  const qmpClient = new QmpClient(spec.qmpPath);
  let lastConsole = '';
  let stopped = false;
  const consoleText = (): string => {
    if (stopped) return lastConsole;
    const t = readText(spec.consolePath);
    if (t) lastConsole = t;
    return lastConsole;
  };
  const stop = async (graceMs?: number): Promise<void> => {
    if (!stopped) {
      consoleText();
      stopped = true;
      qmpClient.close();
    }
    await tracked.stop(graceMs);
  };
  const waitConsole = async (marker: string, timeoutMs: number): Promise<string> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (tracked.exited()) {
        const text = consoleText();
        const log = readText(spec.logPath);
        await stop();
        throw new Error(
          `${spec.name}: qemu exited before '${marker}' (${tracked.exitDescription()})\n` +
            `qemu log:\n${log}\nconsole tail:\n${text.split('\n').slice(-30).join('\n')}`,
        );
      }
      const text = consoleText();
      if (text.includes(marker)) return text;
      if (Date.now() > deadline) {
        await stop();
        throw new Error(`${spec.name}: no '${marker}' on the console within ${timeoutMs} ms; console tail:\n${text.split('\n').slice(-30).join('\n')}`);
      }
      await sleep(100);
    }
  };
  return {
    ...tracked,
    stop,
    qmp: (cmd, a) => (stopped ? Promise.reject(new Error(`${spec.name} is stopped`)) : qmpClient.execute(cmd, a)),
    consoleText,
    waitConsole,
  };
}

function pidIsOurQemu(pid: number, ramPath: string): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    if (state === 'Z' || state === 'X') return false;
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.some((a) => a.includes(`mem-path=${ramPath},`));
  } catch {
    return false;
  }
}

/**
 * Remove the leftovers of live targets whose QEMU is gone (e.g. the process that
 * booted them was SIGKILLed: QEMU then dies via pdeathsig, but its RAM file stays
 * in /dev/shm). Only touches targets that have a pidfile in our run dir, and only
 * when that pidfile is older than a minute and names no live QEMU for that target.
 * Returns the names cleaned up. Called by bootLiveTarget().
 */
export function sweepStaleLiveTargets(): string[] {
  const run = path.join(liveTargetDir(), 'run');
  const cleaned: string[] = [];
  let entries: string[];
  try {
    entries = fs.readdirSync(run);
  } catch {
    return cleaned;
  }
  for (const f of entries) {
    if (!f.endsWith('.pid')) continue;
    const name = f.slice(0, -4);
    if (!/^[A-Za-z0-9._-]+$/.test(name)) continue;
    const pidPath = path.join(run, f);
    try {
      const st = fs.statSync(pidPath);
      if (Date.now() - st.mtimeMs < 60_000) continue;
      const pid = Number.parseInt(fs.readFileSync(pidPath, 'utf8').trim(), 10);
      if (!Number.isInteger(pid) || pid <= 0) continue;
      const ramPath = `/dev/shm/${name}.ram`;
      if (pidIsOurQemu(pid, ramPath)) continue;
      for (const x of [ramPath, pidPath, ...['.qmp', '.console.log', '.qemu.log'].map((e) => path.join(run, name + e))]) {
        fs.rmSync(x, { force: true });
      }
      cleaned.push(name);
    } catch {
      /* raced with someone else; leave it */
    }
  }
  return cleaned;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function readText(p: string): string {
  try {
    return fs.readFileSync(p, 'latin1');
  } catch {
    return '';
  }
}

function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      child.off('exit', on);
      resolve(false);
    }, ms);
    const on = () => {
      clearTimeout(t);
      resolve(true);
    };
    child.once('exit', on);
  });
}

/**
 * Boot the provisioned kernel under QEMU/TCG with RAM in /dev/shm/NAME.ram and
 * wait for the guest's `KVMMEM-TRUTH ready` line. QEMU is this process's child
 * (reaped by Node); it is started under `setpriv --pdeathsig KILL` when
 * available so it dies with us, and a process 'exit' hook kills it and removes
 * the RAM file as a safety net. Always call stop().
 */
export async function bootLiveTarget(name: string, opts: BootOptions = {}): Promise<LiveTarget> {
  if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new Error(`bootLiveTarget: bad name ${JSON.stringify(name)}`);
  const memMb = opts.memMb ?? 256;
  if (!Number.isInteger(memMb) || memMb < 64 || memMb > 2816) {
    throw new Error('bootLiveTarget: memMb must be an integer in 64..2816 (file offset = GPA only below the PCI hole)');
  }
  const avail = liveTargetAvailable();
  if (!avail.ok) throw new Error(`live target unavailable: ${avail.reason}; run: ${avail.provision}`);
  const timeoutMs = opts.timeoutMs ?? 60000;

  const dir = liveTargetDir();
  const run = path.join(dir, 'run');
  fs.mkdirSync(run, { recursive: true });
  const kernel = path.join(dir, 'vmlinuz');
  const initrd = path.join(dir, 'initrd.cpio.gz');
  const ramPath = `/dev/shm/${name}.ram`;
  const consolePath = path.join(run, `${name}.console.log`);
  const qmpPath = path.join(run, `${name}.qmp`);
  const pidPath = path.join(run, `${name}.pid`);
  const logPath = path.join(run, `${name}.qemu.log`);

  sweepStaleLiveTargets();
  // Refuse to clobber a running instance of the same name; clear a dead one's leftovers.
  try {
    const old = Number.parseInt(fs.readFileSync(pidPath, 'utf8').trim(), 10);
    if (Number.isInteger(old) && old > 0 && pidIsOurQemu(old, ramPath)) {
      throw new Error(`live target '${name}' is already running (pid ${old}); stop it with: bash scripts/live-target/stop.sh ${name}`);
    }
  } catch (e) {
    if (e instanceof Error && e.message.startsWith('live target')) throw e;
  }
  fs.rmSync(ramPath, { force: true });
  // The kernel unpacks concatenated initramfs archives in order: extras land on top of the provisioned one.
  let initrdPath = initrd;
  const runFiles: string[] = [];
  if (opts.extraInitrd !== undefined && opts.extraInitrd.length > 0) {
    initrdPath = path.join(run, `${name}.initrd`);
    fs.writeFileSync(initrdPath, Buffer.concat([initrd, ...opts.extraInitrd].map((f) => fs.readFileSync(f))));
    runFiles.push(initrdPath);
  }

  const q = spawnQemu({
    name: `live target '${name}'`,
    args: [
      '-accel', 'tcg', '-smp', '1', '-m', `${memMb}M`,
      '-object', `memory-backend-file,id=ram,size=${memMb}M,mem-path=${ramPath},share=on`,
      '-machine', 'q35,memory-backend=ram', '-nodefaults', '-display', 'none', '-no-reboot',
      '-kernel', kernel, '-initrd', initrdPath, '-append', `console=ttyS0 panic=-1${opts.append ? ` ${opts.append}` : ''}`,
      ...(opts.cpu ? ['-cpu', opts.cpu] : []),
    ],
    consolePath, qmpPath, pidPath, logPath, files: [ramPath, ...runFiles],
  });

  // Wait for the guest's ready line (spawnQemu stops QEMU when it does not come).
  const text = await q.waitConsole('KVMMEM-TRUTH ready', timeoutMs);
  let truth: Truth;
  try {
    truth = parseTruth(text);
  } catch (e) {
    await q.stop();
    throw new Error(`live target '${name}': ${(e as Error).message}; console tail:\n${text.split('\n').slice(-40).join('\n')}`);
  }

  const hmp = async (commandLine: string): Promise<string> => {
    const out = await q.qmp('human-monitor-command', { 'command-line': commandLine });
    return typeof out === 'string' ? out : String(out ?? '');
  };
  const cr3 = async (): Promise<bigint> => {
    const out = await hmp('info registers');
    const m = /\bCR3=([0-9a-fA-F]+)/.exec(out);
    if (!m) throw new Error(`CR3 not found in 'info registers' output:\n${out}`);
    return BigInt('0x' + m[1]);
  };
  const gva2gpa = async (va: bigint): Promise<bigint | null> => {
    const v = BigInt.asUintN(64, va);
    const out = await hmp(`gva2gpa 0x${v.toString(16)}`);
    const m = /gpa:\s*(?:0x)?([0-9a-fA-F]+)/.exec(out);
    if (m) return BigInt('0x' + m[1]);
    if (/unmapped/i.test(out)) return null;
    throw new Error(`unexpected gva2gpa output: ${JSON.stringify(out)}`);
  };

  return {
    name, ramPath, consolePath, qmpPath, pid: q.pid, memBytes: memMb * 1024 * 1024, truth,
    qmp: q.qmp, hmp, cr3, gva2gpa, consoleText: q.consoleText, stop: () => q.stop(),
  };
}
