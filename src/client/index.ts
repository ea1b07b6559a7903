export { KvmMem, type OpenOptions, type DeviceOpener } from './kvmmem.js';
export { Session, MappedPage, MappedRange, type SessionOptions, type SessionStats, type MappingInfo } from './session.js';
export { UseAfterUnmapError, RetryExhaustedError, LockedMemoryError } from './errors.js';
export { localMemoryStats, type LocalMemoryStats } from './local-memory.js';
export { toAddress, hex, PAGE_SIZE, type AddressLike } from './address.js';
export type { TargetVm } from './target.js';
