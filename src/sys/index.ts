export * as libc from './libc.js';
export { Window, prefault, remapFresh, remapShared } from './window.js';
export type { WindowOptions } from './window.js';
