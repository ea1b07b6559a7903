// SPDX-License-Identifier: GPL-2.0
/*
 * kvmmem.c - the guest-side /dev/kvmmem misc driver of the KVMI patches
 * (virt/kvm/kvmi_mem_guest.c, RFC v4 02/18, seed 003) as a Linux 6.1 module.
 *
 * Same UAPI (native/include/kvmi_mem.h), same structures (file_map,
 * page_map), same order of checks and errnos as the seed and as its TS model
 * (src/model/driver.ts). Deliberate differences, each explained where it is
 * made and in docs/kmod.md:
 *  - the page is found with get_user_pages_fast_only() (follow_page() is not
 *    exported in 6.1); a page not present still gives the seed's quirk;
 *  - the shared zero page counts as not present (the seed only WARNs);
 *  - the page is PINNED (pin_user_pages FOLL_LONGTERM|FOLL_WRITE) while it is
 *    mapped and unpinned on UNMAP/release (reference lab.md §7);
 *  - the hypercalls go through one transport function with two backends:
 *    the real KVM hypercalls, or the lab mailbox (an ivshmem-doorbell device,
 *    layout in kvmmem_mailbox.h) when there is no KVM paravirt (TCG).
 */
#define pr_fmt(fmt) "kvmmem: " fmt

#include <linux/module.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/pgtable.h>
#include <linux/types.h>
#include <linux/kvm_para.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/sched.h>
#include <linux/list.h>
#include <linux/spinlock.h>
#include <linux/mutex.h>
#include <linux/rwsem.h>
#include <linux/pci.h>
#include <linux/interrupt.h>
#include <linux/wait.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/bitops.h>

#include "kvmi_mem.h"
#include "kvmmem_mailbox.h"

/* ------------------------------------------------------------ parameters */

static char *transport = "auto";
module_param(transport, charp, 0444);
MODULE_PARM_DESC(transport, "hypercall transport: auto (kvm if paravirt, else mailbox), kvm, mailbox");

static unsigned int mbox_timeout_ms = 5000;
module_param(mbox_timeout_ms, uint, 0644);
MODULE_PARM_DESC(mbox_timeout_ms, "mailbox: how long a hypercall waits for the host (ms); then -ETIMEDOUT");

static bool pin_pages = true;
module_param(pin_pages, bool, 0644);
MODULE_PARM_DESC(pin_pages, "pin each mapped page while mapped (default); 0 = the seed's unreferenced lookup, only to demonstrate the hazard it leaves (docs/kmod.md)");

/* A lost interrupt costs at most this much latency, never a hang. */
#define KVMMEM_MBOX_RECHECK_MS 10

enum kvmmem_tp { KVMMEM_TP_NONE, KVMMEM_TP_KVM, KVMMEM_TP_MBOX };
static const char *const kvmmem_tp_name[] = { "none", "kvm", "mailbox" };
static enum kvmmem_tp kvmmem_tp;

/* ------------------------------------------------------------ the mailbox transport */

struct kvmmem_mbox {
	struct pci_dev *pdev;
	void __iomem *regs;			/* BAR0 */
	struct kvmmem_mbox_header *hdr;		/* BAR2, write-back mapped (it is RAM) */
	struct kvmmem_mbox_slot *slots;
	u32 nslots, host_peer, vector;
	wait_queue_head_t wq;			/* answers and freed slots */
	spinlock_t lock;			/* held, poisoned, orphan[] */
	unsigned long held;			/* slots a caller is using */
	unsigned long poisoned;			/* timed out, not answered yet */
	/* A poisoned slot's request, as we sent it (not as the shared memory
	 * says now), and the pin of the page it named: kept until the host
	 * answers, since the host may still alias that page. */
	struct page *orphan[KVMMEM_MBOX_MAX_SLOTS];
	unsigned int orphan_nr[KVMMEM_MBOX_MAX_SLOTS];
	u64 orphan_map_gpa[KVMMEM_MBOX_MAX_SLOTS];
};

static struct kvmmem_mbox *kvmmem_mbox;
/* Calls hold it for reading; unbinding takes it for writing (waits for them). */
static DECLARE_RWSEM(kvmmem_mbox_rwsem);

