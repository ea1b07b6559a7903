/**
 * `kvmmem demo`: the main job on the built-in model. A model host with a
 * synthetic Linux-like guest connects to the tool's unix socket; the tool maps
 * and scans its memory, walks its page tables, follows a kernel list, watches a
 * live page, and tears everything down — then shows nothing is left mapped.
 */
import { ModelLab } from '../lab/model-lab.js';
import { hex } from '../client/address.js';
import { PhysicalReader, AddressSpace, scan, buildSyntheticGuest } from '../inspect/index.js';
import { readFileSync } from 'node:fs';
import { freemem } from 'node:os';
import type { Output } from './common.js';
import { CliUsageError, progressBar } from './common.js';

/** Bytes the kernel could give without swapping (MemAvailable), or os.freemem() without /proc. */
function availableMemory(): number {
  try {
    const m = /^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch { /* no /proc */ }
  return freemem();
}

export interface DemoOptions {
  seed: number;
  memoryMiB: number;
}

export async function runDemo(out: Output, opts: DemoOptions): Promise<number> {
  // The guest's RAM is a memfd the demo fills: more than the machine has would end in the OOM killer.
  const avail = availableMemory();
  if (opts.memoryMiB < 1) throw new CliUsageError('demo: --memory must be at least 1 MiB');
  if (opts.memoryMiB * 2 ** 20 > avail * 0.8) {
    throw new CliUsageError(`demo: --memory ${opts.memoryMiB} MiB is more than this machine can spare (${Math.floor(avail / 2 ** 20)} MiB available): give at most ${Math.floor((avail * 0.8) / 2 ** 20)}`);
  }
  const t0 = performance.now();
  const lab = await ModelLab.start({ vms: [{ name: 'demo-guest', memory: opts.memoryMiB * 1024 * 1024 }] });
  try {
    const model = lab.modelVm('demo-guest');
    const vm = lab.vm('demo-guest');
    const truth = buildSyntheticGuest(model.memory, { seed: opts.seed });
    out.say('kvmmem demo: the built-in hypercall model, end to end');
    out.say(`  tool   IntrospectionServer on ${lab.socketPath}`);
    out.say(`  host   model KVM host (KVMI ${lab.host.protocol}), VM ${vm.name} ${vm.uuid}, ${opts.memoryMiB} MiB`);
    out.say(`         hooked over the socket: handshake ok, KVMI version ${vm.version}`);
    out.say(`  guest  synthetic Linux-like kernel (seed ${hex(opts.seed)}): page tables, banner, task list`);
    out.say();

    const session = lab.open();
    const end = BigInt(opts.memoryMiB) << 20n;

    // 1. Scan all of guest-physical memory for the banner, zero-copy.
    const bar = progressBar(out.json, Number(end));
    const found = await scan(session, vm, 'Linux version ', { to: end, onProgress: (p) => bar.update(p.done, `${p.matches} matches`) });
    bar.stop();
    const reader = new PhysicalReader(session, vm, { cachePages: 64 });
    const banner = (await reader.readCString(found.matches[0]!, 256)).replace(/\n$/, '');
    out.say(`1. scan of ${opts.memoryMiB} MiB for "Linux version ": ${found.matches.length} match(es) at ${found.matches.map(hex).join(', ')}`);
    out.say(`   ${banner}`);

    // 2. Page-table walk: the banner's kernel virtual address leads to the same page.
    const space = new AddressSpace(reader, truth.cr3);
    const tr = await space.translate(truth.bannerVa);
    out.say(`2. page walk from cr3 ${hex(truth.cr3)}: linux_banner ${hex(truth.bannerVa)} -> gpa ${hex(tr.gpa)} (${tr.pageSize >= 1 << 20 ? `${tr.pageSize >> 20} MiB` : '4 KiB'} page)${found.matches.includes(tr.gpa) ? ', the page the scan found' : ''}`);

    // 3. Follow the kernel's task list through virtual reads.
    const tasks: { pid: number; comm: string; va: bigint }[] = [];
    let va = truth.tasks[0]!.va;
    do {
      const pid = await space.readU32(va + BigInt(truth.taskLayout.pid));
      const comm = (await space.read(va + BigInt(truth.taskLayout.comm), 16)).toString('latin1').replace(/\0.*$/s, '');
      tasks.push({ pid, comm, va });
      va = await space.readU64(va + BigInt(truth.taskLayout.next));
    } while (va !== truth.tasks[0]!.va && tasks.length < 1000);
    out.say(`3. task list via virtual reads: ${tasks.map((t) => `${t.pid}:${t.comm}`).join(' ')}`);

    // 4. A live mapping: the guest writes, the tool sees it through the same mapping (no copy, no remap).
    const task = truth.tasks[1]!;
    const commGpa = task.gpa + BigInt(truth.taskLayout.comm);
    const live = await session.mapRange(vm, commGpa, 16);
    const comm = () => live.buffer.toString('latin1').replace(/\0.*$/s, '');
    const before = comm();
    model.memory.write(commGpa, Buffer.from('demo-renamed\0'));
    const after = comm();
    out.say(`4. live mapping of gpa ${hex(commGpa)} at ${hex(live.address)}: comm "${before}" -> the guest writes -> "${after}" seen through the mapping`);
    live.unmap();

    const stats = session.stats;
    const rstats = reader.stats;
    out.say(`5. session: ${stats.maps} pages mapped, ${stats.unmaps} unmapped, ${stats.tokens} tokens in ${stats.tokenRoundTrips} round trips, ${stats.retries} retries`);
    out.say(`   reader: ${rstats.hits} hits, ${rstats.misses} misses, ${rstats.rangeMaps} range maps`);
    const stillMapped = lab.host.stats().mappings;
    session.close(); // the driver's release() unmaps whatever the reader still holds
    reader.close();
    const hostAfter = lab.host.stats();
    const counters = lab.host.counters();
    out.say(`6. teardown: ${stillMapped} page(s) still mapped before close; after close the host holds ${hostAfter.mappings} mappings, ${hostAfter.tokensOutstanding} outstanding tokens, ${lab.host.driver.file_list.size} open driver files`);
    out.say(`   host totals: ${counters.mapHypercalls} MAP and ${counters.unmapHypercalls} UNMAP hypercalls, ${counters.remapCalls} remap calls for ${counters.remappedPages} pages`);
    const ok = found.matches.includes(tr.gpa) && banner === truth.banner && tasks.length === truth.tasks.length
      && after === 'demo-renamed' && hostAfter.mappings === 0;
    out.say();
    out.say(`${ok ? 'ok' : 'MISMATCH'}: every result above agrees with the synthetic guest's ground truth (${Math.round(performance.now() - t0)} ms)`);
    out.result({
      ok, vm: { name: vm.name, uuid: vm.uuid, memoryBytes: end },
      scan: { matches: found.matches, scannedBytes: found.scannedBytes, banner },
      translate: { cr3: truth.cr3, va: truth.bannerVa, gpa: tr.gpa, pageSize: tr.pageSize },
      tasks, liveMapping: { gpa: commGpa, before, after },
      session: stats, reader: rstats, host: { afterClose: hostAfter, counters },
    });
    return ok ? 0 : 1;
  } finally {
    await lab.close();
  }
}
