/**
 * The two-VM lab: a live *target* VM (the live-target kernel and init, RAM in
 * /dev/shm) and an *introspector* VM (same kernel, the host's / shared
 * read-only, the lab agent in its QEMU, the kvmmem module loaded when there is
 * one) plus the lab host that plays KVM+KVMI between them. Architecture:
 * docs/lab.md.
 *
 * `Lab.start()` boots it in this process (the VMs are this process's children
 * and die with it); `lab.run()` runs a command inside the introspector;
 * `lab.close()` stops everything and removes every file. Each lab also
 * serves its control socket (run-dir/ctl.sock), so `kvmmem lab run --name N`
 * from any process reaches it; `kvmmem lab up` is this class in a detached
 * process.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { constants as osConstants } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { bootLiveTarget, liveTargetDir, type LiveTarget } from '../live/target.js';
import { LAB_PROVISION_COMMAND, LabError } from './errors.js';
import { RunnerConnection, type CommandHandle } from './runner.js';
import { encodeFrame, FRAME, FrameDecoder, type ExitStatus } from './runner-protocol.js';
import { checkLabName, ctlPath, DEFAULT_LAB_NAME, pidRecord, readState, runDirOf, stopLab, alive, writeState, type LabState } from './run-dir.js';
import { bootIntrospector, findAgent, freePort, GUEST_SHARE_ROOT, labAvailable, type Introspector } from './vms.js';

/** What the lab host (src/lab/lab-host.ts, LabHost.start) takes. */
export interface LabHostStartOptions {
  agentSocket: string;
  mailboxPath: string;
  /** The introspector's RAM file: an UNMAP zeroes the page there and gives QEMU its own page back. */
  introspectorRam?: string;
  targets: { name: string; ramPath: string; uuid?: string }[];
  cookie: string;
  tool?: { tcp: { host: string; port: number } };
}
export interface LabHostHandle {
  close(): Promise<void> | void;
  stats(): unknown;
  /** The device manager's pre-unhook of a target VM (what a real host does before it stops introspection). */
  preunhook?(name: string, timeoutMs?: number): Promise<string>;
}
export type StartHost = (o: LabHostStartOptions) => Promise<LabHostHandle>;

