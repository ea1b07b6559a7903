/**
 * The lab's introspector VM: the live target's kernel with its own initramfs
 * (scripts/lab/provision-vm.sh: guest modules, kvmmem-runner, /init), the
 * host's `/` shared read-only over virtiofs (shared/reference/lab.md §2: a
 * private mount namespace in which a read-only bind of / is virtiofsd's
 * source, because virtiofsd has no read-only switch and the guest's `ro` is
 * advisory), slirp networking with one hostfwd port for the KVMI socket, a
 * virtio-serial port for the runner, and RAM as a shared file so vhost-user-fs
 * and the lab agent (LD_PRELOAD, docs/lab-agent.md) can reach it.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { liveTargetAvailable, liveTargetDir, spawnQemu, spawnTracked, type QemuProcess, type TrackedChild } from '../live/target.js';
import { UsageError } from '../errors.js';
import { LAB_PROVISION_COMMAND, LabError } from './errors.js';
import { RunnerConnection } from './runner.js';

export const VIRTIOFSD = '/usr/lib/qemu/virtiofsd';
/** The virtio-serial port name the runner looks for (scripts/lab/provision-vm.sh's /init). */
export const RUNNER_PORT_NAME = 'kvmmem.runner';
/** Where the introspector mounts the share; commands run chrooted there. */
export const GUEST_SHARE_ROOT = '/host';

export function introspectorInitrd(): string {
  return path.join(liveTargetDir(), 'lab', 'intro.cpio.gz');
}

/** The newest lab agent build (scripts/lab/build-agent.sh caches it under agent/<hash>/), or null. */
export function findAgent(): string | null {
  const dir = path.join(liveTargetDir(), 'agent');
  let best: { p: string; t: number } | null = null;
  try {
    for (const h of fs.readdirSync(dir)) {
      const p = path.join(dir, h, 'kvmmem_agent.so');
      try {
        const t = fs.statSync(p).mtimeMs;
        if (!best || t > best.t) best = { p, t };
      } catch {
        /* not built there */
      }
    }
  } catch {
    return null;
  }
  return best?.p ?? null;
}

export type LabAvailability = { ok: true } | { ok: false; reason: string; provision: string };

/** Synchronous check of everything the two VMs need. */
export function labAvailable(): LabAvailability {
  const no = (reason: string): LabAvailability => ({ ok: false, reason, provision: LAB_PROVISION_COMMAND });
  const live = liveTargetAvailable();
  if (!live.ok) return no(live.reason);
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return no('the lab needs root (a private mount namespace for the read-only share)');
  try {
    fs.accessSync(VIRTIOFSD, fs.constants.X_OK);
  } catch {
    return no(`${VIRTIOFSD} missing (package qemu-system-common)`);
  }
  if (!fs.existsSync('/usr/bin/unshare') && !fs.existsSync('/bin/unshare')) return no('unshare (util-linux) missing');
  try {
    if (fs.statSync(introspectorInitrd()).size === 0) return no(`empty ${introspectorInitrd()}`);
  } catch {
    return no(`introspector initramfs missing: ${introspectorInitrd()}`);
  }
  return { ok: true };
}

/** A free TCP port on 127.0.0.1 for slirp's hostfwd (the guest listens on the same number). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const a = srv.address();
      srv.close(() => (a && typeof a === 'object' ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}

export interface IntrospectorOptions {
  /** VM name for messages and files (e.g. LAB-intro). */
  name: string;
  runDir: string;
  memMb: number;
  /** /dev/shm/... RAM file (memory-backend-file share=on). */
  ramPath: string;
  /** hostfwd tcp:127.0.0.1:PORT-:PORT */
  port: number;
  /** Lab agent .so to LD_PRELOAD; null: no agent, no doorbell. */
  agent: string | null;
  /** The doorbell's shared memory file (KVMMEM_AGENT_MAILBOX); with the agent only. */
  mailboxPath: string;
  timeoutMs: number;
  /**
   * Host directories under /tmp (or /dev/shm) to keep visible inside: the guest
   * mounts its own tmpfs over the share's /tmp and /dev/shm, which would hide a
   * checkout there (a CI clone in mktemp -d). Passed on the kernel command line
   * (kvmmem.keep=P1,P2), bind-mounted from the share by the init.
   */
  keep?: readonly string[];
}

