export * as libc from './libc.js';
export { Window, prefault, remapFreshRaw, remapSharedRaw } from './window.js';
export type { WindowOptions } from './window.js';