static irqreturn_t kvmmem_mbox_irq(int irq, void *data)
{
	struct kvmmem_mbox *mb = data;

	wake_up_all(&mb->wq);
	return IRQ_HANDLED;
}

static bool kvmmem_slot_answered(struct kvmmem_mbox_slot *s)
{
	return READ_ONCE(s->resp_seq) == READ_ONCE(s->req_seq);
}

/* A free slot (answered, not held, not poisoned), marked held; -1 if none. */
static int kvmmem_mbox_take(struct kvmmem_mbox *mb)
{
	int i, got = -1;

	spin_lock(&mb->lock);
	for (i = 0; i < mb->nslots; i++) {
		if (test_bit(i, &mb->held) || test_bit(i, &mb->poisoned))
			continue;
		if (!kvmmem_slot_answered(&mb->slots[i]))
			continue;	/* the host has not answered its last request yet */
		__set_bit(i, &mb->held);
		got = i;
		break;
	}
	spin_unlock(&mb->lock);
	return got;
}

static void kvmmem_mbox_give(struct kvmmem_mbox *mb, int i)
{
	spin_lock(&mb->lock);
	__clear_bit(i, &mb->held);
	spin_unlock(&mb->lock);
	wake_up_all(&mb->wq);
}

/*
 * One request through slot `i` (held by us): write it, ring, wait. Returns
 * the host's result, or -ETIMEDOUT (the slot is then poisoned and adopts
 * *pin).
 */
static long kvmmem_mbox_send(struct kvmmem_mbox *mb, int i, unsigned int nr, u64 a0, u64 a1, u64 a2,
			     const struct kvmi_map_mem_token *token, struct page **pin, unsigned long deadline)
{
	struct kvmmem_mbox_slot *s = &mb->slots[i];
	u32 seq;
	long left;

	WRITE_ONCE(s->nr, nr);
	WRITE_ONCE(s->flags, 0);
	WRITE_ONCE(s->a0, a0);
	WRITE_ONCE(s->a1, a1);
	WRITE_ONCE(s->a2, a2);
	if (token)
		memcpy(s->token, token, sizeof(s->token));
	else
		memset(s->token, 0, sizeof(s->token));
	seq = READ_ONCE(s->req_seq) + 1;
	if (seq == 0)
		seq = 1;
	wmb();	/* the request before its sequence number */
	WRITE_ONCE(s->req_seq, seq);
	wmb();	/* the sequence number before the doorbell */
	iowrite32((mb->host_peer << 16) | mb->vector, mb->regs + KVMMEM_IVSHMEM_DOORBELL);

	for (;;) {
		if (READ_ONCE(s->resp_seq) == seq)
			break;
		left = (long)(deadline - jiffies);
		if (left <= 0)
			break;
		wait_event_timeout(mb->wq, READ_ONCE(s->resp_seq) == seq,
				   min_t(long, left, msecs_to_jiffies(KVMMEM_MBOX_RECHECK_MS)));
	}
	if (READ_ONCE(s->resp_seq) == seq) {
		long result;

		rmb();	/* the sequence number before the result it publishes */
		result = (long)READ_ONCE(s->result);
		kvmmem_mbox_give(mb, i);
		return result;
	}
	spin_lock(&mb->lock);
	__clear_bit(i, &mb->held);
	__set_bit(i, &mb->poisoned);
	mb->orphan[i] = pin ? *pin : NULL;
	mb->orphan_nr[i] = nr;
	mb->orphan_map_gpa[i] = nr == KVMMEM_MBOX_NR_MEM_MAP ? a2 : a0;
	if (pin)
		*pin = NULL;
	spin_unlock(&mb->lock);
	pr_warn_ratelimited("mailbox: hypercall %u (a0 %#llx a1 %#llx a2 %#llx) not answered in %u ms: -ETIMEDOUT, slot %d poisoned until the host answers\n",
			    nr, a0, a1, a2, mbox_timeout_ms, i);
	return -ETIMEDOUT;
}

