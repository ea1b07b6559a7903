/**
 * 6. scale: 262,144 pages in one session (per-page cost flat, heap per mapping, RSS,
 * UNMAP newest vs oldest, teardown), and the real driver's O(n) UNMAP list walk timed
 * in C (native/bench/list_walk.c).
 */
import { readFileSync } from 'node:fs';
import { Session, type MappedRange } from '../src/client/session.js';
import type { TargetVm } from '../src/client/target.js';
import type { Device, IoctlArg } from '../src/device/device.js';
import { KvmmemError } from '../src/errors.js';
import { PS, round, row, runC, stat, usPer, withLab, now, type Ctx } from './harness.js';

/** RssAnon and RssShmem of this process, MiB. */
function rssParts(): { anon: number; shmem: number } {
  const st = readFileSync('/proc/self/status', 'utf8');
  const kib = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(st)?.[1] ?? NaN);
  return { anon: round(kib('RssAnon') / 1024), shmem: round(kib('RssShmem') / 1024) };
}

/** A device that accepts every MAP/UNMAP and keeps nothing: isolates the client's own bookkeeping. */
class NullDevice implements Device {
  readonly path = 'null:bench';
  closed = false;
  ioctl(_r: number, _a: IoctlArg): number { return 0; }
  ioctlBatch(_r: number, _a: Uint8Array, _s: number, count: number, results: Int32Array): number { results.fill(0, 0, count); return count; }
  error(request: number, negErrno: number): KvmmemError { return new KvmmemError(`null device: ${request} failed with ${negErrno}`, { code: 'EIO', errno: negErrno }); }
  close(): void { this.closed = true; }
}

/** A TargetVm that hands out tokens without a socket. */
function nullVm(): TargetVm {
  const token = new Uint8Array(32).fill(7);
  return {
    uuid: '00000000-0000-4000-8000-000000000000', name: 'null', state: 'connected',
    async getMapTokensSettled(n: number) { return new Array<Uint8Array>(n).fill(token); },
    on() { return undefined; }, off() { return undefined; },
  };
}

