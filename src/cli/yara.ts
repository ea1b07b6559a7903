/**
 * `kvmmem yara RULES...`: YARA rules over a guest's physical memory. The
 * engine (a native module) is loaded only when this command runs.
 */
import { type Command } from 'commander';
import { hex } from '../client/address.js';
import { CliUsageError, EXIT, formatBytes, output, parseAddress, parseCount, progressBar, runCommand } from './common.js';
import { targetOptions, withTarget, type TargetArgs } from './target.js';

interface YaraCliOptions extends TargetArgs {
  from?: bigint;
  to?: bigint;
  max?: number;
  overlap?: number;
  json?: boolean;
}

/** Printable context: latin1 with anything outside 0x20..0x7e as '.'. */
const printable = (b: Buffer): string => b.toString('latin1').replace(/[^\x20-\x7e]/g, '.');

export function registerYara(program: Command): void {
  targetOptions(program.command('yara')
    .description('run YARA rules (YARA-X) over guest-physical memory, live and zero-copy: a RAM file (--ram) or a VM of a real deployment (--listen)'))
    .argument('[rules...]', 'rule files (.yar)')
    .option('-e, --rule <text>', 'rule text (repeatable)', (v: string, acc: string[] = []) => [...acc, v])
    .option('--from <addr>', 'first gpa', parseAddress)
    .option('--to <addr>', 'end gpa (exclusive; default the end of the RAM file; required with --listen)', parseAddress)
    .option('--max <n>', 'stop after n hits', (v) => parseCount(v))
    .option('--overlap <bytes>', 'longest match found exactly across chunk edges (default 4096)', (v) => parseCount(v))
    .option('--json', 'one JSON document instead of text')
    .addHelpText('after', [
      '',
      'Exit: 0 when a rule matched, 1 when none did, 2 for a rule that does not compile or bad arguments.',
      '',
      'Examples:',
      '  kvmmem yara rules/kernel.yar --ram /dev/shm/guest.ram',
      `  kvmmem yara -e 'rule banner { strings: $b = "Linux version " condition: $b }' --ram dump.raw --json`,
    ].join('\n'))
    .action((files: string[], o: YaraCliOptions & { rule?: string[] }) => runCommand(async () => {
      const out = output(!!o.json);
      const y = await import('../yara/index.js');
      const inline = o.rule ?? [];
      if (files.length === 0 && inline.length === 0) throw new CliUsageError('yara: give rule files or -e RULE');
      let rules;
      try {
        const fromFiles = files.length > 0 ? y.loadRuleFiles(files).sources : [];
        rules = y.compileRules([...fromFiles, ...inline.map((text, i) => ({ text, file: inline.length > 1 ? `-e #${i + 1}` : '-e' }))]);
      } catch (e) {
        if (e instanceof y.YaraCompileError) throw new CliUsageError(e.message);
        throw e;
      }
      return withTarget(o, (l) => out.say(l), async (target) => {
        const end = target.end;
        if (o.to === undefined && end === null) throw new CliUsageError('yara: --to is required here: the host did not tell the guest\'s memory size (KVMI_GET_MAX_GFN; a v4 host has none)');
        const to: bigint = o.to ?? end!;
        const from: bigint = o.from ?? 0n;
        if (end !== null && to > end) throw new CliUsageError(`--to ${hex(to)} is past the end of ${target.label} (${hex(end)})`);
        if (from >= to) throw new CliUsageError(`--from ${hex(from)} must be below --to ${hex(to)}`);
        const bar = progressBar(out.json, Number(to - from));
        const t0 = performance.now();
        const r = await y.yaraScan(target.session, target.vm, rules, {
          from, to,
          ...(o.max === undefined ? {} : { maxMatches: o.max }),
          ...(o.overlap === undefined ? {} : { overlap: o.overlap }),
          onProgress: (p) => bar.update(p.done, `${p.hits} hits`),
          // Hits as they are found (text mode): a long scan shows its results early.
          onHit: out.json ? undefined : (h) => out.say(`${h.namespace === 'default' ? '' : `${h.namespace}:`}${h.rule} ${h.string} ${hex(h.gpa)} +${h.length} ${JSON.stringify(printable(h.data))}`),
        }).finally(() => bar.stop());
        const ms = Math.round(performance.now() - t0);
        out.say(`${r.hits.length} hit(s) of ${r.rules.length} rule(s) in ${formatBytes(r.scannedBytes)}, ${r.skippedPages} pages skipped, ${ms} ms`);
        out.result({
          ...(target.kind === 'ram' ? { ram: target.label } : { vm: { name: target.vm.name, uuid: target.vm.uuid } }),
          from, to, ms, scannedBytes: r.scannedBytes, skippedPages: r.skippedPages, rules: r.rules,
          hits: r.hits.map((h) => ({ ...h, data: h.data.toString('hex'), before: h.before.toString('hex'), after: h.after.toString('hex') })),
        });
        return r.hits.length > 0 ? EXIT.OK : EXIT.FAILED;
      });
    }));
}