/* Take a slot (waiting for one until the deadline) and send. */
static long __kvmmem_mbox_call(struct kvmmem_mbox *mb, unsigned int nr, u64 a0, u64 a1, u64 a2,
			       const struct kvmi_map_mem_token *token, struct page **pin)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(READ_ONCE(mbox_timeout_ms));
	int i;

	for (;;) {
		long left;

		i = kvmmem_mbox_take(mb);
		if (i >= 0)
			break;
		left = (long)(deadline - jiffies);
		if (left <= 0) {
			pr_warn_ratelimited("mailbox: no free slot in %u ms (host not answering?): -ETIMEDOUT\n",
					    mbox_timeout_ms);
			return -ETIMEDOUT;	/* nothing sent: the pin stays the caller's */
		}
		wait_event_timeout(mb->wq, (i = kvmmem_mbox_take(mb)) >= 0,
				   min_t(long, left, msecs_to_jiffies(KVMMEM_MBOX_RECHECK_MS)));
		if (i >= 0)
			break;
	}
	return kvmmem_mbox_send(mb, i, nr, a0, a1, a2, token, pin, deadline);
}

/*
 * Poisoned slots the host has answered since: free them and settle their
 * pins. A MAP the host completed after we gave up is undone with an UNMAP,
 * and only then is the page unpinned, so the page never goes back to the
 * allocator while the host may still alias it.
 */
static void kvmmem_mbox_reap(struct kvmmem_mbox *mb)
{
	int i;

	if (!READ_ONCE(mb->poisoned))
		return;
	for (i = 0; i < mb->nslots; i++) {
		struct kvmmem_mbox_slot *s = &mb->slots[i];
		struct page *page;
		unsigned int nr;
		long result;
		u64 a2;

		spin_lock(&mb->lock);
		if (!test_bit(i, &mb->poisoned) || !kvmmem_slot_answered(s)) {
			spin_unlock(&mb->lock);
			continue;
		}
		rmb();
		nr = mb->orphan_nr[i];
		a2 = mb->orphan_map_gpa[i];
		result = (long)READ_ONCE(s->result);
		page = mb->orphan[i];
		mb->orphan[i] = NULL;
		__clear_bit(i, &mb->poisoned);
		spin_unlock(&mb->lock);
		pr_info("mailbox: late answer in slot %d: hypercall %u result %ld\n", i, nr, result);
		if (nr == KVMMEM_MBOX_NR_MEM_MAP && result == 0) {
			long r = __kvmmem_mbox_call(mb, KVMMEM_MBOX_NR_MEM_UNMAP, a2, 0, 0, NULL, &page);

			if (IS_ERR_VALUE(r))
				pr_warn("mailbox: undoing the late MAP of %#llx: UNMAP failed with %ld\n", a2, r);
		}
		if (page)
			unpin_user_page(page);
	}
}

static long kvmmem_mbox_call(unsigned int nr, u64 a0, u64 a1, u64 a2,
			     const struct kvmi_map_mem_token *token, struct page **pin)
{
	struct kvmmem_mbox *mb;
	long result;

	down_read(&kvmmem_mbox_rwsem);
	mb = kvmmem_mbox;
	if (!mb) {
		result = -ENODEV;	/* the device was unbound */
	} else if (READ_ONCE(mb->hdr->magic) != KVMMEM_MBOX_MAGIC) {
		pr_warn_ratelimited("mailbox: the host stopped serving (magic cleared): -ENODEV\n");
		result = -ENODEV;
	} else {
		kvmmem_mbox_reap(mb);
		result = __kvmmem_mbox_call(mb, nr, a0, a1, a2, token, pin);
	}
	up_read(&kvmmem_mbox_rwsem);
	return result;
}

/*
 * The one transport function: a hypercall as kvm_hypercall3/1 would make
 * it. `pin` (may be NULL) is the pinned page the request names: if the
 * transport has to keep it (a mailbox request that timed out) it sets *pin
 * to NULL and unpins it itself once the host has answered.
 */
static long kvmmem_hypercall(unsigned int nr, unsigned long a0, unsigned long a1, unsigned long a2,
			     const struct kvmi_map_mem_token *token, struct page **pin)
{
	switch (kvmmem_tp) {
	case KVMMEM_TP_KVM:
		if (nr == KVM_HC_MEM_MAP)
			return kvm_hypercall3(KVM_HC_MEM_MAP, a0, a1, a2);
		return kvm_hypercall1(nr, a0);
	case KVMMEM_TP_MBOX:
		/* MAP's a0 is 0 on the wire: the token travels by value (kvmmem_mailbox.h). */
		if (nr == KVM_HC_MEM_MAP)
			return kvmmem_mbox_call(nr, 0, a1, a2, token, pin);
		return kvmmem_mbox_call(nr, a0, 0, 0, NULL, pin);
	default:
		return -ENODEV;
	}
}

