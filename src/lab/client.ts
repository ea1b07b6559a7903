/**
 * Using a lab that another process owns (`kvmmem lab up`'s daemon, or any
 * Lab.start()): its control socket relays the runner's frames, so a LabClient
 * runs commands exactly as lab.run() does. Also the daemon itself: a detached
 * process that owns one Lab until SIGTERM (`kvmmem lab down`).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LabError } from './errors.js';
import { Lab, runWith, type LabInfo, type LabRunOptions, type LabStartOptions } from './lab.js';
import { RunnerConnection } from './runner.js';
import { alive, checkLabName, ctlPath, DEFAULT_LAB_NAME, readState, runDirOf } from './run-dir.js';

export class LabClient {
  private constructor(private readonly conn: RunnerConnection, readonly info: LabInfo) {}

  /** Connect to the running lab NAME; rejects ELAB_NOT_UP when there is none (or it is still starting). */
  static async connect(name = DEFAULT_LAB_NAME, timeoutMs = 10_000, bootWaitMs = 180_000): Promise<LabClient> {
    const dir = runDirOf(name);
    let st = readState(dir);
    // A lab that is still booting (another `lab up` or one-shot `lab run`): wait for it, bounded.
    const deadline = Date.now() + bootWaitMs;
    while (st && alive(st.owner) && st.state === 'starting' && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      st = readState(dir);
    }
    if (!st || !alive(st.owner)) throw new LabError('ELAB_NOT_UP', `no lab '${name}' is running`, { hint: `start one with: kvmmem lab up --name ${name}` });
    if (st.state !== 'ready') throw new LabError('ELAB_NOT_UP', `lab '${name}' is ${st.state}${st.state === 'starting' ? ` after ${bootWaitMs} ms` : ''}`, { hint: `see kvmmem lab status; kvmmem lab down --name ${name} stops it` });
    const owner = st.owner;
    const conn = await RunnerConnection.connect(ctlPath(dir), `lab '${name}'`, timeoutMs, () => (alive(owner) ? null : 'its owner exited'));
    const info = JSON.parse(await conn.hello(timeoutMs)) as LabInfo;
    return new LabClient(conn, info);
  }

  /** As Lab.run: CMD ARGS inside, streamed; resolves with the exit code. */
  run(cmd: string, args: readonly string[] = [], opts: LabRunOptions = {}): Promise<number> {
    return runWith((io) => this.conn.start([cmd, ...args], opts.env ?? {}, opts.cwd ?? process.cwd(), io), opts, `lab '${this.info.name}'`);
  }

  close(): void {
    this.conn.close();
  }
}

/** The kvmmem launcher (bin/kvmmem.js): the daemon is `kvmmem lab daemon`, run by the same Node. */
const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'kvmmem.js');

export interface DaemonOptions {
  name: string;
  targetMemoryMb?: number;
  introspectorMemoryMb?: number;
  timeoutMs?: number;
}

/**
 * Start a detached daemon owning lab NAME (it outlives this process) and wait
 * until it is ready. Its log is run-dir/daemon.log; on failure the error
 * carries that log's tail.
 */
export async function spawnLabDaemon(o: DaemonOptions): Promise<LabInfo> {
  const name = checkLabName(o.name);
  const dir = runDirOf(name);
  const st = readState(dir);
  if (st && alive(st.owner)) throw new LabError('ELAB_EXISTS', `lab '${name}' is already running (pid ${st.owner.pid})`, { hint: `kvmmem lab down --name ${name}, or another --name` });
  // The log lives beside the run dir until the daemon has made it (the daemon moves nothing: it appends).
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  const logPath = path.join(path.dirname(dir), `${name}.daemon.log`);
  const logFd = fs.openSync(logPath, 'w');
  const args = [BIN, 'lab', 'daemon', '--name', name];
  if (o.targetMemoryMb !== undefined) args.push('--target-memory', String(o.targetMemoryMb));
  if (o.introspectorMemoryMb !== undefined) args.push('--introspector-memory', String(o.introspectorMemoryMb));
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd, logFd] });
  fs.closeSync(logFd);
  child.unref();
  const timeoutMs = o.timeoutMs ?? 180_000;
  const deadline = Date.now() + timeoutMs;
  let exited: string | null = null;
  child.once('exit', (code, sig) => { exited = `code ${code} signal ${sig}`; });
  const tail = () => { try { return fs.readFileSync(logPath, 'utf8').trim().split('\n').slice(-30).join('\n'); } catch { return ''; } };
  for (;;) {
    const s = readState(dir);
    if (s?.state === 'ready' && s.owner.pid === child.pid) return s.info as LabInfo;
    if (exited) {
      const text = tail();
      fs.rmSync(logPath, { force: true });
      throw new LabError('ELAB_BOOT', `the lab daemon exited (${exited}) before lab '${name}' was ready:\n${text}`);
    }
    if (Date.now() > deadline) {
      try { process.kill(child.pid!, 'SIGTERM'); } catch { /* gone */ }
      throw new LabError('ETIMEDOUT', `lab '${name}' was not ready within ${timeoutMs} ms (daemon pid ${child.pid}, log ${logPath}):\n${tail()}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * The daemon's body (`kvmmem lab daemon`): own one Lab until SIGTERM/SIGINT/SIGHUP,
 * or until the introspector dies; then close it (removing every file) and exit.
 */
export async function runLabDaemon(o: DaemonOptions): Promise<number> {
  const name = checkLabName(o.name);
  const logPath = path.join(path.dirname(runDirOf(name)), `${name}.daemon.log`);
  const log = (l: string) => process.stdout.write(`${new Date().toISOString()} ${l}\n`);
  let lab: Lab | null = null;
  let stopping = false;
  let wake: () => void = () => {};
  const stopped = new Promise<void>((r) => { wake = r; });
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
    process.removeAllListeners(sig);
    process.on(sig, () => { log(`${sig}: closing`); stopping = true; wake(); });
  }
  const startOpts: LabStartOptions = { name, log };
  if (o.targetMemoryMb !== undefined) startOpts.targetMemoryMb = o.targetMemoryMb;
  if (o.introspectorMemoryMb !== undefined) startOpts.introspectorMemoryMb = o.introspectorMemoryMb;
  if (o.timeoutMs !== undefined) startOpts.timeoutMs = o.timeoutMs;
  try {
    lab = await Lab.start(startOpts);
  } catch (e) {
    log(`failed: ${(e as Error).message}`);
    return 1;
  }
  log(`lab '${name}' ready in ${lab.info.ms.up.toFixed(0)} ms (${lab.info.device.ok ? lab.info.device.path : lab.info.device.reason})`);
  if (stopping) wake();
  // Keep the event loop alive while the lab runs (its sockets are unref'd).
  const keep = setInterval(() => {
    if (!fs.existsSync(runDirOf(name))) { log('run directory removed: closing'); wake(); }
  }, 1000);
  const closedOnItsOwn = new Promise<void>((r) => {
    const t = setInterval(() => { if (readState(runDirOf(name))?.state === 'closing') { clearInterval(t); r(); } }, 500);
    t.unref();
  });
  await Promise.race([stopped, closedOnItsOwn]);
  clearInterval(keep);
  await lab.close();
  fs.rmSync(logPath, { force: true });
  log('closed');
  return 0;
}
