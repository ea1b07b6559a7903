/**
 * `kvmmem lab up|run|down|status`: the two-VM lab (docs/lab.md). `up` starts
 * a detached daemon owning the VMs; `run` uses a lab that is up, or boots one
 * for the one command (in this process) and tears it down after, also on
 * SIGINT/SIGTERM/SIGHUP; `down` stops a lab by its recorded pids and removes
 * its files.
 */
import { type Command, InvalidArgumentError } from 'commander';
import { constants as osConstants } from 'node:os';
import { LAB_PROVISION_COMMAND, LabError } from '../lab/errors.js';
import { Lab, type LabInfo } from '../lab/lab.js';
import { LabClient, runLabDaemon, spawnLabDaemon } from '../lab/client.js';
import { alive, DEFAULT_LAB_NAME, listLabs, readState, runDirOf, stopLab } from '../lab/run-dir.js';
import { EXIT_SIGNALS } from './signals.js';
import { EXIT, output, runCommand } from './common.js';

/** Exit code of `lab run` when --timeout killed the command (as timeout(1)). */
export const EXIT_TIMEOUT = 124;

const mib = (v: string): number => {
  if (!/^\d+$/.test(v) || Number(v) < 64 || Number(v) > 2816) throw new InvalidArgumentError('must be an integer in 64..2816 (MiB)');
  return Number(v);
};
const seconds = (v: string): number => {
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('must be a positive number of seconds');
  return n;
};
const envPair = (v: string, prev: Record<string, string> = {}): Record<string, string> => {
  const i = v.indexOf('=');
  if (i <= 0) throw new InvalidArgumentError(`'${v}' is not NAME=VALUE`);
  return { ...prev, [v.slice(0, i)]: v.slice(i + 1) };
};

function describe(info: LabInfo): string[] {
  return [
    `lab '${info.name}' is up (${(info.ms.up / 1000).toFixed(1)} s)`,
    `  target VM       ${info.target.vm}: RAM ${info.target.ramPath} (${info.target.memMb} MiB), pid ${info.target.pid}`,
    `  introspector VM ${info.introspector.vm}: ${info.introspector.memMb} MiB, pid ${info.introspector.pid}, ip ${info.introspector.ip ?? '-'}`,
    `  listen inside   ${info.listen} (host side ${info.hostForward})`,
    `  lab host        ${info.host.running ? 'running' : `not running: ${info.host.reason}`}`,
    `  device          ${info.device.ok ? info.device.path : info.device.reason}`,
    `  run dir         ${info.runDir}`,
  ];
}

/** Replace the CLI's exit-at-once signal handlers with `onSignal` for the duration of a lab run. */
function onSignals(onSignal: (sig: (typeof EXIT_SIGNALS)[number]) => void): void {
  for (const sig of EXIT_SIGNALS) {
    process.removeAllListeners(sig);
    process.once(sig, () => {
      // A second signal: leave now (process exit hooks still kill the VMs and remove their files).
      process.once(sig, () => process.exit(128 + osConstants.signals[sig]));
      onSignal(sig);
    });
  }
}