export async function benchScale(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const pages = q ? 32_768 : 262_144;
  const piece = q ? 512 : 2048;
  const pieces = pages / piece;
  const tokens = 256;
  const passes = q ? 3 : 4;
  ctx.params.scale = { pages, piecePages: piece, pieces, passes, host: `tokenLimit ${tokens}, maxTokensInFlight ${tokens}`, vm: `${pages * PS / 2 ** 20} MiB anonymous (memfd)` };
  const { gc } = ctx;
  /** JS heap plus ArrayBuffer backing stores (typed arrays of bookkeeping live there, not in the heap). */
  const heapNow = () => { gc(); gc(); const m = process.memoryUsage(); return m.heapUsed + m.arrayBuffers; };
  // client-only bookkeeping: the same pieces over a device and VM that keep nothing
  {
    const s = new Session(new NullDevice(), { maxTokensInFlight: tokens });
    const vm = nullVm();
    const warm = await s.mapRange(vm, 0, piece * PS); warm.unmap();
    const h0 = heapNow();
    const held = [];
    for (let i = 0; i < pieces; i++) held.push(await s.mapRange(vm, i * piece * PS, piece * PS));
    const h1 = heapNow();
    ctx.extra.clientHeapBytesPerMapping = round((h1 - h0) / pages);
    s.close();
    held.length = 0;
  }
  const rss0 = process.memoryUsage().rss;
  await withLab(tokens, pages * PS, async (lab) => {
    const vm = lab.vm('bench');
    const k = Math.max(1, Math.round(pieces / 10));
    const first: number[] = [], last: number[] = [], closeMs: number[] = [], mapMs: number[] = [];
    const times: number[][] = [];
    let heapPerMapping = NaN, rss1 = 0, rssAt = { anon: 0, shmem: 0 };
    const newestUs: number[] = [], oldestUs: number[] = [];
    // Several passes (a session filled to `pages`, then closed), each giving one last/first
    // ratio, so that a drift of the (shared) machine during one pass weighs less.
    for (let pass = 0; pass < passes; pass++) {
      const s = lab.open({ maxTokensInFlight: tokens });
      if (pass === 0) {
        // warm-up (JIT, every layer's code paths) with another piece size, so that the measured
        // pieces do not start on recycled windows while the later ones get new ones
        for (let i = 0; i < Math.max(4, pieces / 10); i++) (await s.mapRange(vm, (i % pieces) * piece * PS, (piece - 1) * PS)).unmap();
      }
      const h0 = pass === 0 ? heapNow() : 0;
      const t: number[] = [];
      const held: MappedRange[] = [];
      const t0 = now();
      for (let i = 0; i < pieces; i++) {
        const a = now();
        held.push(await s.mapRange(vm, i * piece * PS, piece * PS));
        t.push(usPer(now() - a, piece));
      }
      mapMs.push(now() - t0);
      times.push(t);
      // per pass: the median per-page cost of the first and of the last 10% of pieces
      first.push(stat(t.slice(0, k)).median);
      last.push(stat(t.slice(-k)).median);
      const live = lab.host.stats().mappings;
      if (live !== pages) throw new Error(`scale bench: host reports ${live} mappings, expected ${pages}`);
      if (pass === 0) {
        heapPerMapping = (heapNow() - h0) / pages;
        rss1 = process.memoryUsage().rss;
        rssAt = rssParts();
        // UNMAP cost at full occupancy: the newest piece and the oldest one (the real driver's
        // list walk makes the newest the most expensive; the model is O(1) either way), each
        // mapped again afterwards so that the teardown below still releases all `pages`.
        const unmapAt = async (i: number): Promise<number> => {
          const a = now();
          held[i]!.unmap();
          const us = usPer(now() - a, piece);
          held[i] = await s.mapRange(vm, i * piece * PS, piece * PS);
          return us;
        };
        // Mapping a piece again puts it at the end of the driver's list: it becomes the newest,
        // and the oldest is then the next piece from the start.
        let newest = pieces - 1, oldest = 0;
        for (let r = 0; r < 4; r++) {
          for (const which of r % 2 === 0 ? ['newest', 'oldest'] : ['oldest', 'newest']) {
            if (which === 'newest') newestUs.push(await unmapAt(newest));
            else { oldestUs.push(await unmapAt(oldest)); newest = oldest++; }
          }
        }
      }
      const t1 = now();
      s.close();
      closeMs.push(now() - t1);
    }
    const G = '6. scale';
    ctx.rows.push(
      row({ id: 'scale.flat', group: G, title: `${pages} pages mapped by one session in ${pieces} mapRange pieces of ${piece} (${passes} passes): per-page cost, last 10% vs first 10% of pieces`, unit: 'us/page', subject: ['last 10%', last], baseline: ['first 10%', first], goal: { text: '<= 1.2x', op: '<=', target: 1.2 }, note: 'per pass: median us/page of the last 10% of pieces over that of the first 10%' }),
      row({ id: 'scale.heap.client', group: G, title: 'JS heap (incl. ArrayBuffers) per live mapping, client (Session) bookkeeping only', unit: 'bytes', subject: ['kvmmem client', [ctx.extra.clientHeapBytesPerMapping as number]], goal: { text: '<= 256 B', op: '<=', target: 256 }, absolute: true }),
      row({ id: 'scale.heap.process', group: G, title: 'JS heap (incl. ArrayBuffers) per live mapping, whole process (client + driver model + host model)', unit: 'bytes', subject: ['whole process', [heapPerMapping]], goal: { text: '<= 256 B', op: '<=', target: 256 }, absolute: true }),
      row({ id: 'scale.unmap', group: G, title: `UNMAP at ${pages} live mappings: the newest piece vs the oldest, alternated 4 times (driver model: no list walk)`, unit: 'us/page', subject: ['newest', newestUs], baseline: ['oldest', oldestUs], goal: { text: '<= 1.2x', op: '<=', target: 1.2 } }),
      row({ id: 'scale.rss', group: G, title: `RSS with ${pages} pages (${pages * PS / 2 ** 20} MiB of guest memory) mapped: ${rssAt.shmem} MiB shared (the guest pages themselves) + ${rssAt.anon} MiB anonymous (JS heap, code, window pages not mapped to the guest); peak RSS of the bench process ${round(process.resourceUsage().maxRSS / 1024)} MiB`, unit: 'MiB', subject: ['RSS', [rss1 / 2 ** 20]] }),
      row({ id: 'scale.teardown', group: G, title: `teardown: Session.close() of ${pages} live mappings (driver release)`, unit: 'ms', subject: ['close()', closeMs], note: `${round(usPer(stat(closeMs).median, pages))} us/page` }),
    );
    if (ctx.cbin) {
      // The real driver's UNMAP walks map_list (O(n)): its cost at this many live mappings, from C.
      const w = runC<{ ns_per_entry: number; newest_unmap_us: number }>(ctx, 'list_walk', [String(pages), q ? '50' : '20']);
      const teardownNewestFirstSec = (w.ns_per_entry * pages * (pages + 1)) / 2 / 1e9;
      ctx.rows.push(row({ id: 'scale.driver-walk', group: G, title: `real driver (C list walk, optimistic): UNMAP of the newest of ${pages} live mappings`, unit: 'us/page', subject: ['kvmmem model UNMAP (newest)', [stat(newestUs).median]], baseline: ['C map_list walk', [w.newest_unmap_us]], kind: 'speedup', note: `the real driver would need ~${teardownNewestFirstSec.toFixed(0)} s to unmap all ${pages} newest-first (${w.ns_per_entry.toFixed(1)} ns per entry walked)` }));
      ctx.extra.driverListWalk = { n: pages, nsPerEntry: round(w.ns_per_entry), newestUnmapUs: round(w.newest_unmap_us), teardownNewestFirstSec: round(teardownNewestFirstSec) };
    }
    ctx.extra.scale = {
      mapTotalMs: mapMs.map(round), usPerPageAll: mapMs.map((m) => round(usPer(m, pages))), pieceUsPerPage: times.map((t) => t.map(round)),
      newestUnmapUsPerPage: newestUs.map(round), oldestUnmapUsPerPage: oldestUs.map(round),
      closeMs: closeMs.map(round), heapBytesPerMappingProcess: round(heapPerMapping),
      rssMiB: round(rss1 / 2 ** 20), rssAnonMiB: rssAt.anon, rssShmemMiB: rssAt.shmem, rssDeltaMiB: round((rss1 - rss0) / 2 ** 20), peakRssMiB: round(process.resourceUsage().maxRSS / 1024),
    };
  });
}
