/**
 * What a session needs of an introspected VM: its identity, its state and a way
 * to get map tokens. The channel's `Vm` (one KVMI connection) is one; tests and
 * other transports can bring their own.
 */
import { VmGoneError } from '../channel/errors.js';
import { UsageError } from '../errors.js';

export interface TargetVm {
  readonly uuid: string;
  readonly name: string;
  readonly state: 'connected' | 'unhooking' | 'gone';
  /**
   * n single-use tokens requested back-to-back (pipelined): one result per
   * request, a token or the error the host answered (EAGAIN over its limit).
   */
  getMapTokensSettled(n: number): Promise<(Uint8Array | Error)[]>;
  on(event: 'unhook' | 'gone', listener: (...args: any[]) => void): unknown;
  /** Where the VM's guest-physical memory ends (the channel's Vm: KVMI_GET_MAX_GFN); what scans default `to` to. Optional. */
  memorySize?(): Promise<bigint>;
  off(event: 'unhook' | 'gone', listener: (...args: any[]) => void): unknown;
}

export function vmGoneError(vm: TargetVm): VmGoneError {
  return new VmGoneError(vm.state === 'unhooking' ? 'being unhooked' : 'unhooked or disconnected', { vm: vm.name, syscall: 'KVM_INTRO_MEM_MAP' });
}

/** A TargetVm-shaped argument, or a UsageError naming the call. */
export function assertTargetVm(vm: unknown, what: string): asserts vm is TargetVm {
  const v = vm as Partial<TargetVm> | null;
  if (v === null || typeof v !== 'object' || typeof v.getMapTokensSettled !== 'function' || typeof v.on !== 'function' || typeof v.off !== 'function' || typeof v.state !== 'string') {
    throw new UsageError(`${what}: vm must be a connected VM (from server.waitForVm() or lab.vm()), got ${v === null ? 'null' : typeof v}`);
  }
}
