/**
 * Where a lab keeps its state: one run directory per lab name
 * (`$KVMMEM_LIVE_DIR/lab-run/NAME/`, default ~/.cache/kvmmem-live) holding
 * state.json (who owns the lab and every pid and file it started), the
 * sockets and the logs, plus its RAM and mailbox files in /dev/shm. The owner
 * (a `kvmmem lab up` daemon or any process that called Lab.start) removes it
 * all on close; `kvmmem lab down` and the next start of the same name clean up
 * after an owner that died, by pid (each checked against its recorded start
 * time, so a reused pid is never killed).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { liveTargetDir } from '../live/target.js';
import { LabError } from './errors.js';

export const DEFAULT_LAB_NAME = 'lab';

/** A process recorded with its start time (field 22 of /proc/PID/stat): guards against pid reuse. */
export interface PidRecord { pid: number; start: string; what: string }

export interface LabState {
  name: string;
  /** 'starting' until both VMs are up and the runner answered; then 'ready'. */
  state: 'starting' | 'ready' | 'closing';
  /** The process owning the lab (its VMs are its children). */
  owner: PidRecord;
  /** Every helper process started: QEMUs, virtiofsd. */
  pids: PidRecord[];
  /** Every file and directory the lab created outside the run directory (/dev/shm files, target run files). */
  files: string[];
  startedAt: string;
  /** What `kvmmem lab up --json` prints (LabInfo), once ready. */
  info?: unknown;
}

export function checkLabName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/.test(name)) {
    throw new LabError('ERR_INVALID_ARG', `bad lab name ${JSON.stringify(name)}`, { hint: 'use 1-32 characters of [A-Za-z0-9._-], starting with a letter or digit' });
  }
  return name;
}

export function labsRoot(): string {
  return path.join(liveTargetDir(), 'lab-run');
}

export function runDirOf(name: string): string {
  return path.join(labsRoot(), checkLabName(name));
}

export const statePath = (runDir: string) => path.join(runDir, 'state.json');
export const ctlPath = (runDir: string) => path.join(runDir, 'ctl.sock');

export function readState(runDir: string): LabState | null {
  try {
    return JSON.parse(fs.readFileSync(statePath(runDir), 'utf8')) as LabState;
  } catch {
    return null;
  }
}

/** Atomic replace, so a reader never sees half a file. */
export function writeState(runDir: string, s: LabState): void {
  const tmp = `${statePath(runDir)}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(s, null, 2) + '\n');
  fs.renameSync(tmp, statePath(runDir));
}

function procStat(pid: number): { start: string; state: string } | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { state: f[0]!, start: f[19]! };
  } catch {
    return null;
  }
}

export function pidRecord(pid: number, what: string): PidRecord {
  return { pid, start: procStat(pid)?.start ?? '?', what };
}

/** The recorded process is still running (same pid, same start time, not a zombie). */
export function alive(r: PidRecord): boolean {
  const s = procStat(r.pid);
  return s !== null && s.start === r.start && s.state !== 'Z' && s.state !== 'X';
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** SIGTERM, wait up to `graceMs`, then SIGKILL and wait again. True when it is gone. */
export async function killRecorded(r: PidRecord, graceMs: number): Promise<boolean> {
  if (!alive(r)) return true;
  for (const [sig, ms] of [['SIGTERM', graceMs], ['SIGKILL', 5000]] as const) {
    try {
      process.kill(r.pid, sig);
    } catch {
      return true;
    }
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (!alive(r)) return true;
      await sleep(50);
    }
  }
  return !alive(r);
}

/**
 * Stop a lab that is not ours: SIGTERM its owner (which closes it), and when
 * the owner is gone or does not finish in `graceMs`, kill every recorded
 * helper by pid and remove every recorded file and the run directory.
 * Returns what it did, for messages. The daemon's log (NAME.daemon.log beside
 * the run directory) goes too unless `keepDaemonLog` (a starting daemon writes it).
 */
export async function stopLab(name: string, graceMs = 30_000, opts: { keepDaemonLog?: boolean } = {}): Promise<{ found: boolean; killed: string[]; left: string[] }> {
  const dir = runDirOf(name);
  const st = readState(dir);
  const killed: string[] = [];
  if (!st && !fs.existsSync(dir)) return { found: false, killed, left: [] };
  if (st) {
    if (st.owner.pid !== process.pid && alive(st.owner)) {
      if (await killRecorded(st.owner, graceMs)) killed.push(`${st.owner.what} ${st.owner.pid}`);
    }
    for (const p of st.pids) {
      if (alive(p) && (await killRecorded(p, 5000))) killed.push(`${p.what} ${p.pid}`);
    }
    for (const f of st.files) fs.rmSync(f, { recursive: true, force: true });
  }
  fs.rmSync(dir, { recursive: true, force: true });
  if (!opts.keepDaemonLog) fs.rmSync(`${dir}.daemon.log`, { force: true });
  const left = [...(st?.pids.filter(alive).map((p) => `${p.what} ${p.pid}`) ?? []), ...(st?.files.filter((f) => fs.existsSync(f)) ?? [])];
  return { found: true, killed, left };
}

/** Every lab run directory, with its state and whether its owner is alive. */
export function listLabs(): { name: string; runDir: string; state: LabState | null; alive: boolean }[] {
  let names: string[];
  try {
    names = fs.readdirSync(labsRoot());
  } catch {
    return [];
  }
  return names.filter((n) => { try { return fs.statSync(path.join(labsRoot(), n)).isDirectory(); } catch { return false; } }).sort().map((name) => {
    const runDir = path.join(labsRoot(), name);
    const state = readState(runDir);
    return { name, runDir, state, alive: state !== null && alive(state.owner) };
  });
}
