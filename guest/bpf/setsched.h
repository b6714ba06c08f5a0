/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the lab's task_setscheduler BPF programs and their loader share:
 * the record of one hook call sent through the "events" ring buffer, and
 * the names of the read-only settings the loader writes before the load.
 *
 * Include it after the integer types (vmlinux.h in BPF programs,
 * <linux/types.h> in the loader).
 */
#ifndef LAB_SETSCHED_H
#define LAB_SETSCHED_H

/* Only calls made by this process are recorded (and may be denied). */
#define SETSCHED_TGID_VAR	"target_tgid"
/* A CPU no requested mask may name; -1 for none. */
#define SETSCHED_RESERVED_VAR	"reserved_cpu"
#define SETSCHED_EVENTS_MAP	"events"

struct setsched_event {
	__u32 caller;		/* pid (TID) of the calling task */
	__u32 target;		/* pid of the task whose scheduling changes */
	__u64 mask_word;	/* first word of the requested mask */
	__u8 has_mask;		/* in_mask was not NULL */
	__u8 has_attr;		/* attr was not NULL */
	__u8 pad[2];
	__s32 verdict;		/* what the program returned */
};

#endif /* LAB_SETSCHED_H */
