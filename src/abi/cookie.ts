/**
 * The handshake's shared secret: the tool answers the device manager with the
 * SHA-1 of a cookie both were configured with (libkvmi/QEMU `key` object).
 */
import { createHash } from 'node:crypto';

export const COOKIE_HASH_SIZE = 20;

export function cookieHash(cookie: string | Uint8Array): Uint8Array {
  return new Uint8Array(createHash('sha1').update(cookie).digest());
}
