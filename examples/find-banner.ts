// Find the Linux banner in guest-physical memory and print it.
//   npx tsx examples/find-banner.ts                  (the demo guest)
//   npx tsx examples/find-banner.ts --ram /dev/shm/guest.ram
import { scan, PhysicalReader } from '../src/index.js';
import { runExample } from './_target.js';

await runExample(async (t) => {
  const { matches } = await scan(t.session, t.vm, 'Linux version ', { to: t.end });
  const reader = new PhysicalReader(t.session, t.vm);
  for (const gpa of matches) {
    const text = await reader.readCString(gpa, 300);
    console.log(`0x${gpa.toString(16)}  ${text.trimEnd()}`);
  }
  reader.close();
  console.log(`${matches.length} match(es) in ${t.end >> 20n} MiB`);
});