/* C (arch/x86/kernel/kvmi_mem_guest.c): the hypercall wrappers. */
static long kvmi_arch_map_hc(struct kvmi_map_mem_token *tknp, u64 req_gpa, u64 map_gpa, struct page **pin)
{
	return kvmmem_hypercall(KVM_HC_MEM_MAP, (unsigned long)tknp, req_gpa, map_gpa, tknp, pin);
}

static long kvmi_arch_unmap_hc(u64 map_gpa, struct page **pin)
{
	return kvmmem_hypercall(KVM_HC_MEM_UNMAP, map_gpa, 0, 0, NULL, pin);
}

/* ------------------------------------------------------------ the driver (seed 003) */

static struct list_head file_list;
static spinlock_t file_lock;

struct file_map {
	struct list_head file_list;
	struct file *file;
	struct list_head map_list;
	struct mutex lock;
	int active;	/* for tearing down */
};

struct page_map {
	struct list_head map_list;
	__u64 gpa;
	unsigned long vaddr;
	unsigned long paddr;	/* 0 for the quirk entries (the seed leaves kmalloc garbage) */
	struct page *page;	/* the pinned page; NULL for the quirk entries */
};

static int kvm_dev_open(struct inode *inodep, struct file *filp)
{
	struct file_map *fmp;

	pr_debug("kvmi: file %016lx opened by process %s\n", (unsigned long)filp, current->comm);

	fmp = kmalloc(sizeof(*fmp), GFP_KERNEL);
	if (!fmp)
		return -ENOMEM;

	INIT_LIST_HEAD(&fmp->file_list);
	fmp->file = filp;
	filp->private_data = fmp;
	INIT_LIST_HEAD(&fmp->map_list);
	mutex_init(&fmp->lock);
	fmp->active = 1;

	spin_lock(&file_lock);
	list_add_tail(&fmp->file_list, &file_list);
	spin_unlock(&file_lock);

	return 0;
}

/*
 * The shared zero page backs anonymous memory that was read but never
 * written. Its frame is shared by every such page of every process, so
 * handing it to the host would alias the target page into all of them. It
 * counts as "not present" (the quirk below): from the process's view that
 * page was never faulted in for writing. (Huge zero pages are not exported
 * by name: in an anonymous VMA every page that is not PageAnon is one.)
 */
static bool kvmmem_is_zero_page(struct vm_area_struct *vma, struct page *page)
{
	return is_zero_pfn(page_to_pfn(page)) || (vma_is_anonymous(vma) && !PageAnon(page));
}

