// SPDX-License-Identifier: GPL-2.0
/*
 * setsched_nocheck: setsched without the NULL check of the mask. Callers
 * that do not change the affinity pass NULL, and the hook says so
 * (in_mask__nullable), so the verifier must refuse to load this.
 */
#include "setsched_common.bpf.h"

SEC("lsm/task_setscheduler")
int BPF_PROG(lab_setsched_nocheck, struct task_struct *p,
	     const struct cpumask *in_mask, const struct sched_attr *attr,
	     int ret)
{
	if (ret)
		return ret;
	return setsched_verdict(p, true, in_mask->bits[0], attr != NULL);
}
