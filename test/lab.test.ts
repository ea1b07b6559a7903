// The two-VM lab (src/lab/lab.ts, `kvmmem lab`): real VMs on QEMU/TCG.
// Four boots, one after the other (the machine's 2 cores are shared):
//   1. `lab up` (a detached daemon) -> status -> `lab run` of node inside: exit code, stdout and stderr apart,
//      the share read-only, the guest's own /proc, a --timeout, a LabClient -> `lab down` leaves nothing;
//   2. `lab run` with no lab up boots one and tears it down;
//   3. SIGTERM of such a `lab run` tears its lab down;
//   4. Lab.start() / lab.run() / lab.close() in this process.
// Skipped, with the provisioning command, when the lab cannot start here.
import test from 'ava';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Lab, LabClient, labAvailable, LabError, type LabInfo } from '../src/lab/index.js';
import { alive, readState, runDirOf, type PidRecord } from '../src/lab/run-dir.js';
import { loadModule } from '../src/lab/lab.js';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'kvmmem.js');
const avail = labAvailable();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Cli { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

/** Run the CLI with a bound; on the bound, SIGKILL it and fail with what it printed. */
function cli(args: string[], opts: { timeoutMs?: number; onSpawn?: (pid: number, out: () => string) => void } = {}): Promise<Cli> {
  const timeoutMs = opts.timeoutMs ?? 150_000;
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => { stdout += d; });
    child.stderr.on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`kvmmem ${args.join(' ')}: no exit within ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 });
    });
    opts.onSpawn?.(child.pid!, () => stdout + stderr);
  });
}

/** What a lab leaves behind: its run directory, /dev/shm files, live recorded pids. */
function leftovers(name: string, pids: PidRecord[]): string[] {
  const left: string[] = [];
  if (fs.existsSync(runDirOf(name))) left.push(runDirOf(name));
  if (fs.existsSync(`${runDirOf(name)}.daemon.log`)) left.push(`${runDirOf(name)}.daemon.log`);
  for (const f of fs.readdirSync('/dev/shm')) if (f.startsWith(`${name}-`) || f === `${name}.mbox`) left.push(`/dev/shm/${f}`);
  for (const p of pids) if (alive(p)) left.push(`${p.what} pid ${p.pid}`);
  return left;
}

async function noLeftovers(name: string, pids: PidRecord[], ms = 10_000): Promise<string[]> {
  const deadline = Date.now() + ms;
  let left = leftovers(name, pids);
  while (left.length > 0 && Date.now() < deadline) {
    await sleep(100);
    left = leftovers(name, pids);
  }
  return left;
}

if (!avail.ok) {
  const why = `lab unavailable: ${avail.reason}; provision with: ${avail.provision}`;
  console.warn(`test/lab.test.ts skipped: ${why}`);
  test.skip(`lab: up/status/run/down, one-shot run, SIGTERM, Lab API — SKIPPED (${why})`, () => {});
} else {
  const tag = `t${process.pid}`;

  test.serial('lab up -> status -> run (exit code, streams, read-only share, own /proc, timeout) -> down leaves nothing', async (t) => {
    t.timeout(300_000);
    const name = `${tag}a`;
    const up = await cli(['lab', 'up', '--name', name, '--json']);
    t.is(up.code, 0, up.stderr);
    const info = JSON.parse(up.stdout) as LabInfo;
    const pids = [...(readState(runDirOf(name))?.pids ?? []), readState(runDirOf(name))!.owner];
    try {
      t.is(info.name, name);
      t.is(info.target.ramPath, `/dev/shm/${name}-target.ram`);
      t.true(fs.statSync(info.target.ramPath).size === 256 * 2 ** 20);
      t.regex(info.listen, /^tcp:0\.0\.0\.0:\d+$/);
      t.true(info.introspector.status.includes('share /host'), info.introspector.status.join('; '));
      t.log(`lab up to ready: ${(up.ms / 1000).toFixed(1)} s (CLI), lab itself ${info.ms.up} ms (target ${info.ms.target} ms, introspector ${info.ms.introspector} ms, module ${info.ms.module} ms); device: ${info.device.ok ? info.device.path : info.device.reason}`);
      t.is(pids.length, 4);
      for (const p of pids) t.true(alive(p), `${p.what} ${p.pid} alive after up`);

      const st = await cli(['lab', 'status', '--json']);
      t.is(st.code, 0, st.stderr);
      const mine = (JSON.parse(st.stdout) as { labs: { name: string; state: string; pids: { alive: boolean }[] }[] }).labs.find((l) => l.name === name);
      t.is(mine?.state, 'ready');
      t.true(mine!.pids.every((p) => p.alive));

      // node inside, through the share: stdout and stderr kept apart, the exit code passed through.
      const script = 'console.log("out:" + process.env.KVMMEM_LISTEN + ":" + (process.env.KVMMEM_COOKIE || "").length); console.error("err:" + process.cwd()); process.exit(3)';
      const times: number[] = [];
      for (let i = 0; i < 3; i++) {
        const r = await cli(['lab', 'run', '--name', name, '--', 'node', '-e', script]);
        times.push(r.ms);
        t.is(r.code, 3, r.stderr);
        t.is(r.stdout, `out:${info.listen}:32\n`);
        t.is(r.stderr, `err:${ROOT}\n`);
      }
      t.log(`lab run -- node -e (CLI, wall): first ${times[0]!.toFixed(0)} ms, later ${times.slice(1).map((x) => x.toFixed(0)).join(', ')} ms`);

      // The share is the host's / and read-only inside, even for root.
      const probe = path.join(ROOT, `.lab-write-probe-${tag}`);
      const w = await cli(['lab', 'run', '--name', name, '--', 'sh', '-c', `echo x > '${probe}'; echo rc=$?; test -f '${path.join(ROOT, 'package.json')}' && echo seen`]);
      t.is(w.code, 0, w.stderr);
      t.regex(w.stdout, /rc=[1-9]/);
      t.regex(w.stdout, /seen/);
      t.regex(w.stderr, /Read-only file system/);
      t.false(fs.existsSync(probe));

      // A file the host creates after a failed lookup inside is seen inside (the share's entry timeout is 1 s).
      const late = path.join(ROOT, `.lab-late-probe-${tag}`);
      t.teardown(() => fs.rmSync(late, { force: true }));
      t.is((await cli(['lab', 'run', '--name', name, '--', 'cat', late])).code, 1);
      fs.writeFileSync(late, 'late\n');
      await sleep(1500);
      const seen = await cli(['lab', 'run', '--name', name, '--', 'cat', late]);
      t.is(seen.stdout, 'late\n', seen.stderr);

      // /proc inside is the guest's: PID 1 is the runner, the kernel is the guest kernel.
      const p = await cli(['lab', 'run', '--name', name, '--', 'sh', '-c', 'tr "\\0" " " < /proc/1/cmdline; echo; uname -r; ls /proc | grep -c "^[0-9]"']);
      t.is(p.code, 0, p.stderr);
      const [cmdline, release, nprocs] = p.stdout.trim().split('\n');
      t.regex(cmdline!, /^\/kvmmem-runner /);
      t.is(release, info.introspector.status.find((l) => l.startsWith('kernel '))!.slice(7));
      t.true(Number(nprocs) < 200, `the guest has few processes (${nprocs})`);

      // A command that hangs is bounded: --timeout kills its process group, exit 124.
      const h = await cli(['lab', 'run', '--name', name, '--timeout', '2', '--', 'sh', '-c', 'echo started; sleep 1000']);
      t.is(h.code, 124, h.stderr);
      t.is(h.stdout, 'started\n');
      t.true(h.ms < 30_000, `timeout honoured (${h.ms.toFixed(0)} ms)`);
      const g = await cli(['lab', 'run', '--name', name, '--', 'sh', '-c', 'for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < $f; echo; done | grep -c "^sleep 1000" || true']);
      t.is(g.stdout.trim(), '0', 'the timed-out command is gone inside');

      // The same from TypeScript, through the lab's control socket; a command that cannot start is typed.
      const client = await LabClient.connect(name);
      try {
        let out = '';
        let err = '';
        const code = await client.run('sh', ['-c', 'echo a; echo b >&2; exit 7'], { stdout: (b) => { out += b; }, stderr: (b) => { err += b; } });
        t.deepEqual([code, out, err], [7, 'a\n', 'b\n']);
        const e = await t.throwsAsync(client.run('/no/such/program'), { instanceOf: LabError });
        t.is(e?.code, 'ELAB_EXEC');
        const te = await t.throwsAsync(client.run('sleep', ['1000'], { timeoutMs: 500 }), { instanceOf: LabError });
        t.is(te?.code, 'ETIMEDOUT');
      } finally {
        client.close();
      }
    } finally {
      const down = await cli(['lab', 'down', '--name', name]);
      t.is(down.code, 0, down.stderr);
      t.deepEqual(await noLeftovers(name, pids), []);
    }
  });

  test.serial('lab run with no lab up boots one for the command and tears it down', async (t) => {
    t.timeout(200_000);
    const name = `${tag}b`;
    let pids: PidRecord[] = [];
    const r = await cli(['lab', 'run', '--name', name, '--', 'node', '-e', 'console.log(require("fs").readFileSync("/proc/1/cmdline", "latin1").split("\\0")[0]); process.exit(5)'], {
      onSpawn: () => {
        // Record the pids while it runs, to check they are gone afterwards.
        const poll = setInterval(() => {
          const s = readState(runDirOf(name));
          if (s && s.pids.length > 0) { pids = [...s.pids, s.owner]; }
          if (s?.state === 'ready' || !fs.existsSync(path.dirname(runDirOf(name)))) clearInterval(poll);
        }, 50);
        setTimeout(() => clearInterval(poll), 150_000).unref();
      },
    });
    t.is(r.code, 5, r.stderr);
    t.is(r.stdout, '/kvmmem-runner\n');
    t.is(r.stderr, '', 'a captured stderr is the command\'s alone (no boot progress)');
    t.log(`one-shot lab run (boot + node + teardown): ${(r.ms / 1000).toFixed(1)} s`);
    t.is(pids.length, 4, 'saw the lab\'s pids while it ran');
    t.deepEqual(await noLeftovers(name, pids), []);
  });

  test.serial('SIGTERM of `kvmmem lab run` tears its lab down', async (t) => {
    t.timeout(200_000);
    const name = `${tag}c`;
    let pids: PidRecord[] = [];
    const r = await cli(['lab', 'run', '--name', name, '--', 'sh', '-c', 'echo started; sleep 1000'], {
      onSpawn: (pid, out) => {
        const poll = setInterval(() => {
          const s = readState(runDirOf(name));
          if (s && s.pids.length > 0) pids = [...s.pids, s.owner];
          if (out().includes('started')) { clearInterval(poll); process.kill(pid, 'SIGTERM'); }
        }, 50);
        setTimeout(() => clearInterval(poll), 150_000).unref();
      },
    });
    t.is(r.code, 143, `exit 128 + SIGTERM; stderr: ${r.stderr}`);
    t.is(pids.length, 4);
    t.deepEqual(await noLeftovers(name, pids), []);
  });

  test.serial('Lab.start / lab.run / lab.close in this process', async (t) => {
    t.timeout(200_000);
    const name = `${tag}d`;
    const lab = await Lab.start({ name, targetMemoryMb: 128, introspectorMemoryMb: 512, startHost: null });
    const pids = [...readState(runDirOf(name))!.pids];
    try {
      t.deepEqual(lab.info.host, { running: false, reason: 'no lab host requested (startHost: null)' });
      t.false(lab.info.device.ok);
      let out = '';
      const code = await lab.run('node', ['-p', 'process.getuid() + " " + require("os").cpus().length'], { stdout: (b) => { out += b; }, stderr: () => {} });
      t.is(code, 0);
      t.is(out, '0 1\n', 'root inside a one-vCPU guest');
      let seen = '';
      const ac = new AbortController();
      const p = lab.run('sh', ['-c', 'echo go; sleep 1000'], { signal: ac.signal, stdout: (b) => { seen += b; ac.abort(); } });
      t.is(await p, 128 + 15, 'an aborted command ends by SIGTERM');
      t.is(seen, 'go\n');
      // The module loader (busybox insmod of a host path through the share) says why there is no device.
      const missing = path.join(ROOT, 'native', 'kmod', `no-such-${tag}.ko`);
      const dev = await loadModule((lab as unknown as { intro: { runner: Parameters<typeof loadModule>[0] } }).intro.runner, missing);
      t.false(dev.ok);
      t.regex(dev.ok ? '' : dev.reason, new RegExp(`^no /dev/kvmmem: insmod no-such-${tag}\\.ko transport=mailbox failed: .*No such file`));
      t.regex((await loadModule((lab as unknown as { intro: { runner: Parameters<typeof loadModule>[0] } }).intro.runner, '/tmp/x.ko') as { reason: string }).reason, /under \/tmp\//);
      const busy = await t.throwsAsync(Lab.start({ name, startHost: null }), { instanceOf: LabError });
      t.is(busy?.code, 'ELAB_EXISTS');
    } finally {
      await lab.close();
    }
    t.deepEqual(await noLeftovers(name, pids), []);
    await t.throwsAsync(lab.run('true'), { instanceOf: LabError });
  });
}
