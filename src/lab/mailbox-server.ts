/**
 * The host side of the lab mailbox (protocol: native/kmod/kvmmem_mailbox.h):
 * the guest module's "hypercalls" arrive in slots of a shared file; each is
 * answered by the ModelHost's hypercall path, exactly as the model's driver
 * would be (tokens single use and bound to their VM, v6 limits, EALREADY, the
 * host's list), with the host's page remapper (the lab's: the QEMU agent).
 *
 * serve() scans every slot whose req_seq differs from resp_seq, in slot order,
 * inside one host batch (the remaps of all of them pipelined to the agent),
 * then writes each result and after it resp_seq (two ordered pwrites), then
 * rings once. It is called on each doorbell EVENT (coalesced) and once at start.
 */
import * as fs from 'node:fs';
import { KVM_ENOSYS, KVM_HC_MEM_MAP, KVM_HC_MEM_UNMAP } from '../abi/hypercall.js';
import { ERRNO } from '../abi/errno.js';
import { PAGE_SIZE } from '../abi/structs.js';
import { UsageError } from '../errors.js';
import type { ModelHost } from '../model/host.js';
import {
  MBOX_HEADER, MBOX_HEADER_SIZE, MBOX_LAYOUT_SIZE, MBOX_MAGIC, MBOX_MAX_SLOTS, MBOX_NR_MEM_MAP, MBOX_NR_MEM_UNMAP,
  MBOX_SLOT, MBOX_TOKEN_SIZE, MBOX_VERSION, mboxSlotOffset,
} from './mailbox.js';

const EINVAL = ERRNO.EINVAL!;

export interface MailboxServerOptions {
  /** The mailbox file (the agent's KVMMEM_AGENT_MAILBOX, e.g. /dev/shm/<lab>.mbox). */
  path: string;
  host: ModelHost;
  /** Rings the guest (one call per serve() that answered something). */
  ring: () => void;
  /** Slots served (default and at most 16). */
  nslots?: number;
  /** The ivshmem peer id the guest rings (the agent's host peer: 0). */
  hostPeer?: number;
  /** The doorbell vector both ways (0). */
  vector?: number;
}

export interface MailboxStats {
  /** Requests answered. */
  served: number;
  maps: number;
  unmaps: number;
  /** Answers other than 0. */
  errors: number;
  /** serve() calls (doorbells, after coalescing). */
  scans: number;
  /** Doorbells that found nothing pending (a coalesced or early one). */
  idleScans: number;
  /** The guest's guest_state word (1: its module is bound). */
  guestState: number;
}

export class MailboxServer {
  readonly path: string;
  readonly nslots: number;
  readonly #host: ModelHost;
  readonly #ring: () => void;
  readonly #fd: number;
  readonly #hostPeer: number;
  readonly #vector: number;
  readonly #buf = Buffer.alloc(MBOX_LAYOUT_SIZE);
  readonly #word = Buffer.alloc(8);
  readonly #stats: Omit<MailboxStats, 'guestState'> = { served: 0, maps: 0, unmaps: 0, errors: 0, scans: 0, idleScans: 0 };
  #serving = false;
  #closed = false;

  constructor(opts: MailboxServerOptions) {
    const nslots = opts.nslots ?? MBOX_MAX_SLOTS;
    if (!Number.isInteger(nslots) || nslots < 1 || nslots > MBOX_MAX_SLOTS) throw new UsageError(`mailbox nslots must be 1..${MBOX_MAX_SLOTS}, got ${String(nslots)}`);
    this.path = opts.path;
    this.nslots = nslots;
    this.#host = opts.host;
    this.#ring = opts.ring;
    this.#hostPeer = opts.hostPeer ?? 0;
    this.#vector = opts.vector ?? 0;
    const fd = fs.openSync(opts.path, 'r+');
    const size = fs.fstatSync(fd).size;
    if (size < MBOX_LAYOUT_SIZE) {
      fs.closeSync(fd);
      throw new UsageError(`mailbox ${opts.path} is ${size} bytes: the layout needs ${MBOX_LAYOUT_SIZE}`,
        'use the file the agent created and sized (KVMMEM_AGENT_MAILBOX; 1 MiB by default)');
    }
    this.#fd = fd;
  }

