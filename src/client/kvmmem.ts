/**
 * The entry point: `KvmMem.open()` opens the device (real or model) and returns
 * a Session, which is one driver file_map.
 */
import { LinuxDevice, DEFAULT_DEVICE_PATH } from '../device/linux-device.js';
import type { Device } from '../device/device.js';
import { UsageError } from '../errors.js';
import { Session, validateSessionOptions, type SessionOptions } from './session.js';

/** Anything that can open a model device: a ModelHost from 'kvmmem/model'. */
export interface DeviceOpener {
  openDevice(): Device;
}

export type OpenOptions = SessionOptions & (
  | { device?: string }
  | { model: DeviceOpener }
  | { binding: Device }
);

export const KvmMem = {
  /**
   * `KvmMem.open()` / `KvmMem.open({ device: '/dev/kvmmem' })`: the real device;
   * `KvmMem.open({ model: host })`: one open of the model's /dev/kvmmem;
   * `KvmMem.open({ binding })`: any Device implementation.
   */
  open(options: OpenOptions = {}): Session {
    validateSessionOptions(options); // before anything is opened: a bad option leaks nothing
    let device: Device;
    if ('model' in options && options.model) {
      if (typeof options.model.openDevice !== 'function') throw new UsageError('open: { model } must be a ModelHost (it has no openDevice())');
      device = options.model.openDevice();
    } else if ('binding' in options && options.binding) {
      device = options.binding;
    } else {
      const dev = LinuxDevice.open(('device' in options && options.device) || DEFAULT_DEVICE_PATH);
      try {
        dev.probe(); // a path that is not kvmmem fails here, with the clear error, not at the first MAP
      } catch (e) {
        dev.close();
        throw e;
      }
      device = dev;
    }
    return new Session(device, options);
  },
};
