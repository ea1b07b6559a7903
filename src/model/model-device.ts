/**
 * The hypercall model's /dev/kvmmem: one open file of the model driver
 * (src/model/driver.ts) behind the same Device interface as LinuxDevice, so
 * `ioctl(KVM_INTRO_MEM_MAP, <48 bytes>)` and `ioctl(KVM_INTRO_MEM_UNMAP, addr)`
 * do here what they do on a KVMI guest kernel, and fail with the same errors.
 */
import { ioctlName } from '../abi/ioctl.js';
import { ClosedError, type KvmmemError } from '../errors.js';
import type { FileMap, KvmiMemDriver, PageMap } from './driver.js';
import type { ModelHost } from './host.js';
import { deviceError } from '../device/hints.js';
import { checkBatch } from '../device/linux-device.js';
import type { Device, IoctlArg } from '../device/device.js';

export class ModelDevice implements Device {
  readonly path: string;
  readonly host: ModelHost;
  readonly #driver: KvmiMemDriver;
  readonly #fmp: FileMap;
  #closed = false;

  private constructor(host: ModelHost) {
    this.host = host;
    this.path = `model:${host.name}`;
    this.#driver = host.driver; // module init: throws EPERM without paravirt
    this.#fmp = this.#driver.kvm_dev_open(this);
  }

  /** open("/dev/kvmmem") on the model host's introspector. */
  static open(host: ModelHost): ModelDevice {
    return new ModelDevice(host);
  }

  /** Closed by close(), or released when the host was closed. */
  get closed(): boolean {
    return this.#closed || !this.#driver.file_list.has(this.#fmp);
  }

  /** The driver's per-file state (struct file_map), for diagnostics and tests. */
  get file(): FileMap { return this.#fmp; }

  /** This file's map_list, in list order. */
  mappings(): PageMap[] {
    return this.#fmp.map_list.entries();
  }

  ioctl(request: number, arg: IoctlArg): number {
    if (this.closed) throw new ClosedError(`device ${this.path}`, ioctlName(request));
    const r = this.#driver.kvm_dev_ioctl(this.#fmp, request, arg);
    if (r < 0) throw this.error(request, r);
    return r;
  }

  /**
   * As many ioctls; MAP records (stride >= 48) and UNMAP values (stride 0) go
   * through the driver's batch path: per record exactly the driver's checks
   * and the host's validation, page remaps coalesced at the end.
   */
  ioctlBatch(request: number, args: Uint8Array, stride: number, count: number, results: Int32Array): number {
    if (this.closed) throw new ClosedError(`device ${this.path}`, ioctlName(request));
    if (count === 0) return 0;
    checkBatch(args, stride, count, results); // the same rule as LinuxDevice
    return this.#driver.kvm_dev_ioctl_batch(this.#fmp, request, args, stride, count, results);
  }

  /** Builds the typed error for a failed request (also used for batch results). */
  error(request: number, negErrno: number): KvmmemError {
    return deviceError(this.path, request, negErrno); // the same errors as LinuxDevice's
  }


  /** close(): the driver's release() unmaps everything this file mapped. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#driver.kvm_dev_release(this.#fmp);
  }
}
