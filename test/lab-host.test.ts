// The lab host's parts that need no VM: the mirrored layouts against their one
// source (the C headers), and the mailbox server's answers to a guest's slots,
// served by a model host (this process's pages standing in for the
// introspector's, the local remapper instead of the agent). The whole lab host
// on real VMs: test/lab-kvmmem.test.ts.
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { KVM_EINVAL, KVM_ENOENT, KVM_ENOSYS } from '../src/abi/hypercall.js';
import { IntrospectionServer } from '../src/channel/index.js';
import { ModelHost } from '../src/model/index.js';
import * as libc from '../src/sys/libc.js';
import * as mbox from '../src/lab/mailbox.js';
import * as agent from '../src/lab/agent-protocol.js';
import { MailboxServer } from '../src/lab/mailbox-server.js';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const PS = 4096;

function defines(file: string, prefix: string): Map<string, number> {
  const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
  const out = new Map<string, number>();
  for (const m of text.matchAll(new RegExp(`^#define ${prefix}(\\w+)\\s+\\(?(0x[0-9a-f]+|\\d+)(?:ULL|u)?\\)?`, 'gim'))) out.set(m[1]!, Number(BigInt(m[2]!)));
  const en = /enum kvmmem_agent_op \{([\s\S]*?)\};/.exec(text);
  for (const m of en?.[1]?.matchAll(/KVMMEM_AGENT_(\w+) = (0x[0-9a-f]+|\d+)/gi) ?? []) out.set(m[1]!, Number(m[2]));
  return out;
}

test('src/lab/mailbox.ts says what native/kmod/kvmmem_mailbox.h says', (t) => {
  const h = defines('native/kmod/kvmmem_mailbox.h', 'KVMMEM_MBOX_');
  t.regex(fs.readFileSync(path.join(ROOT, 'native/kmod/kvmmem_mailbox.h'), 'utf8'), new RegExp(`#define KVMMEM_MBOX_MAGIC\\s+0x${mbox.MBOX_MAGIC.toString(16)}ULL`, 'i'));
  t.deepEqual(
    { version: mbox.MBOX_VERSION, maxSlots: mbox.MBOX_MAX_SLOTS, header: mbox.MBOX_HEADER_SIZE, slot: mbox.MBOX_SLOT_SIZE, off: mbox.MBOX_GUEST_OFF, bound: mbox.MBOX_GUEST_BOUND, map: mbox.MBOX_NR_MEM_MAP, unmap: mbox.MBOX_NR_MEM_UNMAP },
    { version: h.get('VERSION'), maxSlots: h.get('MAX_SLOTS'), header: h.get('HEADER_SIZE'), slot: h.get('SLOT_SIZE'), off: h.get('GUEST_OFF'), bound: h.get('GUEST_BOUND'), map: h.get('NR_MEM_MAP'), unmap: h.get('NR_MEM_UNMAP') },
  );
  t.is(mbox.MBOX_LAYOUT_SIZE, 2112);
  t.deepEqual(mbox.MBOX_HEADER, { magic: h.get('OFF_MAGIC'), version: h.get('OFF_VERSION'), nslots: h.get('OFF_NSLOTS'), hostPeer: h.get('OFF_HOST_PEER'), vector: h.get('OFF_VECTOR'), guestState: h.get('OFF_GUEST_STATE') });
  t.deepEqual(mbox.MBOX_SLOT, {
    reqSeq: h.get('SLOT_OFF_REQ_SEQ'), respSeq: h.get('SLOT_OFF_RESP_SEQ'), nr: h.get('SLOT_OFF_NR'), flags: h.get('SLOT_OFF_FLAGS'),
    a0: h.get('SLOT_OFF_A0'), a1: h.get('SLOT_OFF_A1'), a2: h.get('SLOT_OFF_A2'), result: h.get('SLOT_OFF_RESULT'), token: h.get('SLOT_OFF_TOKEN'),
  });
  const iv = defines('native/kmod/kvmmem_mailbox.h', 'KVMMEM_IVSHMEM_');
  t.deepEqual(mbox.IVSHMEM_REG, { intrMask: iv.get('INTR_MASK'), intrStatus: iv.get('INTR_STATUS'), ivPosition: iv.get('IV_POSITION'), doorbell: iv.get('DOORBELL') });
});

