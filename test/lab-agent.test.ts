// The lab agent (native/lab/): a shared object LD_PRELOADed into an
// *introspector's* QEMU that remaps guest-physical pages of that QEMU's RAM
// file to pages of another file, as a real KVMI host's mm_remote_map() does.
//
// One VM boot: the live-target kernel with a test initramfs whose probe
// (native/lab/test/probe.c) mlocks a page, prints its PFN and reports on the
// console every change it sees in that page. The test drives the agent's
// control socket (protocol: native/lab/kvmmem_agent.h) and checks what the
// guest sees. Skipped, with the provisioning command, when QEMU, the
// provisioned kernel or gcc are missing.
import test from 'ava';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ERRNO } from '../src/abi/errno.js';
import { liveTargetAvailable, liveTargetDir, PROVISION_COMMAND } from '../src/live/target.js';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const HEADER = path.join(ROOT, 'native', 'lab', 'kvmmem_agent.h');
const PAGE = 4096;
const MEM_MB = 256;
const TARGET_PAGES = 64;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ------------------------------------------------------------ protocol (from the header: one source)

function headerConstants(): Map<string, number> {
  const text = fs.readFileSync(HEADER, 'utf8');
  const out = new Map<string, number>();
  for (const m of text.matchAll(/^#define KVMMEM_AGENT_(\w+) (0x[0-9a-f]+|\d+)u?\b/gim)) out.set(m[1]!, Number(m[2]));
  const en = /enum kvmmem_agent_op \{([\s\S]*?)\};/.exec(text);
  if (!en) throw new Error(`no enum kvmmem_agent_op in ${HEADER}`);
  for (const m of en[1]!.matchAll(/KVMMEM_AGENT_(\w+) = (0x[0-9a-f]+|\d+)/gi)) out.set(m[1]!, Number(m[2]));
  return out;
}
const K = headerConstants();
const k = (name: string): number => {
  const v = K.get(name);
  if (v === undefined) throw new Error(`KVMMEM_AGENT_${name} not in ${HEADER}`);
  return v;
};
const OP = {
  INFO: k('INFO'), ATTACH_FD: k('ATTACH_FD'), ATTACH_PATH: k('ATTACH_PATH'), DETACH: k('DETACH'), MAP: k('MAP'),
  RESTORE: k('RESTORE'), FRESH: k('FRESH'), RESTORE_ALL: k('RESTORE_ALL'), STATS: k('STATS'),
  DOORBELL_FDS: k('DOORBELL_FDS'), SUBSCRIBE: k('SUBSCRIBE'), RING: k('RING'), EVENT: k('EVENT'),
};
const MAGIC = k('MAGIC');
const F_EVENT = k('F_EVENT');

interface Req { op: number; flags?: number; target?: number; gpa?: bigint; offset?: bigint; npages?: bigint; reserved?: number; payload?: Buffer; len?: number }
interface Resp { magic: number; op: number; flags: number; seq: number; status: number; v: bigint[] }

function packReq(q: Req, seq: number): Buffer {
  const payload = q.payload ?? Buffer.alloc(0);
  const b = Buffer.alloc(48);
  b.writeUInt32LE(MAGIC, 0);
  b.writeUInt16LE(q.op, 4);
  b.writeUInt16LE(q.flags ?? 0, 6);
  b.writeUInt32LE(seq, 8);
  b.writeUInt32LE(q.target ?? 0, 12);
  b.writeBigUInt64LE(q.gpa ?? 0n, 16);
  b.writeBigUInt64LE(q.offset ?? 0n, 24);
  b.writeBigUInt64LE(q.npages ?? 0n, 32);
  b.writeUInt32LE(q.len ?? payload.length, 40);
  b.writeUInt32LE(q.reserved ?? 0, 44);
  return Buffer.concat([b, payload]);
}

function parseResp(b: Buffer): Resp {
  return {
    magic: b.readUInt32LE(0), op: b.readUInt16LE(4), flags: b.readUInt16LE(6), seq: b.readUInt32LE(8), status: b.readInt32LE(12),
    v: [b.readBigUInt64LE(16), b.readBigUInt64LE(24), b.readBigUInt64LE(32), b.readBigUInt64LE(40)],
  };
}

/** A minimal client of the control socket (the library's own client lives in src/lab/). */
class AgentConn {
  private buf = Buffer.alloc(0);
  private queue: Resp[] = [];
  private events: Resp[] = [];
  private wake: (() => void) | null = null;
  private seq = 0;
  closed = false;
  private constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      while (this.buf.length >= 48) {
        const r = parseResp(this.buf.subarray(0, 48));
        this.buf = this.buf.subarray(48);
        (r.flags & F_EVENT ? this.events : this.queue).push(r);
      }
      this.kick();
    });
    sock.on('close', () => { this.closed = true; this.kick(); });
    sock.on('error', () => { /* seen as close */ });
  }
  private kick() { const w = this.wake; this.wake = null; w?.(); }
  static connect(p: string, timeoutMs = 5000): Promise<AgentConn> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(p);
      const t = setTimeout(() => { s.destroy(); reject(new Error(`timed out after ${timeoutMs} ms connecting to the agent at ${p}`)); }, timeoutMs);
      s.once('connect', () => { clearTimeout(t); resolve(new AgentConn(s)); });
      s.once('error', (e) => { clearTimeout(t); reject(e); });
    });
  }
  private async until<T>(take: () => T | undefined, what: string, timeoutMs: number): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = take();
      if (v !== undefined) return v;
      if (this.closed) throw new Error(`connection closed while waiting for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((r) => { const t = setTimeout(r, left); this.wake = () => { clearTimeout(t); r(); }; });
    }
  }
  write(raw: Buffer) { this.sock.write(raw); }
  send(q: Req): number { const s = ++this.seq; this.sock.write(packReq(q, s)); return s; }
  response(what: string, timeoutMs = 5000): Promise<Resp> { return this.until(() => this.queue.shift(), what, timeoutMs); }
  event(timeoutMs: number): Promise<Resp> { return this.until(() => this.events.shift(), 'a doorbell EVENT', timeoutMs); }
  async call(q: Req, timeoutMs = 5000): Promise<Resp> {
    const s = this.send(q);
    const r = await this.response(`the response to op ${q.op} (seq ${s})`, timeoutMs);
    if (r.magic !== MAGIC || r.seq !== s || r.op !== q.op) throw new Error(`bad response ${JSON.stringify(r, (_, x) => (typeof x === 'bigint' ? x.toString() : x))} to op ${q.op} seq ${s}`);
    return r;
  }
  async waitClosed(timeoutMs: number, what: string) { await this.until(() => (this.closed ? true : undefined), what, timeoutMs).catch((e) => { if (!this.closed) throw e; }); }
  close() { this.sock.destroy(); }
}

// ------------------------------------------------------------ availability and build

type Tools = { agent: string; agentctl: string; initrd: string };
function prepare(): { ok: true; tools: Tools } | { ok: false; reason: string } | { ok: 'error'; error: string } {
  const live = liveTargetAvailable();
  if (!live.ok) return { ok: false, reason: live.reason };
  if (spawnSync('gcc', ['--version']).status !== 0) return { ok: false, reason: 'gcc not found (the agent is built with the system gcc)' };
  try {
    const out = execFileSync('bash', [path.join(ROOT, 'scripts', 'lab', 'build-agent.sh'), '--probe'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    const get = (key: string) => {
      const m = new RegExp(`^${key}=(.*)$`, 'm').exec(out);
      if (!m) throw new Error(`build-agent.sh printed no ${key}=: ${out}`);
      return m[1]!;
    };
    return { ok: true, tools: { agent: get('AGENT'), agentctl: get('AGENTCTL'), initrd: get('PROBE_INITRD') } };
  } catch (e: any) {
    return { ok: 'error', error: `scripts/lab/build-agent.sh --probe failed: ${e.stderr ?? e.message}` };
  }
}
const prep = prepare();

// ------------------------------------------------------------ the VM

interface Lab {
  qemu: ChildProcess; pid: number; dir: string; sock: string; ivs: string; ram: string; target: string; mbox: string;
  console: string; qemuLog: string; pfns: bigint[]; bootMs: number; ramBase: bigint; cursor: number; targetFd: number;
}
let lab: Lab | undefined;

function consoleText(l: Lab): string { try { return fs.readFileSync(l.console, 'latin1').replace(/\r/g, ''); } catch { return ''; } }

/** Wait for `re` on the console after everything matched so far; returns the match. */
async function waitConsole(l: Lab, re: RegExp, what: string, timeoutMs = 15000): Promise<RegExpExecArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = consoleText(l);
    const g = new RegExp(re.source, re.flags.includes('g') ? re.flags : re.flags + 'g');
    g.lastIndex = l.cursor;
    const m = g.exec(text);
    if (m) { l.cursor = m.index + m[0].length; return m; }
    if (l.qemu.exitCode !== null || l.qemu.signalCode !== null) throw new Error(`QEMU exited (${l.qemu.exitCode ?? l.qemu.signalCode}) while waiting for ${what}; qemu log: ${fs.readFileSync(l.qemuLog, 'utf8')}`);
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (${re}); console tail:\n${text.slice(-1500)}`);
    await sleep(20);
  }
}