/** The kernel command-line word for `keep` ('' when nothing needs keeping); paths with spaces or commas cannot be passed. */
export function keepArg(paths: readonly string[]): string {
  const under = (p: string, dir: string) => p === dir || p.startsWith(`${dir}/`);
  const want = [...new Set(paths.map((p) => path.resolve(p)))].filter((p) => under(p, '/tmp') || under(p, '/dev/shm'));
  const bad = want.find((p) => /[\s,]/.test(p));
  if (bad !== undefined) throw new UsageError(`the lab cannot show ${JSON.stringify(bad)} inside: a path under /tmp or /dev/shm with a space or comma`, 'run from a checkout whose path has neither (or outside /tmp)');
  return want.length === 0 ? '' : ` kvmmem.keep=${want.join(',')}`;
}

export interface Introspector {
  qemu: QemuProcess;
  virtiofsd: TrackedChild;
  runner: RunnerConnection;
  /** The runner's status lines (kernel, share, net, runner port, any "error ..." lines). */
  status: string[];
  /** The guest's address (udhcpc), if it got one. */
  ip: string | null;
  agentSocket: string | null;
  ms: { virtiofsd: number; ready: number };
  stop(): Promise<void>;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function startVirtiofsd(runDir: string, timeoutMs: number): Promise<{ child: TrackedChild; socket: string }> {
  const socket = path.join(runDir, 'virtiofs.sock');
  const mnt = path.join(runDir, 'share-root');
  fs.mkdirSync(mnt, { recursive: true });
  fs.rmSync(socket, { force: true });
  // The bind lives only in virtiofsd's private mount namespace: it goes away with it.
  // cache=always keeps file data cached (later `node -e` 0.26 s, vs ~2 s with cache=auto); timeout=1 bounds how
  // long the guest trusts a cached entry, so a file the host creates or changes is seen within a second
  // (with cache=always alone, a lookup that once failed kept failing for a day).
  const script = 'mount --bind / "$1" && mount -o remount,bind,ro "$1" && exec "$2" --socket-path="$3" -o source="$1" -o sandbox=chroot -o cache=always -o timeout=1';
  const child = spawnTracked('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', mnt, VIRTIOFSD, socket], {
    logPath: path.join(runDir, 'virtiofsd.log'), files: [socket],
  });
  const deadline = Date.now() + timeoutMs;
  while (!fs.existsSync(socket)) {
    if (child.exited() || Date.now() > deadline) {
      const log = fs.readFileSync(path.join(runDir, 'virtiofsd.log'), 'utf8');
      await child.stop();
      throw new LabError(child.exited() ? 'ELAB_BOOT' : 'ETIMEDOUT', `virtiofsd ${child.exited() ? `exited (${child.exitDescription()})` : `made no socket within ${timeoutMs} ms`}: ${log.trim()}`);
    }
    await sleep(20);
  }
  return { child, socket };
}