/* actually does the mapping of a page */
static long _do_mapping(struct kvmi_mem_map *map_req, struct page_map *pmp)
{
	struct mm_struct *mm = current->mm;
	unsigned long uaddr = (unsigned long)map_req->gva & PAGE_MASK;
	struct vm_area_struct *vma;
	struct page *page;
	unsigned long paddr;
	long result;

	pr_debug("kvmi: mapping remote GPA %016llx into %016llx\n", map_req->gpa, map_req->gva);

	/* check access to memory location */
	if (!access_ok((void __user *)(unsigned long)map_req->gva, PAGE_SIZE)) {
		pr_err_ratelimited("kvmi: invalid virtual address for mapping\n");
		return -EINVAL;
	}

	mmap_read_lock(mm);

	/* find the page to be replaced */
	vma = find_vma(mm, map_req->gva);
	if (!vma || map_req->gva < vma->vm_start) {
		/*
		 * QUIRK (seed): find_vma() NULL -> PTR_ERR(NULL) == 0: success
		 * without a hypercall, the entry is kept. (A gva below the vma
		 * find_vma returns lies in a hole: follow_page finds no page, same.)
		 */
		result = 0;
		pr_debug("kvmi: no mapping at %016llx: entry kept without a hypercall\n", map_req->gva);
		goto out;
	}

	/*
	 * follow_page(vma, gva, 0) is not exported in 6.1. The lockless walk of
	 * get_user_pages_fast_only() never faults either: it returns a page only
	 * when one is present in this page table (no swap entry, no PFN map).
	 */
	if (get_user_pages_fast_only(uaddr, 1, 0, &page) != 1) {
		/* QUIRK (seed): follow_page() NULL -> 0: success without a hypercall, entry kept. */
		result = 0;
		pr_debug("kvmi: page at %016llx not present: entry kept without a hypercall\n", map_req->gva);
		goto out;
	}
	if (kvmmem_is_zero_page(vma, page)) {
		put_page(page);
		result = 0;	/* as not present (the seed WARNs "zero-page still mapped" and maps it) */
		pr_debug("kvmi: zero page at %016llx: treated as not present\n", map_req->gva);
		goto out;
	}
	put_page(page);

	if (READ_ONCE(pin_pages)) {
		/*
		 * Pin the page for as long as the host aliases it (the seed takes
		 * no reference: at exit the page is freed before release()
		 * unmaps it). FOLL_WRITE makes it this process's own writable
		 * page first (COW is broken, a read-only page-cache page is
		 * never handed out); FOLL_LONGTERM keeps it from migrating.
		 */
		result = pin_user_pages(uaddr, 1, FOLL_WRITE | FOLL_LONGTERM, &page, NULL);
		if (result != 1) {
			if (result >= 0)
				result = -EFAULT;
			pr_err_ratelimited("kvmi: pin_user_pages() failed with result %ld\n", result);
			goto out;
		}
		pmp->page = page;
	}
	/* (pin_pages=0: the seed's follow_page(vma, gva, 0) holds no reference either) */

	/* get the physical address and store it in page_map */
	paddr = page_to_phys(page);
	pr_debug("kvmi: page phys addr %016lx\n", paddr);
	pmp->paddr = paddr;

	/* last thing to do is host mapping */
	result = kvmi_arch_map_hc(&map_req->token, map_req->gpa, paddr, &pmp->page);
	if (IS_ERR_VALUE(result)) {
		pr_err_ratelimited("kvmi: HC failed with result %ld\n", result);
		if (pmp->page)
			unpin_user_page(pmp->page);
		pmp->page = NULL;
		goto out;
	}

out:
	mmap_read_unlock(mm);

	return result;
}

/* actually does the unmapping of a page; the pin is dropped unless the transport kept it */
static long _do_unmapping(struct page_map *pmp)
{
	long result;

	pr_debug("kvmi: unmapping request for phys addr %016lx\n", pmp->paddr);

	/* local GPA uniquely identifies the mapping on the host */
	result = kvmi_arch_unmap_hc(pmp->paddr, &pmp->page);
	if (IS_ERR_VALUE(result))
		pr_warn_ratelimited("kvmi: HC failed with result %ld\n", result);
	if (pmp->page)
		unpin_user_page(pmp->page);
	pmp->page = NULL;

	return result;
}

static long kvm_dev_ioctl_map(struct file_map *fmp, struct kvmi_mem_map *map)
{
	struct page_map *pmp;
	long result;

	/* access_ok() lost its VERIFY_READ/VERIFY_WRITE argument in 5.0: the seed's two checks are one range check */
	if (!access_ok((void __user *)(unsigned long)map->gva, PAGE_SIZE))
		return -EINVAL;

	/* prepare list entry */
	pmp = kmalloc(sizeof(*pmp), GFP_KERNEL);
	if (!pmp)
		return -ENOMEM;

	INIT_LIST_HEAD(&pmp->map_list);
	pmp->gpa = map->gpa;
	pmp->vaddr = map->gva;
	pmp->paddr = 0;
	pmp->page = NULL;

	/* acquire the file mapping */
	mutex_lock(&fmp->lock);

	/* check if other thread is closing the file */
	if (!fmp->active) {
		result = -ENODEV;
		pr_warn_ratelimited("kvmi: unable to map, file is being closed\n");
		goto out_err;
	}

	/* do the actual mapping */
	result = _do_mapping(map, pmp);
	if (IS_ERR_VALUE(result))
		goto out_err;

	/* link to list */
	list_add_tail(&pmp->map_list, &fmp->map_list);

	/* all fine */
	result = 0;
	goto out_finalize;

out_err:
	kfree(pmp);

out_finalize:
	mutex_unlock(&fmp->lock);

	return result;
}