function writeTarget(l: Lab, page: number, off: number, data: Buffer) { fs.writeSync(l.targetFd, data, 0, data.length, page * PAGE + off); }
function readTarget(l: Lab, page: number, off: number, len: number): Buffer { const b = Buffer.alloc(len); fs.readSync(l.targetFd, b, 0, len, page * PAGE + off); return b; }
function cmd(seq: number, verb: string): Buffer { const b = Buffer.alloc(16); b.write('CMD:', 0, 'latin1'); b.writeUInt32LE(seq, 4); b.write(verb, 8, 'latin1'); return b; }
/** What QEMU's own address space holds at guest-physical `gpa` (what the guest sees). */
function qemuView(l: Lab, gpa: bigint, len: number): Buffer {
  const fd = fs.openSync(`/proc/${l.pid}/mem`, 'r');
  try { const b = Buffer.alloc(len); fs.readSync(fd, b, 0, len, Number(l.ramBase + gpa)); return b; } finally { fs.closeSync(fd); }
}
function ramVmas(l: Lab): number { return fs.readFileSync(`/proc/${l.pid}/maps`, 'utf8').split('\n').filter((x) => x.endsWith(` ${l.ram}`)).length; }
function fdCount(pid: number): number { return fs.readdirSync(`/proc/${pid}/fd`).length; }
function alive(l: Lab): boolean { return l.qemu.exitCode === null && l.qemu.signalCode === null; }
function agentctl(args: string[]): string {
  if (prep.ok !== true) throw new Error('no tools');
  return execFileSync(prep.tools.agentctl, args, { encoding: 'utf8', timeout: 30000 });
}
const E = (name: string) => -ERRNO[name]!;

