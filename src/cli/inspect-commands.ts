/**
 * The bodies of `kvmmem scan`, `read` and `translate`, on any Target (a RAM
 * file through the model, or a real deployment; see target.ts).
 */
import { hex } from '../client/address.js';
import { PhysicalReader, AddressSpace, scan, type ScanPattern } from '../inspect/index.js';
import * as faults from '../sys/faults.js';
import { CliUsageError, EXIT, formatBytes, hexdump, progressBar, type Output } from './common.js';
import type { Target } from './target.js';

/** scan over a deployment whose host does not answer KVMI_GET_MAX_GFN (v4) needs an end. */
export const SCAN_NEEDS_TO = 'scan: --to is required here: the host did not tell the guest\'s memory size (KVMI_GET_MAX_GFN; a v4 host has none)';

/** Most bytes one `kvmmem read` copies. */
export const READ_MAX = 64 * 2 ** 20;

export async function scanTarget(out: Output, target: Target, o: { pattern: ScanPattern; from?: bigint; to?: bigint; max?: number }): Promise<number> {
  const end = target.end;
  if (o.to === undefined && end === null) {
    throw new CliUsageError(SCAN_NEEDS_TO);
  }
  const to: bigint = o.to ?? end!;
  const from: bigint = o.from ?? 0n;
  if (end !== null && to > end) throw new CliUsageError(`--to ${hex(to)} is past the end of ${target.label} (${hex(end)})`);
  if (from >= to) throw new CliUsageError(`--from ${hex(from)} must be below --to ${hex(to)}`);
  const patternBytes = typeof o.pattern === 'string' ? Buffer.byteLength(o.pattern, 'latin1') : o.pattern instanceof Uint8Array ? o.pattern.length : 0;
  if (patternBytes > Number(to - from)) out.say(`note: the pattern (${formatBytes(patternBytes)}) is longer than the range (${formatBytes(Number(to - from))}): nothing can match`);
  const bar = progressBar(out.json, Number(to - from));
  const t0 = performance.now();
  const r = await scan(target.session, target.vm, o.pattern, {
    from, to, ...(o.max === undefined ? {} : { maxMatches: o.max }),
    onProgress: (p) => bar.update(p.done, `${p.matches} matches`),
    // Matches as they are found: a long scan shows its results early.
    onMatch: out.json ? undefined : (gpa) => out.say(hex(gpa)),
  }).finally(() => bar.stop());
  const ms = Math.round(performance.now() - t0);
  out.say(`${r.matches.length} match(es) in ${formatBytes(r.scannedBytes)}, ${r.skippedPages} pages skipped, ${ms} ms`);
  out.result({ ...labelOf(target), from, to, matches: r.matches, scannedBytes: r.scannedBytes, skippedPages: r.skippedPages, ms });
  return r.matches.length > 0 ? EXIT.OK : EXIT.FAILED;
}

export async function readTarget(out: Output, target: Target, o: { gpa: bigint; len: number }): Promise<number> {
  if (o.len > READ_MAX) throw new CliUsageError('--len is limited to 64 MiB per read');
  if (target.end !== null && o.gpa + BigInt(o.len) > target.end) {
    throw new CliUsageError(`[${hex(o.gpa)}, +${o.len}) reaches past the end of ${target.label} (${hex(target.end)})`);
  }
  let data: Buffer;
  if (target.kind === 'ram') {
    // A RAM file that shrinks under the read: a typed error (sys/faults), not EFAULT or SIGBUS.
    const watch = faults.watch(target.vm.uuid);
    if (!faults.guarded()) watch.verify('read');
    data = await target.session.read(target.vm, o.gpa, o.len).catch((e: unknown) => { watch.check('read'); throw e; });
    watch.check('read');
  } else {
    data = await target.session.read(target.vm, o.gpa, o.len);
  }
  out.say(hexdump(data, o.gpa));
  out.result({ ...labelOf(target), gpa: o.gpa, length: data.length, hex: data.toString('hex') });
  return EXIT.OK;
}

export async function translateTarget(out: Output, target: Target, o: { cr3: bigint; va: bigint; levels: 4 | 5 }): Promise<number> {
  // A root past the RAM is bad input (as read's range), not a failed walk.
  if (target.end !== null && o.cr3 - (o.cr3 & 0xfffn) >= target.end) {
    throw new CliUsageError(`--cr3 ${hex(o.cr3)} is past the end of ${target.label} (${hex(target.end)}): give CR3 from this guest (QEMU: info registers)`);
  }
  using reader = new PhysicalReader(target.session, target.vm, { cachePages: 16 });
  const tr = await new AddressSpace(reader, o.cr3, { levels: o.levels }).translate(o.va);
  out.say(`${hex(o.va)} -> ${hex(tr.gpa)} (${tr.pageSize} byte page; entries ${tr.entries.map(hex).join(' ')})`);
  out.result({ ...labelOf(target), cr3: o.cr3, va: o.va, gpa: tr.gpa, pageSize: tr.pageSize, entries: tr.entries });
  return EXIT.OK;
}

/** The JSON documents name their target: `ram` (as before) or `vm`. */
function labelOf(t: Target): Record<string, unknown> {
  return t.kind === 'ram' ? { ram: t.label } : { vm: { name: t.vm.name, uuid: t.vm.uuid } };
}
