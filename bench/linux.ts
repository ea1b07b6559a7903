/**
 * linux: LinuxGuest on a 256 MiB RAM file of the live target (a stock Debian
 * kernel frozen with QMP stop and copied), through `kvmmem ps --ram`'s stack:
 * attach from nothing (base, kallsyms, BTF) with CR3 and by searching all RAM,
 * a process list, symbol lookup by address. Without a provisioned live target
 * the synthetic Linux guest stands in (said in the params). Goals of issue 12.
 */
import { copyFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openRam } from '../src/cli/common.js';
import { PhysicalReader } from '../src/inspect/index.js';
import { GuestMemory } from '../src/model/index.js';
import { LinuxGuest, buildSyntheticLinux } from '../src/os/linux/index.js';
import { bootLiveTarget, liveTargetAvailable } from '../src/live/target.js';
import { now, row, type Ctx } from './harness.js';

const G = 'linux';

/** A RAM file with a Linux kernel in it, and the CR3 to start from. */
async function ramFile(ctx: Ctx, path: string): Promise<{ cr3: bigint; source: string }> {
  const avail = liveTargetAvailable();
  if (avail.ok) {
    const t = await bootLiveTarget(`kvmmem-bench-linux-${process.pid}`, { memMb: 256, timeoutMs: 150_000 });
    try {
      await t.qmp('stop'); // a still image: every repetition reads the same guest
      const cr3 = await t.cr3();
      copyFileSync(t.ramPath, path);
      return { cr3, source: `live target (${t.truth.banner.split(' ').slice(0, 3).join(' ')}), 256 MiB, frozen by QMP stop and copied` };
    } finally {
      await t.stop();
    }
  }
  ctx.log(`bench linux: live target unavailable (${avail.reason}); using the synthetic Linux guest`);
  rmSync(path, { force: true });
  const { writeFileSync, truncateSync } = await import('node:fs');
  writeFileSync(path, '');
  truncateSync(path, 256 * 2 ** 20);
  const mem = GuestMemory.fromFile(path);
  const truth = buildSyntheticLinux(mem, { extraSymbols: 20_000 });
  mem.close();
  return { cr3: truth.cr3, source: 'synthetic Linux guest (live target not provisioned), 256 MiB' };
}

export async function benchLinux(ctx: Ctx): Promise<void> {
  const reps = ctx.quick ? 3 : 7;
  const dir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const path = join(dir, `kvmmem-bench-linux-copy-${process.pid}.ram`);
  try {
    const { cr3, source } = await ramFile(ctx, path);
    const ram = await openRam(path);
    try {
      const attachCr3: number[] = [], attachSearch: number[] = [], ps: number[] = [], lookup: number[] = [];
      let nproc = 0;
      for (let i = 0; i < reps; i++) {
        // from nothing: a fresh reader (empty page cache) each time
        {
          using reader = new PhysicalReader(ram.session, ram.vm, { cachePages: 1024 });
          const t0 = now();
          await LinuxGuest.attach(reader, { cr3 });
          attachCr3.push(now() - t0);
        }
        {
          using reader = new PhysicalReader(ram.session, ram.vm, { cachePages: 1024 });
          const t0 = now();
          await LinuxGuest.attach(reader, { end: ram.end });
          attachSearch.push(now() - t0);
        }
      }
      using reader = new PhysicalReader(ram.session, ram.vm, { cachePages: 1024 });
      const guest = await LinuxGuest.attach(reader, { cr3 });
      await guest.processes(); // layouts resolved once, as every later call finds them
      for (let i = 0; i < reps; i++) {
        const t0 = now();
        nproc = (await guest.processes()).length;
        ps.push(now() - t0);
      }
      // lookups of addresses spread over the whole table, each inside a symbol
      const syms = guest.symbols;
      const n = 200_000;
      const addrs = Array.from({ length: 1024 }, (_, i) => syms.addresses[Math.floor((i * syms.count) / 1024)]! + 3n);
      let sink = 0;
      for (let r = 0; r < reps; r++) {
        const t0 = now();
        for (let i = 0; i < n; i++) sink += syms.symbolize(addrs[i & 1023]!).length;
        lookup.push(((now() - t0) * 1000) / n);
      }
      if (sink === 0) throw new Error('bench linux: no lookups');
      ctx.params.linux = { reps, source, symbols: syms.count, btfTypes: guest.types.count, processes: nproc, lookupsPerRep: n };
      ctx.rows.push(
        row({ id: 'linux.attach.cr3', group: G, title: 'LinuxGuest.attach from CR3: base, all of kallsyms, BTF (fresh page cache)', unit: 'ms', subject: ['kvmmem', attachCr3], goal: { text: '< 500 ms', op: '<', target: 500 }, absolute: true }),
        row({ id: 'linux.attach.search', group: G, title: 'LinuxGuest.attach by searching all RAM (no CR3): kallsyms anywhere, base by three checks, BTF', unit: 'ms', subject: ['kvmmem', attachSearch] }),
        row({ id: 'linux.ps', group: G, title: `processes(): the task list walked, names as /proc prints them (${nproc} processes)`, unit: 'ms', subject: ['kvmmem', ps], goal: { text: '< 20 ms', op: '<', target: 20 }, absolute: true }),
        row({ id: 'linux.symbolize', group: G, title: `symbols.symbolize(addr) -> name+0x.. over ${syms.count} symbols`, unit: 'µs', subject: ['kvmmem', lookup], goal: { text: '< 2 µs', op: '<', target: 2 }, absolute: true }),
      );
    } finally {
      await ram.close();
    }
  } finally {
    rmSync(path, { force: true });
  }
}
