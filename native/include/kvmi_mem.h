/* SPDX-License-Identifier: MIT */
/*
 * kvmi_mem.h - the guest /dev/kvmmem UAPI, the host introspection hook ioctls
 * and the KVMI wire structs, as used by kvmmem. Mirrors src/abi; the two
 * are compared field by field by test/abi.test.ts through native/abi_check.c.
 *
 * From the KVMI RFC patches (v4, 2017; v6, 2019; v9, 2020), none of which
 * are in mainline, so nothing here exists in the system headers -- except
 * KVMIO and some KVM_E* values, which are reused when present.
 */
#ifndef KVMMEM_KVMI_MEM_H
#define KVMMEM_KVMI_MEM_H

#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/errno.h>

#if defined(__has_include)
# if __has_include(<linux/kvm.h>)
#  include <linux/kvm.h>
# endif
# if __has_include(<linux/kvm_para.h>)
#  include <linux/kvm_para.h>
# endif
#endif

/* ---- guest device /dev/kvmmem (misc device "kvmmem") ---- */

struct kvmi_map_mem_token {
	__u64 token[4];			/* opaque, from KVMI_GET_MAP_TOKEN */
};

struct kvmi_mem_map {
	struct kvmi_map_mem_token token;
	__u64 gpa;			/* guest-physical address in the introspected VM */
	__u64 gva;			/* virtual address in the caller's process */
};

#ifndef KVM_INTRO_MEM_MAP
#define KVM_INTRO_MEM_MAP	_IOW('i', 0x01, struct kvmi_mem_map)
#endif
/* The argument is the address itself, not a pointer to it. */
#ifndef KVM_INTRO_MEM_UNMAP
#define KVM_INTRO_MEM_UNMAP	_IOW('i', 0x02, unsigned long)
#endif

/* ---- hypercalls (kvm_para.h) ---- */

#ifndef KVM_HC_MEM_MAP
#define KVM_HC_MEM_MAP		32
#endif
#ifndef KVM_HC_MEM_UNMAP
#define KVM_HC_MEM_UNMAP	33
#endif
#ifndef KVM_HC_XEN_HVM_OP
#define KVM_HC_XEN_HVM_OP	34
#endif

/*
 * Spelled exactly as the kernel's kvm_para.h (token for token) so that
 * including it after this file is not a conflicting redefinition.
 */
#ifndef KVM_ENOSYS
#define KVM_ENOSYS		1000
#endif
#ifndef KVM_EFAULT
#define KVM_EFAULT		EFAULT
#endif
#ifndef KVM_EINVAL
#define KVM_EINVAL		EINVAL
#endif
#ifndef KVM_E2BIG
#define KVM_E2BIG		E2BIG
#endif
#ifndef KVM_EPERM
#define KVM_EPERM		EPERM
#endif
#ifndef KVM_EOPNOTSUPP
#define KVM_EOPNOTSUPP		95
#endif
#ifndef KVM_EAGAIN
#define KVM_EAGAIN		11
#endif
#ifndef KVM_EBUSY
#define KVM_EBUSY		EBUSY
#endif
#ifndef KVM_ENOENT
#define KVM_ENOENT		ENOENT
#endif
#ifndef KVM_ENOMEM
#define KVM_ENOMEM		ENOMEM
#endif

/* ---- host VM ioctls ---- */

#ifndef KVMIO
#define KVMIO 0xAE
#endif

struct kvm_introspection_hook {
	__s32 fd;			/* socket connected to the introspection tool */
	__u32 padding;			/* must be 0 (EINVAL otherwise) */
	__u8 uuid[16];
};

#ifndef KVM_INTROSPECTION_HOOK
#define KVM_INTROSPECTION_HOOK		_IOW(KVMIO, 0xc3, struct kvm_introspection_hook)
#endif
#ifndef KVM_INTROSPECTION_UNHOOK
#define KVM_INTROSPECTION_UNHOOK	_IO(KVMIO, 0xc4)
#endif
#ifndef KVM_INTROSPECTION_PREUNHOOK
#define KVM_INTROSPECTION_PREUNHOOK	_IO(KVMIO, 0xcc)
#endif

/* ---- KVMI socket protocol (little-endian) ---- */

#ifndef KVMI_VERSION
#define KVMI_VERSION			1
#endif
#define KVMI_EVENT_UNHOOK		0
#define KVMI_EVENT_ACTION_CONTINUE	0
#define KVMI_EVENT_ACTION_RETRY		1
#define KVMI_EVENT_ACTION_CRASH		2

