// The library on a real kernel: inside the lab's introspector VM, through
// /dev/kvmmem (native/kmod/kvmmem.ko, mailbox transport) and the lab host
// (src/lab/lab-host.ts: the model host's token store and hypercalls, the QEMU
// agent as the page remapper, a device manager per target VM over TCP).
// One lab boot; each test runs programs inside it (test/fixtures/lab-inside.ts,
// `kvmmem selftest`) and checks them against the target's RAM file and the
// lab host's state, seen from here.
// Skipped, with the provisioning command, when the lab cannot start here.
import test from 'ava';
import * as fs from 'node:fs';
import { Lab, labAvailable } from '../src/lab/index.js';
import type { LabHostStats } from '../src/lab/lab-host.js';

const avail = labAvailable();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const PAGE = 4096;
const INSIDE = ['--import', 'tsx', 'test/fixtures/lab-inside.ts'];

interface Ran { code: number; stdout: string; stderr: string }

let lab: Lab | undefined;

async function run(cmd: string, args: string[], opts: { timeoutMs?: number; onStdout?: (all: string) => void } = {}): Promise<Ran> {
  let stdout = '';
  let stderr = '';
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), opts.timeoutMs ?? 120_000);
  try {
    const code = await lab!.run(cmd, args, { signal: ac.signal, stdout: (b) => { stdout += b; opts.onStdout?.(stdout); }, stderr: (b) => { stderr += b; } });
    if (ac.signal.aborted) throw new Error(`${cmd} ${args.join(' ')}: aborted after ${opts.timeoutMs ?? 120_000} ms\nstdout: ${stdout}\nstderr: ${stderr}`);
    return { code, stdout, stderr };
  } finally {
    clearTimeout(timer);
  }
}

