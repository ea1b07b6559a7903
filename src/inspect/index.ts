// Guest inspection over mapped pages: a page-cached physical reader, zero-copy
// physical scans, x86-64 page-table walks, and a synthetic guest for the model.
export { PhysicalReader, type PhysicalReaderOptions, type PhysicalReaderStats } from './reader.js';
export { scan, type ScanOptions, type ScanPattern, type ScanProgress, type ScanResult, type RegexPattern } from './scan.js';
export {
  translate, readVirtual, isCanonical, canonical, AddressSpace,
  PTE_ADDR_MASK, PTE_PRESENT, PTE_RW, PTE_US, PTE_ACCESSED, PTE_DIRTY, PTE_PS, PTE_GLOBAL, PTE_NX,
  type PhysRead, type PhysReadBytes, type PageSize, type TranslateOptions, type Translation,
} from './paging.js';
export { TranslationError, AbortError, type PagingLevel, type TranslationErrorDetails } from './errors.js';
export {
  buildSyntheticGuest, TASK_LAYOUT, PAGE_OFFSET, KERNEL_VIRTUAL_BASE, VMALLOC_BASE, USER_VA,
  type SyntheticMemory, type SyntheticOptions, type SyntheticTask, type SyntheticTranslation, type SyntheticTruth,
} from './synthetic.js';
