/**
 * `kvmmem selftest`: a conformance suite for a kvmmem deployment — the real
 * /dev/kvmmem with a KVMI host, or the built-in model. Each check talks raw
 * ioctls (the same bytes a C tool would send) with tokens from the VM's KVMI
 * connection, and restores whatever it touched.
 */
import { randomBytes } from 'node:crypto';
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP } from '../abi/ioctl.js';
import { PAGE_SIZE, encodeMemMap } from '../abi/structs.js';
import { MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, PROT_NONE, PROT_READ, PROT_WRITE, mmap, munmap } from '../sys/memory.js';
import type { Device } from '../device/device.js';
import { KvmmemError, NotKvmmemDeviceError } from '../errors.js';
import { Window } from '../sys/window.js';
import type { TargetVm } from '../client/target.js';
import { hex } from '../client/address.js';

export interface SelftestContext {
  /** Opens a new file on the device under test (one driver file_map each). */
  openDevice(): Device;
  vm: TargetVm;
  /** A guest page to use (must be RAM). */
  gpa: bigint;
  /** The guest's own view of memory, when the harness has one (the model). */
  guestRead?: (gpa: bigint, length: number) => Buffer;
  guestWrite?: (gpa: bigint, data: Uint8Array) => void;
  /** Host mappings now (the model exposes them). */
  hostMappings?: () => number;
  /** Triggers the device manager's pre-unhook (the model can; a real tool cannot). */
  unhook?: () => Promise<void>;
}

export interface CheckResult {
  name: string;
  status: 'pass' | 'fail' | 'skip';
  detail: string;
}

interface Check {
  name: string;
  what: string;
  run(c: Harness): Promise<string>;
}

const PS = 4096;

/** Per-run helpers: pages, tokens, raw MAP/UNMAP returning 0 or an errno name. */
class Harness {
  readonly ctx: SelftestContext;
  readonly device: Device;
  readonly #windows: Window[] = [];

  constructor(ctx: SelftestContext, device: Device) {
    this.ctx = ctx;
    this.device = device;
  }

  page(): Window {
    const w = Window.alloc(PS);
    this.#windows.push(w);
    return w;
  }

  async token(): Promise<Uint8Array> {
    const [t] = await this.ctx.vm.getMapTokensSettled(1);
    if (t instanceof Error) throw t;
    return t!;
  }

  map(token: Uint8Array, gpa: bigint, gva: number, device = this.device): string {
    return this.#try(() => device.ioctl(KVM_INTRO_MEM_MAP, encodeMemMap({ token, gpa, gva: BigInt(gva) })));
  }

  /** A fresh local page with the test gpa mapped into it (a failed MAP throws). */
  async mapped(device = this.device): Promise<Window> {
    const w = this.page();
    expect('MAP', this.map(await this.token(), this.ctx.gpa, w.address, device), 'OK');
    return w;
  }

  unmap(gva: number, device = this.device): string {
    return this.#try(() => device.ioctl(KVM_INTRO_MEM_UNMAP, gva));
  }

  #try(f: () => number): string {
    try {
      f();
      return 'OK';
    } catch (e) {
      if (e instanceof NotKvmmemDeviceError) throw e;
      if (e instanceof KvmmemError) return e.code;
      throw e;
    }
  }

  dispose(): void {
    // Pages stay mapped (fresh pages after UNMAP); windows are freed only once nothing maps them.
    for (const w of this.#windows) w.free();
  }
}

function expect(what: string, got: string, want: string): void {
  if (got !== want) throw new Error(`${what}: got ${got}, expected ${want}`);
}

