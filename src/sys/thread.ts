/**
 * Threads and the end of a thread: what keeps ffi-rs safe in worker threads, and
 * what cleans up after a thread that ends while it holds native resources.
 *
 * 1. ffi-rs in workers. Node dlclose()s a worker's addons when the worker's
 *    environment is torn down; if no other thread had loaded ffi-rs, its code is
 *    unmapped. But the first ffi-rs call on a thread registers Rust std's
 *    thread-local-destructor pthread key, and glibc runs that destructor when the
 *    worker's OS thread exits -- after the unmap: SIGSEGV of the whole process
 *    (README "Known issues"). Importing this module pins every ffi-rs binary
 *    resident (dlopen RTLD_NOLOAD|RTLD_NODELETE: never unmapped, exactly what
 *    "the main thread loaded it too" gave by accident). Where the pin cannot be
 *    made, importing kvmmem in a worker throws ThreadUnsafeError instead.
 *
 * 2. Cleanup at thread end. onThreadExit() hooks run at the thread's 'exit'
 *    (end of the event loop, process.exit(); the CLI turns SIGINT/SIGTERM/SIGHUP
 *    into process.exit). worker.terminate() runs no JavaScript in the worker, so
 *    native resources are also recorded in a process-wide ledger (a
 *    SharedArrayBuffer every Worker created after this import inherits through
 *    worker_threads environment data): when a worker ends, the thread that created
 *    it (if it imported kvmmem) closes the fds and unmaps the mappings that worker
 *    still owned, and removes its temp directories. A worker's own 'exit' does the
 *    same for itself. This module is the first thing src/sys/ffi.ts imports.
 */
