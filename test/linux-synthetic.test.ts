// src/os/linux on the synthetic Linux guest (src/os/linux/synthetic.ts) through
// the model stack: kallsyms (6.1 with and without seqs_of_names) and BTF parsed
// from memory, the views, and corrupted structures (cycles, wild pointers,
// truncated BTF, missing or foreign kallsyms) giving typed errors, never a hang.
import test, { type ExecutionContext } from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IntrospectionServer } from '../src/channel/index.js';
import { KvmMem } from '../src/client/index.js';
import { GuestMemory, ModelHost } from '../src/model/index.js';
import { PhysicalReader } from '../src/inspect/index.js';
import {
  Btf, LinuxGuest, LinuxNoSuchError, LinuxNotFoundError, LinuxStructureError, LinuxUnsupportedError,
} from '../src/os/linux/index.js';
import { buildSyntheticLinux, type SyntheticLinuxOptions, type SyntheticLinuxTruth } from '../src/os/linux/synthetic.js';

const dir = mkdtempSync(join(tmpdir(), 'kvmmem-linux-syn-'));
test.after.always(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;

interface Fx { truth: SyntheticLinuxTruth; reader: PhysicalReader; memory: GuestMemory }

async function fixture(t: ExecutionContext, opts: SyntheticLinuxOptions = {}, corrupt?: (x: SyntheticLinuxTruth, m: GuestMemory) => void): Promise<Fx> {
  const memory = GuestMemory.anonymous(64n << 20n);
  const truth = buildSyntheticLinux(memory, opts);
  corrupt?.(truth, memory);
  const unix = join(dir, `s${++n}.sock`);
  const cookie = `c${n}`;
  const server = await IntrospectionServer.listen({ unix }, { cookie });
  const host = new ModelHost({ cookie });
  const session = KvmMem.open({ model: host });
  t.teardown(async () => { session.close(); host.close(); await server.close(); memory.close(); });
  await host.createVm({ name: `vm${n}`, memory }).attach({ unix, cookie });
  const vm = await server.waitForVm({ name: `vm${n}` });
  return { truth, reader: new PhysicalReader(session, vm, { cachePages: 256 }), memory };
}

const u64 = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt.asUintN(64, v)); return b; };

for (const [seqs, order, layout] of [[true, 'v6.1', 'v6.2'], [false, 'v6.1', 'v6.1'], [true, 'v6.4', 'v6.4']] as const) {
  test.serial(`attach from CR3 and by search; every kallsyms line (layout ${layout}: ${order === 'v6.4' ? 'num_syms first, offsets after the token index' : seqs ? 'with seqs_of_names' : 'without seqs_of_names'})`, async (t) => {
    t.timeout(60_000);
    const { truth, reader, memory } = await fixture(t, { seqs, order, seed: layout.charCodeAt(3) });
    const g = await LinuxGuest.attach(reader, { cr3: truth.cr3 | 0x1000n | 0x5n }); // PTI user half and PCID bits are ignored
    t.is(g.base.textVa, truth.text);
    t.is(g.base.textPa, truth.textPa);
    t.is(g.base.levels, 4);
    t.is(g.symbols.layout, layout);
    t.is(g.symbols.count, truth.symbols.length);
    t.deepEqual([...g.symbols].map((s) => `${s.type} ${s.name} ${s.address}`), truth.symbols.map((s) => `${s.type} ${s.name} ${s.address}`));
    t.is(g.symbols.line(0), '0000000000000000 A fixed_percpu_data');
    t.is(g.symbols.lookup('init_task'), truth.symbols.find((s) => s.name === 'init_task')!.address);
    t.is(g.symbols.lookup('no_such_symbol'), undefined);
    t.throws(() => g.symbols.address('no_such_symbol'), { instanceOf: LinuxNoSuchError });
    t.is(g.symbols.symbolize(g.symbols.address('func_000010') + 0x10n), 'func_000010+0x10');
    t.is(g.symbols.symbolize(g.symbols.address('func_000010')), 'func_000010');
    t.is(g.symbols.symbolize(0x10n), '__per_cpu_start+0x10');
    t.true(g.symbols.all('dup_static').length > 1);
    t.true(g.symbols.names.some((nm) => nm.length > 140), 'a name with a two-byte length');
    const s = await LinuxGuest.attach(reader, { end: memory.end });
    t.is(s.base.textPa, truth.textPa);
    t.is(s.base.how, 'search');
    t.is(s.symbols.count, g.symbols.count);
    t.is(s.base.btfGpa, truth.btfGpa);
  });
}

