/* SPDX-License-Identifier: MIT */
/*
 * Prints the ABI as the C compiler sees it, one "NAME VALUE" (decimal) per
 * line, for test/abi.test.ts to compare with src/abi. Every struct gets
 * sizeof.S, and every member offsetof.S.F and sizeof.S.F.
 *
 *   cc -Wall -Werror -Inative/include native/abi_check.c -o abi_check
 *
 * Also compiled in kernel context, against the headers of the lab's guest
 * kernel (kbuild, to assembly only: test/abi.test.ts), where each value
 * becomes a "->NAME VALUE" line of the .s file (the asm-offsets trick).
 */
#ifdef __KERNEL__
#include <linux/stddef.h>
#define VALUE(name, v) asm volatile("\n.ascii \"->" name " %c0\"" : : "i" ((long long)(v)))
#else
#include <stddef.h>
#include <stdio.h>
#define VALUE(name, v) printf("%s %lld\n", name, (long long)(v))
#endif

#include "kvmi_mem.h"

#define STRUCT(s) VALUE("sizeof." #s, sizeof(struct s))
#define FIELD(s, f) \
	do { \
		VALUE("offsetof." #s "." #f, offsetof(struct s, f)); \
		VALUE("sizeof." #s "." #f, sizeof(((struct s *)0)->f)); \
	} while (0)
/* ioctl numbers are unsigned int in the kernel; print them that way. */
#define IOCTL(n) VALUE(#n, (unsigned int)(n))
#define CONST(n) VALUE(#n, (n))

#ifdef __KERNEL__
void kvmmem_abi_check(void);
void kvmmem_abi_check(void)
#else
int main(void)
#endif
{
	STRUCT(kvmi_map_mem_token);
	FIELD(kvmi_map_mem_token, token);

	STRUCT(kvmi_mem_map);
	FIELD(kvmi_mem_map, token);
	FIELD(kvmi_mem_map, gpa);
	FIELD(kvmi_mem_map, gva);

	STRUCT(kvm_introspection_hook);
	FIELD(kvm_introspection_hook, fd);
	FIELD(kvm_introspection_hook, padding);
	FIELD(kvm_introspection_hook, uuid);

	STRUCT(kvmi_msg_hdr);
	FIELD(kvmi_msg_hdr, id);
	FIELD(kvmi_msg_hdr, size);
	FIELD(kvmi_msg_hdr, seq);

	STRUCT(kvmi_error_code);
	FIELD(kvmi_error_code, err);
	FIELD(kvmi_error_code, padding);

	STRUCT(kvmi_qemu2introspector);
	FIELD(kvmi_qemu2introspector, struct_size);
	FIELD(kvmi_qemu2introspector, uuid);
	FIELD(kvmi_qemu2introspector, padding);
	FIELD(kvmi_qemu2introspector, start_time);
	FIELD(kvmi_qemu2introspector, name);

	STRUCT(kvmi_introspector2qemu);
	FIELD(kvmi_introspector2qemu, struct_size);
	FIELD(kvmi_introspector2qemu, cookie_hash);

	STRUCT(kvmi_get_version_reply);
	FIELD(kvmi_get_version_reply, version);
	FIELD(kvmi_get_version_reply, padding);

	STRUCT(kvmi_get_version_reply_v4);
	FIELD(kvmi_get_version_reply_v4, version);
	FIELD(kvmi_get_version_reply_v4, commands);
	FIELD(kvmi_get_version_reply_v4, events);
	FIELD(kvmi_get_version_reply_v4, padding);

	STRUCT(kvmi_control_vm_events);
	FIELD(kvmi_control_vm_events, event_id);
	FIELD(kvmi_control_vm_events, enable);
	FIELD(kvmi_control_vm_events, padding1);
	FIELD(kvmi_control_vm_events, padding2);

	STRUCT(kvmi_event);
	FIELD(kvmi_event, size);
	FIELD(kvmi_event, vcpu);
	FIELD(kvmi_event, event);
	FIELD(kvmi_event, padding);

	STRUCT(kvmi_event_reply);
	FIELD(kvmi_event_reply, action);
	FIELD(kvmi_event_reply, event);
	FIELD(kvmi_event_reply, padding1);
	FIELD(kvmi_event_reply, padding2);

	STRUCT(kvmi_vm_read_physical);
	FIELD(kvmi_vm_read_physical, gpa);
	FIELD(kvmi_vm_read_physical, size);
	FIELD(kvmi_vm_read_physical, padding1);
	FIELD(kvmi_vm_read_physical, padding2);

	STRUCT(kvmi_vm_write_physical);
	FIELD(kvmi_vm_write_physical, gpa);
	FIELD(kvmi_vm_write_physical, size);
	FIELD(kvmi_vm_write_physical, padding1);
	FIELD(kvmi_vm_write_physical, padding2);

	IOCTL(KVM_INTRO_MEM_MAP);
	IOCTL(KVM_INTRO_MEM_UNMAP);
	IOCTL(KVM_INTROSPECTION_HOOK);
	IOCTL(KVM_INTROSPECTION_UNHOOK);
	IOCTL(KVM_INTROSPECTION_PREUNHOOK);
	CONST(KVMIO);

	CONST(KVM_HC_MEM_MAP);
	CONST(KVM_HC_MEM_UNMAP);
	CONST(KVM_HC_XEN_HVM_OP);

	CONST(KVM_ENOSYS);
	CONST(KVM_EFAULT);
	CONST(KVM_EINVAL);
	CONST(KVM_E2BIG);
	CONST(KVM_EPERM);
	CONST(KVM_EOPNOTSUPP);
	CONST(KVM_EAGAIN);
	CONST(KVM_EBUSY);
	CONST(KVM_ENOENT);
	CONST(KVM_ENOMEM);

	CONST(KVMI_VERSION);
	CONST(KVMI_EVENT_UNHOOK);
	CONST(KVMI_EVENT_ACTION_CONTINUE);
	CONST(KVMI_EVENT_ACTION_RETRY);
	CONST(KVMI_EVENT_ACTION_CRASH);
	CONST(KVMI_V4_GET_VERSION);
	CONST(KVMI_V4_GET_MAP_TOKEN);
	CONST(KVMI_V4_EVENT);
	CONST(KVMI_V4_EVENT_REPLY);
	CONST(KVMI_V4_READ_PHYSICAL);
	CONST(KVMI_V4_WRITE_PHYSICAL);
	CONST(KVMI_V6_EVENT_REPLY);
	CONST(KVMI_V6_EVENT);
	CONST(KVMI_V6_GET_VERSION);
	CONST(KVMI_V6_CONTROL_VM_EVENTS);
	CONST(KVMI_V6_GET_MAP_TOKEN);
	CONST(KVMI_V6_READ_PHYSICAL);
	CONST(KVMI_V6_WRITE_PHYSICAL);
	CONST(KVMI_V6_GET_MAX_GFN);
#ifndef __KERNEL__
	return 0;
#endif
}