async function boot(tools: Tools): Promise<Lab> {
  const name = `kvmmem-labagent-${process.pid}`;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmmem-lab-'));
  const ram = `/dev/shm/${name}.ram`, target = `/dev/shm/${name}.target`, mbox = `/dev/shm/${name}.mbox`;
  const sock = path.join(dir, 'agent.sock'), ivs = path.join(dir, 'ivs.sock');
  const consoleLog = path.join(dir, 'console.log'), qemuLog = path.join(dir, 'qemu.log');
  // The "target RAM": a file whose page k starts with TARGET-PAGE-kkk.
  const tbuf = Buffer.alloc(TARGET_PAGES * PAGE, 0x33);
  for (let p = 0; p < TARGET_PAGES; p++) tbuf.write(`TARGET-PAGE-${String(p).padStart(3, '0')}.`, p * PAGE, 'latin1');
  fs.writeFileSync(target, tbuf);
  const logFd = fs.openSync(qemuLog, 'w');
  const started = Date.now();
  const qemu = spawn('qemu-system-x86_64', [
    '-accel', 'tcg', '-smp', '1', '-m', `${MEM_MB}M`,
    '-object', `memory-backend-file,id=ram,size=${MEM_MB}M,mem-path=${ram},share=on`,
    '-machine', 'q35,memory-backend=ram', '-nodefaults', '-display', 'none', '-no-reboot',
    '-kernel', path.join(liveTargetDir(), 'vmlinuz'), '-initrd', tools.initrd, '-append', 'console=ttyS0 panic=-1',
    '-chardev', `socket,path=${ivs},id=ivs`, '-device', 'ivshmem-doorbell,chardev=ivs,vectors=1',
    '-serial', `file:${consoleLog}`,
  ], {
    stdio: ['ignore', logFd, logFd],
    env: { ...process.env, LD_PRELOAD: tools.agent, KVMMEM_AGENT_SOCKET: sock, KVMMEM_AGENT_RAM: ram, KVMMEM_AGENT_IVSHMEM: ivs, KVMMEM_AGENT_MAILBOX: mbox },
  });
  fs.closeSync(logFd);
  const l: Lab = { qemu, pid: qemu.pid!, dir, sock, ivs, ram, target, mbox, console: consoleLog, qemuLog, pfns: [], bootMs: 0, ramBase: 0n, cursor: 0, targetFd: fs.openSync(target, 'r+') };
  lab = l;
  const m = await waitConsole(l, /PROBE pfns ([0-9a-f,]+)\n/, 'the probe\'s PFNs', 60000);
  l.bootMs = Date.now() - started;
  l.pfns = m[1]!.split(',').map((x) => BigInt(`0x${x}`));
  await waitConsole(l, /PROBE pfn [0-9a-f]+\n/, 'the probe\'s ready line');
  const line = fs.readFileSync(`/proc/${l.pid}/maps`, 'utf8').split('\n').find((x) => x.endsWith(` ${ram}`) && x.split(/\s+/)[2] === '00000000');
  if (!line) throw new Error(`no mapping of ${ram} at offset 0 in QEMU's maps`);
  l.ramBase = BigInt(`0x${line.split('-')[0]}`);
  return l;
}