export interface LabStartOptions {
  /** Lab name (run directory, /dev/shm file prefix); default 'lab'. */
  name?: string;
  /** Target VM RAM in MiB (default 256). */
  targetMemoryMb?: number;
  /** Introspector VM RAM in MiB (default 1024: Node runs in it). */
  introspectorMemoryMb?: number;
  /** Bound on the whole boot (default 120000 ms: two TCG boots on shared cores). */
  timeoutMs?: number;
  /**
   * Starts the lab host (token store, mailbox server, agent remapper). Default:
   * LabHost.start from ./lab-host.js when this build has it; null: no host
   * (commands still run; there is no /dev/kvmmem).
   */
  startHost?: StartHost | null;
  /** kvmmem.ko to load (transport=mailbox). Default: $KVMMEM_LAB_KMOD, else the KMOD= line of scripts/lab/provision-kmod.sh; null: none. */
  kmod?: string | null;
  /** KVMI cookie shared by the host and the tool inside (default: 16 random bytes, hex). */
  cookie?: string;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

export interface LabInfo {
  name: string;
  runDir: string;
  /** KVMMEM_LISTEN of commands inside: where the tool listens for the host's device manager. */
  listen: string;
  /** The host side of the hostfwd (127.0.0.1:PORT reaches the guest's PORT). */
  hostForward: string;
  target: { vm: string; ramPath: string; memMb: number; pid: number };
  introspector: { vm: string; ramPath: string; memMb: number; pid: number; ip: string | null; status: string[] };
  mailboxPath: string | null;
  agentSocket: string | null;
  host: { running: true } | { running: false; reason: string };
  device: { ok: true; path: string } | { ok: false; reason: string };
  ms: { target: number; introspector: number; host: number; module: number; up: number };
}

export interface LabRunOptions {
  /** Added to the command's environment (after PATH, HOME, KVMMEM_LISTEN, KVMMEM_COOKIE). */
  env?: Record<string, string>;
  /** Working directory inside (a host path: / is shared). Default process.cwd(). */
  cwd?: string;
  /** Where the command's stdout goes (default process.stdout). */
  stdout?: NodeJS.WritableStream | ((chunk: Buffer) => void);
  stderr?: NodeJS.WritableStream | ((chunk: Buffer) => void);
  /** Kill the command (SIGKILL to its process group) after this long and reject with ETIMEDOUT. */
  timeoutMs?: number;
  /** Abort: SIGTERM to the command's process group (SIGKILL 3 s later); resolves with its exit code. */
  signal?: AbortSignal;
}

const sink = (s: LabRunOptions['stdout'], fallback: NodeJS.WritableStream) =>
  typeof s === 'function' ? s : (b: Buffer) => { (s ?? fallback).write(b); };

/** The exit code a shell would report: the code, or 128 + the signal number. */
export const exitCodeOf = (s: ExitStatus): number => s.code ?? 128 + (s.signal ?? 0);

const PACKAGE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
/** Host directories kept visible inside the introspector even under /tmp: this checkout and the working directory. */
const LAB_KEEP: readonly string[] = [PACKAGE_ROOT, process.cwd()];

/** The default lab host: LabHost.start of ./lab-host.js (or .ts under tsx) when this build has it. */
async function defaultStartHost(): Promise<StartHost | string> {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const file = ['lab-host.js', 'lab-host.ts'].map((f) => path.join(here, f)).find((f) => fs.existsSync(f));
  if (!file) return 'the lab host (src/lab/lab-host.ts) is not in this build';
  const mod = (await import(pathToFileURL(file).href)) as { LabHost?: { start?: StartHost } };
  const start = mod.LabHost?.start;
  if (typeof start !== 'function') return `${file} exports no LabHost.start`;
  return (o) => start.call(mod.LabHost, o);
}

/** Where kvmmem.ko is: an explicit path, $KVMMEM_LAB_KMOD, or the kmod provisioning script's KMOD= line. */
function findKmod(explicit: string | null | undefined): { path: string } | { reason: string } {
  if (explicit === null) return { reason: 'no kernel module requested (kmod: null)' };
  const p = explicit ?? process.env.KVMMEM_LAB_KMOD;
  if (p) return fs.existsSync(p) ? { path: path.resolve(p) } : { reason: `kernel module ${p} does not exist` };
  const script = path.join(PACKAGE_ROOT, 'scripts', 'lab', 'provision-kmod.sh');
  if (!fs.existsSync(script)) return { reason: `no kernel module: ${path.relative(PACKAGE_ROOT, script)} is not in this checkout (set KVMMEM_LAB_KMOD=path/to/kvmmem.ko)` };
  try {
    const out = execFileSync('bash', [script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 600_000 });
    const m = /^KMOD=(.+)$/m.exec(out);
    if (!m) return { reason: `${path.basename(script)} printed no KMOD= line` };
    return { path: m[1]!.trim() };
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    return { reason: `${path.basename(script)} failed: ${(err.stderr ?? err.message).trim().split('\n').slice(-3).join(' / ')}` };
  }
}

const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export class Lab {
  private closing: Promise<void> | null = null;
  private closeRequested = false;
  private readonly commands = new Set<CommandHandle>();
  private ctlServer: net.Server | null = null;
  private readonly exitHook = () => this.exitCleanupSync();

  private constructor(
    readonly info: LabInfo,
    private readonly target: LiveTarget,
    private readonly intro: Introspector,
    private readonly host: LabHostHandle | null,
    private readonly cookie: string,
    private state: LabState,
  ) {
    process.on('exit', this.exitHook);
  }

  get name(): string { return this.info.name; }

  /** Boot the target and the introspector, start the lab host, load the module; resolves when commands can run. */
  static async start(opts: LabStartOptions = {}): Promise<Lab> {
    const t0 = performance.now();
    const log = opts.log ?? (() => {});
    const name = checkLabName(opts.name ?? DEFAULT_LAB_NAME);
    const targetMb = opts.targetMemoryMb ?? 256;
    const introMb = opts.introspectorMemoryMb ?? 1024;
    for (const [what, v] of [['targetMemoryMb', targetMb], ['introspectorMemoryMb', introMb]] as const) {
      if (!Number.isInteger(v) || v < 64 || v > 2816) throw new LabError('ERR_INVALID_ARG', `${what} must be an integer in 64..2816 (MiB)`);
    }
    const timeoutMs = opts.timeoutMs ?? 120_000;
    const avail = labAvailable();
    if (!avail.ok) throw new LabError('ELAB_UNAVAILABLE', `the lab cannot start: ${avail.reason}`, { hint: `provision with: ${avail.provision}` });

    const runDir = runDirOf(name);
    const old = readState(runDir);
    if (old && alive(old.owner)) {
      throw new LabError('ELAB_EXISTS', `lab '${name}' is already running (${old.owner.what} pid ${old.owner.pid})`, { hint: `use it (kvmmem lab run --name ${name} -- CMD), stop it (kvmmem lab down --name ${name}) or pick another --name` });
    }
    await stopLab(name, 30_000, { keepDaemonLog: true }); // the leftovers of an owner that died
    fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });

