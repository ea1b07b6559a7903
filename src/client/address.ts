/**
 * Addresses at the public surface are bigint (guest-physical and virtual alike),
 * decided once for the whole library. Inputs also accept a non-negative safe
 * integer number or a hex/decimal string, and are checked here.
 */
import { PAGE_SIZE } from '../abi/structs.js';
import { hex } from '../abi/errors.js';
import { UsageError } from '../errors.js';

export { PAGE_SIZE, hex };

export type AddressLike = bigint | number | string;

export const PAGE_SHIFT = 12n;
export const PAGE_MASK = 0xfffn;
const U64_MAX = (1n << 64n) - 1n;

/** Parses and range-checks an address ("0x1000", "4096", 4096, 4096n). */
export function toAddress(value: AddressLike, what = 'address'): bigint {
  let v: bigint;
  if (typeof value === 'bigint') v = value;
  else if (typeof value === 'number') {
    if (!Number.isInteger(value)) throw new UsageError(`${what} ${value} is not an integer`, 'addresses are whole numbers of bytes');
    if (!Number.isSafeInteger(value)) throw new UsageError(`${what} ${value} is not a safe integer`, 'pass a bigint for addresses above 2^53');
    v = BigInt(value);
  } else if (typeof value === 'string' && /^(0x[0-9a-f](_?[0-9a-f])*|0o[0-7](_?[0-7])*|0b[01](_?[01])*|[0-9](_?[0-9])*)$/i.test(value)) {
    v = BigInt(value.replaceAll('_', ''));
  } else {
    throw new UsageError(`${what} ${JSON.stringify(value)} is not an address`, 'give it as a bigint, a number, or a string in hex (0x...) or decimal');
  }
  if (v < 0n || v > U64_MAX) throw new UsageError(`${what} ${hex(v)} is outside 0..2^64-1`);
  return v;
}

export const pageBase = (a: bigint): bigint => a & ~PAGE_MASK;
export const pageOffset = (a: bigint): number => Number(a & PAGE_MASK);