/** Adds `lab` to the program (through program.command, so it inherits exitOverride and the error output). */
export function addLabCommand(program: Command): Command {
  const lab = program.command('lab').description('the two-VM lab: a live target VM and an introspector VM with /dev/kvmmem (docs/lab.md)')
    .addHelpText('after', `\nProvision once with: ${LAB_PROVISION_COMMAND}\n\nExamples:\n  kvmmem lab up\n  kvmmem lab run -- node -e "console.log(process.env.KVMMEM_LISTEN)"\n  kvmmem lab status\n  kvmmem lab down`);

  lab.command('up')
    .description('boot a lab (target + introspector VMs, lab host) in a background process that outlives this command')
    .option('--name <name>', 'lab name', DEFAULT_LAB_NAME)
    .option('--target-memory <MiB>', 'target VM RAM', mib, 256)
    .option('--introspector-memory <MiB>', 'introspector VM RAM', mib, 1024)
    .option('--json', 'one JSON document')
    .addHelpText('after', '\nExamples:\n  kvmmem lab up\n  kvmmem lab up --name ci --target-memory 512 --json')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      // Interrupted while the lab boots: stop the half-started lab rather than leave it behind.
      onSignals((sig) => { void stopLab(o.name).finally(() => process.exit(128 + osConstants.signals[sig])); });
      const info = await spawnLabDaemon({ name: o.name, targetMemoryMb: o.targetMemory, introspectorMemoryMb: o.introspectorMemory });
      for (const l of describe(info)) out.say(l);
      out.result(info);
      return EXIT.OK;
    }));

  lab.command('run')
    .description('run CMD inside the introspector VM as root, in this directory, with KVMMEM_LISTEN and KVMMEM_COOKIE set; exits with its code')
    .option('--name <name>', 'lab name', DEFAULT_LAB_NAME)
    .option('--timeout <seconds>', 'kill the command after this long (exit 124)', seconds)
    .option('--env <NAME=VALUE>', 'add to the command\'s environment (repeatable)', envPair)
    .option('--cwd <dir>', 'working directory inside (default: this one; / is shared)')
    .option('--target-memory <MiB>', 'target VM RAM when a lab is booted for this command', mib, 256)
    .argument('<cmd>', 'command')
    .argument('[args...]', 'its arguments (put -- before CMD)')
    .addHelpText('after', '\nWithout a lab up, boots one for this command and tears it down afterwards.\n\nExamples:\n  kvmmem lab run -- node -e "console.log(process.version)"\n  kvmmem lab run --timeout 60 -- npx tsx examples/scan.ts')
    .action((cmd: string, args: string[], o) => runCommand(async () => {
      const runOpts = {
        ...(o.env ? { env: o.env as Record<string, string> } : {}),
        ...(o.cwd ? { cwd: o.cwd as string } : {}),
        ...(o.timeout ? { timeoutMs: Math.round(o.timeout * 1000) } : {}),
      };
      const ac = new AbortController();
      let signalled: number | null = null;
      const st = readState(runDirOf(o.name));
      const run = async (runner: { run: Lab['run'] }): Promise<number> => {
        try {
          const code = await runner.run(cmd, args, { ...runOpts, signal: ac.signal });
          return signalled ?? code;
        } catch (e) {
          if (e instanceof LabError && e.code === 'ETIMEDOUT' && o.timeout) {
            process.stderr.write(`kvmmem: ${e.message}\n`);
            return EXIT_TIMEOUT;
          }
          if (e instanceof LabError && e.code === 'ELAB_EXEC') {
            process.stderr.write(`kvmmem: ${e.message}\n`);
            return 127;
          }
          throw e;
        }
      };
      if (st && alive(st.owner)) {
        const client = await LabClient.connect(o.name);
        onSignals((sig) => { signalled = 128 + osConstants.signals[sig]; ac.abort(); });
        try {
          return await run(client);
        } finally {
          client.close();
        }
      }
      // No lab up: one for this command, owned by this process.
      let labP: Promise<Lab> | null = null;
      let closing = false;
      onSignals((sig) => {
        signalled = 128 + osConstants.signals[sig];
        closing = true;
        ac.abort();
        // Booting or running: either way close what there is, then leave with the signal's code.
        void (labP ?? Promise.reject(new Error('no lab'))).then((l) => l.close(), () => {}).finally(() => process.exit(signalled!));
      });
      // Boot progress only on a terminal: a captured stderr is CMD's alone.
      labP = Lab.start({ name: o.name, targetMemoryMb: o.targetMemory, ...(process.stderr.isTTY ? { log: (l: string) => process.stderr.write(`kvmmem lab: ${l}\n`) } : {}) });
      const l = await labP;
      try {
        if (closing) return signalled!;
        return await run(l);
      } finally {
        await l.close();
      }
    }));

  lab.command('down')
    .description('stop a lab: its daemon, VMs and virtiofsd by pid; removes its run directory and /dev/shm files')
    .option('--name <name>', 'lab name', DEFAULT_LAB_NAME)
    .option('--json', 'one JSON document')
    .addHelpText('after', '\nExamples:\n  kvmmem lab down\n  kvmmem lab down --name ci')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      const r = await stopLab(o.name);
      if (!r.found) out.say(`no lab '${o.name}'`);
      else out.say(`lab '${o.name}' down${r.killed.length ? ` (stopped ${r.killed.join(', ')})` : ''}`);
      if (r.left.length) process.stderr.write(`kvmmem: still there after down: ${r.left.join(', ')}\n`);
      out.result({ name: o.name, ...r });
      return r.left.length ? EXIT.FAILED : EXIT.OK;
    }));

  lab.command('status')
    .description('the labs on this machine: state, pids, listen address, device')
    .option('--json', 'one JSON document')
    .addHelpText('after', '\nExamples:\n  kvmmem lab status\n  kvmmem lab status --json')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      const labs = listLabs().map((l) => ({
        name: l.name, runDir: l.runDir, state: l.alive ? l.state?.state ?? 'unknown' : 'dead (run `kvmmem lab down` to clean up)',
        owner: l.state?.owner ?? null, pids: (l.state?.pids ?? []).map((p) => ({ ...p, alive: alive(p) })), info: (l.state?.info ?? null) as LabInfo | null,
      }));
      if (labs.length === 0) out.say('no labs');
      for (const l of labs) {
        if (l.info && l.state === 'ready') for (const line of describe(l.info)) out.say(line);
        else out.say(`lab '${l.name}': ${l.state}`);
        out.say(`  pids            ${[l.owner ? `owner ${l.owner.pid}` : '', ...l.pids.map((p) => `${p.what} ${p.pid}${p.alive ? '' : ' (gone)'}`)].filter(Boolean).join(', ')}`);
      }
      out.result({ labs });
      return EXIT.OK;
    }));

  lab.command('daemon', { hidden: true })
    .description('(internal) the process `lab up` starts: owns one lab until SIGTERM')
    .requiredOption('--name <name>', 'lab name')
    .option('--target-memory <MiB>', 'target VM RAM', mib)
    .option('--introspector-memory <MiB>', 'introspector VM RAM', mib)
    .action((o) => runCommand(() => runLabDaemon({ name: o.name, targetMemoryMb: o.targetMemory, introspectorMemoryMb: o.introspectorMemory })));

  return lab;
}

