// KVM hypercall numbers (kvm_para.h) and the KVM_E* values hypercalls return,
// negated (a hypercall returning -KVM_ENOENT means "token unknown/used").

export const KVM_HC_MEM_MAP = 32;
export const KVM_HC_MEM_UNMAP = 33;
export const KVM_HC_XEN_HVM_OP = 34;

export const KVM_ENOSYS = 1000;
export const KVM_EFAULT = 14;
export const KVM_EPERM = 1;
export const KVM_EAGAIN = 11;
export const KVM_EBUSY = 16;
export const KVM_EINVAL = 22;
export const KVM_ENOENT = 2;
export const KVM_ENOMEM = 12;
export const KVM_EOPNOTSUPP = 95;
/** In mainline kvm_para.h as well; listed for completeness. */
export const KVM_E2BIG = 7;

// Mainline numbers too, so traces of unrelated hypercalls read well.
const NAMES: ReadonlyMap<number, string> = new Map([
  [1, 'KVM_HC_VAPIC_POLL_IRQ'],
  [2, 'KVM_HC_MMU_OP'],
  [3, 'KVM_HC_FEATURES'],
  [4, 'KVM_HC_PPC_MAP_MAGIC_PAGE'],
  [5, 'KVM_HC_KICK_CPU'],
  [6, 'KVM_HC_MIPS_GET_CLOCK_FREQ'],
  [7, 'KVM_HC_MIPS_EXIT_VM'],
  [8, 'KVM_HC_MIPS_CONSOLE_OUTPUT'],
  [9, 'KVM_HC_CLOCK_PAIRING'],
  [10, 'KVM_HC_SEND_IPI'],
  [11, 'KVM_HC_SCHED_YIELD'],
  [12, 'KVM_HC_MAP_GPA_RANGE'],
  [KVM_HC_MEM_MAP, 'KVM_HC_MEM_MAP'],
  [KVM_HC_MEM_UNMAP, 'KVM_HC_MEM_UNMAP'],
  [KVM_HC_XEN_HVM_OP, 'KVM_HC_XEN_HVM_OP'],
]);

/** 'KVM_HC_MEM_MAP' etc.; unknown numbers give 'hypercall <nr>'. */
export function hypercallName(nr: number): string {
  return NAMES.get(nr) ?? `hypercall ${String(nr)}`;
}
