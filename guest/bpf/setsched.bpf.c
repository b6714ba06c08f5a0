// SPDX-License-Identifier: GPL-2.0
/*
 * setsched: a BPF LSM program on task_setscheduler that records the
 * requested CPU mask (its first word) and whether scheduling attributes
 * came with the call, and refuses with -EPERM a mask that names the CPU
 * the loader reserved.
 *
 * Both pointer arguments are named __nullable in lsm_hook_defs.h, so
 * the verifier makes the program check them before reading them.
 */
#include "setsched_common.bpf.h"

SEC("lsm/task_setscheduler")
int BPF_PROG(lab_setsched, struct task_struct *p,
	     const struct cpumask *in_mask, const struct sched_attr *attr,
	     int ret)
{
	/* An earlier BPF LSM program refused already: keep its answer. */
	if (ret)
		return ret;
	if (!in_mask)
		return setsched_verdict(p, false, 0, attr != NULL);
	return setsched_verdict(p, true, in_mask->bits[0], attr != NULL);
}
