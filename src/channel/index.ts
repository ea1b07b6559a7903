// The KVMI socket protocol, tool side: listen for device managers, one Vm per
// introspected VM, tokens over its connection. See server.ts and vm.ts.
export { IntrospectionServer } from './server.js';
export type { BoundAddress, IntrospectionServerOptions, ListenAddress, RejectedInfo, VmFilter } from './server.js';
export { Vm, formatUuid, startTimeToDate, HOST_TOKEN_LIMIT, MAX_EVENT_BODY, MAX_PIPELINE } from './vm.js';
export type { RequestOptions, VmEventInfo, VmGoneInfo, VmOptions, VmState, VmUnhookInfo } from './vm.js';
export { KvmiError, ProtocolError, ServerClosedError, TimeoutError, VmGoneError } from './errors.js';
export { RawFdDuplex, RawSocketListener } from './rawfd.js';
export type { RawListenerAddress } from './rawfd.js';
