/**
 * Errors of src/inspect. Both extend KvmmemError, so callers switch on `code`
 * as everywhere else in the library.
 */
import { KvmmemError } from '../errors.js';
import { hex } from '../client/address.js';

/** Paging-structure level names, outermost first (5-level paging adds PML5). */
export type PagingLevel = 'PML5' | 'PML4' | 'PDPT' | 'PD' | 'PT';

export interface TranslationErrorDetails {
  va: bigint;
  cr3: bigint;
  /** The level whose entry was not present (absent for ERR_NON_CANONICAL). */
  level?: PagingLevel;
  /** Guest-physical address of that entry. */
  entryGpa?: bigint;
  /** The entry's 64-bit value. */
  entryValue?: bigint;
}

/**
 * A guest-virtual address could not be translated:
 * - code 'ERR_PAGE_NOT_PRESENT': the entry at `level` (at `entryGpa`, value `entryValue`) has P=0;
 * - code 'ERR_NON_CANONICAL': `va` is not canonical for the paging mode.
 */
export class TranslationError extends KvmmemError {
  readonly va: bigint;
  readonly cr3: bigint;
  readonly level: PagingLevel | undefined;
  readonly entryGpa: bigint | undefined;
  readonly entryValue: bigint | undefined;

  constructor(code: 'ERR_PAGE_NOT_PRESENT' | 'ERR_NON_CANONICAL', d: TranslationErrorDetails, levels = 4) {
    const msg = code === 'ERR_NON_CANONICAL'
      ? `va ${hex(d.va)} is not canonical for ${levels}-level paging (bits 63..${levels === 5 ? 56 : 47} must all equal bit ${levels === 5 ? 56 : 47})`
      : `va ${hex(d.va)} is not mapped: ${d.level} entry at gpa ${hex(d.entryGpa ?? 0n)} is not present (value ${hex(d.entryValue ?? 0n)}, cr3 ${hex(d.cr3)})`;
    super(msg, {
      code,
      hint: code === 'ERR_NON_CANONICAL'
        ? 'sign-extend the address from bit 47 (bit 56 with 5-level paging)'
        : 'the guest has not mapped this address in this address space (or it is paged out); check the CR3 and the address',
    });
    this.va = d.va;
    this.cr3 = d.cr3;
    this.level = d.level;
    this.entryGpa = d.entryGpa;
    this.entryValue = d.entryValue;
  }
}

/** An operation was cancelled through its AbortSignal (code 'ABORT_ERR', like DOMException AbortError). */
export class AbortError extends KvmmemError {
  constructor(what: string, reason?: unknown) {
    super(`${what} was aborted`, reason === undefined ? { code: 'ABORT_ERR' } : { code: 'ABORT_ERR', cause: reason });
    this.name = 'AbortError';
  }
}
