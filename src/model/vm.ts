/**
 * A VM on the model host and the KVM side of introspection: the VM fd's
 * KVM_INTROSPECTION_HOOK / UNHOOK / PREUNHOOK ioctls (RFC v4 kvm_main.c /
 * kvmi.c, with the kernel's order of checks) and its KVMI connection, which
 * hands out map tokens. Unhook revokes every page mapped from the VM and drops
 * its tokens (through the host).
 */
import type * as net from 'node:net';
import { debuglog } from 'node:util';
import { parse as uuidParse } from 'uuid';
import { ERRNO } from '../abi/errno.js';
import {
  KVM_INTROSPECTION_HOOK, KVM_INTROSPECTION_PREUNHOOK, KVM_INTROSPECTION_UNHOOK, decodeIoctl, ioctlName,
} from '../abi/ioctl.js';
import { HOOK_SIZE, decodeHook } from '../abi/structs.js';
import { DeviceError, KvmmemError, UsageError } from '../errors.js';
import type { ModelHost } from './host.js';
import type { GuestMemory } from './memory.js';
import { KvmiConnection, type UnhookAck } from './kvmi-server.js';
import { sockfd_lookup } from './sockets.js';
import { copy_from_user } from './uaccess.js';
import type { AttachOptions, Attachment, PreunhookOptions } from './device-manager.js';
import * as deviceManager from './device-manager.js';

const debug = debuglog('kvmmem');
const { EAGAIN, EEXIST, EFAULT, EINVAL, ENODEV, ENOENT, ENOTTY, EPERM } = ERRNO as Record<'EAGAIN' | 'EEXIST' | 'EFAULT' | 'EINVAL' | 'ENODEV' | 'ENOENT' | 'ENOTTY' | 'EPERM', number>;

export interface VmStats {
  uuid: string;
  name: string;
  hooked: boolean;
  mappings: number;
  tokensOutstanding: number;
}

/** What a KVM_INTROSPECTION_HOOK caller passes (struct kvm_introspection_hook). */
export interface HookArgs {
  fd: number;
  padding?: number;
  /** 16 bytes or a uuid string; default the VM's own uuid. */
  uuid?: Uint8Array | string;
}

const VM_HINTS = {
  EPERM: 'introspection is disabled on this host (kvm.introspection=0; here: new ModelHost({ introspection: true }))',
  PADDING: 'kvm_introspection_hook.padding must be 0',
  FD: 'fd must be a socket connected to the introspection tool (adoptSocket(socket) returns the fd of a connected net.Socket)',
  EEXIST: 'the VM is already introspected: KVM_INTROSPECTION_UNHOOK it first',
  PRE_EFAULT: 'the VM is not introspected yet (use KVM_INTROSPECTION_HOOK)',
  PRE_ENOENT: 'the socket had an error, or the tool did not subscribe to the UNHOOK event (KVMI_CONTROL_VM_EVENTS)',
  EFAULT: 'the kvm_introspection_hook struct could not be read (fewer than 24 bytes, or an unreadable pointer)',
} as const;

/** VM ioctl table (Avi Kivity's table-driven "generic ioctl dispatcher" style): request -> expected argument size, handler. */
interface VmIoctl {
  name: string;
  size: number;
  run(vm: ModelVm, arg: Uint8Array | null): number;
}

/**
 * A VM on the model host: its memory, and the KVM side of introspection
 * (the VM fd's KVM_INTROSPECTION_* ioctls and its KVMI connection).
 */
export class ModelVm {
  readonly host: ModelHost;
  /** Lower-case RFC 9562 string. */
  readonly uuid: string;
  readonly name: string;
  readonly memory: GuestMemory;
  /** When the VM was created (the handshake's start_time, in seconds). */
  readonly startTime: bigint;
  /** @internal */ readonly _ownsMemory: boolean;
  /** @internal how many introspector pages are currently mapped from this VM (the host's list has them). */
  _mapped = 0;
  /** @internal */ _removed = false;
  #conn: KvmiConnection | null = null;
  #hooked = false;
  #hookUuid: Uint8Array | null = null;

  /** @internal use host.createVm() */
  constructor(host: ModelHost, uuid: string, name: string, memory: GuestMemory, ownsMemory: boolean) {
    this.host = host;
    this.uuid = uuid;
    this.name = name;
    this.memory = memory;
    this._ownsMemory = ownsMemory;
    this.startTime = BigInt(Math.floor(Date.now() / 1000));
  }

