// Walk the x86-64 page tables: virtual address -> guest-physical address, then read there.
//   npx tsx examples/translate.ts                         (the demo guest's linux_banner)
//   npx tsx examples/translate.ts --ram FILE --cr3 0x2a3c000 --va 0xffffffff9e11ffe0
import { AddressSpace, PhysicalReader } from '../src/index.js';
import { runExample } from './_target.js';

await runExample(async (t) => {
  const cr3 = t.arg('cr3', t.truth?.cr3);
  const va = t.arg('va', t.truth?.bannerVa);
  const reader = new PhysicalReader(t.session, t.vm, { cachePages: 32 });
  const space = new AddressSpace(reader, cr3);
  const tr = await space.translate(va);
  console.log(`cr3 0x${cr3.toString(16)}  va 0x${va.toString(16)} -> gpa 0x${tr.gpa.toString(16)} (${tr.pageSize}-byte page)`);
  console.log(`entries: ${tr.entries.map((e) => `0x${e.toString(16)}`).join(' -> ')}`);
  console.log(`64 bytes there: ${JSON.stringify((await space.read(va, 64)).toString('latin1'))}`);
  reader.close();
});
