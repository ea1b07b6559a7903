/**
 * kvmmem/model: the executable hypercall model of the two kernel sides the
 * library talks to — the introspector's /dev/kvmmem driver (RFC v4
 * kvmi_mem_guest.c) and the KVMI host (tokens, KVM_HC_MEM_MAP/UNMAP,
 * hook/unhook/preunhook, the host side of the KVMI socket). Real memory, real page aliasing, real bytes on the
 * Device interface. See docs/driver-model.md.
 */
export { ModelHost, ModelVm } from './host.js';
export type { CreateVmOptions, HookArgs, HostCounters, HostMapping, HostStats, ModelHostOptions, VmStats } from './host.js';
export { GuestMemory } from './memory.js';
export type { AnonymousOptions, FromFileOptions, MemoryRegion, PcLayoutOptions, ResolvedGpa } from './memory.js';
export { ModelDevice } from './model-device.js';
export { attach, preunhook } from './device-manager.js';
export type { AttachOptions, Attachment, PreunhookOptions } from './device-manager.js';
// The driver's and host's parts (KvmiMemDriver, FileMap, TokenStore, KvmiConnection,
// the socket adopters) are internals: import them from their modules in this tree.
