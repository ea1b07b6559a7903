// The KVMI socket protocol, tool side: listen for device managers, one Vm per
// introspected VM, tokens over its connection. See server.ts and vm.ts.
export { IntrospectionServer, formatAddress, DEFAULT_TCP_HOST } from './server.js';
export type { BoundAddress, IntrospectionServerOptions, ListenAddress, RejectedInfo, VmFilter } from './server.js';
export { Vm, DEFAULT_LIMITS } from './vm.js';
export type { ChannelLimits, PhysicalOptions, RequestOptions, VmEventInfo, VmGoneInfo, VmOptions, VmState, VmUnhookInfo } from './vm.js';
export { ChannelLimitError, KvmiError, PeerRefusedError, ProtocolError, ServerClosedError, TimeoutError, VmGoneError } from './errors.js';
export type { ChannelLimitName } from './errors.js';
// The raw-fd transport (RawFdDuplex, RawSocketListener) and the protocol's constants are internals.