static long kvm_dev_ioctl_unmap(struct file_map *fmp, unsigned long vaddr)
{
	struct page_map *pmp;
	bool found = false;

	mutex_lock(&fmp->lock);

	/* check if other thread is closing the file */
	if (!fmp->active) {
		mutex_unlock(&fmp->lock);
		pr_warn_ratelimited("kvmi: unable to unmap, file is being closed\n");
		return -ENODEV;
	}

	/* check that this address belongs to us: the first entry with exactly this vaddr */
	list_for_each_entry(pmp, &fmp->map_list, map_list) {
		if (pmp->vaddr == vaddr) {
			found = true;
			break;
		}
	}

	if (!found) {
		mutex_unlock(&fmp->lock);
		pr_err_ratelimited("kvmi: address %016lx not mapped\n", vaddr);
		return -ENOENT;
	}

	/* decouple guest mapping */
	list_del(&pmp->map_list);
	mutex_unlock(&fmp->lock);

	/* unmap & ignore result */
	_do_unmapping(pmp);

	kfree(pmp);

	return 0;
}

static long kvm_dev_ioctl(struct file *filp, unsigned int ioctl, unsigned long arg)
{
	void __user *argp = (void __user *)arg;
	struct file_map *fmp = filp->private_data;
	long result;

	if (WARN_ON_ONCE(fmp->file != filp))	/* the seed BUG()s here */
		return -EINVAL;

	switch (ioctl) {
	case KVM_INTRO_MEM_MAP: {
		struct kvmi_mem_map map;

		result = -EFAULT;
		if (copy_from_user(&map, argp, sizeof(map)))
			break;

		result = kvm_dev_ioctl_map(fmp, &map);
		if (IS_ERR_VALUE(result))
			break;

		result = 0;
		break;
	}
	case KVM_INTRO_MEM_UNMAP: {
		unsigned long vaddr = (unsigned long)arg;

		result = kvm_dev_ioctl_unmap(fmp, vaddr);
		if (IS_ERR_VALUE(result))
			break;

		result = 0;
		break;
	}
	default:
		pr_err_ratelimited("kvmi: ioctl %#x not implemented\n", ioctl);
		result = -ENOTTY;
	}

	return result;
}

static int kvm_dev_release(struct inode *inodep, struct file *filp)
{
	struct file_map *fmp = filp->private_data;
	struct page_map *pmp, *next;
	unsigned int n = 0;

	pr_debug("kvmi: file %016lx closed by process %s\n", (unsigned long)filp, current->comm);

	mutex_lock(&fmp->lock);

	/* mark for teardown */
	fmp->active = 0;

	/* release mappings taken on this instance of the file */
	list_for_each_entry_safe(pmp, next, &fmp->map_list, map_list) {
		_do_unmapping(pmp);
		list_del(&pmp->map_list);
		kfree(pmp);
		n++;
	}

	mutex_unlock(&fmp->lock);

	spin_lock(&file_lock);
	list_del(&fmp->file_list);
	spin_unlock(&file_lock);

	kfree(fmp);
	if (n)
		pr_info("kvmi: file closed by %s: %u mappings released\n", current->comm, n);

	return 0;
}

static const struct file_operations kvmmem_ops = {
	.owner		= THIS_MODULE,
	.open		= kvm_dev_open,
	.unlocked_ioctl	= kvm_dev_ioctl,
	.compat_ioctl	= kvm_dev_ioctl,
	.release	= kvm_dev_release,
};

static struct miscdevice kvm_mem_dev = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "kvmmem",
	.fops	= &kvmmem_ops,
};

/* ------------------------------------------------------------ the mailbox device */

