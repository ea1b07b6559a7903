/**
 * The `kvmmem` command line (commander). Every command takes addresses in hex
 * or decimal, prints text or one JSON document (--json), and exits 0 on
 * success, 1 when the operation failed, 2 on bad input.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { hex } from '../client/address.js';
import { PhysicalReader, AddressSpace, scan } from '../inspect/index.js';
import * as faults from '../sys/faults.js';
import { IntrospectionServer } from '../channel/index.js';
import { LinuxDevice } from '../device/linux-device.js';
import { ModelLab } from '../lab/model-lab.js';
import { CliUsageError, EXIT, hexdump, output, parseAddress, parseCount, progressBar, resolveCookie, runCommand, withRam } from './common.js';
import { runDemo } from './demo.js';
import { runSelftest, SELFTEST_CHECKS, type CheckResult } from './selftest.js';
import { benchCommand } from './bench-command.js';
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

  program.command('scan')
    .description('find a byte pattern in a guest RAM file through the full stack (model host attached to the file)')
    .requiredOption('--ram <file>', 'guest RAM: a QEMU memory-backend-file (share=on) or a raw image')
    .addOption(new Option('--pattern <text>', 'text to find (latin1 bytes)').conflicts('hex'))
    .addOption(new Option('--hex <hex>', 'bytes to find, in hex (e.g. 7f454c46)'))
    .option('--from <addr>', 'first gpa', parseAddress)
    .option('--to <addr>', 'end gpa (exclusive; default the end of the file)', parseAddress)
    .option('--max <n>', 'stop after n matches', (v) => parseCount(v))
    .option('--json', 'one JSON document instead of text')
    .addHelpText('after', '\nExamples:\n  kvmmem scan --ram /dev/shm/guest.ram --pattern "Linux version "\n  kvmmem scan --ram dump.raw --hex 7f454c46 --from 0x100000 --to 0x4000000 --json')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      const needle = patternOf(o);
      return withRam(o.ram, async (ram) => {
        const to: bigint = o.to ?? ram.end;
        const from: bigint = o.from ?? 0n;
        if (to > ram.end) throw new CliUsageError(`--to ${hex(to)} is past the end of ${o.ram} (${hex(ram.end)})`);
        if (from >= to) throw new CliUsageError(`--from ${hex(from)} must be below --to ${hex(to)}`);
        const bar = progressBar(out.json, Number(to - from), 'bytes');
        const t0 = performance.now();
        const r = await scan(ram.session, ram.vm, needle, {
          from, to, ...(o.max === undefined ? {} : { maxMatches: o.max }),
          onProgress: (p) => bar.update(p.done, `${p.matches} matches`),
        });
        bar.stop();
        const ms = performance.now() - t0;
        for (const m of r.matches) out.say(hex(m));
        out.say(`${r.matches.length} match(es) in ${(r.scannedBytes / 2 ** 20).toFixed(1)} MiB, ${r.skippedPages} pages skipped, ${ms.toFixed(0)} ms`);
        out.result({ ram: o.ram, from, to, matches: r.matches, scannedBytes: r.scannedBytes, skippedPages: r.skippedPages, ms });
        return r.matches.length > 0 ? EXIT.OK : EXIT.FAILED;
      });
    }));

  program.command('read')
    .description('read guest-physical memory from a guest RAM file (xxd-style hex dump)')
    .requiredOption('--ram <file>', 'guest RAM file')
    .requiredOption('--gpa <addr>', 'guest-physical address', parseAddress)
    .requiredOption('--len <n>', 'bytes to read', (v) => parseCount(v))
    .option('--json', 'one JSON document (bytes in hex)')
    .addHelpText('after', '\nExamples:\n  kvmmem read --ram /dev/shm/guest.ram --gpa 0x1000000 --len 256')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      if (o.len > 64 * 2 ** 20) throw new CliUsageError('--len is limited to 64 MiB per read');
      await withRam(o.ram, async (ram) => {
        if (o.gpa + BigInt(o.len) > ram.end) throw new CliUsageError(`[${hex(o.gpa)}, +${o.len}) reaches past the end of ${o.ram} (${hex(ram.end)})`);
        // A RAM file that shrinks under the read: a typed error (sys/faults), not EFAULT or SIGBUS.
        const watch = faults.watch(ram.vm.uuid);
        if (!faults.guarded()) watch.verify('read');
        const data = await ram.session.read(ram.vm, o.gpa, o.len).catch((e: unknown) => { watch.check('read'); throw e; });
        watch.check('read');
        out.say(hexdump(data, o.gpa));
        out.result({ ram: o.ram, gpa: o.gpa, length: data.length, hex: data.toString('hex') });
      });
    }));

  program.command('translate')
    .description('walk x86-64 page tables in a guest RAM file: virtual address -> guest-physical address')
    .requiredOption('--ram <file>', 'guest RAM file')
    .requiredOption('--cr3 <addr>', 'page-table root (CR3, e.g. from QEMU `info registers`)', parseAddress)
    .requiredOption('--va <addr>', 'virtual address', parseAddress)
    .option('--levels <n>', '4 or 5 (LA57)', (v) => { if (v !== '4' && v !== '5') throw new InvalidArgumentError('must be 4 or 5'); return Number(v) as 4 | 5; }, 4)
    .option('--json', 'one JSON document')
    .addHelpText('after', '\nExamples:\n  kvmmem translate --ram /dev/shm/guest.ram --cr3 0x2a3c000 --va 0xffffffff81e00100')
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      await withRam(o.ram, async (ram) => {
        using reader = new PhysicalReader(ram.session, ram.vm, { cachePages: 16 });
        const tr = await new AddressSpace(reader, o.cr3, { levels: o.levels }).translate(o.va);
        out.say(`${hex(o.va)} -> ${hex(tr.gpa)} (${tr.pageSize} byte page; entries ${tr.entries.map(hex).join(' ')})`);
        out.result({ cr3: o.cr3, va: o.va, gpa: tr.gpa, pageSize: tr.pageSize, entries: tr.entries });
      });
    }));

  program.command('selftest')
    .description('conformance suite for a kvmmem deployment (real device + KVMI socket) or the built-in model')
    .option('--device <path>', 'the kvmmem device to test', '/dev/kvmmem')
    .option('--listen <address>', 'where the tool listens for the device manager: unix:PATH or vsock:PORT')
    .addOption(new Option('--cookie <text>', 'KVMI cookie shared with the device manager (visible in ps: prefer --cookie-file or KVMMEM_COOKIE)').conflicts('cookieFile'))
    .option('--cookie-file <path>', 'read the KVMI cookie from a file (a trailing newline is dropped)')
    .option('--socket-mode <octal>', 'mode of the unix socket file', (v) => { if (!/^0?[0-7]{3}$/.test(v)) throw new InvalidArgumentError('must be an octal mode such as 600'); return parseInt(v, 8); }, 0o600)
    .option('--allow-uid <uid...>', 'uids allowed to connect over unix (default: root and you)', (v, prev: number[] | undefined) => {
      if (!/^\d+$/.test(v)) throw new InvalidArgumentError(`'${v}' is not a uid`);
      return [...(prev ?? []), Number(v)];
    })
    .option('--model', 'test the built-in model instead of a real device')
    // A bigint default needs its text for --help (commander would JSON.stringify it and throw).
    .addOption(new Option('--gpa <addr>', 'guest page to use (must be RAM)').argParser(parseAddress).default(0x100000n, '0x100000'))
    .option('--wait <seconds>', 'how long to wait for a VM to connect', (v) => parseCount(v), 60)
    .option('--json', 'one JSON document')
    .addHelpText('after', `\nChecks:\n${SELFTEST_CHECKS.map((c) => `  ${c.name.padEnd(24)}${c.what}`).join('\n')}\n\nExamples:\n  kvmmem selftest --model\n  kvmmem selftest --device /dev/kvmmem --listen vsock:1234 --cookie-file /etc/kvmi.cookie\n  KVMMEM_COOKIE=secret kvmmem selftest --device /dev/kvmmem --listen unix:/run/kvmi.sock --gpa 0x200000`)
    .action((o) => runCommand(async () => {
      const out = output(!!o.json);
      let results: CheckResult[];
      let target: string;
      if (o.model) {
        const lab = await ModelLab.start({ vms: [{ name: 'selftest', memory: 16 * 2 ** 20 }] });
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
        if (!o.listen) throw new CliUsageError('selftest: give --listen unix:PATH|vsock:PORT for a real device, or --model');
        const address = parseListen(o.listen);
        const cookie = resolveCookie(o);
        // Fail fast, before waiting for a VM, when there is no device or it is not kvmmem.
        LinuxDevice.open(o.device).probe().close();
        const server = await IntrospectionServer.listen(address, {
          cookie, mode: o.socketMode, ...(o.allowUid === undefined ? {} : { allowUids: o.allowUid }),
        });
        try {
          out.say(`waiting up to ${o.wait} s for a device manager on ${o.listen} ...`);
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

  program.command('bench')
    .description('benchmarks against their C / libkvmi / grep baselines, side by side; writes latest.json and BENCHMARKS.md into --out')
    .option('--quick', 'smaller sizes and fewer repetitions (under a minute)')
    .option('--json', 'one JSON document instead of the table')
    .option('--only <groups>', 'comma-separated: ioctl,model,libkvmi,tokens,scan,scale')
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

function parseListen(v: string): { unix: string } | { vsock: number } {
  const m = /^(unix|vsock):(.+)$/.exec(v);
  if (m?.[1] === 'unix') return { unix: m[2]! };
  if (m?.[1] === 'vsock' && /^\d+$/.test(m[2]!)) return { vsock: Number(m[2]) };
  throw new CliUsageError(`--listen '${v}': expected unix:PATH or vsock:PORT`);
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
