/**
 * What `kvmmem scan|read|translate` work on: a guest RAM file through the
 * model stack (`--ram FILE`), or a real deployment (`--listen ADDR`): the
 * tool listens, the device manager of `--vm` connects and handshakes, and
 * pages are mapped through `--device` (/dev/kvmmem), as in any tool built on
 * the library. Both give a Session and a Vm; the commands cannot tell them apart.
 */
import { Option, type Command } from 'commander';
import { IntrospectionServer, formatAddress, type BoundAddress, type ListenAddress, type RejectedInfo, type Vm, type VmFilter } from '../channel/index.js';
import { KvmMem } from '../client/kvmmem.js';
import type { Session } from '../client/session.js';
import type { Device } from '../device/device.js';
import { KvmmemError } from '../errors.js';
import { CliUsageError, openRam, parseCount, resolveCookie } from './common.js';

/** The environment variable that gives --listen its default. */
export const LISTEN_ENV = 'KVMMEM_LISTEN';
export const DEFAULT_WAIT_MS = 30_000;

/**
 * `unix:PATH`, `vsock:PORT` or `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6,
 * `tcp:PORT` for 127.0.0.1). `from` names the source in errors.
 */
export function parseListen(v: string, from = '--listen'): ListenAddress {
  const m = /^(unix|vsock|tcp):(.+)$/.exec(v);
  if (m?.[1] === 'unix') return { unix: m[2]! };
  if (m?.[1] === 'vsock' && /^\d+$/.test(m[2]!) && Number(m[2]) <= 0xffffffff) return { vsock: Number(m[2]) };
  if (m?.[1] === 'tcp') {
    const t = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d+)$/.exec(m[2]!) ?? /^()()(\d+)$/.exec(m[2]!);
    const port = t === null ? NaN : Number(t[3]);
    if (t !== null && port <= 65535) {
      const host = t[1] || t[2] || undefined;
      return { tcp: host === undefined ? { port } : { host, port } };
    }
  }
  throw new CliUsageError(`${from} '${v}': expected unix:PATH, vsock:PORT or tcp:HOST:PORT (port 0..65535)`);
}

/** --listen as given, else $KVMMEM_LISTEN, else undefined. */
export function listenOf(o: { listen?: string }, env: NodeJS.ProcessEnv = process.env): ListenAddress | undefined {
  if (o.listen !== undefined) return parseListen(o.listen);
  const e = env[LISTEN_ENV];
  if (e !== undefined && e !== '') return parseListen(e, LISTEN_ENV);
  return undefined;
}

/** `--vm` as a waitForVm filter: a UUID (8-4-4-4-12 hex) or a name. */
export function vmFilterOf(v: string | undefined): VmFilter {
  if (v === undefined) return {};
  if (v === '') throw new CliUsageError('--vm must not be empty');
  return /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(v) ? { uuid: v } : { name: v };
}

export interface Target {
  kind: 'ram' | 'deployment';
  session: Session;
  vm: Vm;
  /** One past the last guest-physical byte, when known: a RAM file's size, a deployment's KVMI_GET_MAX_GFN; else null. */
  end: bigint | null;
  /** What the command works on, for messages: the RAM file or 'VM name (uuid) via /dev/kvmmem'. */
  label: string;
  close(): Promise<void>;
}

export interface DeploymentOptions {
  /** The device path (probed: a path that is not kvmmem fails before any waiting), or an opener (an embedding, the tests: a model host's device). */
  device: string | (() => Device);
  listen: ListenAddress;
  cookie: string;
  /** The VM to wait for (default: the first to connect). */
  vm?: VmFilter;
  waitMs?: number;
  socketMode?: number;
  allowUids?: readonly number[];
  /** Called once the tool listens (with the bound address: a TCP port 0 is resolved here). */
  onListening?: (address: BoundAddress) => void;
}

/**
 * Opens the device, listens, and waits (bounded) for the VM's device manager
 * to connect. The error after waitMs names the VM, the address, the wait,
 * and why connections were refused if any were (a wrong cookie shows up so).
 */