static int kvmmem_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct kvmmem_mbox *mb;
	struct kvmmem_mbox_header *hdr;
	resource_size_t start = pci_resource_start(pdev, 2), len = pci_resource_len(pdev, 2);
	u32 version, nslots, vector;
	int ret, i;

	/* Every ivshmem device is offered to us (the target's RAM too): bind only the mailbox. */
	if (!(pci_resource_flags(pdev, 2) & IORESOURCE_MEM) || len < PAGE_SIZE ||
	    pci_resource_len(pdev, 0) < 16)
		return -ENODEV;

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	hdr = devm_memremap(&pdev->dev, start, PAGE_SIZE, MEMREMAP_WB);
	if (IS_ERR(hdr))
		return PTR_ERR(hdr);
	if (READ_ONCE(hdr->magic) != KVMMEM_MBOX_MAGIC) {
		dev_info(&pdev->dev, "kvmmem: no mailbox magic at BAR2 (host not serving, or not a mailbox): not binding\n");
		return -ENODEV;
	}
	if (kvmmem_mbox) {
		dev_info(&pdev->dev, "kvmmem: a mailbox is already bound (%s): leaving this one alone\n",
			 pci_name(kvmmem_mbox->pdev));
		return -ENODEV;
	}
	rmb();	/* the magic is written last: the fields it covers after it */
	version = READ_ONCE(hdr->version);
	nslots = READ_ONCE(hdr->nslots);
	vector = READ_ONCE(hdr->vector);
	if (version != KVMMEM_MBOX_VERSION || nslots == 0 || nslots > KVMMEM_MBOX_MAX_SLOTS || vector > 31) {
		dev_err(&pdev->dev, "kvmmem: mailbox version %u (want %u), %u slots (1..%u), vector %u: not binding\n",
			version, KVMMEM_MBOX_VERSION, nslots, KVMMEM_MBOX_MAX_SLOTS, vector);
		return -ENODEV;
	}

	mb = devm_kzalloc(&pdev->dev, sizeof(*mb), GFP_KERNEL);
	if (!mb)
		return -ENOMEM;
	mb->pdev = pdev;
	mb->hdr = hdr;
	mb->slots = (struct kvmmem_mbox_slot *)((u8 *)hdr + KVMMEM_MBOX_HEADER_SIZE);
	mb->nslots = nslots;
	mb->host_peer = READ_ONCE(hdr->host_peer) & 0xffff;
	mb->vector = vector;
	init_waitqueue_head(&mb->wq);
	spin_lock_init(&mb->lock);
	/* A slot the host left unanswered (a previous guest's request) stays out of use until answered. */
	for (i = 0; i < nslots; i++)
		if (!kvmmem_slot_answered(&mb->slots[i]))
			__set_bit(i, &mb->poisoned);

	ret = pcim_iomap_regions(pdev, BIT(0), "kvmmem");
	if (ret)
		return ret;
	mb->regs = pcim_iomap_table(pdev)[0];

	/* The doorbell device has no INTx fallback: MSI-X or nothing (ivshmem-plain has none). */
	ret = pci_alloc_irq_vectors(pdev, vector + 1, vector + 1, PCI_IRQ_MSIX);
	if (ret < 0) {
		dev_err(&pdev->dev, "kvmmem: mailbox without MSI-X vector %u (%d): is it ivshmem-doorbell with vectors>=%u? not binding\n",
			vector, ret, vector + 1);
		return -ENODEV;
	}
	pci_set_master(pdev);	/* MSI-X messages are bus-master writes */
	ret = devm_request_irq(&pdev->dev, pci_irq_vector(pdev, vector), kvmmem_mbox_irq, 0, "kvmmem-mbox", mb);
	if (ret) {
		pci_free_irq_vectors(pdev);
		return ret;
	}

	WRITE_ONCE(hdr->guest_state, KVMMEM_MBOX_GUEST_BOUND);
	down_write(&kvmmem_mbox_rwsem);
	kvmmem_mbox = mb;
	up_write(&kvmmem_mbox_rwsem);
	pci_set_drvdata(pdev, mb);
	dev_info(&pdev->dev, "kvmmem: mailbox bound: BAR2 %pa+%llu KiB, %u slots, ring peer %u vector %u, our peer id %u\n",
		 &start, (unsigned long long)len >> 10, nslots, mb->host_peer, vector,
		 ioread32(mb->regs + KVMMEM_IVSHMEM_IV_POSITION));
	return 0;
}

static void kvmmem_pci_remove(struct pci_dev *pdev)
{
	struct kvmmem_mbox *mb = pci_get_drvdata(pdev);
	unsigned int kept = 0;
	int i;

	down_write(&kvmmem_mbox_rwsem);	/* waits for the calls in flight (each bounded) */
	kvmmem_mbox = NULL;
	up_write(&kvmmem_mbox_rwsem);
	WRITE_ONCE(mb->hdr->guest_state, KVMMEM_MBOX_GUEST_OFF);
	/* Pins of still-unanswered requests are leaked on purpose: the host may alias those pages. */
	for (i = 0; i < mb->nslots; i++)
		kept += mb->orphan[i] != NULL;
	if (kept)
		dev_warn(&pdev->dev, "kvmmem: %u page(s) of unanswered requests stay pinned\n", kept);
	devm_free_irq(&pdev->dev, pci_irq_vector(pdev, mb->vector), mb);
	pci_free_irq_vectors(pdev);
	dev_info(&pdev->dev, "kvmmem: mailbox unbound\n");
}

