/**
 * The real /dev/kvmmem misc device of the KVMI patches (RFC v4 kvmi_mem_guest.c), driven with
 * ioctl(2) through src/sys. MAP takes a pointer to the 48-byte kvmi_mem_map,
 * UNMAP the page address as the argument *value*.
 */
import * as libc from '../sys/libc.js';
import { KVM_GUEST_MEM_UNMAP_V2, KVM_INTRO_MEM_UNMAP, ioctlName } from '../abi/ioctl.js';
import { ERRNO } from '../abi/errno.js';
import { ClosedError, KvmmemError, KvmmemV2DeviceError, NoDeviceError, SyscallError, UsageError } from '../errors.js';
import { deviceError } from './hints.js';
import { ioctlBatchByOne, type Device, type IoctlArg } from './device.js';

export const DEFAULT_DEVICE_PATH = '/dev/kvmmem';

export class LinuxDevice implements Device {
  readonly path: string;
  #fd: number;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.#fd = fd;
  }

  /** Opens the device read-write with O_CLOEXEC; errors say what to do. */
  static open(path: string = DEFAULT_DEVICE_PATH): LinuxDevice {
    try {
      return new LinuxDevice(path, libc.open(path, libc.O_RDWR));
    } catch (e) {
      if (!(e instanceof SyscallError)) throw e;
      if (e.code === 'ENOENT') throw new NoDeviceError(path);
      if (e.code === 'EACCES' || e.code === 'EPERM') {
        throw new KvmmemError(`open ${path}: permission denied (${e.code})`, {
          code: e.code, errno: e.errno!, syscall: 'open', path,
          hint: `run as root, or give your user read-write access to ${path} (e.g. a udev rule: KERNEL=="kvmmem", MODE="0660", GROUP="kvm")`,
        });
      }
      throw e;
    }
  }

  /**
   * Checks that the file is a kvmmem device without changing anything:
   * UNMAP of address 0 is ENOENT on the driver (nothing is mapped there) and
   * ENOTTY on anything else, which throws NotKvmmemDeviceError, or
   * KvmmemV2DeviceError when the file answers libkvmi's v2 UNMAP instead
   * (libkvmi's own probe: anything but ENOTTY there is v2).
   */
  probe(): this {
    if (this.#fd < 0) throw new ClosedError(`device ${this.path}`, 'ioctl');
    const r = libc.ioctlRaw(this.#fd, KVM_INTRO_MEM_UNMAP, 0);
    const kind = classifyProbe(r, () => libc.ioctlRaw(this.#fd, KVM_GUEST_MEM_UNMAP_V2, 0));
    if (kind === 'v2') throw new KvmmemV2DeviceError(this.path);
    if (kind === 'other') throw this.error(KVM_INTRO_MEM_UNMAP, r);
    return this;
  }

  get closed(): boolean { return this.#fd < 0; }
  /** The file descriptor (for diagnostics and tests). */
  get fd(): number { return this.#fd; }

  ioctl(request: number, arg: IoctlArg): number {
    if (this.#fd < 0) throw new ClosedError(`device ${this.path}`, ioctlName(request));
    const r = libc.ioctlRaw(this.#fd, request, arg);
    if (r < 0) throw this.error(request, r);
    return r;
  }

  ioctlBatch(request: number, args: Uint8Array, stride: number, count: number, results: Int32Array): number {
    if (this.#fd < 0) throw new ClosedError(`device ${this.path}`, ioctlName(request));
    if (count === 0) return 0;
    checkBatch(args, stride, count, results);
    if (libc.batchAvailable()) {
      return stride > 0
        ? libc.ioctlManyPtrRaw(this.#fd, request, args, stride, count, results)
        : libc.ioctlManyValRaw(this.#fd, request, args, count, results);
    }
    return ioctlBatchByOne((req, a) => libc.ioctlRaw(this.#fd, req, a), request, args, stride, count, results);
  }

  /** The typed error for a failed request (also used for batch results). */
  error(request: number, negErrno: number): KvmmemError {
    return deviceError(this.path, request, negErrno);
  }

  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    libc.close(fd);
  }
}

export function checkBatch(args: Uint8Array, stride: number, count: number, results: Int32Array): void {
  const need = stride > 0 ? stride * count : 8 * count;
  if (!Number.isInteger(count) || count < 0 || args.byteLength < need || results.length < count) {
    throw new UsageError(`ioctlBatch: ${count} records need ${need} argument bytes (got ${args.byteLength}) and ${count} result slots (got ${results.length})`);
  }
}

/**
 * @internal What a probe's answers say: v1 UNMAP(0) is ENOENT (or 0) on the
 * v1 driver; when it is ENOTTY, the v2 UNMAP(0) tells libkvmi's v2 device
 * (anything but ENOTTY) from a file that is no kvmmem at all.
 */
export function classifyProbe(v1Unmap: number, v2Unmap: () => number): 'v1' | 'v2' | 'other' {
  if (v1Unmap === -ERRNO.ENOENT || v1Unmap >= 0) return 'v1';
  if (v1Unmap !== -ERRNO.ENOTTY) return 'other';
  return v2Unmap() !== -ERRNO.ENOTTY ? 'v2' : 'other';
}