import ffi from 'ffi-rs';
import { lstatSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { debuglog } from 'node:util';
import { getEnvironmentData, isMainThread, setEnvironmentData, threadId, type Worker } from 'node:worker_threads';
import { KvmmemError, UsageError } from '../errors.js';

const debug = debuglog('kvmmem');
const { open: ffiOpen, load, DataType } = ffi;
const LIBC = 'libc';
ffiOpen({ library: LIBC, path: '' });

// ---- 1. ffi-rs in worker threads ----

/** Importing kvmmem in a worker thread where ffi-rs could not be kept loaded (the worker's exit would SIGSEGV the process). */
export class ThreadUnsafeError extends KvmmemError {
  constructor(detail: string) {
    super(`kvmmem cannot be used in this worker thread: ${detail}`, {
      code: 'ERR_WORKER_UNSAFE', syscall: 'dlopen',
      hint: "import 'kvmmem' (or 'ffi-rs') in the main thread before starting workers, or use a child process instead of a worker",
    });
  }
}

/** The ffi-rs native binaries mapped into this process (the .node file ffi-rs's index.js loaded). */
export function ffiBinaries(): string[] {
  const found = new Set<string>();
  for (const line of readFileSync('/proc/self/maps', 'utf8').split('\n')) {
    const slash = line.indexOf('/');
    if (slash < 0) continue;
    const path = line.slice(slash);
    if (/\/ffi-rs\.[^/]*\.node$/.test(path)) found.add(path);
  }
  return [...found];
}

// glibc's values (Node's os.constants.dlopen has no RTLD_NOLOAD or RTLD_NODELETE).
const RTLD_NOW = 2, RTLD_NOLOAD = 4, RTLD_NODELETE = 0x1000;
const RTLD_PIN = RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE;

/** Pins every loaded ffi-rs binary resident; returns the paths pinned, or a reason it could not. */
function pinFfiRs(): { pinned: string[] } | { failed: string } {
  let paths: string[];
  try {
    paths = ffiBinaries();
  } catch (e) {
    return { failed: `cannot read /proc/self/maps (${(e as Error).message})` };
  }
  if (paths.length === 0) return { failed: 'the ffi-rs binary is not among the mapped files of /proc/self/maps' };
  for (const p of paths) {
    // The handle is never dlclose()d: with NODELETE the object stays even if it were.
    const h = load({ library: LIBC, funcName: 'dlopen', retType: DataType.U64, paramsType: [DataType.String, DataType.I32], paramsValue: [p, RTLD_PIN] }) as number;
    if (!h) return { failed: `dlopen(${p}, RTLD_NOLOAD|RTLD_NODELETE) failed` };
  }
  return { pinned: paths };
}

/** The decision taken at import: a worker may use kvmmem only with ffi-rs pinned. Exported for tests. */
export function checkThreadSafety(pin: { pinned: string[] } | { failed: string }, mainThread: boolean): void {
  if ('failed' in pin) {
    // The main thread's exit is the process's: nothing is unloaded before it.
    if (mainThread) debug('ffi-rs could not be pinned (%s): harmless on the main thread', pin.failed);
    else throw new ThreadUnsafeError(`${pin.failed}, so this worker's exit would unload ffi-rs under a live thread-local destructor`);
  }
}

const pinResult = pinFfiRs();
checkThreadSafety(pinResult, isMainThread);
/** The ffi-rs binaries this process keeps resident (empty when the pin failed on the main thread). */
export const pinnedFfiBinaries: readonly string[] = 'pinned' in pinResult ? pinResult.pinned : [];

// ---- 2a. per-thread exit hooks ----

const hooks = new Set<() => void>();

/**
 * Runs `fn` (synchronously) when this thread ends: the end of its event loop,
 * process.exit(), or a signal the CLI turns into an exit. Not on
 * worker.terminate() (no JavaScript runs then: see the ledger below). Returns
 * the function that removes the hook (call it when the resource is released).
 */
export function onThreadExit(fn: () => void): () => void {
  hooks.add(fn);
  return () => { hooks.delete(fn); };
}

/** Runs and clears every exit hook, newest first (what 'exit' does; exported for the CLI and tests). */
export function runThreadExitHooks(): void {
  const all = [...hooks].reverse();
  hooks.clear();
  for (const fn of all) {
    try {
      fn();
    } catch (e) {
      debug('exit hook failed: %s', (e as Error).message);
    }
  }
}

// ---- 2b. the process-wide ledger of native resources ----
// Slot i: meta[2i] = owner (threadId + 1; 0 free; -1 being claimed or reaped),
// meta[2i+1] = kind; data[2i], data[2i+1] = fd / (address, length). Claimed with
// Atomics, so any thread may record, release and reap.
const SLOTS = 1 << 16;
const KIND_FD = 1, KIND_MAPPING = 2;
const LEDGER_KEY = 'kvmmem:thread-ledger:v1';
const LEDGER_BYTES = SLOTS * 8 + SLOTS * 16;

function ledgerBuffer(): SharedArrayBuffer {
  const inherited = getEnvironmentData(LEDGER_KEY);
  const sab = inherited instanceof SharedArrayBuffer && inherited.byteLength === LEDGER_BYTES ? inherited : new SharedArrayBuffer(LEDGER_BYTES);
  setEnvironmentData(LEDGER_KEY, sab); // every Worker created from here on shares it
  return sab;
}
const sab = ledgerBuffer();
const meta = new Int32Array(sab, 0, SLOTS * 2);
const data = new Float64Array(sab, SLOTS * 8, SLOTS * 2);
const me = threadId + 1;
let hint = 0;

/** A ledger entry: pass it to release() when the resource is freed normally. -1 = not recorded. */
export type LedgerEntry = number;

function record(kind: number, a: number, b: number): LedgerEntry {
  for (let n = 0; n < SLOTS; n++) {
    const i = (hint + n) & (SLOTS - 1);
    if (Atomics.load(meta, 2 * i) !== 0 || Atomics.compareExchange(meta, 2 * i, 0, -1) !== 0) continue;
    meta[2 * i + 1] = kind;
    data[2 * i] = a;
    data[2 * i + 1] = b;
    Atomics.store(meta, 2 * i, me);
    hint = i + 1;
    return i;
  }
  debug('thread ledger full (%d entries): %s not recorded; it leaks if this worker is terminated', SLOTS, kind === KIND_FD ? `fd ${a}` : `mapping 0x${a.toString(16)}`);
  return -1;
}

/** Records an fd this thread owns. Call release() BEFORE closing it (a reaper must never close a reused number). */
export function recordFd(fd: number): LedgerEntry {
  return record(KIND_FD, fd, 0);
}

/** Records a mapping [address, address + length) this thread owns. Call release() BEFORE unmapping it. */
export function recordMapping(address: number, length: number): LedgerEntry {
  return record(KIND_MAPPING, address, length);
}

/** The resource was (or is about to be) freed by its owner. */
export function release(entry: LedgerEntry): void {
  if (entry >= 0) Atomics.compareExchange(meta, 2 * entry, me, 0);
}

/** Ledger entries of this thread still open (for tests and diagnostics). */
export function recordedByThisThread(): { fds: number; mappings: number } {
  let fds = 0, mappings = 0;
  for (let i = 0; i < SLOTS; i++) {
    if (Atomics.load(meta, 2 * i) !== me) continue;
    if (meta[2 * i + 1] === KIND_FD) fds++;
    else mappings++;
  }
  return { fds, mappings };
}

// ---- temp directories named after their owner ----
const OWNED_DIR = /^kvmmem-([a-z]+)-(\d+)-(\d+)-/;

/** mkdtemp in the temp dir as kvmmem-KIND-PID-THREAD-XXXXXX, so that the owner's death can be told from the name. */
export function makeOwnedTempDir(kind: string): string {
  if (!/^[a-z]+$/.test(kind)) throw new UsageError(`makeOwnedTempDir: kind must be lower-case letters, got ${kind}`);
  return mkdtempSync(join(tmpdir(), `kvmmem-${kind}-${process.pid}-${threadId}-`));
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH'; // EPERM: alive, someone else's
  }
}