test('src/lab/agent-protocol.ts says what native/lab/kvmmem_agent.h says', (t) => {
  const h = defines('native/lab/kvmmem_agent.h', 'KVMMEM_AGENT_');
  t.deepEqual(
    { magic: agent.AGENT_MAGIC, version: agent.AGENT_VERSION, page: agent.AGENT_PAGE, maxPayload: agent.AGENT_MAX_PAYLOAD, event: agent.AGENT_F_EVENT },
    { magic: h.get('MAGIC'), version: h.get('VERSION'), page: h.get('PAGE'), maxPayload: h.get('MAX_PAYLOAD'), event: h.get('F_EVENT') },
  );
  for (const [name, v] of Object.entries(agent.AGENT_OP)) t.is(v as number, h.get(name) ?? -1, `op ${name}`);
  // Request/response sizes: the C structs' (48 bytes each, static-asserted in the header).
  t.regex(fs.readFileSync(path.join(ROOT, 'native/lab/kvmmem_agent.h'), 'utf8'), /sizeof\(struct kvmmem_agent_req\) == 48/);
  t.is(agent.AGENT_REQ_SIZE, 48);
  t.is(agent.AGENT_RESP_SIZE, 48);
});

/** A model host with one hooked VM, a tool connected to it, and a mailbox file. */
async function fixture(t: import('ava').ExecutionContext) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmmem-mbox-'));
  const unix = path.join(dir, 'tool.sock');
  const cookie = 'mbox-test';
  const server = await IntrospectionServer.listen({ unix }, { cookie });
  const host = new ModelHost({ cookie });
  const mvm = host.createVm({ name: 'target', memory: 64 * PS });
  // A recognisable target page 5.
  const tag = Buffer.from('TARGET-PAGE-5', 'latin1');
  mvm.memory.write(5n * BigInt(PS), tag);
  await mvm.attach({ unix, cookie });
  const vm = await server.waitForVm({ name: 'target' });
  const mboxPath = path.join(dir, 'mbox');
  fs.writeFileSync(mboxPath, Buffer.alloc(1 << 20));
  let rings = 0;
  const ms = new MailboxServer({ path: mboxPath, host, ring: () => { rings++; }, nslots: 4 });
  // The "introspector page": one of this process's pages (the local remapper's identity for it).
  const win = libc.mmap(0, 2 * PS, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  libc.memsetAt(win, 0, 2 * PS);
  const fd = fs.openSync(mboxPath, 'r+');
  t.teardown(async () => {
    fs.closeSync(fd);
    ms.close();
    host.close();
    await server.close();
    libc.munmap(win, 2 * PS);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  /** The guest side: fill slot i and bump its req_seq (returns the new seq). */
  const request = (i: number, f: { nr: number; flags?: number; a0?: bigint; a1?: bigint; a2?: bigint; token?: Uint8Array }): number => {
    const o = mbox.mboxSlotOffset(i);
    const b = Buffer.alloc(mbox.MBOX_SLOT_SIZE);
    fs.readSync(fd, b, 0, b.length, o);
    b.writeUInt32LE(f.nr, mbox.MBOX_SLOT.nr);
    b.writeUInt32LE(f.flags ?? 0, mbox.MBOX_SLOT.flags);
    b.writeBigUInt64LE(f.a0 ?? 0n, mbox.MBOX_SLOT.a0);
    b.writeBigUInt64LE(f.a1 ?? 0n, mbox.MBOX_SLOT.a1);
    b.writeBigUInt64LE(f.a2 ?? 0n, mbox.MBOX_SLOT.a2);
    b.fill(0, mbox.MBOX_SLOT.token, mbox.MBOX_SLOT.token + 32);
    if (f.token) Buffer.from(f.token).copy(b, mbox.MBOX_SLOT.token);
    const seq = (b.readUInt32LE(mbox.MBOX_SLOT.reqSeq) + 1) >>> 0 || 1;
    b.writeUInt32LE(seq, mbox.MBOX_SLOT.reqSeq);
    fs.writeSync(fd, b, 0, b.length, o);
    return seq;
  };
  const answer = (i: number): { resp: number; result: bigint } => {
    const b = Buffer.alloc(mbox.MBOX_SLOT_SIZE);
    fs.readSync(fd, b, 0, b.length, mbox.mboxSlotOffset(i));
    return { resp: b.readUInt32LE(mbox.MBOX_SLOT.respSeq), result: b.readBigInt64LE(mbox.MBOX_SLOT.result) };
  };
  const header = () => { const b = Buffer.alloc(64); fs.readSync(fd, b, 0, 64, 0); return b; };
  return { host, vm, ms, win, request, answer, header, rings: () => rings, tag, fd };
}

test.serial('the mailbox server: header (magic last, guest_state left alone), MAP and UNMAP through the host, one RING per scan', async (t) => {
  const f = await fixture(t);
  // The guest wrote guest_state = BOUND before the host started: start() must keep it.
  const gs = Buffer.alloc(4); gs.writeUInt32LE(mbox.MBOX_GUEST_BOUND); fs.writeSync(f.fd, gs, 0, 4, mbox.MBOX_HEADER.guestState);
  t.is(f.ms.serve(), 0, 'nothing is served before start()');
  f.ms.start();
  const h = f.header();
  t.is(h.readBigUInt64LE(0), mbox.MBOX_MAGIC);
  t.deepEqual([h.readUInt32LE(8), h.readUInt32LE(12), h.readUInt32LE(16), h.readUInt32LE(20), h.readUInt32LE(24)], [mbox.MBOX_VERSION, 4, 0, 0, mbox.MBOX_GUEST_BOUND]);
  t.is(f.ms.serve(), 0);
  t.is(f.ms.stats().idleScans, 1);
  t.is(f.rings(), 0, 'an idle scan rings nobody');

  const token = await f.vm.getMapToken();
  const s0 = f.request(0, { nr: mbox.MBOX_NR_MEM_MAP, a1: 5n * BigInt(PS), a2: BigInt(f.win), token });
  const s1 = f.request(2, { nr: mbox.MBOX_NR_MEM_MAP, a1: 6n * BigInt(PS), a2: BigInt(f.win + PS), token }); // the same token again
  t.is(f.ms.serve(), 2);
  t.is(f.rings(), 1, 'one RING for the two answers');
  t.deepEqual(f.answer(0), { resp: s0, result: 0n });
  t.deepEqual(f.answer(2), { resp: s1, result: BigInt(-KVM_ENOENT) }, 'a token is single use');
  t.is(libc.view(f.win, f.tag.length).toString('latin1'), 'TARGET-PAGE-5', 'the introspector page shows the target page');
  t.is(f.host.stats().mappings, 1);

  const s2 = f.request(1, { nr: mbox.MBOX_NR_MEM_UNMAP, a0: BigInt(f.win) });
  t.is(f.ms.serve(), 1);
  t.deepEqual(f.answer(1), { resp: s2, result: 0n });
  t.is(f.host.stats().mappings, 0);
  t.true(libc.view(f.win, PS).every((b) => b === 0), 'a fresh page after UNMAP');
  t.like(f.ms.stats(), { served: 3, maps: 2, unmaps: 1, errors: 1, guestState: mbox.MBOX_GUEST_BOUND });

  f.ms.close();
  t.is(f.header().readBigUInt64LE(0), 0n, 'close() clears the magic: the module stops calling');
});

test.serial('the mailbox server refuses what the protocol does not allow, per slot: flags, a token pointer, an unknown call', async (t) => {
  const f = await fixture(t);
  f.ms.start();
  const token = await f.vm.getMapToken();
  const a = f.request(0, { nr: mbox.MBOX_NR_MEM_MAP, flags: 1, a1: 0n, a2: BigInt(f.win), token });
  const b = f.request(1, { nr: mbox.MBOX_NR_MEM_MAP, a0: 0x1000n, a1: 0n, a2: BigInt(f.win), token });
  const c = f.request(2, { nr: 99 });
  const d = f.request(3, { nr: mbox.MBOX_NR_MEM_UNMAP, flags: 2, a0: BigInt(f.win) });
  t.is(f.ms.serve(), 4);
  t.deepEqual([f.answer(0), f.answer(1), f.answer(2), f.answer(3)], [
    { resp: a, result: BigInt(-KVM_EINVAL) }, { resp: b, result: BigInt(-KVM_EINVAL) }, { resp: c, result: BigInt(-KVM_ENOSYS) }, { resp: d, result: BigInt(-KVM_EINVAL) },
  ]);
  t.is(f.host.stats().mappings, 0, 'nothing mapped');
  // The refused token was never presented to the host: it still maps.
  const e = f.request(0, { nr: mbox.MBOX_NR_MEM_MAP, a1: 5n * BigInt(PS), a2: BigInt(f.win), token });
  t.is(f.ms.serve(), 1);
  t.deepEqual(f.answer(0), { resp: e, result: 0n });
  t.throws(() => new MailboxServer({ path: __filename_of(), host: f.host, ring: () => {}, nslots: 17 }), { message: /nslots must be 1\.\.16/ });
});

function __filename_of(): string { return fileURLToPath(import.meta.url); }
