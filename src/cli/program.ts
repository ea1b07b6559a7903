/**
 * The `kvmmem` command line (commander). Every command takes addresses in hex
 * or decimal, prints text or one JSON document (--json), and exits 0 on
 * success, 1 when the operation failed, 2 on bad input.
 */
import { hex } from '../client/address.js';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { IntrospectionServer, formatAddress } from '../channel/index.js';
import { LinuxDevice } from '../device/linux-device.js';
import { ModelLab } from '../lab/model-lab.js';
import { CliUsageError, EXIT, output, parseAddress, parseCount, resolveCookie, runCommand } from './common.js';
import { READ_MAX, readTarget, scanTarget, translateTarget } from './inspect-commands.js';
import { LISTEN_ENV, listenOf, targetOptions, withTarget } from './target.js';
import { runDemo } from './demo.js';
import { runSelftest, SELFTEST_CHECKS, type CheckResult } from './selftest.js';
import { benchCommand } from './bench-command.js';
import { registerYara } from './yara.js';
import { registerLinuxCommands } from './linux.js';
import { addLabCommand } from './lab.js';

const EXIT_HELP = `
Exit codes:
  0  success
  1  the operation failed (an error from the device, the host or the guest; a failing selftest; scan: no match)
  2  bad input (unknown option, malformed address, missing file)`;