test.serial('BTF: members through anonymous structs and unions, typedefs, arrays, bit-fields, enums', async (t) => {
    t.timeout(60_000);
  const { truth, reader } = await fixture(t);
  const g = await LinuxGuest.attach(reader, { cr3: truth.cr3 });
  const b = g.types;
  t.is(b.offsetOf('task_struct', 'pid'), 0x40, 'inside an anonymous struct');
  t.is(b.offsetOf('task_struct', '__state'), 0, 'inside an anonymous union');
  t.is(b.offsetOf('task_struct', 'comm'), 0xb0);
  t.is(b.member('task_struct', 'comm').size, 16);
  t.is(b.offsetOf('task_struct', 'tasks.prev'), 0x68, 'a dotted path through an embedded struct');
  t.is(b.offsetOf('cred', 'uid.val'), 4, 'through a typedef of an anonymous struct');
  t.is(b.offsetOf('mm_struct', 'arg_start'), 0x78);
  t.is(b.structSize('task_struct'), 0x300);
  t.like(b.member('printk_info', 'level'), { bitOffset: 157, bitSize: 3 });
  t.is(b.enumValue('MODULE_STATE_UNFORMED'), 3n);
  t.throws(() => b.offsetOf('task_struct', 'nope'), { instanceOf: LinuxNoSuchError, message: /no member 'nope' in struct task_struct/ });
  t.throws(() => b.structId('no_struct'), { instanceOf: LinuxNoSuchError });
  t.is(b.data.length, truth.btfBytes);
});

test.serial('views: processes, modules, uname, a process\'s argv, environment, VMAs and memory', async (t) => {
    t.timeout(60_000);
  const { truth, reader } = await fixture(t);
  const g = await LinuxGuest.attach(reader, { cr3: truth.cr3 });
  const ps = await g.processes();
  t.deepEqual(ps.map((p) => ({ pid: p.pid, ppid: p.ppid, comm: p.comm, kthread: p.kthread, uid: p.uid })),
    truth.tasks.map((x) => ({ pid: x.pid, ppid: x.ppid, comm: x.comm, kthread: x.kthread, uid: x.uid })));
  t.is(ps.find((p) => p.pid === 12)!.taskComm, 'rcu_tasks_rude_', 'comm[16] itself is cut; the kernel prints the full name');
  t.is(ps[0]!.state, 'S');
  t.deepEqual((await g.modules()).map((m) => m.line), truth.modules);
  t.deepEqual(await g.uname(), truth.uname);
  const p = await g.process(truth.process.pid);
  t.deepEqual(await p.cmdline(), truth.process.argv);
  t.deepEqual(await p.environ(), truth.process.env);
  const maps = await p.maps();
  t.is(maps.length, 1);
  t.like(maps[0], { start: truth.process.vma.start, end: truth.process.vma.end, perms: 'rw-p', path: '' });
  t.is((await p.read(truth.process.vma.start + 0x800n, 11)).toString('latin1'), 'kvmmem-loop');
  await t.throwsAsync((await g.process(2)).cmdline(), { instanceOf: LinuxNoSuchError, message: /kernel thread/ });
  await t.throwsAsync(g.process(4242), { instanceOf: LinuxNoSuchError });
});

test.serial('seeds: the kernel is found wherever the synthetic KASLR put it', async (t) => {
    t.timeout(60_000);
  t.timeout(120_000);
  for (const seed of [1, 2, 3]) {
    const { truth, reader } = await fixture(t, { seed, extraSymbols: 300 + seed * 200 });
    const g = await LinuxGuest.attach(reader, { cr3: truth.cr3 });
    t.is(g.base.textPa, truth.textPa, `seed ${seed}`);
    t.is(g.symbols.count, truth.symbols.length);
    t.is((await g.processes()).length, truth.tasks.length);
  }
});

// ---------------------------------------------------------------- corrupted guests

test.serial('a cycle in the task list is a typed error naming task_struct, not a hang', async (t) => {
    t.timeout(60_000);
  t.timeout(30_000);
  const { reader, truth } = await fixture(t, {}, (x) => {
    // tasks[3].next -> tasks[1]: a loop that never returns to init_task
    x.write(x.tasks[3]!.va + 0x60n, u64(x.tasks[1]!.va + 0x60n));
  });
  const g = await LinuxGuest.attach(reader, { cr3: truth.cr3 });
  const e = await t.throwsAsync(g.processes(), { instanceOf: LinuxStructureError, message: /task_struct at 0x[0-9a-f]+: list cycles back/ });
  t.is(e!.code, 'ERR_LINUX_BAD_STRUCTURE');
  t.is(e!.struct, 'task_struct');
  t.is(e!.address, truth.tasks[1]!.va + 0x60n);
});