export async function openDeployment(o: DeploymentOptions): Promise<Target> {
  const waitMs = o.waitMs ?? DEFAULT_WAIT_MS;
  // The device first: no device or not kvmmem is known at once, not after the wait.
  const session = typeof o.device === 'string' ? KvmMem.open({ device: o.device }) : KvmMem.open({ binding: o.device() });
  const deviceLabel = typeof o.device === 'string' ? o.device : 'the given device';
  let server: IntrospectionServer;
  try {
    server = await IntrospectionServer.listen(o.listen, {
      cookie: o.cookie, ...(o.socketMode === undefined ? {} : { mode: o.socketMode }), ...(o.allowUids === undefined ? {} : { allowUids: o.allowUids }),
    });
  } catch (e) {
    session.close();
    throw e;
  }
  const rejected: RejectedInfo[] = [];
  const onRejected = (i: RejectedInfo) => { rejected.push(i); };
  server.on('rejected', onRejected);
  const where = formatAddress(server.address!);
  const filter = o.vm ?? {};
  const what = filter.uuid !== undefined ? `VM ${filter.uuid}` : filter.name !== undefined ? `VM ${JSON.stringify(filter.name)}` : 'a VM';
  let vm: Vm;
  try {
    o.onListening?.(server.address!);
    vm = await server.waitForVm(filter, waitMs);
  } catch (e) {
    session.close();
    await server.close();
    if (!(e instanceof KvmmemError) || e.code !== 'ETIMEDOUT') throw e;
    const last = rejected.at(-1);
    throw new KvmmemError(`waited ${waitMs} ms on ${where} for ${what} to connect: none did${rejected.length === 0 ? '' : `; ${rejected.length} connection(s) refused, the last: ${last!.reason}`}`, {
      code: 'ETIMEDOUT', errno: e.errno ?? -110, syscall: 'waitForVm',
      hint: `point the VM's device manager at ${where} with the same cookie${filter.name === undefined && filter.uuid === undefined ? '' : ', and check --vm'}; --wait-ms waits longer`,
    });
  }
  server.off('rejected', onRejected);
  // KVMI_GET_MAX_GFN where the host answers it (v6); a v4 host or a refusal leaves the end unknown (--to then required).
  let end: bigint | null = null;
  try {
    end = await vm.memorySize();
  } catch {
    end = null;
  }
  return {
    kind: 'deployment', session, vm, end, label: `VM ${vm.name} (${vm.uuid}) via ${deviceLabel}`,
    async close() {
      session.close();
      await server.close();
    },
  };
}

/** The options every command on a target shares; see targetOf(). */
export function targetOptions(cmd: Command): Command {
  return cmd
    .option('--ram <file>', 'guest RAM: a QEMU memory-backend-file (share=on) or a raw image, through the built-in model')
    .option('--listen <address>', `a real deployment: listen for the VM's device manager on unix:PATH, vsock:PORT or tcp:HOST:PORT (default $${LISTEN_ENV})`)
    .option('--device <path>', 'with --listen: the kvmmem device', '/dev/kvmmem')
    .option('--vm <name|uuid>', 'with --listen: the VM to introspect (default: the first that connects)')
    .option('--wait-ms <ms>', 'with --listen: how long to wait for that VM to connect', (v) => parseCount(v), DEFAULT_WAIT_MS)
    .addOption(new Option('--cookie <text>', 'with --listen: the KVMI cookie (visible in ps: prefer --cookie-file or KVMMEM_COOKIE)').conflicts('cookieFile'))
    .option('--cookie-file <path>', 'with --listen: read the KVMI cookie from a file');
}

export interface TargetArgs {
  ram?: string;
  listen?: string;
  device: string;
  vm?: string;
  waitMs: number;
  cookie?: string;
  cookieFile?: string;
}

/**
 * --ram FILE or --listen ADDR (or $KVMMEM_LISTEN when --ram is not given);
 * both or neither is a usage error. `say` reports the wait.
 */
export async function targetOf(o: TargetArgs, say: (line: string) => void): Promise<Target> {
  if (o.ram !== undefined && o.listen !== undefined) throw new CliUsageError('give --ram FILE or --listen ADDRESS, not both');
  if (o.ram !== undefined) {
    const ram = await openRam(o.ram);
    return { kind: 'ram', session: ram.session, vm: ram.vm, end: ram.end, label: o.ram, close: () => ram.close() };
  }
  const listen = listenOf(o);
  if (listen === undefined) throw new CliUsageError(`give --ram FILE (a RAM file, through the model) or --listen ADDRESS (a real deployment; or set ${LISTEN_ENV})`);
  const cookie = resolveCookie(o);
  const vm = vmFilterOf(o.vm);
  return openDeployment({
    device: o.device, listen, cookie, vm, waitMs: o.waitMs,
    onListening: (a) => say(`waiting up to ${o.waitMs} ms on ${formatAddress(a)} for ${o.vm === undefined ? 'a VM' : `VM ${o.vm}`} to connect ...`),
  });
}

/** Runs `body` on a target and always tears it down after. */
export async function withTarget<T>(o: TargetArgs, say: (line: string) => void, body: (t: Target) => Promise<T>): Promise<T> {
  const target = await targetOf(o, say);
  try {
    return await body(target);
  } finally {
    await target.close();
  }
}
