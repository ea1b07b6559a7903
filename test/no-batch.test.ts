/**
 * Without the native batch helper (no C compiler at install time) everything
 * still works through the per-call path, and NODE_DEBUG=kvmmem says so once.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

test('no batch helper: the per-call path maps a range correctly and says why once', (t) => {
  const root = fileURLToPath(new URL('..', import.meta.url));
  const code = `
    import { ModelLab } from './src/lab/index.js';
    import * as libc from './src/sys/libc.js';
    const lab = await ModelLab.start({ vms: [{ name: 'g', memory: 4 << 20 }] });
    lab.modelVm('g').memory.write(0x3000n, Buffer.from('per-call path'));
    const s = lab.open();
    const r = await s.mapRange(lab.vm('g'), 0n, 64 * 4096);
    console.log(JSON.stringify({ batch: libc.batchAvailable(), text: r.buffer.toString('latin1', 0x3000, 0x300d), host: lab.host.stats().mappings }));
    r.unmap();
    console.log(JSON.stringify({ after: lab.host.stats().mappings }));
    s.close(); await lab.close();`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    cwd: root, encoding: 'utf8', timeout: 60_000, env: { ...process.env, KVMMEM_NO_BATCH: '1', NODE_DEBUG: 'kvmmem' },
  });
  t.is(r.status, 0, r.stderr);
  const [first, second] = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
  t.deepEqual(first, { batch: false, text: 'per-call path', host: 64 });
  t.deepEqual(second, { after: 0 });
  const notes = r.stderr.split('\n').filter((l) => /native batch helper absent/.test(l));
  t.is(notes.length, 1, r.stderr);
  t.regex(notes[0]!, /using the per-call path/);
});
