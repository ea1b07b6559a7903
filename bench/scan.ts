/**
 * 5. scan: `kvmmem scan --ram`'s code path over a RAM file against an in-process
 * mmap + Buffer.indexOf and against grep -c -a -F, all finding the same planted needles.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openRam } from '../src/cli/common.js';
import { scan } from '../src/inspect/index.js';
import * as libc from '../src/sys/libc.js';
import { interleave, now, round, row, stat, type Ctx } from './harness.js';

const NEEDLE = 'kvmmem-bench: Linux version 6.18.0 (needle)';

export function makeRamFile(path: string, bytes: number, matches: number): number[] {
  // Pseudo-random bytes (xorshift) without newline-free stretches long enough to matter, plus the
  // needle at `matches` offsets far apart (one per grep "line"), one across a 1 MiB chunk boundary.
  const block = Buffer.alloc(1 << 20);
  let x = 0x2545f491;
  for (let i = 0; i < block.length; i += 4) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    block.writeInt32LE(x | 0, i);
  }
  // make sure the block itself never contains the needle's first bytes by accident
  const fd = openSync(path, 'w');
  try {
    for (let off = 0; off < bytes; off += block.length) writeSync(fd, block, 0, Math.min(block.length, bytes - off), off);
    const at: number[] = [];
    const needle = Buffer.from(NEEDLE, 'latin1');
    const stride = Math.floor(bytes / matches);
    for (let k = 0; k < matches; k++) {
      const off = k === 1 ? (1 << 20) - 10 : k * stride + 12345; // k=1 straddles the first chunk boundary
      const framed = Buffer.concat([Buffer.from('\n'), needle, Buffer.from('\n')]);
      writeSync(fd, framed, 0, framed.length, off - 1);
      at.push(off);
    }
    return at.sort((a, b) => a - b);
  } finally {
    closeSync(fd);
  }
}

export async function benchScan(ctx: Ctx): Promise<void> {
  const q = ctx.quick;
  const reps = q ? 2 : 5;
  const bytes = (q ? 64 : 256) * 2 ** 20;
  const dir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const path = join(dir, `kvmmem-bench-${process.pid}.ram`);
  const at = makeRamFile(path, bytes, 16);
  ctx.params.scan = { reps, bytes, file: dir === '/dev/shm' ? 'tmpfs (/dev/shm)' : dir, needleBytes: NEEDLE.length, plantedMatches: at.length, host: 'tokenLimit 256 (as `kvmmem scan --ram`)' };
  const ks: number[] = [], direct: number[] = [], grep: number[] = [];
  const counts = { kvmmem: -1, direct: -1, grep: -1 };
  const needle = Buffer.from(NEEDLE, 'latin1');
  const grepOk = spawnSync('grep', ['--version']).status === 0;
  try {
    const ram = await openRam(path);
    try {
      const kvmmemScan = async () => {
        const t0 = now();
        const r = await scan(ram.session, ram.vm, NEEDLE, { from: 0n, to: ram.end });
        ks.push(now() - t0);
        counts.kvmmem = r.matches.length;
      };
      const directScan = () => {
        const t0 = now();
        const fd = libc.open(path, libc.O_RDONLY);
        const addr = libc.mmap(0, bytes, libc.PROT_READ, libc.MAP_SHARED, fd, 0);
        let n = 0;
        try {
          const v = libc.view(addr, bytes);
          for (let i = v.indexOf(needle); i >= 0; i = v.indexOf(needle, i + 1)) n++;
        } finally {
          libc.munmap(addr, bytes);
          libc.close(fd);
        }
        direct.push(now() - t0);
        counts.direct = n;
      };
      const grepScan = () => {
        const t0 = now();
        const r = spawnSync('grep', ['-c', '-a', '-F', NEEDLE, path], { encoding: 'utf8' });
        grep.push(now() - t0);
        counts.grep = Number(r.stdout.trim());
      };
      await kvmmemScan(); directScan();
      ks.length = 0; direct.length = 0;
      await interleave(reps, grepOk ? [kvmmemScan, directScan, grepScan] : [kvmmemScan, directScan]);
    } finally {
      await ram.close();
    }
  } finally {
    rmSync(path, { force: true });
  }
  if (counts.kvmmem !== at.length || counts.direct !== at.length || (grepOk && counts.grep !== at.length)) {
    throw new Error(`scan bench: match counts differ (planted ${at.length}, kvmmem ${counts.kvmmem}, direct ${counts.direct}, grep ${counts.grep})`);
  }
  if (!grepOk) ctx.skipped.push('scan vs grep: no grep on PATH');
  const mib = bytes / 2 ** 20;
  const G = '5. scan';
  ctx.rows.push(
    row({ id: 'scan.direct', group: G, title: `scan of a ${mib} MiB RAM file: kvmmem scan (full model stack) vs mmap + Buffer.indexOf in-process`, unit: 'ms', subject: ['kvmmem scan', ks], baseline: ['direct mmap+indexOf', direct], goal: { text: '<= 1.5x direct', op: '<=', target: 1.5 } }),
  );
  if (grepOk) ctx.rows.push(row({ id: 'scan.grep', group: G, title: `scan of a ${mib} MiB RAM file: kvmmem scan vs grep -c -a -F`, unit: 'ms', subject: ['kvmmem scan', ks], baseline: ['grep -c -a -F', grep], goal: { text: 'faster than grep (< 1x)', op: '<', target: 1 } }));
  ctx.extra.scanThroughputMiBs = { kvmmem: round(mib / (stat(ks).median / 1000)), direct: round(mib / (stat(direct).median / 1000)), ...(grepOk ? { grep: round(mib / (stat(grep).median / 1000)) } : {}) };
}
