/**
 * Linux views on the command line: ps, modules, ksym, dmesg, proc, uname,
 * each on a guest RAM file (--ram; --cr3 makes the attach read the base from
 * the page tables instead of searching all RAM). Tables are shaped like the
 * guest's own tools (ps -eo, lsmod, /proc/PID/maps, dmesg, uname -a); --json
 * gives one document.
 */
import { Command, InvalidArgumentError } from 'commander';
import { hex } from '../client/address.js';
import { PhysicalReader } from '../inspect/index.js';
import { LinuxGuest } from '../os/linux/index.js';
import { CliUsageError, EXIT, hexdump, output, parseAddress, parseCount, runCommand, withRam, type Output } from './common.js';

interface TargetOpts { ram: string; cr3?: bigint; json?: boolean }

/** Attaches to the Linux guest in the RAM file and runs `body`; always tears down. */
async function withGuest<T>(o: TargetOpts, body: (g: LinuxGuest, out: Output) => Promise<T>): Promise<T> {
  const out = output(!!o.json);
  return withRam(o.ram, async (ram) => {
    using reader = new PhysicalReader(ram.session, ram.vm, { cachePages: 1024 });
    const g = await LinuxGuest.attach(reader, o.cr3 !== undefined ? { cr3: o.cr3 } : { end: ram.end });
    return await body(g, out); // before the reader is disposed
  });
}

function targeted(cmd: Command): Command {
  return cmd
    .requiredOption('--ram <file>', 'guest RAM file (QEMU memory-backend-file share=on, or a raw image)')
    .option('--cr3 <addr>', 'CR3 of a vCPU: the kernel\'s base from its page tables (default: search all RAM)', parseAddress)
    .option('--json', 'one JSON document instead of text');
}

const pad = (s: string | number, n: number) => String(s).padStart(n, ' ');