  /** Writes the header, the magic last: from now on the guest module may bind. */
  start(): void {
    const h = Buffer.alloc(MBOX_HEADER_SIZE);
    h.writeUInt32LE(MBOX_VERSION, MBOX_HEADER.version);
    h.writeUInt32LE(this.nslots, MBOX_HEADER.nslots);
    h.writeUInt32LE(this.#hostPeer, MBOX_HEADER.hostPeer);
    h.writeUInt32LE(this.#vector, MBOX_HEADER.vector);
    // (guest_state is the guest's: leave bytes 24..28 alone)
    fs.writeSync(this.#fd, h, 8, MBOX_HEADER.guestState - 8, 8);
    fs.writeSync(this.#fd, h, MBOX_HEADER.guestState + 4, MBOX_HEADER_SIZE - MBOX_HEADER.guestState - 4, MBOX_HEADER.guestState + 4);
    this.#word.writeBigUInt64LE(MBOX_MAGIC, 0);
    fs.writeSync(this.#fd, this.#word, 0, 8, MBOX_HEADER.magic);
    this.#serving = true;
  }

  /**
   * Answers every pending slot; returns how many. Rings the guest once if any
   * was answered. Safe to call at any time (a doorbell that finds nothing is
   * counted and ignored).
   */
  serve(): number {
    if (!this.#serving || this.#closed) return 0;
    this.#stats.scans++;
    const b = this.#buf;
    const len = mboxSlotOffset(this.nslots);
    fs.readSync(this.#fd, b, 0, len, 0);
    const pending: number[] = [];
    for (let i = 0; i < this.nslots; i++) {
      const o = mboxSlotOffset(i);
      if (b.readUInt32LE(o + MBOX_SLOT.reqSeq) !== b.readUInt32LE(o + MBOX_SLOT.respSeq)) pending.push(i);
    }
    if (pending.length === 0) {
      this.#stats.idleScans++;
      return 0;
    }
    const host = this.#host;
    const results: number[] = [];
    const mapPage: number[] = [];
    // One host batch: results are final per slot, the agent gets the remaps pipelined.
    const outer = !host._deferring;
    if (outer) host._beginDeferral();
    let failures: Map<number, number> | undefined;
    try {
      for (const i of pending) {
        const o = mboxSlotOffset(i);
        const nr = b.readUInt32LE(o + MBOX_SLOT.nr);
        const flags = b.readUInt32LE(o + MBOX_SLOT.flags);
        const a0 = b.readBigUInt64LE(o + MBOX_SLOT.a0), a1 = b.readBigUInt64LE(o + MBOX_SLOT.a1), a2 = b.readBigUInt64LE(o + MBOX_SLOT.a2);
        let r: number;
        let page = -1;
        if (nr === MBOX_NR_MEM_MAP) {
          this.#stats.maps++;
          // The token travels in the slot (a0 = 0): a pointer there would be a guest address the host cannot read.
          if (flags !== 0 || a0 !== 0n) r = -EINVAL;
          else {
            r = host.hypercall(KVM_HC_MEM_MAP, b.subarray(o + MBOX_SLOT.token, o + MBOX_SLOT.token + MBOX_TOKEN_SIZE), a1, a2);
            if (r === 0) page = Number(a2 - (a2 % BigInt(PAGE_SIZE)));
          }
        } else if (nr === MBOX_NR_MEM_UNMAP) {
          this.#stats.unmaps++;
          r = flags !== 0 ? -EINVAL : host.hypercall(KVM_HC_MEM_UNMAP, a0);
        } else {
          r = -KVM_ENOSYS; // what KVM answers an unknown hypercall
        }
        results.push(r);
        mapPage.push(page);
      }
    } finally {
      if (outer) failures = host._endDeferral();
    }
    for (let k = 0; k < pending.length; k++) {
      const o = mboxSlotOffset(pending[k]!);
      // A MAP whose remap failed at the end of the batch was rolled back: its answer is that errno.
      let r = results[k]!;
      if (mapPage[k]! >= 0 && failures !== undefined) r = failures.get(mapPage[k]!) ?? r;
      this.#word.writeBigInt64LE(BigInt(r), 0);
      fs.writeSync(this.#fd, this.#word, 0, 8, o + MBOX_SLOT.result);
      // resp_seq after the result (two ordered stores to the shared page).
      fs.writeSync(this.#fd, b, o + MBOX_SLOT.reqSeq, 4, o + MBOX_SLOT.respSeq);
      this.#stats.served++;
      if (r !== 0) this.#stats.errors++;
    }
    this.#ring();
    return pending.length;
  }

  stats(): MailboxStats {
    let guestState = 0;
    if (!this.#closed) {
      fs.readSync(this.#fd, this.#word, 0, 4, MBOX_HEADER.guestState);
      guestState = this.#word.readUInt32LE(0);
    }
    return { ...this.#stats, guestState };
  }

  /** Clears the magic ("not serving": a module loaded now does not bind) and closes the file. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#serving = false;
    try {
      this.#word.writeBigUInt64LE(0n, 0);
      fs.writeSync(this.#fd, this.#word, 0, 8, MBOX_HEADER.magic);
    } finally {
      fs.closeSync(this.#fd);
    }
  }
}
