/**
 * Shared by the examples: the demo guest (a synthetic Linux-like kernel on the
 * built-in model) by default, or `--ram FILE` for a real guest's RAM file
 * (a QEMU memory-backend-file with share=on, or a raw dump).
 */
import { ModelLab } from '../src/lab/index.js';
import { GuestMemory } from '../src/model/index.js';
import { buildSyntheticGuest, type SyntheticTruth } from '../src/inspect/index.js';

export async function openTarget(argv = process.argv.slice(2)) {
  const i = argv.indexOf('--ram');
  const ram = i >= 0 ? argv[i + 1] : undefined;
  const memory = ram ? GuestMemory.fromFile(ram, { readOnly: !argv.includes('--write') }) : GuestMemory.anonymous(64 << 20);
  const truth: SyntheticTruth | undefined = ram ? undefined : buildSyntheticGuest(memory);
  const lab = await ModelLab.start({ vms: [{ name: ram ?? 'demo-guest', memory }], host: { tokenLimit: 256 } });
  const session = lab.open({ maxTokensInFlight: 256 });
  return {
    lab, memory, session, truth,
    vm: lab.vm(ram ?? 'demo-guest'),
    end: memory.regions.reduce((e, r) => (r.gpa + r.size > e ? r.gpa + r.size : e), 0n),
    /** A value given as `--name VALUE` (hex or decimal), else the fallback. */
    arg(name: string, fallback?: bigint): bigint {
      const j = argv.indexOf(`--${name}`);
      if (j >= 0 && argv[j + 1] !== undefined) return BigInt(argv[j + 1]!);
      if (fallback === undefined) throw new Error(`--${name} is required with --ram`);
      return fallback;
    },
    async close() { session.close(); await lab.close(); memory.close(); },
  };
}