  /** The uuid as 16 bytes. */
  get uuidBytes(): Uint8Array { return uuidParse(this.uuid); }
  /** kvm->kvmi is set (between a successful HOOK and UNHOOK). */
  get hooked(): boolean { return this.#hooked; }
  get removed(): boolean { return this._removed; }
  /** The uuid given with KVM_INTROSPECTION_HOOK (used in messages), when hooked. */
  get hookUuid(): Uint8Array | null { return this.#hookUuid; }
  /** The live KVMI connection, when hooked. */
  get connection(): KvmiConnection | null { return this.#conn; }
  get label(): string { return `VM ${this.name} (${this.uuid})`; }

  stats(): VmStats {
    return {
      uuid: this.uuid,
      name: this.name,
      hooked: this.#hooked,
      mappings: this._mapped,
      tokensOutstanding: this.host._tokens.outstanding(this),
    };
  }

  // ---- VM fd ioctls ----

  static readonly #ioctls: ReadonlyMap<number, VmIoctl> = new Map<number, VmIoctl>([
    [KVM_INTROSPECTION_HOOK, { name: 'KVM_INTROSPECTION_HOOK', size: decodeIoctl(KVM_INTROSPECTION_HOOK).size, run: (vm, a) => vm.#ioctlHook(a!) }],
    [KVM_INTROSPECTION_UNHOOK, { name: 'KVM_INTROSPECTION_UNHOOK', size: 0, run: (vm) => vm.#ioctlUnhook() }],
    [KVM_INTROSPECTION_PREUNHOOK, { name: 'KVM_INTROSPECTION_PREUNHOOK', size: 0, run: (vm) => vm.#ioctlPreunhook() }],
  ]);

  /**
   * ioctl(vm_fd, request, arg) for the introspection requests (kvm_vm_ioctl):
   * HOOK takes the 24-byte struct (bytes, or a pointer in this process);
   * UNHOOK and PREUNHOOK take nothing. Returns 0 or throws a DeviceError;
   * any other request: ENOTTY.
   */
  ioctl(request: number, arg: Uint8Array | bigint | number = 0): number {
    const h = ModelVm.#ioctls.get(request >>> 0);
    if (h === undefined) throw new DeviceError(-ENOTTY, ioctlName(request), { path: this.#path() });
    let bytes: Uint8Array | null = null;
    if (h.size > 0) {
      // EPERM comes first: kvm_vm_ioctl checks enable_introspection before copy_from_user.
      if (!this.host.introspection) throw this.#err(EPERM, h.name, VM_HINTS.EPERM);
      bytes = arg instanceof Uint8Array
        ? (arg.length >= h.size ? arg.subarray(0, h.size) : null)
        : copy_from_user(BigInt.asUintN(64, BigInt(arg)), h.size);
      if (bytes === null) throw this.#err(EFAULT, h.name, VM_HINTS.EFAULT);
    }
    return h.run(this, bytes);
  }

  /** KVM_INTROSPECTION_HOOK with a struct built from `args`. Returns 0 or throws. */
  hook(args: HookArgs): number {
    const uuid = args.uuid === undefined ? this.uuidBytes : typeof args.uuid === 'string' ? uuidParse(args.uuid) : args.uuid;
    if (uuid.length !== 16) throw new UsageError('hook: uuid must be 16 bytes');
    const buf = Buffer.alloc(HOOK_SIZE);
    buf.writeInt32LE(args.fd | 0, 0);
    buf.writeUInt32LE((args.padding ?? 0) >>> 0, 4);
    buf.set(uuid, 8);
    return this.ioctl(KVM_INTROSPECTION_HOOK, buf);
  }

  /** KVM_INTROSPECTION_UNHOOK: revoke mappings, drop tokens, close the connection. 0, or EPERM. */
  unhook(): number {
    return this.ioctl(KVM_INTROSPECTION_UNHOOK);
  }

  /**
   * The device manager's pre-unhook (the KVM_INTROSPECTION_PREUNHOOK patch): KVM_INTROSPECTION_PREUNHOOK
   * (EPERM / EFAULT not hooked / ENOENT socket error or UNHOOK event not
   * enabled; otherwise the UNHOOK event is sent), then wait for the tool to
   * reply or close the socket, or for the timeout, then UNHOOK.
   */
  preunhook(opts: PreunhookOptions = {}): Promise<UnhookAck> {
    return deviceManager.preunhook(this, opts);
  }

  /** The device manager's connect + handshake + HOOK (QEMU's role). */
  attach(opts: AttachOptions): Promise<Attachment> {
    return deviceManager.attach(this, opts);
  }

  /**
   * What this VM's KVMI connection answers to KVMI_GET_MAP_TOKEN: a fresh
   * token, or a DeviceError EAGAIN over the limit; the VM must be hooked.
   */
  getMapToken(): Uint8Array {
    if (!this.#hooked || this._removed || this.host.closed) {
      throw new KvmmemError(`KVMI_GET_MAP_TOKEN: ${this.label} is not hooked`, {
        code: 'ENOTCONN', errno: -107, syscall: 'KVMI_GET_MAP_TOKEN',
        hint: 'tokens come from the KVMI connection of a hooked VM: attach() the VM to the tool first',
      });
    }
    const t = this.host._tokens.issue(this);
    if (t === null) {
      throw new DeviceError(-EAGAIN, 'KVMI_GET_MAP_TOKEN', {
        path: this.#path(),
        hint: `too many tokens have accumulated (at most ${this.host._tokens.limit} unused per VM): use or let some expire`,
      });
    }
    return t;
  }

  /** @internal the device manager waits for the tool after PREUNHOOK. */
  _waitUnhookAck(timeoutMs: number): Promise<UnhookAck> {
    return this.#conn === null ? Promise.resolve('closed') : this.#conn.waitUnhookAck(timeoutMs);
  }

  /** @internal kvmi_destroy_vm(): unhook whatever the introspection setting. */
  _teardown(): void {
    this.#unhookNow();
  }

  // kvmi_ioctl_hook() + kvmi_hook() (KVMI v9 patch 38), in the kernel's order.
  #ioctlHook(arg: Uint8Array): number {
    const NAME = 'KVM_INTROSPECTION_HOOK';
    const hook = decodeHook(arg);
    if (hook.padding !== 0) throw this.#err(EINVAL, NAME, VM_HINTS.PADDING); // kvmi_ioctl_hook
    if (this.#hooked) throw this.#err(EEXIST, NAME, VM_HINTS.EEXIST); // kvm->kvmi set
    if (this._removed || this.host.closed) throw this.#err(ENODEV, NAME, 'the VM was removed');
    const sock: net.Socket | null = sockfd_lookup(hook.fd); // __kvmi_hook -> kvmi_sock_get
    if (sock === null) throw this.#err(EINVAL, NAME, VM_HINTS.FD);
    this.#hooked = true;
    this.#hookUuid = hook.uuid;
    this.#conn = new KvmiConnection(sock, {
      protocol: this.host.protocol,
      label: this.label,
      memory: this.memory,
      issueToken: () => (this.#hooked && !this._removed ? this.host._tokens.issue(this) : null),
      issueTokenInto: (out, offset) => this.#hooked && !this._removed && this.host._tokens.issueInto(this, out, offset),
      onDisconnect: (c) => {
        debug('%s: KVMI connection closed%s', this.label, c.errored ? ' after a socket error' : '');
      },
    });
    debug('%s: hooked (fd %d)', this.label, hook.fd);
    return 0;
  }

  #ioctlUnhook(): number {
    if (!this.host.introspection) throw this.#err(EPERM, 'KVM_INTROSPECTION_UNHOOK', VM_HINTS.EPERM);
    this.#unhookNow();
    return 0;
  }

  // kvmi_ioctl_preunhook() (the KVM_INTROSPECTION_PREUNHOOK patch).
  #ioctlPreunhook(): number {
    const NAME = 'KVM_INTROSPECTION_PREUNHOOK';
    if (!this.host.introspection) throw this.#err(EPERM, NAME, VM_HINTS.EPERM);
    if (!this.#hooked || this.#conn === null) throw this.#err(EFAULT, NAME, VM_HINTS.PRE_EFAULT);
    // kvmi_unhook_event(): only a tool that enabled the event gets it; a dead socket cannot.
    if (!this.#conn.unhookEventEnabled || !this.#conn.sendUnhookEvent()) throw this.#err(ENOENT, NAME, VM_HINTS.PRE_ENOENT);
    return 0;
  }

  /** kvmi_unhook(): stop the receive side, free everything. Idempotent. */
  #unhookNow(): void {
    const conn = this.#conn;
    const was = this.#hooked;
    this.#hooked = false;
    this.#conn = null;
    this.#hookUuid = null;
    // Model improvement over v4: pages and tokens of the VM do not outlive the hook.
    this.host._revoke(this);
    this.host._tokens.dropVm(this);
    conn?.shutdown();
    if (was) debug('%s: unhooked', this.label);
  }

  #path(): string {
    return `model:${this.host.name}/vm/${this.name}`;
  }

  #err(errno: number, syscall: string, hint: string): DeviceError {
    return new DeviceError(-errno, syscall, { path: this.#path(), hint });
  }
}