export function buildProgram(): Command {
  const program = new Command('kvmmem')
    .description('Map other VMs\' guest-physical memory through /dev/kvmmem (KVMI), or through the built-in hypercall model.')
    .version(process.env.npm_package_version ?? '0.1.0')
    // Commander's own errors in one line, as every other bad input.
    .configureOutput({ outputError: (str, write) => write(`kvmmem: ${str.trim().replace(/^error: /, '')} (see kvmmem --help)\n`) })
    .addHelpText('after', EXIT_HELP)
    .exitOverride();

  program.command('demo')
    .description('the main job on the built-in model: a synthetic guest mapped, scanned, page-walked and torn down')
    .option('--seed <n>', 'synthetic guest seed', (v) => parseCount(v), 0x5eed)
    .option('--memory <MiB>', 'guest memory size in MiB', (v) => parseCount(v), 64)
    .option('--json', 'one JSON document instead of text')
    .addHelpText('after', '\nExamples:\n  kvmmem demo\n  kvmmem demo --seed 7 --json')
    .action((o) => runCommand(() => runDemo(output(!!o.json), { seed: o.seed, memoryMiB: o.memory })));

  targetOptions(program.command('scan')
    .description('find a byte pattern in guest-physical memory: a guest RAM file (--ram, through the model) or a VM of a real deployment (--listen)'))
    .addOption(new Option('--pattern <text>', 'text to find (latin1 bytes)').conflicts('hex'))
    .addOption(new Option('--hex <hex>', 'bytes to find, in hex (e.g. 7f454c46)'))
    .option('--from <addr>', 'first gpa', parseAddress)
    .option('--to <addr>', 'end gpa (exclusive; default the end of the RAM file; required with --listen)', parseAddress)
    .option('--max <n>', 'stop after n matches', (v) => parseCount(v))
    .option('--json', 'one JSON document instead of text')
    .addHelpText('after', '\nExamples:\n  kvmmem scan --ram /dev/shm/guest.ram --pattern "Linux version "\n  kvmmem scan --ram dump.raw --hex 7f454c46 --from 0x100000 --to 0x4000000 --json\n  KVMMEM_COOKIE=secret kvmmem scan --listen tcp:0.0.0.0:4444 --vm web-01 --pattern "Linux version "')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      const pattern = patternOf(o);
      return withTarget(o, (l) => out.say(l), (target) => scanTarget(out, target, { pattern, from: o.from, to: o.to, max: o.max }));
    }));

  registerYara(program);

  targetOptions(program.command('read')
    .description('read guest-physical memory (xxd-style hex dump) from a guest RAM file (--ram) or a VM of a real deployment (--listen)'))
    .requiredOption('--gpa <addr>', 'guest-physical address', parseAddress)
    .requiredOption('--len <n>', 'bytes to read', (v) => parseCount(v))
    .option('--json', 'one JSON document (bytes in hex)')
    .addHelpText('after', '\nExamples:\n  kvmmem read --ram /dev/shm/guest.ram --gpa 0x1000000 --len 256\n  kvmmem read --listen unix:/run/kvmi.sock --cookie-file /etc/kvmi.cookie --vm victim --gpa 0x1000 --len 64')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      if (o.len > READ_MAX) throw new CliUsageError('--len is limited to 64 MiB per read');
      return withTarget(o, (l) => out.say(l), (target) => readTarget(out, target, { gpa: o.gpa, len: o.len }));
    }));

  targetOptions(program.command('translate')
    .description('walk x86-64 page tables (virtual address -> guest-physical address) in a guest RAM file (--ram) or a VM of a real deployment (--listen)'))
    .requiredOption('--cr3 <addr>', 'page-table root (CR3, e.g. from QEMU `info registers`)', parseAddress)
    .requiredOption('--va <addr>', 'virtual address', parseAddress)
    .option('--levels <n>', '4 or 5 (LA57)', (v) => { if (v !== '4' && v !== '5') throw new InvalidArgumentError('must be 4 or 5'); return Number(v) as 4 | 5; }, 4)
    .option('--json', 'one JSON document')
    .addHelpText('after', '\nExamples:\n  kvmmem translate --ram /dev/shm/guest.ram --cr3 0x2a3c000 --va 0xffffffff81e00100\n  KVMMEM_LISTEN=vsock:1234 KVMMEM_COOKIE=secret kvmmem translate --vm victim --cr3 0x2a3c000 --va 0xffffffff81e00100')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      return withTarget(o, (l) => out.say(l), (target) => translateTarget(out, target, { cr3: o.cr3, va: o.va, levels: o.levels }));
    }));

  program.command('selftest')
    .description('conformance suite for a kvmmem deployment (real device + KVMI socket) or the built-in model')
    .option('--device <path>', 'the kvmmem device to test', '/dev/kvmmem')
    .option('--listen <address>', `where the tool listens for the device manager: unix:PATH, vsock:PORT or tcp:HOST:PORT (default $${LISTEN_ENV})`)
    .addOption(new Option('--cookie <text>', 'KVMI cookie shared with the device manager (visible in ps: prefer --cookie-file or KVMMEM_COOKIE)').conflicts('cookieFile'))
    .option('--cookie-file <path>', 'read the KVMI cookie from a file (a trailing newline is dropped)')
    .option('--socket-mode <octal>', 'mode of the unix socket file', (v) => { if (!/^0?[0-7]{3}$/.test(v)) throw new InvalidArgumentError('must be an octal mode such as 600'); return parseInt(v, 8); }, 0o600)
    .option('--allow-uid <uid...>', 'uids allowed to connect over unix (default: root and you; not with tcp:)', (v, prev: number[] | undefined) => {
      if (!/^\d+$/.test(v)) throw new InvalidArgumentError(`'${v}' is not a uid`);
      return [...(prev ?? []), Number(v)];
    })
    .option('--model', 'test the built-in model instead of a real device')
    // A bigint default needs its text for --help (commander would JSON.stringify it and throw).
    .addOption(new Option('--gpa <addr>', 'guest page to use (must be RAM)').argParser(parseAddress).default(0x100000n, '0x100000'))
    .option('--wait <seconds>', 'how long to wait for a VM to connect', (v) => parseCount(v), 60)
    .option('--json', 'one JSON document')
    .addHelpText('after', `\nChecks:\n${SELFTEST_CHECKS.map((c) => `  ${c.name.padEnd(24)}${c.what}`).join('\n')}\n\nExamples:\n  kvmmem selftest --model\n  kvmmem selftest --device /dev/kvmmem --listen vsock:1234 --cookie-file /etc/kvmi.cookie\n  KVMMEM_COOKIE=secret kvmmem selftest --device /dev/kvmmem --listen unix:/run/kvmi.sock --gpa 0x200000\n  KVMMEM_COOKIE=secret kvmmem selftest --listen tcp:0.0.0.0:4444`)
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      let results: CheckResult[];
      let target: string;
      if (o.model) {
        const memory = 16 * 2 ** 20;
        if (o.gpa >= BigInt(memory)) throw new CliUsageError(`selftest: --gpa ${hex(o.gpa)} is past the model VM's ${memory >> 20} MiB of RAM (give a gpa below ${hex(memory)})`);
        const lab = await ModelLab.start({ vms: [{ name: 'selftest', memory }] });
        try {
          const mvm = lab.modelVm('selftest');
          mvm.memory.write(o.gpa, Buffer.from('kvmmem selftest page: guest data'));
          target = `model (${lab.host.driver.constructor.name}, KVMI ${lab.host.protocol})`;
          results = await runSelftest({
            openDevice: () => lab.host.openDevice(), vm: lab.vm('selftest'), gpa: o.gpa,
            guestRead: (g, n) => mvm.memory.read(g, n), hostMappings: () => lab.host.stats().mappings,
            unhook: async () => { await mvm.preunhook(); },
          });
        } finally {
          await lab.close();
        }
      } else {
        const address = listenOf(o);
        if (address === undefined) throw new CliUsageError(`selftest: give --listen unix:PATH|vsock:PORT|tcp:HOST:PORT (or ${LISTEN_ENV}) for a real device, or --model`);
        const cookie = resolveCookie(o);
        // Options the server refuses (allowUids with TCP) first, then the device: both before waiting for a VM.
        const server = await IntrospectionServer.listen(address, {
          cookie, mode: o.socketMode, ...(o.allowUid === undefined ? {} : { allowUids: o.allowUid }),
        });
        try {
          LinuxDevice.open(o.device).probe().close();
          out.say(`waiting up to ${o.wait} s for a device manager on ${formatAddress(server.address!)} ...`);
          const vm = await server.waitForVm({}, o.wait * 1000);
          target = `${o.device} with VM ${vm.name} (${vm.uuid})`;
          results = await runSelftest({ openDevice: () => LinuxDevice.open(o.device), vm, gpa: o.gpa });
        } finally {
          await server.close();
        }
      }
      const failed = results.filter((r) => r.status === 'fail').length;
      out.say(`kvmmem selftest: ${target}`);
      for (const r of results) out.say(`  ${r.status.toUpperCase().padEnd(5)} ${r.name.padEnd(24)} ${r.detail}`);
      out.say(`${results.filter((r) => r.status === 'pass').length} passed, ${failed} failed, ${results.filter((r) => r.status === 'skip').length} skipped`);
      out.result({ target, results, ok: failed === 0 });
      return failed === 0 ? EXIT.OK : EXIT.FAILED;
    }));

  registerLinuxCommands(program);

  program.command('bench')
    .description('benchmarks against their C / libkvmi / grep baselines, side by side; writes latest.json and BENCHMARKS.md into --out')
    .option('--quick', 'smaller sizes and fewer repetitions (under a minute)')
    .option('--json', 'one JSON document instead of the table')
    .option('--only <groups>', 'comma-separated: ioctl,model,libkvmi,tokens,scan,scale,physical,yara,linux')
    .option('--out <dir>', 'where latest.json and BENCHMARKS.md go', 'kvmmem-bench')
    .option('--no-write', 'do not write latest.json and BENCHMARKS.md')
    .addHelpText('after', '\nExamples:\n  kvmmem bench --quick\n  kvmmem bench --only ioctl,tokens --out /tmp/bench\n  kvmmem bench --json --no-write > results.json')
    .action((o) => runCommand(() => benchCommand(o)));

  addLabCommand(program);
  return program;
}