/* Message ids differ between the v4 and v6 patch sets. */
#define KVMI_V4_GET_VERSION		1
#define KVMI_V4_GET_MAP_TOKEN		15
#define KVMI_V4_EVENT			23
#define KVMI_V4_EVENT_REPLY		24
#define KVMI_V4_READ_PHYSICAL		13
#define KVMI_V4_WRITE_PHYSICAL		14
#define KVMI_V6_EVENT_REPLY		0
#define KVMI_V6_EVENT			1
#define KVMI_V6_GET_VERSION		2
#define KVMI_V6_CONTROL_VM_EVENTS	8
#define KVMI_V6_GET_MAP_TOKEN		22
#define KVMI_V6_READ_PHYSICAL		17
#define KVMI_V6_WRITE_PHYSICAL		18
#define KVMI_V6_GET_MAX_GFN		29	/* reply: struct { __u64 gfn; } after kvmi_error_code */

/* Handshake, before any framing; struct_size first, extensible. */
struct kvmi_qemu2introspector {		/* device manager -> tool */
	__u32 struct_size;
	__u8 uuid[16];
	__u32 padding;
	__s64 start_time;
	char name[64];
};

struct kvmi_introspector2qemu {		/* tool -> device manager */
	__u32 struct_size;
	__u8 cookie_hash[20];		/* SHA-1 of the shared cookie */
};

struct kvmi_msg_hdr {
	__u16 id;
	__u16 size;			/* bytes following the header */
	__u32 seq;
};

struct kvmi_error_code {		/* starts every reply */
	__s32 err;
	__u32 padding;
};

struct kvmi_get_version_reply {		/* v6 */
	__u32 version;
	__u32 padding;
};

struct kvmi_get_version_reply_v4 {	/* named kvmi_get_version_reply in v4 */
	__u32 version;
	__u32 commands;
	__u32 events;
	__u32 padding;
};

struct kvmi_control_vm_events {		/* v6 */
	__u16 event_id;
	__u8 enable;
	__u8 padding1;
	__u32 padding2;
};

struct kvmi_event {			/* common part; arch data follows */
	__u16 size;
	__u16 vcpu;
	__u8 event;
	__u8 padding[3];
};

struct kvmi_event_reply {
	__u8 action;
	__u8 event;
	__u16 padding1;
	__u32 padding2;
};

/*
 * KVMI_READ_PHYSICAL / KVMI_WRITE_PHYSICAL parameters as kvmi.rst gives them.
 * The v4/v6 headers say `__u64 size` over the same 8 bytes: identical for
 * every valid size (1..4096, within one page).
 */
struct kvmi_vm_read_physical {
	__u64 gpa;
	__u16 size;
	__u16 padding1;
	__u32 padding2;
};

struct kvmi_vm_write_physical {
	__u64 gpa;
	__u16 size;
	__u16 padding1;
	__u32 padding2;
	__u8 data[];			/* size bytes */
};

_Static_assert(sizeof(struct kvmi_map_mem_token) == 32, "kvmi_map_mem_token");
_Static_assert(sizeof(struct kvmi_mem_map) == 48, "kvmi_mem_map");
_Static_assert(sizeof(struct kvm_introspection_hook) == 24, "kvm_introspection_hook");
_Static_assert(sizeof(struct kvmi_qemu2introspector) == 96, "kvmi_qemu2introspector");
_Static_assert(sizeof(struct kvmi_introspector2qemu) == 24, "kvmi_introspector2qemu");
_Static_assert(sizeof(struct kvmi_msg_hdr) == 8, "kvmi_msg_hdr");
_Static_assert(sizeof(struct kvmi_error_code) == 8, "kvmi_error_code");
_Static_assert(sizeof(struct kvmi_get_version_reply) == 8, "kvmi_get_version_reply");
_Static_assert(sizeof(struct kvmi_get_version_reply_v4) == 16, "kvmi_get_version_reply_v4");
_Static_assert(sizeof(struct kvmi_control_vm_events) == 8, "kvmi_control_vm_events");
_Static_assert(sizeof(struct kvmi_event) == 8, "kvmi_event");
_Static_assert(sizeof(struct kvmi_event_reply) == 8, "kvmi_event_reply");
_Static_assert(sizeof(struct kvmi_vm_read_physical) == 16, "kvmi_vm_read_physical");
_Static_assert(sizeof(struct kvmi_vm_write_physical) == 16, "kvmi_vm_write_physical");

_Static_assert(KVM_INTRO_MEM_MAP == 0x40306901, "KVM_INTRO_MEM_MAP");
#if defined(__LP64__)
/* _IOW(..., unsigned long) is only 0x40086902 where long is 64-bit. */
_Static_assert(KVM_INTRO_MEM_UNMAP == 0x40086902, "KVM_INTRO_MEM_UNMAP");
#endif

#endif /* KVMMEM_KVMI_MEM_H */
