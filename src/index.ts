/**
 * kvmmem: map other VMs' guest-physical memory into this process through
 * /dev/kvmmem (KVMI), or through the built-in hypercall model ('kvmmem/model').
 */
export * from './client/index.js';
export * from './channel/index.js';
export * from './inspect/index.js';
export { LinuxDevice, DEFAULT_DEVICE_PATH } from './device/linux-device.js';
export type { Device, IoctlArg } from './device/device.js';
export {
  KvmmemError, SyscallError, DeviceError, NoDeviceError, NotKvmmemDeviceError, KvmmemV2DeviceError, ClosedError, UsageError,
} from './errors.js';
// Worker threads: the typed refusal, and cleanup for workers created before kvmmem was imported.
export { ThreadUnsafeError, reapThread } from './sys/thread.js';
export type { Reaped } from './sys/thread.js';
// Linux guests without a profile: kernel base, kallsyms, BTF and views (docs/linux-views.md).
export * from './os/linux/index.js';