async function shutdown() {
  const l = lab;
  if (!l) return;
  lab = undefined;
  if (alive(l)) {
    l.qemu.kill('SIGKILL');
    await new Promise<void>((r) => { if (!alive(l)) r(); else { const t = setTimeout(r, 10000); l.qemu.once('exit', () => { clearTimeout(t); r(); }); } });
  }
  try { fs.closeSync(l.targetFd); } catch { /* closed */ }
  for (const f of [l.ram, l.target, l.mbox]) fs.rmSync(f, { force: true });
  fs.rmSync(l.dir, { recursive: true, force: true });
}

// ------------------------------------------------------------ tests

if (prep.ok === false) {
  console.warn(`lab-agent tests skipped: ${prep.reason}; provision with: ${PROVISION_COMMAND}`);
  test.skip(`lab agent: skipped (${prep.reason}; provision with: ${PROVISION_COMMAND})`, (t) => { t.pass(); });
} else if (prep.ok === 'error') {
  test('lab agent: builds', (t) => { t.fail(prep.error); });
} else {
  const tools = prep.tools;
  test.before(async () => { await boot(tools); });
  test.after.always(shutdown);

  test.serial('lab agent: inert in a process that is not QEMU (a wrapper keeps the environment and takes no socket)', (t) => {
    const sock = path.join(os.tmpdir(), `kvmmem-inert-${process.pid}.sock`);
    const r = spawnSync('/bin/sh', ['-c', 'echo "env=$KVMMEM_AGENT_SOCKET"; [ -e "$KVMMEM_AGENT_SOCKET" ] && echo exists || echo absent'], {
      encoding: 'utf8', timeout: 10000, env: { ...process.env, LD_PRELOAD: tools.agent, KVMMEM_AGENT_SOCKET: sock },
    });
    t.is(r.status, 0, r.stderr);
    t.true(r.stdout.includes(`env=${sock}`), 'the variable survives for the QEMU the wrapper will exec');
    t.true(r.stdout.includes('absent'), 'no control socket created');
    t.false(fs.existsSync(sock));
  });

  test.serial('lab agent: MAP shows the target page in the guest, live both ways; RESTORE brings the original back; FRESH gives zeros', async (t) => {
    const l = lab!;
    t.log(`boot to the probe's PFN line: ${l.bootMs} ms; probe page pfn 0x${l.pfns[0]!.toString(16)}`);
    const c = await AgentConn.connect(l.sock);
    t.teardown(() => c.close());
    const info = await c.call({ op: OP.INFO });
    t.is(info.status, 0);
    t.deepEqual(info.v, [BigInt(k('VERSION')), BigInt(MEM_MB * 1024 * 1024), 1n, BigInt(PAGE)]);

    // Attach by SCM_RIGHTS (the C client) and by path; ids are distinct and nonzero.
    const m = /^id=(\d+) size=(\d+)$/m.exec(agentctl([l.sock, 'attach-fd', l.target]));
    t.truthy(m, 'attach-fd prints id= size=');
    const tid = Number(m![1]);
    t.is(Number(m![2]), TARGET_PAGES * PAGE);
    const byPath = await c.call({ op: OP.ATTACH_PATH, payload: Buffer.from(l.target) });
    t.is(byPath.status, 0);
    t.not(Number(byPath.v[0]), tid);
    t.is((await c.call({ op: OP.DETACH, target: Number(byPath.v[0]) })).status, 0);
    t.is((await c.call({ op: OP.DETACH, target: Number(byPath.v[0]) })).status, E('EBADF'), 'a detached id is gone');

    const gpa = l.pfns[0]! * BigInt(PAGE);
    const mp = await c.call({ op: OP.MAP, gpa, target: tid, offset: 5n * BigInt(PAGE), npages: 1n });
    t.is(mp.status, 0);
    t.is(mp.v[0], 1n);
    await waitConsole(l, /PROBE see hex=\w+ text=TARGET-PAGE-005\.\n/, 'the guest to see target page 5');
    t.pass('guest sees the target page');

    writeTarget(l, 5, 0, Buffer.from('HOST-LIVE-WRITE1'));
    await waitConsole(l, /PROBE see hex=\w+ text=HOST-LIVE-WRITE1\n/, 'the guest to see the host\'s write into the target file');

    writeTarget(l, 5, 64, cmd(1, 'WRITE___'));
    await waitConsole(l, /PROBE wrote 1\n/, 'the guest to write into the mapped page');
    t.is(readTarget(l, 5, 2048, 14).toString('latin1'), 'GUEST-WROTE-1\0', 'the guest\'s write reached the target file');
    t.is(fs.readFileSync(l.ram).subarray(Number(gpa), Number(gpa) + 16).toString('latin1'), 'PROBE-ORIGINAL-A', 'the RAM file keeps the original page meanwhile');

    let st = await c.call({ op: OP.STATS });
    t.is(st.v[0], 1n, 'one page mapped');
    t.is(st.v[1], 0n, 'no fresh page');
    t.is(st.v[2], 1n, 'one target attached');

    const rs = await c.call({ op: OP.RESTORE, gpa, npages: 1n });
    t.is(rs.status, 0);
    t.is(rs.v[0], 1n);
    await waitConsole(l, /PROBE see hex=\w+ text=PROBE-ORIGINAL-A\n/, 'the guest to see its original page again');
    t.is((await c.call({ op: OP.RESTORE, gpa, npages: 1n })).v[0], 0n, 'restoring an original page does nothing');

    t.is((await c.call({ op: OP.FRESH, gpa, npages: 1n })).status, 0);
    await waitConsole(l, /PROBE see hex=0{32} text=\.{16}\n/, 'the guest to see a zeroed page');
    st = await c.call({ op: OP.STATS });
    t.is(st.v[1], 1n, 'one fresh page');
    t.is((await c.call({ op: OP.RESTORE, gpa, npages: 1n })).v[0], 1n);
    await waitConsole(l, /PROBE see hex=\w+ text=PROBE-ORIGINAL-A\n/, 'the original after FRESH + RESTORE');
    t.is(ramVmas(l), 1, 'restored pages merge back into QEMU\'s single RAM VMA');

    // A run of two adjacent guest-physical pages of the probe.
    const sorted = [...l.pfns.slice(1)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const lo = sorted.find((p, i) => sorted[i + 1] === p + 1n);
    if (lo === undefined) {
      t.log(`no two adjacent PFNs among the probe's pages (${l.pfns.map((p) => p.toString(16))}); run MAP not exercised`);
    } else {
      const rgpa = lo * BigInt(PAGE);
      const before = qemuView(l, rgpa, PAGE * 2);
      t.true(before.subarray(0, 12).toString('latin1').startsWith('PROBE-EXTRA-'), 'QEMU sees the probe\'s page');
      t.is((await c.call({ op: OP.MAP, gpa: rgpa, target: tid, offset: 10n * BigInt(PAGE), npages: 2n })).status, 0);
      t.is(qemuView(l, rgpa, 16).toString('latin1'), 'TARGET-PAGE-010.');
      t.is(qemuView(l, rgpa + BigInt(PAGE), 16).toString('latin1'), 'TARGET-PAGE-011.');
      t.true(ramVmas(l) > 1, 'the run is a separate VMA while mapped');
      const busy = await c.call({ op: OP.DETACH, target: tid });
      t.is(busy.status, E('EBUSY'), 'a target with mapped pages cannot be detached');
      t.is(busy.v[0], 2n);
      const all = await c.call({ op: OP.RESTORE_ALL });
      t.is(all.status, 0);
      t.is(all.v[0], 2n);
      t.deepEqual(qemuView(l, rgpa, PAGE * 2), before, 'RESTORE_ALL puts the original pages back');
      t.is(ramVmas(l), 1);
    }
    st = await c.call({ op: OP.STATS });
    t.deepEqual([st.v[0], st.v[1]], [0n, 0n]);
  });

  test.serial('lab agent: bad requests get error replies; QEMU, the guest and the agent keep running; no fd leaks', async (t) => {
    const l = lab!;
    const c = await AgentConn.connect(l.sock);
    t.teardown(() => c.close());
    t.is((await c.call({ op: OP.INFO })).status, 0); // the RAM fd is taken on a first request
    const fds0 = fdCount(l.pid);
    const att = await c.call({ op: OP.ATTACH_PATH, payload: Buffer.from(l.target) });
    t.is(att.status, 0);
    const tid = Number(att.v[0]);
    const RAM = BigInt(MEM_MB * 1024 * 1024), P = BigInt(PAGE), FILE = BigInt(TARGET_PAGES * PAGE);
    const gpa = l.pfns[0]! * P;
    const cases: Array<[string, Req, string]> = [
      ['unaligned gpa', { op: OP.MAP, gpa: gpa + 1n, target: tid, npages: 1n }, 'EINVAL'],
      ['unaligned offset', { op: OP.MAP, gpa, target: tid, offset: 100n, npages: 1n }, 'EINVAL'],
      ['zero pages', { op: OP.MAP, gpa, target: tid, npages: 0n }, 'EINVAL'],
      ['absurd run length', { op: OP.MAP, gpa, target: tid, npages: 1n << 60n }, 'EINVAL'],
      ['gpa at the end of RAM', { op: OP.MAP, gpa: RAM, target: tid, npages: 1n }, 'ERANGE'],
      ['run crossing the end of RAM', { op: OP.MAP, gpa: RAM - P, target: tid, npages: 2n }, 'ERANGE'],
      ['gpa far outside RAM', { op: OP.FRESH, gpa: 1n << 63n, npages: 1n }, 'ERANGE'],
      ['offset at the end of the target file', { op: OP.MAP, gpa, target: tid, offset: FILE, npages: 1n }, 'ENXIO'],
      ['run crossing the end of the target file', { op: OP.MAP, gpa, target: tid, offset: FILE - P, npages: 2n }, 'ENXIO'],
      ['offset near 2^64', { op: OP.MAP, gpa, target: tid, offset: (1n << 64n) - P, npages: 2n }, 'ENXIO'],
      ['unknown target id', { op: OP.MAP, gpa, target: 9999, npages: 1n }, 'EBADF'],
      ['target id 0', { op: OP.DETACH, target: 0 }, 'EBADF'],
      ['unknown op', { op: 999 }, 'EOPNOTSUPP'],
      ['nonzero flags', { op: OP.STATS, flags: 1 }, 'EINVAL'],
      ['nonzero reserved', { op: OP.STATS, reserved: 7 }, 'EINVAL'],
      ['payload on an op without one', { op: OP.MAP, gpa, target: tid, npages: 1n, payload: Buffer.from('abcd') }, 'EINVAL'],
      ['attach a missing path', { op: OP.ATTACH_PATH, payload: Buffer.from('/nonexistent/kvmmem') }, 'ENOENT'],
      ['attach a directory', { op: OP.ATTACH_PATH, payload: Buffer.from('/tmp') }, 'EISDIR'],
      ['attach a character device', { op: OP.ATTACH_PATH, payload: Buffer.from('/dev/null') }, 'EINVAL'],
      ['attach a path with a NUL', { op: OP.ATTACH_PATH, payload: Buffer.from(`${l.target}\0x`) }, 'EINVAL'],
      ['attach an empty path', { op: OP.ATTACH_PATH }, 'EINVAL'],
      ['ATTACH_FD without an fd', { op: OP.ATTACH_FD }, 'EBADF'],
      ['RESTORE with a target', { op: OP.RESTORE, gpa, npages: 1n, target: tid }, 'EINVAL'],
      ['RESTORE_ALL with arguments', { op: OP.RESTORE_ALL, npages: 1n }, 'EINVAL'],
      ['RING of a missing vector', { op: OP.RING, target: 5 }, 'EINVAL'],
    ];
    for (const [what, q, errno] of cases) {
      const r = await c.call(q);
      t.is(r.status, E(errno), `${what}: ${errno}`);
    }
    t.is((await c.call({ op: OP.INFO })).status, 0, 'the connection is still usable');

    // An fd on a request that takes none is closed and the request refused.
    t.regex(agentctl([l.sock, 'raw-fd', String(OP.STATS), l.target]), new RegExp(`^status=${E('EINVAL')} `, 'm'));

    // Pipelined requests (the batch mode): answered in order.
    const seqs = [c.send({ op: OP.INFO }), c.send({ op: OP.MAP, gpa: gpa + 1n, target: tid, npages: 1n }), c.send({ op: OP.STATS })];
    const rs = [await c.response('batch 1'), await c.response('batch 2'), await c.response('batch 3')];
    t.deepEqual(rs.map((r) => r.seq), seqs);
    t.deepEqual(rs.map((r) => r.status), [0, E('EINVAL'), 0]);

    // Framing errors: one answer, then the agent hangs up.
    const g = await AgentConn.connect(l.sock);
    g.write(Buffer.alloc(48, 0xff));
    t.is((await g.response('the answer to 48 garbage bytes')).status, E('EPROTO'));
    await g.waitClosed(5000, 'the agent to close a connection that sent garbage');
    t.true(g.closed);
    const big = await AgentConn.connect(l.sock);
    big.write(packReq({ op: OP.ATTACH_PATH, len: 5000 }, 1));
    t.is((await big.response('the answer to an oversized payload')).status, E('EMSGSIZE'));
    await big.waitClosed(5000, 'the agent to close after EMSGSIZE');

    // Clients that vanish mid-message (header, payload) or mid-response.
    for (const partial of [Buffer.alloc(7, 1), packReq({ op: OP.MAP }, 1).subarray(0, 20), packReq({ op: OP.ATTACH_PATH, len: 10 }, 1).subarray(0, 48 + 3)]) {
      const p = await AgentConn.connect(l.sock);
      p.write(partial);
      await sleep(50);
      p.close();
    }
    // A client that pipelines many requests and does not read: the agent
    // stops reading it (backpressure) but keeps serving everyone else.
    const slow = await AgentConn.connect(l.sock);
    slow.sock.pause();
    const many = Buffer.concat(Array.from({ length: 4000 }, (_, i) => packReq({ op: OP.INFO }, i + 1)));
    slow.write(many);
    await sleep(300);
    t.is((await c.call({ op: OP.STATS })).status, 0, 'another client is served while one does not read');
    slow.sock.resume();
    for (let i = 0; i < 4000; i++) await slow.response(`slow client's response ${i + 1}/4000`);
    t.pass('the non-reading client got all 4000 responses once it read');
    slow.close();

    // Still alive: QEMU runs, the guest sees a fresh MAP, nothing leaked.
    t.true(alive(l), 'QEMU is running');
    t.is((await c.call({ op: OP.MAP, gpa, target: tid, offset: 7n * P, npages: 1n })).status, 0);
    await waitConsole(l, /PROBE see hex=\w+ text=TARGET-PAGE-007\.\n/, 'the guest to see target page 7 after the bad requests');
    t.is((await c.call({ op: OP.RESTORE_ALL })).v[0], 1n);
    await waitConsole(l, /PROBE see hex=\w+ text=PROBE-ORIGINAL-A\n/, 'the original page again');
    t.is((await c.call({ op: OP.DETACH, target: tid })).status, 0);
    const deadline = Date.now() + 5000;
    while (fdCount(l.pid) !== fds0 && Date.now() < deadline) await sleep(50);
    t.is(fdCount(l.pid), fds0, `QEMU's fd count is back to ${fds0} (waited for the agent to close every connection and fd)`);
    t.is(consoleText(l).includes('PROBE exited'), false, 'the probe is still running');
  });

  test.serial('lab agent: ivshmem-doorbell: a guest doorbell reaches a subscriber and a DOORBELL_FDS holder; RING raises a vector', async (t) => {
    const l = lab!;
    const c = await AgentConn.connect(l.sock);
    t.teardown(() => c.close());
    t.is(consoleText(l).match(/PROBE ivshmem \S+ ivposition (\d+)/)?.[1], '1', 'the guest\'s doorbell device got its id from the agent (ivshmem server)');
    const att = await c.call({ op: OP.ATTACH_PATH, payload: Buffer.from(l.target) });
    const tid = Number(att.v[0]);
    const gpa = l.pfns[0]! * BigInt(PAGE);
    t.is((await c.call({ op: OP.SUBSCRIBE })).status, 0);
    writeTarget(l, 20, 64, cmd(2, 'RING____'));
    t.is((await c.call({ op: OP.MAP, gpa, target: tid, offset: 20n * BigInt(PAGE), npages: 1n })).status, 0);
    await waitConsole(l, /PROBE rang 2\n/, 'the guest to ring the doorbell');
    const ev = await c.event(10000);
    t.is(ev.op, OP.EVENT);
    t.is(ev.seq, 0);
    t.is(ev.v[0], 0n, 'vector 0');
    t.true(ev.v[1] >= 1n, 'at least one doorbell');
    t.is((await c.call({ op: OP.RING, target: 0 })).status, 0, 'RING of vector 0');

    // The raw eventfds by SCM_RIGHTS, once nobody subscribes.
    c.close();
    await sleep(100);
    const child = spawn(prep.ok === true ? prep.tools.agentctl : 'false', [l.sock, 'doorbell-wait', '20000'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.on('data', (d) => { out += d; });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    const d0 = Date.now();
    while (!out.includes('DOORBELL') && Date.now() - d0 < 10000) await sleep(20);
    t.regex(out, /DOORBELL vectors=1 qemu_peer=1 host_peer=0 shm_size=1048576/, 'fds and ids received');
    writeTarget(l, 20, 64, cmd(3, 'RING____'));
    await waitConsole(l, /PROBE rang 3\n/, 'the guest to ring again');
    t.is(await Promise.race([exited, sleep(15000).then(() => 'timeout')]), 0, 'doorbell-wait exits');
    t.regex(out, /RANG vector=0 count=\d+/, 'the eventfd holder saw the doorbell');
    const c2 = await AgentConn.connect(l.sock);
    t.is((await c2.call({ op: OP.RESTORE_ALL })).v[0], 1n);
    t.is((await c2.call({ op: OP.DETACH, target: tid })).status, 0);
    c2.close();
  });

  test.serial('lab agent: figures: round trips, QEMU and agent idle CPU (logged, not asserted)', async (t) => {
    const l = lab!;
    const tid = Number(/^id=(\d+)/m.exec(agentctl([l.sock, 'attach-fd', l.target]))![1]);
    const gpa = l.pfns[0]! * BigInt(PAGE);
    for (const line of agentctl([l.sock, 'bench', String(gpa), String(tid), '0', '2000']).trim().split('\n')) t.log(`C client: ${line}`);
    const c = await AgentConn.connect(l.sock);
    t.teardown(() => c.close());
    const times: number[] = [];
    for (let i = 0; i < 500; i++) {
      const t0 = process.hrtime.bigint();
      const a = await c.call({ op: OP.MAP, gpa, target: tid, npages: 1n });
      const b = await c.call({ op: OP.FRESH, gpa, npages: 1n });
      times.push(Number(process.hrtime.bigint() - t0) / 1000);
      if (a.status || b.status) throw new Error(`map/fresh failed: ${a.status} ${b.status}`);
    }
    t.is((await c.call({ op: OP.RESTORE, gpa, npages: 1n })).v[0], 1n);
    times.sort((x, y) => x - y);
    t.log(`Node client: map+fresh of one page n=500 p50=${times[250]!.toFixed(1)} us p99=${times[495]!.toFixed(1)} us max=${times[499]!.toFixed(1)} us`);

    // Idle: the probe stops polling (QUIET), then ~5 s of CPU ticks.
    t.is((await c.call({ op: OP.MAP, gpa, target: tid, offset: 30n * BigInt(PAGE), npages: 1n })).status, 0);
    writeTarget(l, 30, 64, cmd(4, 'QUIET___'));
    await waitConsole(l, /PROBE quiet 4\n/, 'the probe to go quiet');
    t.is((await c.call({ op: OP.RESTORE_ALL })).v[0], 1n);
    c.close();
    const task = fs.readdirSync(`/proc/${l.pid}/task`).find((id) => fs.readFileSync(`/proc/${l.pid}/task/${id}/comm`, 'utf8').trim() === 'kvmmem-agent');
    t.truthy(task, 'the agent thread is named kvmmem-agent');
    const ticks = (p: string) => { const f = fs.readFileSync(p, 'utf8').slice(fs.readFileSync(p, 'utf8').lastIndexOf(')') + 2).split(' '); return Number(f[11]) + Number(f[12]); };
    await sleep(500);
    const q0 = ticks(`/proc/${l.pid}/stat`), a0 = ticks(`/proc/${l.pid}/task/${task}/stat`), w0 = Date.now();
    await sleep(5000);
    const q1 = ticks(`/proc/${l.pid}/stat`), a1 = ticks(`/proc/${l.pid}/task/${task}/stat`), secs = (Date.now() - w0) / 1000;
    const hz = 100; // USER_HZ on Linux x86-64
    t.log(`idle over ${secs.toFixed(1)} s: QEMU ${((100 * (q1 - q0)) / hz / secs).toFixed(2)}% of a core, agent thread ${((100 * (a1 - a0)) / hz / secs).toFixed(2)}%`);
    t.log(`boot to the probe's PFN line: ${l.bootMs} ms`);
    t.true(alive(l));
  });
}
