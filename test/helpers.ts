/** Small helpers shared by test files (not a test file itself: ava runs *.test.ts). */
import { DeviceError } from '../src/errors.js';

/** The errno a Device call failed with (0 when it did not throw). */
export function errnoOf(fn: () => unknown): number {
  try {
    fn();
    return 0;
  } catch (e) {
    if (e instanceof DeviceError) return e.errno!;
    throw e;
  }
}