function result(r: Ran): Record<string, unknown> {
  const line = r.stdout.split('\n').find((l) => l.startsWith('RESULT '));
  if (line === undefined) throw new Error(`no RESULT line (exit ${r.code})\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return JSON.parse(line.slice(7)) as Record<string, unknown>;
}

const stats = (): LabHostStats => lab!.hostStats() as LabHostStats;

/** Pages of the target's RAM file holding `LABMARK-` (the live-target init rewrites it every second). */
function markerPages(ram: string, max: number): bigint[] {
  const b = fs.readFileSync(ram);
  const out = new Set<bigint>();
  for (let i = b.indexOf('LABMARK-'); i >= 0 && out.size < max; i = b.indexOf('LABMARK-', i + 1)) out.add(BigInt(i - (i % PAGE)));
  return [...out];
}

/** A page of zeros near the top of the target's RAM (free memory of a small guest), for a write test. */
function zeroPage(ram: string): bigint {
  const fd = fs.openSync(ram, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const p = Buffer.alloc(PAGE);
    for (let off = size - 64 * PAGE; off > size / 2; off -= PAGE) {
      fs.readSync(fd, p, 0, PAGE, off);
      if (p.every((x) => x === 0)) return BigInt(off);
    }
  } finally {
    fs.closeSync(fd);
  }
  throw new Error(`no zero page in the upper half of ${ram}`);
}

async function untilZeroMappings(ms: number): Promise<LabHostStats> {
  const deadline = Date.now() + ms;
  let s = stats();
  while (s.host.mappings !== 0 && Date.now() < deadline) { await sleep(100); s = stats(); }
  return s;
}

if (!avail.ok) {
  const why = `lab unavailable: ${avail.reason}; provision with: ${avail.provision}`;
  console.warn(`test/lab-kvmmem.test.ts skipped: ${why}`);
  test.skip(`lab: the library through a real /dev/kvmmem — SKIPPED (${why})`, () => {});
} else {
  test.before(async (t) => {
    t.timeout(240_000);
    lab = await Lab.start({ name: `lk${process.pid % 100000}`, targetMemoryMb: 128, introspectorMemoryMb: 1024, log: (l) => t.log(l) });
    t.log(`lab up in ${lab.info.ms.up} ms (target ${lab.info.ms.target}, introspector ${lab.info.ms.introspector}, host ${lab.info.ms.host}, module ${lab.info.ms.module} ms)`);
    if (!lab.info.device.ok) {
      const reason = lab.info.device.reason;
      await lab.close();
      lab = undefined;
      throw new Error(`the lab came up without /dev/kvmmem: ${reason}`);
    }
  });

  test.after.always(async () => {
    await lab?.close();
    lab = undefined;
  });

  test.serial('inside: kvmmem selftest --device /dev/kvmmem passes every check the real driver can be asked', async (t) => {
    t.timeout(180_000);
    const r = await run('node', ['bin/kvmmem.js', 'selftest', '--device', '/dev/kvmmem', '--json']);
    const doc = JSON.parse(r.stdout) as { results: { name: string; status: string; detail: string }[]; ok: boolean };
    for (const c of doc.results) t.log(`${c.status.padEnd(4)} ${c.name}: ${c.detail}`);
    t.is(r.code, 0, r.stderr);
    t.true(doc.ok);
    // unhook is the device manager's to trigger; the lab host does it below (preunhook from here).
    t.deepEqual(doc.results.filter((c) => c.status !== 'pass').map((c) => c.name), ['unhook']);
    const s = await untilZeroMappings(5000);
    t.is(s.host.mappings, 0, 'the host holds nothing after the selftest');
    t.true(s.mailbox.maps > 0 && s.mailbox.unmaps > 0);
  });

  test.serial('inside: raw ioctls on LinuxDevice: ENOTTY, EINVAL, ENOENT, single-use tokens, EALREADY, UNMAP twice, a zero page after UNMAP', async (t) => {
    t.timeout(120_000);
    const r = await run('node', [...INSIDE, 'errnos', '0x100000']);
    const o = result(r);
    t.is(r.code, 0, r.stderr);
    t.like(o, {
      enotty: 'ENOTTY', einval: 'EINVAL', unmapUnknown: 'ENOENT', map: 'OK', tokenReuse: 'ENOENT', forged: 'ENOENT',
      ealready: 'EALREADY', unmap: 'OK', unmapTwice: 'ENOENT', afterZero: true,
    });
  });

  test.serial('inside: a mapped page of the live target shows its LABMARK counter change with no new map', async (t) => {
    t.timeout(120_000);
    const pages = markerPages(lab!.info.target.ramPath, 16);
    t.true(pages.length > 0, 'the marker is in the target RAM');
    const r = await run('node', [...INSIDE, 'marker', ...pages.map((g) => `0x${g.toString(16)}`)]);
    const o = result(r) as { mapped: number; changed: { gpa: string; from: number; to: number } | null };
    t.is(r.code, 0, r.stderr);
    t.is(o.mapped, pages.length);
    t.not(o.changed, null, 'a counter moved on one of the mapped pages');
    t.log(`${pages.length} pages mapped; ${JSON.stringify(o.changed)}`);
  });

  test.serial('inside: a write through the mapping is seen in the target\'s RAM, and the target side\'s write is seen inside', async (t) => {
    t.timeout(120_000);
    const ram = lab!.info.target.ramPath;
    const gpa = zeroPage(ram);
    let replied = '';
    const fd = fs.openSync(ram, 'r+');
    try {
      const r = await run('node', [...INSIDE, 'write', `0x${gpa.toString(16)}`, '0'], {
        onStdout: (all) => {
          const m = /WROTE (KVMMEM-INSIDE-(\d+))\n/.exec(all);
          if (m === null || replied !== '') return;
          // Seen here, in the target VM's own RAM file?
          const b = Buffer.alloc(m[1]!.length);
          fs.readSync(fd, b, 0, b.length, Number(gpa));
          if (b.toString('latin1') !== m[1]) { replied = `not seen: ${JSON.stringify(b.toString('latin1'))}`; return; }
          replied = `KVMMEM-TARGET-${m[2]}`;
          fs.writeSync(fd, Buffer.from(replied, 'latin1'), 0, replied.length, Number(gpa) + 64);
        },
      });
      const o = result(r);
      t.is(r.code, 0, r.stderr);
      t.true(replied.startsWith('KVMMEM-TARGET-'), replied);
      t.is(o.reply, replied, 'the target side\'s write, seen through the introspector\'s mapping');
      const back = Buffer.alloc(PAGE);
      fs.readSync(fd, back, 0, PAGE, Number(gpa));
      t.true(back.every((x) => x === 0), 'the inside program put the page back');
    } finally {
      fs.closeSync(fd);
    }
  });

  test.serial('inside: kill -9 of a process holding 64 mappings: release() unmaps them all, the host holds none', async (t) => {
    t.timeout(120_000);
    const before = stats();
    let during: LabHostStats | undefined;
    const script = `node ${INSIDE.join(' ')} hold 0x200000 64 > /tmp/hold.out 2>&1 & p=$!
i=0; while ! grep -q HOLDING /tmp/hold.out; do sleep 0.2; i=$((i+1)); if [ $i -gt 400 ]; then cat /tmp/hold.out; exit 3; fi; done
echo HELD; sleep 2; kill -9 $p; wait $p; echo "KILLED $?"`;
    const r = await run('sh', ['-c', script], { onStdout: (all) => { if (during === undefined && all.includes('HELD')) during = stats(); } });
    t.is(r.code, 0, `${r.stdout}\n${r.stderr}`);
    t.regex(r.stdout, /KILLED 137/);
    t.true(during !== undefined && during.host.mappings >= 64, `mapped while held: ${during?.host.mappings}`);
    const after = await untilZeroMappings(10_000);
    t.is(after.host.mappings, 0);
    t.true(after.mailbox.unmaps - before.mailbox.unmaps >= 64, `UNMAP hypercalls from release(): ${after.mailbox.unmaps - before.mailbox.unmaps}`);
  });

  test.serial('inside: the lab host pre-unhooks the target: the tool gets the UNHOOK event, its page is revoked (zeros)', async (t) => {
    t.timeout(120_000);
    const gpa = markerPages(lab!.info.target.ramPath, 1)[0]!;
    let ack: Promise<string> | undefined;
    const r = await run('node', [...INSIDE, 'unhook', `0x${gpa.toString(16)}`], {
      onStdout: (all) => { if (ack === undefined && all.includes('MAPPED')) ack = lab!.preunhook(); },
    });
    const o = result(r);
    t.log(JSON.stringify(o), r.stderr.trim());
    t.is(r.code, 0, r.stderr);
    t.regex(r.stdout, /MAPPED true/, 'the channel enabled the UNHOOK event');
    t.like(o, { nonzero: true, event: true, state: 'gone', zeroAfter: true, pageAccess: 'USE_AFTER_UNMAP' });
    t.not(ack, undefined);
    t.true(['reply', 'closed'].includes(await ack!), 'the tool answered the event');
    t.is((await untilZeroMappings(5000)).host.mappings, 0);
  });
}
