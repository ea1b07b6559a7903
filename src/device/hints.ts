/**
 * What to do about each errno a kvmmem ioctl can return. Shared by the real and
 * the model device so that both throw the same, equally helpful errors.
 */
import { KVM_INTRO_MEM_MAP, KVM_INTRO_MEM_UNMAP, ioctlName } from '../abi/ioctl.js';
import { DeviceError, NotKvmmemDeviceError, type KvmmemError } from '../errors.js';
import { ERRNO } from '../abi/errno.js';

const MAP_HINTS: Record<number, string> = {
  [ERRNO.EFAULT]: 'the host could not reach a page: the gpa lies outside the target VM\'s memory, or the kvmi_mem_map struct was unreadable',
  [ERRNO.EINVAL]: 'gva must be a page in user space (below 0x7ffffffff000); on a v6 host EINVAL also means the target is introspected by someone else',
  [ERRNO.ENOENT]: 'the token is unknown, already used or expired (tokens are single-use: request a fresh KVMI_GET_MAP_TOKEN for every MAP), the VM is no longer hooked, or the target page is not present',
  [ERRNO.ENODEV]: 'this device file is being closed by another thread; open a new session',
  [ERRNO.EAGAIN]: 'transient host condition: retry with a fresh token after a short wait',
  [ERRNO.EBUSY]: 'transient host condition: retry with a fresh token after a short wait',
  [ERRNO.EALREADY]: 'this local page is already mapped to a guest page: unmap it first or use another page',
  [ERRNO.ENOMEM]: 'the introspector VM is out of memory; on the model host: this process is close to vm.max_map_count (each mapping of pages at non-adjacent gpas is a VMA of its own): map ranges (adjacent pages of adjacent gpas share one VMA), unmap pages you no longer need, or raise the limit (sysctl -w vm.max_map_count=262144)',
  [ERRNO.KVM_ENOSYS]: 'the host does not implement KVM_HC_MEM_MAP: it is not a KVMI host',
};

const UNMAP_HINTS: Record<number, string> = {
  [ERRNO.ENOENT]: 'nothing is mapped at exactly this address in this open file: pass the very gva given to KVM_INTRO_MEM_MAP (no page rounding), on the same file descriptor',
  [ERRNO.ENODEV]: 'this device file is being closed by another thread',
};

export function hintFor(request: number, errno: number): string | undefined {
  const n = Math.abs(errno);
  if (request === KVM_INTRO_MEM_MAP) return MAP_HINTS[n];
  if (request === KVM_INTRO_MEM_UNMAP) return UNMAP_HINTS[n];
  return undefined;
}

/**
 * The typed error for a failed request on the device at `path`: ENOTTY on the
 * kvmmem requests means "not a kvmmem device"; everything else is a DeviceError
 * with the hint above. Used for single calls and for batch results alike.
 */
export function deviceError(path: string, request: number, negErrno: number): KvmmemError {
  const name = ioctlName(request);
  if (-negErrno === ERRNO.ENOTTY && (request === KVM_INTRO_MEM_MAP || request === KVM_INTRO_MEM_UNMAP)) {
    return new NotKvmmemDeviceError(path, name);
  }
  const hint = hintFor(request, negErrno);
  return new DeviceError(negErrno, name, hint === undefined ? { path } : { path, hint });
}
