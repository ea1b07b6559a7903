/**
 * kvmmem ps / modules / ksym / dmesg / proc / uname, run as a user would
 * (`node bin/kvmmem.js ...`), on a RAM file holding the synthetic Linux kernel.
 * The same commands against the real kernel: test/linux-views.test.ts checks
 * the library they print from.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GuestMemory } from '../src/model/index.js';
import { buildSyntheticLinux } from '../src/os/linux/index.js';

const BIN = fileURLToPath(new URL('../bin/kvmmem.js', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'kvmmem-cli-linux-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));

function kvmmem(...args: string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, NODE_DEBUG: '' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const path = join(dir, 'linux.ram');
writeFileSync(path, '');
spawnSync('truncate', ['-s', '64M', path]);
const mem = GuestMemory.fromFile(path);
const truth = buildSyntheticLinux(mem, { seed: 99 });
mem.close();
const cr3 = `0x${truth.cr3.toString(16)}`;

test('ps and modules: tables like ps -eo and lsmod, JSON with every field', (t) => {
  t.timeout(120_000);
  const ps = kvmmem('ps', '--ram', path, '--cr3', cr3);
  t.is(ps.code, 0, ps.stderr);
  const lines = ps.stdout.trimEnd().split('\n');
  t.regex(lines[0]!, /^\s+PID\s+PPID\s+UID S COMMAND$/);
  t.is(lines.length, truth.tasks.length + 1);
  t.regex(ps.stdout, /^\s+12\s+2\s+0 \w \[rcu_tasks_rude_kthread\]$/m);
  t.regex(ps.stdout, /^\s+97\s+1\s+1000 \w kvmmem-loop$/m);
  const js = kvmmem('ps', '--ram', path, '--json'); // no CR3: the base by search
  t.is(js.code, 0, js.stderr);
  t.deepEqual(JSON.parse(js.stdout).map((p: { pid: number; ppid: number; comm: string }) => [p.pid, p.ppid, p.comm]), truth.tasks.map((x) => [x.pid, x.ppid, x.comm]));
  const mods = kvmmem('modules', '--ram', path, '--cr3', cr3, '--proc');
  t.is(mods.code, 0, mods.stderr);
  t.deepEqual(mods.stdout.trimEnd().split('\n'), truth.modules);
  const lsmod = kvmmem('modules', '--ram', path, '--cr3', cr3);
  t.regex(lsmod.stdout, /^Module\s+Size\s+Used by\nnet_failover\s+24576\s+0\nfailover\s+16384\s+1 net_failover\n/);
});

test('ksym both ways, uname, proc --cmdline/--environ/--maps/--read, and the exit codes', (t) => {
  t.timeout(120_000);
  const addr = truth.symbols.find((s) => s.name === 'init_task')!.address;
  const byName = kvmmem('ksym', '--ram', path, '--cr3', cr3, 'init_task');
  t.is(byName.stdout, `${addr.toString(16).padStart(16, '0')} D init_task\n`);
  const byAddr = kvmmem('ksym', '--ram', path, '--cr3', cr3, `0x${(addr + 0x10n).toString(16)}`);
  t.is(byAddr.stdout, 'init_task+0x10\n');
  t.is(kvmmem('ksym', '--ram', path, '--cr3', cr3, 'no_such_symbol').code, 1);
  const u = kvmmem('uname', '--ram', path, '--cr3', cr3);
  t.is(u.stdout, `Linux synthetic 6.1.0-synthetic ${truth.uname.version} x86_64\n`);
  t.is(kvmmem('proc', '--ram', path, '--cr3', cr3, '97', '--cmdline').stdout, `${truth.process.argv.join('\n')}\n`);
  t.is(kvmmem('proc', '--ram', path, '--cr3', cr3, '97', '--environ').stdout, `${truth.process.env.join('\n')}\n`);
  t.regex(kvmmem('proc', '--ram', path, '--cr3', cr3, '97', '--maps').stdout, /^555555554000-555555555000 rw-p 00000000 00:00 0 $/m);
  const rd = kvmmem('proc', '--ram', path, '--cr3', cr3, '97', '--read', '0x555555554800', '--len', '11', '--json');
  t.is(Buffer.from(JSON.parse(rd.stdout).hex, 'hex').toString(), 'kvmmem-loop');
  const kt = kvmmem('proc', '--ram', path, '--cr3', cr3, '2', '--cmdline');
  t.is(kt.code, 1);
  t.regex(kt.stderr, /kernel thread/);
  t.is(kvmmem('proc', '--ram', path, '97', '--cmdline', '--maps').code, 2, 'two modes at once is bad input');
  t.is(kvmmem('proc', '--ram', path, 'abc').code, 2);
  const none = kvmmem('ps', '--ram', path, '--cr3', '0x1000');
  t.is(none.code, 1);
  t.regex(none.stderr, /no kernel map under CR3 0x1000/);
});