test.serial('a wild next pointer, and one to an unmapped kernel address, are typed errors', async (t) => {
    t.timeout(60_000);
  t.timeout(30_000);
  const wild = await fixture(t, {}, (x) => x.write(x.tasks[2]!.va + 0x60n, u64(0x4141_4141_4141_4141n)));
  const g1 = await LinuxGuest.attach(wild.reader, { cr3: wild.truth.cr3 });
  await t.throwsAsync(g1.processes(), { instanceOf: LinuxStructureError, message: /next = 0x4141414141414141 is not a kernel pointer/ });
  const unmapped = await fixture(t, {}, (x) => x.write(x.tasks[2]!.va + 0x60n, u64(0xffff_c900_7000_0000n)));
  const g2 = await LinuxGuest.attach(unmapped.reader, { cr3: unmapped.truth.cr3 });
  await t.throwsAsync(g2.processes(), { instanceOf: LinuxStructureError, message: /0xffffc9007000000[08]: not mapped/ });
  // a module list whose entry does not point back
  const mod = await fixture(t, {}, (x) => {
    const head = x.symbols.find((s) => s.name === 'modules')!.address;
    x.write(head, u64(x.tasks[0]!.va + 0x60n));
  });
  const g3 = await LinuxGuest.attach(mod.reader, { cr3: mod.truth.cr3 });
  await t.throwsAsync(g3.modules(), { instanceOf: LinuxStructureError, message: /module at .*prev .* does not point back/ });
});

test.serial('truncated or damaged BTF is a typed error; so is a BTF blob in memory cut short', async (t) => {
    t.timeout(60_000);
  const { truth, memory, reader } = await fixture(t);
  const blob = Buffer.from(memory.read(truth.btfGpa, truth.btfBytes));
  t.notThrows(() => Btf.parse(blob));
  t.throws(() => Btf.parse(blob.subarray(0, blob.length - 40)), { instanceOf: LinuxStructureError, message: /past the end .*truncated/ });
  t.throws(() => Btf.parse(blob.subarray(0, 10)), { instanceOf: LinuxStructureError, message: /shorter than a BTF header/ });
  const badMagic = Buffer.from(blob); badMagic[0] = 0;
  t.throws(() => Btf.parse(badMagic), { instanceOf: LinuxStructureError, message: /magic/ });
  // the type section's length cut mid-record
  const cut = Buffer.from(blob); cut.writeUInt32LE(cut.readUInt32LE(12) - 6, 12);
  t.throws(() => Btf.parse(cut), { instanceOf: LinuxStructureError, message: /cut by the end of the section/ });
  // a pointer to a type that does not exist: the writer's first records are six INTs (16 bytes each), then a PTR
  const ref = Buffer.from(blob);
  t.is(ref.readUInt32LE(24 + 6 * 16 + 4) >>> 24, 2, 'type 7 is the PTR');
  ref.writeUInt32LE(0xffff, 24 + 6 * 16 + 8);
  t.throws(() => Btf.parse(ref), { instanceOf: LinuxStructureError, message: /type 7 \(ptr\) refers to type 65535, past the last/ });
  // and through attach: __stop_BTF keeps its value, the blob in memory loses its strings
  memory.write(truth.btfGpa + 20n, u64(0xffff_ffffn).subarray(0, 4));
  await t.throwsAsync(LinuxGuest.attach(reader, { cr3: truth.cr3 }), { instanceOf: LinuxStructureError, message: /^btf at 0x[0-9a-f]+: string section/ });
});

test.serial('no kallsyms, or a layout this code does not decode: errors that name what was found', async (t) => {
    t.timeout(60_000);
  t.timeout(60_000);
  const none = await fixture(t, {}, (x, m) => m.write(x.tokenTableGpa, Buffer.alloc(2048)));
  const e = await t.throwsAsync(LinuxGuest.attach(none.reader, { cr3: none.truth.cr3 }), { instanceOf: LinuxNotFoundError });
  t.regex(e!.message, /no kallsyms in gpa \[0x[0-9a-f]+, 0x[0-9a-f]+\): \d+ digit-token runs/);
  t.is(e!.code, 'ERR_LINUX_NOT_FOUND');
  // relative_base where 6.1 keeps it is gone: a newer layout, reported as such
  const newer = await fixture(t, {}, (x, m) => m.write(x.relativeBaseGpa, Buffer.alloc(8)));
  const u = await t.throwsAsync(LinuxGuest.attach(newer.reader, { cr3: newer.truth.cr3 }), { instanceOf: LinuxUnsupportedError });
  t.regex(u!.message, /no kallsyms_relative_base before kallsyms_num_syms .*newer layout/);
  t.is(u!.code, 'ERR_LINUX_UNSUPPORTED');
  // 6.4 order, relative_base after the offsets gone too (mainline's PC-relative tables look like that)
  const pcrel = await fixture(t, { order: 'v6.4' }, (x, m) => m.write(x.relativeBaseGpa, Buffer.alloc(8)));
  const p = await t.throwsAsync(LinuxGuest.attach(pcrel.reader, { cr3: pcrel.truth.cr3 }), { instanceOf: LinuxUnsupportedError });
  t.regex(p!.message, /nor after kallsyms_offsets \(found 0x0\): a newer layout \(PC-relative offsets/);
  // a CR3 that is no kernel's page table
  const ok = await fixture(t);
  await t.throwsAsync(LinuxGuest.attach(ok.reader, { cr3: 0x10000n }), { instanceOf: LinuxNotFoundError, message: /no kernel map under CR3 0x10000: PGD 0x10000/ });
  await t.throwsAsync(LinuxGuest.attach(ok.reader, {}), { code: 'ERR_INVALID_ARG' });
});