const CHECKS: Check[] = [
  {
    name: 'map-unmap',
    what: 'MAP with a fresh token, the page shows guest memory, UNMAP',
    async run(h) {
      const w = await h.mapped();
      const seen = Buffer.from(w.buffer!);
      if (h.ctx.guestRead && !seen.equals(h.ctx.guestRead(h.ctx.gpa, PS))) throw new Error('mapped page differs from guest memory');
      expect('UNMAP', h.unmap(w.address), 'OK');
      return `gpa ${hex(h.ctx.gpa)} mapped at ${hex(w.address)} and unmapped`;
    },
  },
  {
    name: 'aliasing',
    what: 'two mappings of one guest page are the same memory (not copies)',
    async run(h) {
      const a = h.page(), b = h.page();
      expect('MAP a', h.map(await h.token(), h.ctx.gpa, a.address), 'OK');
      expect('MAP b', h.map(await h.token(), h.ctx.gpa, b.address), 'OK');
      try {
        const save = a.buffer!.readUInt32LE(0);
        const probe = (save ^ 0x5a5aa5a5) >>> 0;
        a.buffer!.writeUInt32LE(probe, 0);
        const seen = b.buffer!.readUInt32LE(0);
        a.buffer!.writeUInt32LE(save, 0); // restore the guest's bytes at once
        if (seen !== probe) throw new Error(`write through one mapping not seen through the other (${hex(seen)} != ${hex(probe)})`);
        if (h.ctx.guestRead && h.ctx.guestRead(h.ctx.gpa, 4).readUInt32LE(0) !== save) throw new Error('guest bytes not restored');
      } finally {
        h.unmap(a.address);
        h.unmap(b.address);
      }
      return 'a write through one mapping is seen through the other (restored)';
    },
  },
  {
    name: 'unmap-exact-vaddr',
    what: 'UNMAP matches the exact address given to MAP (no page rounding)',
    async run(h) {
      const w = await h.mapped();
      expect('UNMAP addr+1', h.unmap(w.address + 1), 'ENOENT');
      expect('UNMAP addr', h.unmap(w.address), 'OK');
      return 'UNMAP(addr+1) -> ENOENT, UNMAP(addr) -> 0';
    },
  },
  {
    name: 'unmap-twice',
    what: 'a second UNMAP of the same address is ENOENT',
    async run(h) {
      const w = await h.mapped();
      expect('UNMAP', h.unmap(w.address), 'OK');
      expect('UNMAP again', h.unmap(w.address), 'ENOENT');
      return 'second UNMAP -> ENOENT';
    },
  },
  {
    name: 'token-single-use',
    what: 'a token maps once; replaying it or forging one is ENOENT',
    async run(h) {
      const w = h.page();
      const token = await h.token();
      expect('MAP', h.map(token, h.ctx.gpa, w.address), 'OK');
      expect('UNMAP', h.unmap(w.address), 'OK');
      expect('MAP with the used token', h.map(token, h.ctx.gpa, w.address), 'ENOENT');
      expect('MAP with a forged token', h.map(new Uint8Array(randomBytes(32)), h.ctx.gpa, w.address), 'ENOENT');
      return 'replayed -> ENOENT, forged -> ENOENT';
    },
  },
  {
    name: 'fresh-page-after-unmap',
    what: 'after UNMAP the local address holds a fresh zeroed page',
    async run(h) {
      const w = await h.mapped();
      const nonzero = w.buffer!.some((b) => b !== 0);
      expect('UNMAP', h.unmap(w.address), 'OK');
      if (!w.buffer!.every((b) => b === 0)) throw new Error('page not zeroed after UNMAP');
      return nonzero ? 'guest page was non-zero; local page is zero after UNMAP' : 'zero after UNMAP (the guest page was all zeros: weak check)';
    },
  },
  {
    name: 'teardown-on-close',
    what: 'closing the file unmaps everything it mapped',
    async run(h) {
      const other = h.ctx.openDevice();
      const w1 = h.page(), w2 = h.page();
      const before = h.ctx.hostMappings?.();
      try {
        expect('MAP 1', h.map(await h.token(), h.ctx.gpa, w1.address, other), 'OK');
        expect('MAP 2', h.map(await h.token(), h.ctx.gpa, w2.address, other), 'OK');
      } finally {
        other.close();
      }
      if (!w1.buffer!.every((b) => b === 0) || !w2.buffer!.every((b) => b === 0)) throw new Error('pages still show guest memory after close');
      if (before !== undefined && h.ctx.hostMappings!() !== before) throw new Error(`host still holds ${h.ctx.hostMappings!() - before} mappings`);
      expect('UNMAP on this file of the other file\'s page', h.unmap(w1.address), 'ENOENT');
      return 'release() unmapped both pages; the host holds no mapping';
    },
  },
  {
    name: 'bad-requests',
    what: 'unknown ioctl -> ENOTTY, kernel address -> EINVAL, a struct cut short by an unmapped page -> EFAULT',
    async run(h) {
      const code = (f: () => number) => { try { f(); return 'OK'; } catch (e) { return (e as KvmmemError).code; } };
      expect('unknown request', code(() => h.device.ioctl(0x40086903, 0)), 'ENOTTY');
      expect('gva in kernel space', h.map(await h.token(), h.ctx.gpa, 2 ** 47), 'EINVAL');
      // A struct cut short by an unmapped page: copy_from_user faults on a real kernel as in the model
      // (a short buffer inside mapped memory is not detectable: the driver reads 48 bytes, whatever follows).
      const two = mmap(0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
      try {
        mmap(two + PAGE_SIZE, PAGE_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED);
        expect('16-byte struct before an unmapped page', code(() => h.device.ioctl(KVM_INTRO_MEM_MAP, two + PAGE_SIZE - 16)), 'EFAULT');
      } finally {
        munmap(two, 2 * PAGE_SIZE);
      }
      return 'ENOTTY, EINVAL, EFAULT as the driver returns them';
    },
  },
  {
    name: 'unhook',
    what: 'pre-unhook: the tool gets the UNHOOK event, its pages are revoked, the VM is gone',
    async run(h) {
      if (!h.ctx.unhook) throw new SkipCheck('needs the device manager to pre-unhook the VM (only the model can trigger it from here)');
      const w = await h.mapped();
      await h.ctx.unhook();
      if (h.ctx.vm.state !== 'gone') throw new Error(`VM state is ${h.ctx.vm.state} after unhook`);
      if (h.ctx.hostMappings && h.ctx.hostMappings() !== 0) throw new Error(`host still holds ${h.ctx.hostMappings()} mappings`);
      if (!w.buffer!.every((b) => b === 0)) throw new Error('revoked page still shows guest memory');
      h.unmap(w.address); // the driver entry goes; the host already revoked it
      return 'UNHOOK event answered, mapping revoked, connection closed';
    },
  },
];

class SkipCheck extends Error {}

/** Runs every check in order; stops early only if the device is not kvmmem at all. */
export async function runSelftest(ctx: SelftestContext): Promise<CheckResult[]> {
  const results: CheckResult[] = [];
  const device = ctx.openDevice();
  const h = new Harness(ctx, device);
  try {
    for (const check of CHECKS) {
      try {
        results.push({ name: check.name, status: 'pass', detail: await check.run(h) });
      } catch (e) {
        if (e instanceof SkipCheck) { results.push({ name: check.name, status: 'skip', detail: e.message }); continue; }
        results.push({ name: check.name, status: 'fail', detail: (e as Error).message });
        if (e instanceof NotKvmmemDeviceError) break;
      }
    }
  } finally {
    device.close();
    h.dispose();
  }
  return results;
}

export const SELFTEST_CHECKS = CHECKS.map((c) => ({ name: c.name, what: c.what }));
