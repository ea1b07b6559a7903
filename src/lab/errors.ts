/**
 * Errors of the two-VM lab (src/lab/lab.ts). Codes:
 * - 'ELAB_UNAVAILABLE'  not provisioned (QEMU, kernel, introspector initramfs, virtiofsd): `hint` names the command
 * - 'ELAB_BOOT'         a VM or virtiofsd did not come up (the message carries its log / console tail)
 * - 'ELAB_NOT_UP'       no lab of that name is running
 * - 'ELAB_EXISTS'       a lab of that name is already running
 * - 'ELAB_EXEC'         the command could not start inside (exec, chdir failed)
 * - 'ELAB_GONE'         the lab went away while a command ran (runner connection closed)
 * - 'ETIMEDOUT'         a bounded wait ran out (boot, a command's timeoutMs)
 */
import { KvmmemError } from '../errors.js';

export const LAB_PROVISION_COMMAND = 'bash scripts/live-target/provision.sh';

export class LabError extends KvmmemError {
  constructor(code: string, message: string, opts: { hint?: string; cause?: unknown } = {}) {
    super(message, { code, ...(opts.hint === undefined ? {} : { hint: opts.hint }), ...(opts.cause === undefined ? {} : { cause: opts.cause }) });
  }
}