/* No MODULE_DEVICE_TABLE: loading for every ivshmem device of a system would be a surprise. */
static const struct pci_device_id kvmmem_pci_ids[] = {
	{ PCI_DEVICE(KVMMEM_IVSHMEM_VENDOR, KVMMEM_IVSHMEM_DEVICE) },
	{ 0 }
};

static struct pci_driver kvmmem_pci_driver = {
	.name		= "kvmmem-mailbox",
	.id_table	= kvmmem_pci_ids,
	.probe		= kvmmem_pci_probe,
	.remove		= kvmmem_pci_remove,
	/* init decides on the transport right after registering: probe now, not later */
	.driver.probe_type = PROBE_FORCE_SYNCHRONOUS,
};
static bool kvmmem_pci_registered;

/* ------------------------------------------------------------ init / exit */

static int __init kvm_intro_guest_init(void)
{
	bool want_kvm, want_mbox;
	int result;

	if (!strcmp(transport, "auto")) {
		want_kvm = want_mbox = true;
	} else if (!strcmp(transport, "kvm")) {
		want_kvm = true;
		want_mbox = false;
	} else if (!strcmp(transport, "mailbox")) {
		want_kvm = false;
		want_mbox = true;
	} else {
		pr_err("transport=%s: want auto, kvm or mailbox\n", transport);
		return -EINVAL;
	}

	INIT_LIST_HEAD(&file_list);
	spin_lock_init(&file_lock);

	if (want_kvm && kvm_para_available())
		kvmmem_tp = KVMMEM_TP_KVM;
	if (kvmmem_tp == KVMMEM_TP_NONE && want_mbox) {
		result = pci_register_driver(&kvmmem_pci_driver);
		if (result) {
			pr_err("registering the mailbox PCI driver failed: %d\n", result);
			return result;
		}
		kvmmem_pci_registered = true;
		if (READ_ONCE(kvmmem_mbox))
			kvmmem_tp = KVMMEM_TP_MBOX;
	}
	if (kvmmem_tp == KVMMEM_TP_NONE) {
		/* The seed's init fails with -EPERM without paravirt: so does this one without any transport. */
		if (kvmmem_pci_registered)
			pci_unregister_driver(&kvmmem_pci_driver);
		kvmmem_pci_registered = false;
		if (want_kvm && want_mbox)
			pr_err("kvmi: paravirt not available and no mailbox (ivshmem-doorbell 1af4:1110 whose BAR2 begins with the KVMMBOX1 magic): no transport, not loading\n");
		else if (want_kvm)
			pr_err("kvmi: paravirt not available (transport=kvm): not loading\n");
		else
			pr_err("no mailbox (ivshmem-doorbell 1af4:1110 whose BAR2 begins with the KVMMBOX1 magic; is the host serving?) (transport=mailbox): not loading\n");
		return -EPERM;
	}

	result = misc_register(&kvm_mem_dev);
	if (result) {
		pr_err("kvmi: misc device register failed: %d\n", result);
		if (kvmmem_pci_registered)
			pci_unregister_driver(&kvmmem_pci_driver);
		return result;
	}

	pr_info("kvmi: guest introspection device created (transport %s)\n", kvmmem_tp_name[kvmmem_tp]);
	return 0;
}

static void __exit kvm_intro_guest_exit(void)
{
	/* Open files hold a module reference: no file_map is left here. */
	misc_deregister(&kvm_mem_dev);
	if (kvmmem_pci_registered)
		pci_unregister_driver(&kvmmem_pci_driver);
}

module_init(kvm_intro_guest_init);
module_exit(kvm_intro_guest_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("/dev/kvmmem: map pages of an introspected VM (KVMI guest side, seed 003), with a lab mailbox transport");
MODULE_AUTHOR("kvmmem project");
