// Hex-dump a guest-physical range (xxd style), read through mapped pages.
//   npx tsx examples/hexdump.ts [--gpa 0x1000] [--len 256] [--ram FILE]
import { runExample } from './_target.js';

await runExample(async (t) => {
  const gpa = t.arg('gpa', t.truth?.bannerGpa ?? 0n);
  const len = Number(t.arg('len', 256n));
  const data = await t.session.read(t.vm, gpa, len);
  for (let off = 0; off < data.length; off += 16) {
    const row = data.subarray(off, off + 16);
    const hex = [...row].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = [...row].map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : '.')).join('');
    console.log(`${(gpa + BigInt(off)).toString(16).padStart(12, '0')}  ${hex.padEnd(47)}  ${ascii}`);
  }
});
