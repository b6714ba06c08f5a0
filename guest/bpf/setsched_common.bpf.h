/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The body both lsm/task_setscheduler programs share: settings, the ring
 * buffer and the verdict. The programs differ only in how they read the
 * mask argument, so that a rejection by the verifier is down to that.
 */
#ifndef LAB_SETSCHED_COMMON_BPF_H
#define LAB_SETSCHED_COMMON_BPF_H

#include "vmlinux.h"

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "setsched.h"

#define EPERM 1
#define MASK_WORD_BITS 64

char LICENSE[] SEC("license") = "GPL";

/* Written by the loader before the load; see setsched.h. */
const volatile int target_tgid;
const volatile int reserved_cpu = -1;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024);
} events SEC(".maps");

static __always_inline int setsched_verdict(struct task_struct *p,
					    bool has_mask, __u64 mask_word,
					    bool has_attr)
{
	struct setsched_event ev = {};
	int cpu = reserved_cpu;

	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;

	ev.caller = (__u32)bpf_get_current_pid_tgid();
	ev.target = p->pid;
	ev.mask_word = mask_word;
	ev.has_mask = has_mask;
	ev.has_attr = has_attr;
	/* The lab's kernels have at most 64 CPUs: one mask word. */
	if (has_mask && cpu >= 0 && cpu < MASK_WORD_BITS &&
	    (mask_word >> cpu) & 1) {
		ev.verdict = -EPERM;
		bpf_ringbuf_output(&events, &ev, sizeof(ev), 0);
		/*
		 * A constant, not ev.verdict: read back from the stack it
		 * would be any u32 to the verifier, which wants an LSM
		 * program's return value in [-MAX_ERRNO, 0].
		 */
		return -EPERM;
	}
	bpf_ringbuf_output(&events, &ev, sizeof(ev), 0);
	return 0;
}

#endif /* LAB_SETSCHED_COMMON_BPF_H */