    const targetVm = `${name}-target`;
    const introVm = `${name}-intro`;
    const liveRun = path.join(liveTargetDir(), 'run');
    const targetRam = `/dev/shm/${targetVm}.ram`;
    const introRam = `/dev/shm/${introVm}.ram`;
    const mailboxPath = `/dev/shm/${name}.mbox`;
    const state: LabState = {
      name, state: 'starting', owner: pidRecord(process.pid, 'lab owner'), pids: [], startedAt: new Date().toISOString(),
      files: [targetRam, introRam, mailboxPath, ...['pid', 'qmp', 'console.log', 'qemu.log'].map((e) => path.join(liveRun, `${targetVm}.${e}`))],
    };
    writeState(runDir, state);
    const cleanupDir = () => { for (const f of state.files) fs.rmSync(f, { force: true }); fs.rmSync(runDir, { recursive: true, force: true }); };
    // Until the Lab owns it (and its own exit hook takes over), an exit mid-boot takes the run dir too.
    process.on('exit', cleanupDir);
    try {
      return await Lab.boot(name, opts, { t0, log, targetMb, introMb, timeoutMs, runDir, state, cleanupDir });
    } finally {
      process.off('exit', cleanupDir);
    }
  }

  private static async boot(
    name: string, opts: LabStartOptions,
    c: { t0: number; log: (l: string) => void; targetMb: number; introMb: number; timeoutMs: number; runDir: string; state: LabState; cleanupDir: () => void },
  ): Promise<Lab> {
    const { t0, log, targetMb, introMb, timeoutMs, runDir, state, cleanupDir } = c;
    const targetVm = `${name}-target`;
    const introVm = `${name}-intro`;
    const introRam = `/dev/shm/${introVm}.ram`;
    const mailboxPath = `/dev/shm/${name}.mbox`;

    const agent = findAgent();
    const cookie = opts.cookie ?? randomBytes(16).toString('hex');
    const port = await freePort();
    log(`booting ${targetVm} (${targetMb} MiB) and ${introVm} (${introMb} MiB)${agent ? '' : ' without the lab agent (not built)'}`);
    const tBoot = performance.now();
    let tTarget = 0;
    let tIntro = 0;
    const [tg, it] = await Promise.allSettled([
      bootLiveTarget(targetVm, { memMb: targetMb, timeoutMs }).then((t) => { tTarget = performance.now() - tBoot; return t; }),
      bootIntrospector({ name: introVm, runDir, memMb: introMb, ramPath: introRam, port, agent, mailboxPath, timeoutMs, keep: LAB_KEEP })
        .then((i) => { tIntro = performance.now() - tBoot; return i; }),
    ]);
    if (tg.status === 'rejected' || it.status === 'rejected') {
      if (tg.status === 'fulfilled') await tg.value.stop();
      if (it.status === 'fulfilled') await it.value.stop();
      cleanupDir();
      const why = [tg, it].filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => (r.reason as Error).message).join('\n');
      throw new LabError('ELAB_BOOT', `lab '${name}' did not boot: ${why}`, { hint: `if this says something is missing, provision with: ${LAB_PROVISION_COMMAND}` });
    }
    const target = tg.value;
    const intro = it.value;
    state.pids = [pidRecord(target.pid, `${targetVm} qemu`), pidRecord(intro.qemu.pid, `${introVm} qemu`), pidRecord(intro.virtiofsd.pid, 'virtiofsd')];
    writeState(runDir, state);
    log(`VMs up: target ${tTarget.toFixed(0)} ms, introspector ${tIntro.toFixed(0)} ms`);

    // The host must serve the mailbox before the module loads (it refuses a mailbox without the host's magic).
    let host: LabHostHandle | null = null;
    let hostInfo: LabInfo['host'];
    const tHost = performance.now();
    const fail = async (e: unknown) => {
      intro.runner.close();
      await Promise.allSettled([host?.close(), intro.stop(), target.stop()]);
      cleanupDir();
      throw e;
    };
    if (!agent) hostInfo = { running: false, reason: 'the lab agent is not built (scripts/lab/build-agent.sh)' };
    else {
      try {
        const startHost = opts.startHost === undefined ? await defaultStartHost() : opts.startHost ?? 'no lab host requested (startHost: null)';
        if (typeof startHost === 'string') hostInfo = { running: false, reason: startHost };
        else {
          host = await startHost({
            agentSocket: intro.agentSocket!, mailboxPath, cookie, introspectorRam: introRam,
            targets: [{ name: targetVm, ramPath: target.ramPath }],
            tool: { tcp: { host: '127.0.0.1', port } },
          });
          hostInfo = { running: true };
        }
      } catch (e) {
        return fail(new LabError('ELAB_BOOT', `lab '${name}': the lab host did not start: ${(e as Error).message}`, { cause: e }));
      }
    }
    const msHost = performance.now() - tHost;

    const tMod = performance.now();
    let device: LabInfo['device'];
    if (!host) device = { ok: false, reason: `no /dev/kvmmem: ${hostInfo.running ? '' : hostInfo.reason}` };
    else {
      const kmod = findKmod(opts.kmod);
      if ('reason' in kmod) device = { ok: false, reason: `no /dev/kvmmem: ${kmod.reason}` };
      else {
        try {
          device = await loadModule(intro.runner, kmod.path);
        } catch (e) {
          return fail(new LabError('ELAB_BOOT', `lab '${name}': loading ${kmod.path} failed: ${(e as Error).message}`, { cause: e }));
        }
      }
    }
    const msModule = performance.now() - tMod;
    log(device.ok ? `${device.path} ready` : device.reason);

    const info: LabInfo = {
      name, runDir, listen: `tcp:0.0.0.0:${port}`, hostForward: `127.0.0.1:${port}`,
      target: { vm: targetVm, ramPath: target.ramPath, memMb: targetMb, pid: target.pid },
      introspector: { vm: introVm, ramPath: introRam, memMb: introMb, pid: intro.qemu.pid, ip: intro.ip, status: intro.status },
      mailboxPath: agent ? mailboxPath : null, agentSocket: intro.agentSocket, host: hostInfo, device,
      ms: { target: Math.round(tTarget), introspector: Math.round(tIntro), host: Math.round(msHost), module: Math.round(msModule), up: 0 },
    };
    const lab = new Lab(info, target, intro, host, cookie, state);
    try {
      await lab.serveControl();
    } catch (e) {
      await lab.close();
      throw e;
    }
    info.ms.up = Math.round(performance.now() - t0);
    state.state = 'ready';
    state.info = info;
    writeState(runDir, state);
    intro.runner.onClose((reason) => {
      // The introspector died under us: nothing can run any more; stop the rest.
      if (!lab.closeRequested) { log(`introspector connection lost (${reason}); closing lab '${name}'`); void lab.close(); }
    });
    return lab;
  }

  /** The environment every command gets before `opts.env`. */
  private baseEnv(): Record<string, string> {
    return {
      PATH: process.env.PATH || DEFAULT_PATH, HOME: '/root', LANG: process.env.LANG ?? 'C.UTF-8',
      KVMMEM_LISTEN: this.info.listen, KVMMEM_COOKIE: this.cookie,
    };
  }

  /** Start a command inside as root (chrooted into the share), streaming to `io`. */
  spawn(argv: readonly string[], opts: { env?: Record<string, string>; cwd?: string }, io: { stdout(b: Buffer): void; stderr(b: Buffer): void }): CommandHandle {
    if (this.closeRequested) throw new LabError('ELAB_GONE', `lab '${this.name}' is closed`);
    if (argv.length === 0 || argv[0] === '') throw new LabError('ERR_INVALID_ARG', 'lab.run: no command');
    const h = this.intro.runner.start(argv, { ...this.baseEnv(), ...(opts.env ?? {}) }, opts.cwd ?? process.cwd(), io);
    this.commands.add(h);
    h.done.finally(() => this.commands.delete(h)).catch(() => {});
    return h;
  }

  /**
   * Run CMD ARGS inside the introspector as root, in `cwd` (default: this
   * process's directory, the same path inside since / is shared), with
   * KVMMEM_LISTEN and KVMMEM_COOKIE set. Resolves with the exit code (128 +
   * signal when killed); rejects ELAB_EXEC when it cannot start, ETIMEDOUT
   * after `timeoutMs`.
   */
  async run(cmd: string, args: readonly string[] = [], opts: LabRunOptions = {}): Promise<number> {
    return runWith((io) => this.spawn([cmd, ...args], opts, io), opts, `lab '${this.name}'`);
  }

  /**
   * Pre-unhooks target VM `vm` (default the lab's target) as a real host's
   * device manager does: the tool inside gets the UNHOOK event, its pages of
   * that VM are revoked. Resolves with 'reply', 'closed' or 'timeout' (how the tool answered).
   */
  async preunhook(vm: string = this.info.target.vm, timeoutMs?: number): Promise<string> {
    if (this.host?.preunhook === undefined) throw new LabError('ELAB_NOHOST', `lab '${this.name}' has no lab host to unhook with (${this.info.host.running ? 'it cannot pre-unhook' : this.info.host.reason})`);
    return this.host.preunhook(vm, timeoutMs);
  }

  /** What the lab host reports (null without a host). */
  hostStats(): unknown {
    return this.host?.stats() ?? null;
  }

  /** The guest console of each VM (for diagnostics). */
  consoles(): { target: string; introspector: string } {
    return { target: this.target.consoleText(), introspector: this.intro.qemu.consoleText() };
  }

  private async serveControl(): Promise<void> {
    const sockPath = ctlPath(this.info.runDir);
    fs.rmSync(sockPath, { force: true });
    const server = net.createServer((sock) => this.onControl(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(sockPath, () => { server.removeListener('error', reject); resolve(); });
    });
    fs.chmodSync(sockPath, 0o600);
    server.unref(); // the lab's owner decides how long to live, not the socket
    this.ctlServer = server;
  }

  /** One control connection: the runner's frames, relayed (ids are the client's own). */
  private onControl(sock: net.Socket): void {
    const dec = new FrameDecoder();
    const mine = new Map<number, CommandHandle>();
    const send = (type: number, id: number, p: Buffer | string = Buffer.alloc(0)) => { if (!sock.destroyed) sock.write(encodeFrame(type, id, p)); };
    sock.on('data', (d: Buffer) => {
      let frames;
      try {
        frames = dec.push(d);
      } catch {
        sock.destroy();
        return;
      }
      for (const f of frames) {
        if (f.type === FRAME.PING) send(FRAME.HELLO, 0, JSON.stringify(this.info));
        else if (f.type === FRAME.KILL) mine.get(f.id)?.kill(Number(f.payload.toString('latin1')) || osConstants.signals.SIGTERM);
        else if (f.type === FRAME.RUN) {
          const parts = f.payload.toString('utf8').split('\0');
          const argc = Number(parts[2]);
          const argv = parts.slice(3, 3 + argc);
          const env = Object.fromEntries(parts.slice(3 + argc, -1).map((kv) => { const i = kv.indexOf('='); return [kv.slice(0, i), kv.slice(i + 1)]; }));
          let h: CommandHandle;
          try {
            h = this.spawn(argv, { env, cwd: parts[1]! }, { stdout: (b) => send(FRAME.OUT, f.id, b), stderr: (b) => send(FRAME.ERR, f.id, b) });
          } catch (e) {
            send(FRAME.FAIL, f.id, (e as Error).message);
            continue;
          }
          mine.set(f.id, h);
          h.done.then(
            (s) => send(FRAME.EXIT, f.id, s.code !== null ? `code ${s.code}` : `signal ${s.signal}`),
            (e: Error) => send(FRAME.FAIL, f.id, e.message),
          ).finally(() => mine.delete(f.id));
        }
      }
    });
    // A client that goes away takes its commands with it (Ctrl-C of `kvmmem lab run`).
    sock.on('close', () => { for (const h of mine.values()) h.kill(osConstants.signals.SIGKILL); });
    sock.on('error', () => {});
  }

  /** Stop the host, both VMs and virtiofsd; remove the run directory and the /dev/shm files. Idempotent. */
  close(): Promise<void> {
    this.closeRequested = true;
    this.closing ??= (async () => {
      this.state.state = 'closing';
      try { writeState(this.info.runDir, this.state); } catch { /* run dir already gone */ }
      this.ctlServer?.close();
      for (const h of this.commands) h.kill(osConstants.signals.SIGKILL);
      this.intro.runner.close();
      await Promise.allSettled([Promise.resolve().then(() => this.host?.close())]);
      await Promise.allSettled([this.intro.stop(), this.target.stop()]);
      for (const f of this.state.files) fs.rmSync(f, { force: true });
      fs.rmSync(this.info.runDir, { recursive: true, force: true });
      process.off('exit', this.exitHook);
    })();
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Process exit without close(): the VMs die with us (live/target.ts's hook); take the files too. */
  private exitCleanupSync(): void {
    for (const f of this.state.files) fs.rmSync(f, { force: true });
    fs.rmSync(this.info.runDir, { recursive: true, force: true });
  }
}

/** @internal insmod kvmmem.ko transport=mailbox inside (from the initramfs busybox, the module read through the share). */
export async function loadModule(runner: RunnerConnection, kmod: string, keep: readonly string[] = LAB_KEEP): Promise<LabInfo['device']> {
  const sh = async (script: string): Promise<{ code: number; out: string }> => {
    let out = '';
    const h = runner.start(['sh', '-c', script], { PATH: '/bin:/sbin:/usr/bin:/usr/sbin' }, '/', { stdout: (b) => { out += b; }, stderr: (b) => { out += b; } }, 1);
    const s = await h.done;
    return { code: exitCodeOf(s), out: out.trim() };
  };
  // The guest mounts its own /tmp, /dev, /proc, /sys over the share: host files there are not visible inside.
  // (Unless it lies in a directory the lab keeps visible: kvmmem.keep, see vms.ts keepArg.)
  const kept = keep.some((k) => kmod.startsWith(`${path.resolve(k)}/`));
  const hidden = kept ? undefined : ['/tmp/', '/dev/', '/proc/', '/sys/'].find((d) => kmod.startsWith(d));
  if (hidden) return { ok: false, reason: `no /dev/kvmmem: ${kmod} is under ${hidden}, which the introspector has its own of (put the module elsewhere)` };
  const ins = await sh(`insmod '${GUEST_SHARE_ROOT}${kmod.replace(/'/g, `'\\''`)}' transport=mailbox 2>&1 || { dmesg | grep -i kvmmem | tail -n 3; exit 1; }`);
  if (ins.code !== 0) return { ok: false, reason: `no /dev/kvmmem: insmod ${path.basename(kmod)} transport=mailbox failed: ${ins.out.replace(/\s*\n\s*/g, ' / ')}` };
  const dev = await sh('i=0; while [ $i -lt 50 ]; do [ -c /dev/kvmmem ] && exit 0; i=$((i+1)); sleep 0.1; done; dmesg | grep -i kvmmem | tail -n 3; exit 1');
  if (dev.code !== 0) return { ok: false, reason: `no /dev/kvmmem: the module loaded but made no device node: ${dev.out.replace(/\s*\n\s*/g, ' / ')}` };
  return { ok: true, path: '/dev/kvmmem' };
}

/** Shared by Lab.run and LabClient.run: streams, timeout, abort. */
export async function runWith(start: (io: { stdout(b: Buffer): void; stderr(b: Buffer): void }) => CommandHandle, opts: LabRunOptions, label: string): Promise<number> {
  const h = start({ stdout: sink(opts.stdout, process.stdout), stderr: sink(opts.stderr, process.stderr) });
  let timedOut = false;
  let timer: NodeJS.Timeout | undefined;
  let killTimer: NodeJS.Timeout | undefined;
  const onAbort = () => {
    h.kill(osConstants.signals.SIGTERM);
    killTimer = setTimeout(() => h.kill(osConstants.signals.SIGKILL), 3000);
  };
  if (opts.timeoutMs !== undefined) {
    timer = setTimeout(() => { timedOut = true; h.kill(osConstants.signals.SIGKILL); }, opts.timeoutMs);
  }
  if (opts.signal) {
    if (opts.signal.aborted) onAbort();
    else opts.signal.addEventListener('abort', onAbort, { once: true });
  }
  try {
    const s = await h.done;
    if (timedOut) throw new LabError('ETIMEDOUT', `${label}: the command did not finish within ${opts.timeoutMs} ms and was killed`);
    return exitCodeOf(s);
  } finally {
    clearTimeout(timer);
    clearTimeout(killTimer);
    opts.signal?.removeEventListener('abort', onAbort);
  }
}