export async function bootIntrospector(o: IntrospectorOptions): Promise<Introspector> {
  const t0 = performance.now();
  const initrd = introspectorInitrd();
  const kernel = path.join(liveTargetDir(), 'vmlinuz');
  const { child: virtiofsd, socket: vfsSocket } = await startVirtiofsd(o.runDir, Math.min(o.timeoutMs, 15_000));
  const tVfs = performance.now() - t0;

  const runnerSocket = path.join(o.runDir, 'runner.sock');
  const agentSocket = o.agent ? path.join(o.runDir, 'agent.sock') : null;
  const ivsSocket = path.join(o.runDir, 'ivshmem.sock');
  const env: NodeJS.ProcessEnv = { ...process.env };
  const extra: string[] = [];
  if (o.agent) {
    Object.assign(env, {
      LD_PRELOAD: o.agent, KVMMEM_AGENT_SOCKET: agentSocket!, KVMMEM_AGENT_RAM: o.ramPath,
      KVMMEM_AGENT_IVSHMEM: ivsSocket, KVMMEM_AGENT_MAILBOX: o.mailboxPath,
    });
    extra.push('-chardev', `socket,path=${ivsSocket},id=ivs`, '-device', 'ivshmem-doorbell,chardev=ivs,vectors=1');
  }
  let qemu: QemuProcess;
  try {
    fs.rmSync(o.ramPath, { force: true });
    qemu = spawnQemu({
      name: `introspector '${o.name}'`,
      args: [
        '-accel', 'tcg', '-smp', '1', '-m', `${o.memMb}M`,
        '-object', `memory-backend-file,id=ram,size=${o.memMb}M,mem-path=${o.ramPath},share=on`,
        '-machine', 'q35,memory-backend=ram', '-nodefaults', '-display', 'none', '-no-reboot',
        '-kernel', kernel, '-initrd', initrd, '-append', `console=ttyS0 panic=-1${keepArg(o.keep ?? [])}`,
        '-chardev', `socket,id=vfs,path=${vfsSocket}`, '-device', 'vhost-user-fs-pci,chardev=vfs,tag=hostroot',
        '-netdev', `user,id=n,hostfwd=tcp:127.0.0.1:${o.port}-:${o.port}`, '-device', 'virtio-net-pci,netdev=n',
        '-device', 'virtio-serial-pci',
        '-chardev', `socket,id=run,path=${runnerSocket},server=on,wait=off`, '-device', `virtserialport,chardev=run,name=${RUNNER_PORT_NAME}`,
        ...extra,
      ],
      env,
      consolePath: path.join(o.runDir, 'intro.console.log'), qmpPath: path.join(o.runDir, 'intro.qmp'),
      pidPath: path.join(o.runDir, 'intro.pid'), logPath: path.join(o.runDir, 'intro.qemu.log'),
      files: [o.ramPath, runnerSocket, ivsSocket, ...(agentSocket ? [agentSocket] : []), ...(o.agent ? [o.mailboxPath] : [])],
    });
  } catch (e) {
    await virtiofsd.stop();
    throw e;
  }
  let runner: RunnerConnection | undefined;
  const stop = async () => {
    runner?.close();
    await qemu.stop();
    await virtiofsd.stop();
    fs.rmSync(path.join(o.runDir, 'share-root'), { recursive: true, force: true });
  };
  const dead = () => (qemu.exited() ? `QEMU exited (${qemu.exitDescription()})` : virtiofsd.exited() ? `virtiofsd exited (${virtiofsd.exitDescription()})` : null);
  try {
    const deadline = Date.now() + o.timeoutMs;
    runner = await RunnerConnection.connect(runnerSocket, `introspector '${o.name}'`, o.timeoutMs, dead);
    const hello = await runner.hello(Math.max(1000, deadline - Date.now()), dead);
    const status = hello.split('\n').filter((l) => l.length > 0);
    const ip = status.map((l) => /^net (\S+)/.exec(l)?.[1]).find((x) => x !== undefined) ?? null;
    if (!status.some((l) => l.startsWith('share '))) {
      throw new LabError('ELAB_BOOT', `introspector '${o.name}': the share did not mount: ${status.filter((l) => l.startsWith('error')).join('; ') || hello}`);
    }
    return { qemu, virtiofsd, runner, status, ip, agentSocket, ms: { virtiofsd: tVfs, ready: performance.now() - t0 }, stop };
  } catch (e) {
    const tail = qemu.consoleText().split('\n').slice(-25).join('\n');
    const log = (() => { try { return fs.readFileSync(path.join(o.runDir, 'intro.qemu.log'), 'utf8'); } catch { return ''; } })();
    await stop();
    if (e instanceof LabError) throw new LabError(e.code, `${e.message}\nqemu log:\n${log}\nconsole tail:\n${tail}`);
    throw e;
  }
}

