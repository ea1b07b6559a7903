// Keep one guest page mapped and print what changes in it, live (no copies, no remaps).
//   npx tsx examples/watch-page.ts                        (the demo guest; a writer changes it)
//   npx tsx examples/watch-page.ts --ram /dev/shm/guest.ram --gpa 0x5a3c000 [--seconds 10]
import { runExample } from './_target.js';

await runExample(async (t) => {
  const gpa = t.arg('gpa', t.truth ? t.truth.tasks[1]!.gpa : undefined);
  const seconds = Number(t.arg('seconds', 3n));
  using page = await t.session.map(t.vm, gpa);
  console.log(`watching the page at gpa 0x${page.pageGpa.toString(16)} at local 0x${page.address.toString(16)} for ${seconds} s`);
  let last = Buffer.from(page.buffer);
  // On the demo guest nothing runs, so play the guest: bump a counter in the page now and then.
  let n = 0;
  const writer = t.truth ? setInterval(() => t.memory.write(page.pageGpa + 0xff0n, Buffer.from(`tick-${++n}`.padEnd(16, '\0'))), 400) : undefined;
  const poll = setInterval(() => {
    const now = page.buffer; // the live view: the same memory the guest uses
    for (let off = 0; off < now.length; off += 16) {
      if (!now.subarray(off, off + 16).equals(last.subarray(off, off + 16))) {
        console.log(`  +0x${off.toString(16).padStart(3, '0')}: ${JSON.stringify(now.toString('latin1', off, off + 16))}`);
      }
    }
    last = Buffer.from(now);
  }, 250);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  clearInterval(poll);
  if (writer) clearInterval(writer);
});
