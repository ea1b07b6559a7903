/**
 * Shared by the examples: the demo guest (a synthetic Linux-like kernel on the
 * built-in model) by default, or `--ram FILE` for a real guest's RAM file
 * (a QEMU memory-backend-file with share=on, or a raw dump).
 */
import { ModelLab } from '../src/lab/index.js';
import { GuestMemory } from '../src/model/index.js';
import { buildSyntheticGuest, type SyntheticTruth } from '../src/inspect/index.js';
import { KvmmemError, UsageError } from '../src/index.js';

/** Where the values an example needs come from on a real guest. */
const WHERE: Record<string, string> = {
  cr3: 'CR3 of a vCPU: QEMU monitor `info registers` (or QMP human-monitor-command)',
  va: 'a kernel virtual address: `grep linux_banner /proc/kallsyms` in the guest (as root)',
  gpa: 'a guest-physical address below the end of the RAM file',
};

export type Target = Awaited<ReturnType<typeof openTarget>>;

/**
 * Runs an example against its target and always closes it; an error is one
 * line on stderr (exit 2 for bad arguments, 1 otherwise), never a stack.
 */
export async function runExample(body: (t: Target) => Promise<void>): Promise<void> {
  let t: Target | undefined;
  try {
    t = await openTarget();
    await body(t);
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`${process.argv[1]?.split('/').pop() ?? 'example'}: ${msg.split('\n', 1)[0]}\n`);
    process.exitCode = e instanceof UsageError || !(e instanceof KvmmemError) ? 2 : 1;
  } finally {
    await t?.close();
  }
}

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
      if (j >= 0 && argv[j + 1] !== undefined) {
        try {
          return BigInt(argv[j + 1]!);
        } catch {
          throw new UsageError(`--${name} ${argv[j + 1]}: not a number (give hex 0x... or decimal)`);
        }
      }
      if (fallback === undefined) throw new UsageError(`--${name} is required with --ram`, WHERE[name] ? `it is ${WHERE[name]}` : undefined);
      return fallback;
    },
    async close() { session.close(); await lab.close(); memory.close(); },
  };
}