function removeOwnedDirs(match: (pid: number, tid: number) => boolean): string[] {
  const removed: string[] = [];
  const dir = tmpdir();
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  const uid = process.getuid?.();
  for (const name of names) {
    const m = OWNED_DIR.exec(name);
    if (!m || !match(Number(m[2]), Number(m[3]))) continue;
    const path = join(dir, name);
    try {
      const st = lstatSync(path);
      if (!st.isDirectory() || (uid !== undefined && st.uid !== uid)) continue; // only our own, real directories
      rmSync(path, { recursive: true, force: true });
      removed.push(path);
    } catch (e) {
      debug('could not remove %s: %s', path, (e as Error).message);
    }
  }
  return removed;
}

/**
 * Removes kvmmem temp directories (lab sockets, kvmi.sock dirs) left behind by
 * processes that no longer run (killed with SIGKILL, crashed). A directory is
 * removed only if its name says kvmmem made it, the pid in it is not alive, and
 * it belongs to this user. Returns the paths removed.
 */
export function removeStaleTempDirs(): string[] {
  return removeOwnedDirs((pid) => pid !== process.pid && !pidAlive(pid));
}

// ---- reaping ----
const closeFd = (fd: number) => load({ library: LIBC, funcName: 'close', retType: DataType.I32, paramsType: [DataType.I32], paramsValue: [fd] }) as number;
const unmap = (a: number, len: number) => load({ library: LIBC, funcName: 'munmap', retType: DataType.I32, paramsType: [DataType.U64, DataType.U64], paramsValue: [a, len] }) as number;

// A fresh, unlocked, never-touched zero mapping in place: the memory and the lock
// are returned, yet a stale view still reads zeros instead of faulting.
const MAP_FRESH = 0x02 | 0x20 | 0x10 | 0x4000; // MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE
const defuse = (a: number, len: number) => load({ library: LIBC, funcName: 'mmap', retType: DataType.I64, paramsType: [DataType.U64, DataType.U64, DataType.I32, DataType.I32, DataType.I32, DataType.I64], paramsValue: [a, len, 3, MAP_FRESH, -1, 0] }) as number === a;

export interface Reaped { fds: number; mappings: number; dirs: string[] }

/**
 * Frees what thread `tid` of this process still owned: closes its recorded fds,
 * unmaps its recorded mappings (which unlocks them), removes its temp
 * directories. Only for a thread that has ended (its heap is gone; nothing can
 * use these any more). Called automatically for every Worker created after
 * kvmmem was imported, when it exits; call it yourself for others.
 */
export function reapThread(tid: number): Reaped {
  return reap(tid, false);
}

function reap(tid: number, self: boolean): Reaped {
  const owner = tid + 1;
  const out: Reaped = { fds: 0, mappings: 0, dirs: [] };
  // fds first: a real driver unmaps its pages on release() before their local pages go.
  for (const kind of [KIND_FD, KIND_MAPPING]) {
    for (let i = 0; i < SLOTS; i++) {
      if (Atomics.load(meta, 2 * i) !== owner || meta[2 * i + 1] !== kind) continue;
      if (Atomics.compareExchange(meta, 2 * i, owner, -1) !== owner) continue;
      const a = data[2 * i]!, b = data[2 * i + 1]!;
      if (kind === KIND_FD) {
        if (closeFd(a) === 0) out.fds++;
      } else if (self) {
        // Our own 'exit': later exit listeners may still read a view, so no munmap
        // yet; the creating thread unmaps it after the join.
        if (defuse(a, b)) out.mappings++;
        Atomics.store(meta, 2 * i, owner);
        continue;
      } else if (unmap(a, b) === 0) {
        out.mappings++;
      }
      Atomics.store(meta, 2 * i, 0);
    }
  }
  out.dirs = removeOwnedDirs((pid, t) => pid === process.pid && t === tid);
  if (out.fds + out.mappings + out.dirs.length > 0) debug('thread %d ended: closed %d fd(s), %s %d mapping(s), removed %d dir(s)', tid, out.fds, self ? 'released' : 'unmapped', out.mappings, out.dirs.length);
  return out;
}

// A Worker this thread starts is reaped when it exits (its threadId is -1 by then: keep it now).
process.on('worker', (w: Worker) => {
  const tid = w.threadId;
  w.once('exit', () => reapThread(tid));
});

process.on('exit', () => {
  runThreadExitHooks();
  // A worker frees what its hooks did not (its pool windows...). The main thread's
  // exit is the process's: the kernel does it.
  if (!isMainThread) reap(threadId, true);
});