export function registerLinuxCommands(program: Command): void {
  targeted(program.command('ps'))
    .description('processes of a Linux guest, from its task list (like ps -eo pid,ppid,uid,stat,comm)')
    .addHelpText('after', '\nExamples:\n  kvmmem ps --ram /dev/shm/guest.ram\n  kvmmem ps --ram /dev/shm/guest.ram --cr3 0x2b50000 --json')
    .action((o: TargetOpts) => runCommand(() => withGuest(o, async (g, out) => {
      const ps = await g.processes();
      out.say(`${pad('PID', 7)} ${pad('PPID', 7)} ${pad('UID', 5)} S COMMAND`);
      for (const p of ps) out.say(`${pad(p.pid, 7)} ${pad(p.ppid, 7)} ${pad(p.uid, 5)} ${p.state} ${p.kthread ? `[${p.comm}]` : p.comm}`);
      out.result(ps.map(({ task, mm, ...p }) => ({ ...p, task, mm })));
    })));

  targeted(program.command('modules'))
    .description('loaded modules of a Linux guest (lsmod; --proc for /proc/modules lines)')
    .option('--proc', 'print /proc/modules lines instead of the lsmod table')
    .addHelpText('after', '\nExamples:\n  kvmmem modules --ram /dev/shm/guest.ram\n  kvmmem modules --ram /dev/shm/guest.ram --proc')
    .action((o: TargetOpts & { proc?: boolean }) => runCommand(() => withGuest(o, async (g, out) => {
      const mods = await g.modules();
      if (o.proc) for (const m of mods) out.say(m.line);
      else {
        out.say('Module                  Size  Used by');
        for (const m of mods) out.say(`${m.name.padEnd(19)} ${pad(m.size, 8)}  ${m.refcount} ${m.users.join(',')}`.trimEnd());
      }
      out.result(mods);
    })));

  targeted(program.command('ksym').argument('<name-or-address>', 'a symbol name, or an address (0x...) to symbolize'))
    .description('kernel symbols from the guest\'s own kallsyms: a name\'s address(es), or an address as name+offset')
    .addHelpText('after', '\nExamples:\n  kvmmem ksym --ram /dev/shm/guest.ram init_task\n  kvmmem ksym --ram /dev/shm/guest.ram 0xffffffff81a3c010')
    .action((what: string, o: TargetOpts) => runCommand(() => withGuest(o, async (g, out) => {
      if (/^0x[0-9a-f]+$/i.test(what)) {
        const addr = BigInt(what);
        const f = g.symbols.find(addr);
        out.say(g.symbols.symbolize(addr));
        out.result({ address: addr, symbol: f?.symbol ?? null, offset: f?.offset ?? null, text: g.symbols.symbolize(addr) });
        return f === undefined ? EXIT.FAILED : EXIT.OK;
      }
      const all = g.symbols.all(what);
      for (const s of all) out.say(`${s.address.toString(16).padStart(16, '0')} ${s.type} ${s.name}`);
      if (all.length === 0 && !out.json) process.stderr.write(`kvmmem: no kernel symbol '${what}'\n`);
      out.result(all);
      return all.length === 0 ? EXIT.FAILED : EXIT.OK;
    })));

  targeted(program.command('dmesg'))
    .description('the guest kernel\'s log, from its printk ring buffer')
    .option('--tail <n>', 'only the last n lines', (v) => parseCount(v))
    .addHelpText('after', '\nExamples:\n  kvmmem dmesg --ram /dev/shm/guest.ram --tail 20')
    .action((o: TargetOpts & { tail?: number }) => runCommand(() => withGuest(o, async (g, out) => {
      const recs = await g.dmesg();
      let lines = LinuxGuest.dmesgLines(recs);
      if (o.tail !== undefined) lines = lines.slice(-o.tail);
      for (const l of lines) out.say(l);
      out.result(o.tail === undefined ? recs : recs.slice(-o.tail));
    })));

  targeted(program.command('proc').argument('<pid>', 'process id', (v) => {
    if (!/^\d+$/.test(v)) throw new InvalidArgumentError(`'${v}' is not a pid`);
    return Number(v);
  }))
    .description('one process of a Linux guest: summary, argv, environment, VMAs, or its memory (through its own page table)')
    .option('--cmdline', 'argv, one per line')
    .option('--environ', 'the environment, one per line')
    .option('--maps', 'the VMAs, as /proc/PID/maps')
    .option('--read <va>', 'read the process\'s memory at this virtual address', parseAddress)
    .option('--len <n>', 'bytes to read with --read (default 256)', (v) => parseCount(v))
    .addHelpText('after', '\nExamples:\n  kvmmem proc --ram /dev/shm/guest.ram 1 --cmdline\n  kvmmem proc --ram /dev/shm/guest.ram 96 --maps\n  kvmmem proc --ram /dev/shm/guest.ram 96 --read 0x400000 --len 64')
    .action((pid: number, o: TargetOpts & { cmdline?: boolean; environ?: boolean; maps?: boolean; read?: bigint; len?: number }) => runCommand(async () => {
      const modes = [o.cmdline, o.environ, o.maps, o.read !== undefined].filter(Boolean).length;
      if (modes > 1) throw new CliUsageError('proc: give one of --cmdline, --environ, --maps, --read');
      if (o.len !== undefined && o.read === undefined) throw new CliUsageError('proc: --len goes with --read');
      if ((o.len ?? 0) > 64 * 2 ** 20) throw new CliUsageError('--len is limited to 64 MiB per read');
      return withGuest(o, async (g, out) => {
        const p = await g.process(pid);
        if (o.cmdline || o.environ) {
          const v = o.cmdline ? await p.cmdline() : await p.environ();
          for (const a of v) out.say(a);
          out.result({ pid, [o.cmdline ? 'argv' : 'environ']: v });
        } else if (o.maps) {
          const maps = await p.maps();
          for (const m of maps) out.say(m.line);
          out.result(maps);
        } else if (o.read !== undefined) {
          const data = await p.read(o.read, o.len ?? 256);
          out.say(hexdump(data, o.read));
          out.result({ pid, va: o.read, length: data.length, hex: data.toString('hex') });
        } else {
          const i = p.info;
          const argv = i.mm === 0n ? [] : await p.cmdline();
          out.say(`pid ${i.pid} (${i.comm}) state ${i.state} ppid ${i.ppid} uid ${i.uid}${i.kthread ? ' kernel thread' : ''}`);
          out.say(`task_struct ${hex(i.task)}${i.mm ? `  mm ${hex(i.mm)}` : ''}`);
          if (argv.length) out.say(`cmdline: ${argv.join(' ')}`);
          out.result({ ...i, argv });
        }
      });
    }));

  targeted(program.command('uname'))
    .description('the guest kernel\'s uname (init_uts_ns), like uname -a')
    .addHelpText('after', '\nExamples:\n  kvmmem uname --ram /dev/shm/guest.ram')
    .action((o: TargetOpts) => runCommand(() => withGuest(o, async (g, out) => {
      const u = await g.uname();
      out.say(`${u.sysname} ${u.nodename} ${u.release} ${u.version} ${u.machine}`);
      out.result({ ...u, uptime: await g.uptime() });
    })));
}