function patternOf(o: { pattern?: string; hex?: string }): string | Buffer {
  if (o.pattern !== undefined) {
    if (o.pattern.length === 0) throw new CliUsageError('--pattern must not be empty');
    return o.pattern;
  }
  if (o.hex !== undefined) {
    const h = o.hex.replace(/^0x/i, '').replace(/[\s:]/g, '');
    if (h.length === 0) throw new CliUsageError('--hex must not be empty');
    const bad = /[^0-9a-f]/i.exec(h);
    if (bad) throw new CliUsageError(`--hex '${o.hex}': '${bad[0]}' is not a hex digit`);
    if (h.length % 2 !== 0) throw new CliUsageError(`--hex '${o.hex}' is an odd number of hex digits (two per byte)`);
    return Buffer.from(h, 'hex');
  }
  throw new CliUsageError('scan: give --pattern TEXT or --hex HEX');
}

/** Runs the CLI; resolves with the exit code (commander's own errors become exit 2). */
export async function run(argv: string[]): Promise<number> {
  const program = buildProgram();
  if (argv.length <= 2) {
    // No command is bad input like a missing option: the help on stderr, exit 2.
    program.outputHelp({ error: true });
    return EXIT.USAGE;
  }
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return EXIT.OK;
      return EXIT.USAGE;
    }
    throw e;
  }
  return typeof process.exitCode === 'number' ? process.exitCode : EXIT.OK;
}
