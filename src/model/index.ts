/**
 * kvmmem/model: the executable hypercall model of the two kernel sides the
 * library talks to — the introspector's /dev/kvmmem driver (seed 003) and the
 * KVMI host (tokens, KVM_HC_MEM_MAP/UNMAP, hook/unhook/preunhook, the host side
 * of the KVMI socket). Real memory, real page aliasing, real bytes on the
 * Device interface. See docs/driver-model.md.
 */
export { ModelHost, ModelVm } from './host.js';
export type { CreateVmOptions, HookArgs, HostCounters, HostMapping, HostStats, ModelHostOptions, VmStats } from './host.js';
export { GuestMemory } from './memory.js';
export type { AnonymousOptions, FromFileOptions, MemoryRegion, PcLayoutOptions, ResolvedGpa } from './memory.js';
export { KvmiMemDriver, FileMap } from './driver.js';
export type { PageMap } from './driver.js';
export { ModelDevice } from './model-device.js';
export { TokenStore } from './tokens.js';
export type { TokenStoreOptions } from './tokens.js';
export { KvmiConnection, KVMI_MAX_MESSAGE_SIZE } from './kvmi-server.js';
export type { UnhookAck } from './kvmi-server.js';
export { attach, preunhook, cookieMatches } from './device-manager.js';
export type { AttachOptions, Attachment, PreunhookOptions } from './device-manager.js';
export { adoptSocket, socketFd } from './sockets.js';
