/**
 * libc through ffi-rs, as one namespace for the layers above
 * (`import * as libc from '../sys/libc.js'`): the core calls (core.ts), memory
 * (memory.ts), the native batch helper (batch.ts) and sockets (sockets.ts),
 * all on the shared setup in ffi.ts.
 *
 * Naming: a function whose failure comes back as a -errno value (its result,
 * or per record in a `results` array) instead of a thrown SyscallError ends in
 * `Raw` (ioctlRaw, mmapRaw, readRaw, remapManyRaw...); every other one throws.
 */
import { mapOneRaw, remapManyRaw, remapOneRaw } from './batch.js';
import { pollRaw, readRaw, writeRaw } from './core.js';
import { accept4Raw, shutdownRaw } from './sockets.js';

export * from './core.js';
export * from './memory.js';
export * from './batch.js';
export * from './sockets.js';

// ---- transitional: the names before the Raw rule ----
// Only for src/model/host.ts and src/channel/rawfd.ts, which are being
// restructured elsewhere right now; remove once they use the Raw names.
/** @deprecated use remapOneRaw */
export const remapOne = remapOneRaw;
/** @deprecated use remapManyRaw */
export const remapMany = remapManyRaw;
/** @deprecated use mapOneRaw */
export const mapOne = mapOneRaw;
/** @deprecated use readRaw */
export const read = readRaw;
/** @deprecated use writeRaw */
export const write = writeRaw;
/** @deprecated use pollRaw */
export const poll = pollRaw;
/** @deprecated use accept4Raw */
export const accept4 = accept4Raw;
/** @deprecated use shutdownRaw */
export const shutdown = shutdownRaw;
