/**
 * An initramfs to append to the live target's (BootOptions.extraInitrd) so its
 * /init prints the truth the Linux views are checked against: the hook
 * scripts/live-target/linux-truth.sh as /kvmmem-truth.sh, plus a few modules
 * of the booted kernel when the cache has them (scripts/lab provisioning keeps
 * them under <live dir>/modules/<release>/).
 *
 * Self-contained like target.ts: imports nothing from the rest of src/.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { liveTargetDir } from './target.js';

/** Loaded in this order (busybox insmod resolves no dependencies); chosen to load without devices and give users. */
export const TRUTH_MODULES = ['fuse', 'failover', 'net_failover', 'virtio', 'virtio_ring', 'virtio_net'] as const;

export interface TruthInitrd {
  path: string;
  /** Module files packed (empty when the cache has none of this kernel). */
  modules: string[];
}

const HOOK = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'scripts', 'live-target', 'linux-truth.sh');

/** Is the provisioned /init new enough to source /kvmmem-truth.sh? */
export function initHasTruthHook(): boolean {
  try {
    return fs.readFileSync(path.join(liveTargetDir(), 'init.sh'), 'utf8').includes('/kvmmem-truth.sh');
  } catch {
    return false;
  }
}

/** Builds the archive at `out` (needs cpio and gzip on PATH). */
export function buildTruthInitrd(out: string): TruthInitrd {
  const dir = liveTargetDir();
  const stage = fs.mkdtempSync(path.join(path.dirname(out), 'truth-initrd.'));
  try {
    fs.copyFileSync(HOOK, path.join(stage, 'kvmmem-truth.sh'));
    const modules: string[] = [];
    let release = '';
    try {
      release = fs.readFileSync(path.join(dir, 'kernel-package'), 'utf8').trim().replace(/^linux-image-/, '');
    } catch { /* no package name: no modules */ }
    const modRoot = path.join(dir, 'modules', release, 'kernel');
    if (release !== '' && fs.existsSync(modRoot)) {
      const found = new Map<string, string>();
      const walk = (d: string): void => {
        for (const e of fs.readdirSync(d, { withFileTypes: true })) {
          const p = path.join(d, e.name);
          if (e.isDirectory()) walk(p);
          else if (e.name.endsWith('.ko')) found.set(e.name.slice(0, -3), p);
        }
      };
      walk(modRoot);
      // all or nothing: a partial set would fail on a missing dependency
      if (TRUTH_MODULES.every((m) => found.has(m))) {
        fs.mkdirSync(path.join(stage, 'kmods'));
        for (const m of TRUTH_MODULES) {
          fs.copyFileSync(found.get(m)!, path.join(stage, 'kmods', `${m}.ko`));
          modules.push(`${m}.ko`);
        }
        fs.writeFileSync(path.join(stage, 'kmods', 'order'), modules.join('\n') + '\n');
      }
    }
    const list = execFileSync('find', ['.', '-mindepth', '1'], { cwd: stage, encoding: 'utf8' }).split('\n').filter(Boolean).sort().join('\n') + '\n';
    const cpio = execFileSync('cpio', ['-o', '-H', 'newc', '-R', '0:0', '--quiet'], { cwd: stage, input: list, maxBuffer: 64 << 20 });
    fs.writeFileSync(out, execFileSync('gzip', ['-9n'], { input: cpio, maxBuffer: 64 << 20 }));
    return { path: out, modules };
  } finally {
    fs.rmSync(stage, { recursive: true, force: true });
  }
}
