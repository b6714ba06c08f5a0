// SPDX-License-Identifier: GPL-2.0
/*
 * setattr: change its own scheduling policy and report what happened.
 *
 *   setattr --policy other|batch|idle|fifo|rr|deadline [--priority N]
 *           [--nice N] [--runtime NS --deadline NS --period NS]
 *           [--use setattr|setscheduler] [--expect-errno NAME]
 *           [--expect-hook CALLS]
 *
 * --use picks the syscall: sched_setattr() (default) or the older
 * sched_setscheduler(), which only takes a policy and a priority.
 *
 * Diagnostics: pid, the policy before and after, the return value and
 * errno. --expect-errno adds two KTAP tests: the errno, and that the
 * policy is the new one after a success and the old one after a failure.
 * --expect-hook adds one more: the test LSM's record of this task's calls
 * (see hooklog.h).
 */
#include "hooklog.h"

#include <getopt.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>


/* <linux/sched/types.h> clashes with glibc's <sched.h>: define our own. */
struct lab_sched_attr {
	uint32_t size;
	uint32_t sched_policy;
	uint64_t sched_flags;
	int32_t sched_nice;
	uint32_t sched_priority;
	uint64_t sched_runtime;
	uint64_t sched_deadline;
	uint64_t sched_period;
};

static const struct {
	const char *name;
	int policy;
} policies[] = {
	{ "other", SCHED_OTHER }, { "fifo", SCHED_FIFO }, { "rr", SCHED_RR },
	{ "batch", SCHED_BATCH }, { "idle", SCHED_IDLE },
	{ "deadline", 6 /* SCHED_DEADLINE */ },
};

static int policy_by_name(const char *name)
{
	size_t i;

	for (i = 0; i < sizeof(policies) / sizeof(policies[0]); i++)
		if (!strcmp(policies[i].name, name))
			return policies[i].policy;
	return -1;
}

static const char *policy_name(int policy)
{
	size_t i;

	for (i = 0; i < sizeof(policies) / sizeof(policies[0]); i++)
		if (policies[i].policy == policy)
			return policies[i].name;
	return "unknown";
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "policy", required_argument, NULL, 'p' },
		{ "priority", required_argument, NULL, 'P' },
		{ "nice", required_argument, NULL, 'n' },
		{ "runtime", required_argument, NULL, 'R' },
		{ "deadline", required_argument, NULL, 'D' },
		{ "period", required_argument, NULL, 'T' },
		{ "use", required_argument, NULL, 'u' },
		{ "expect-errno", required_argument, NULL, 'e' },
		{ "expect-hook", required_argument, NULL, 'k' },
		{ NULL, 0, NULL, 0 },
	};
	struct lab_sched_attr attr = { .size = sizeof(attr) };
	const char *exp_errno = NULL, *exp_hook = NULL, *use = "setattr";
	struct sched_param param;
	int opt, ret, err, policy = -1, before, after;
	char why[128];

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'p':
			policy = policy_by_name(optarg);
			break;
		case 'P':
			attr.sched_priority = atoi(optarg);
			break;
		case 'n':
			attr.sched_nice = atoi(optarg);
			break;
		case 'R':
			attr.sched_runtime = strtoull(optarg, NULL, 10);
			break;
		case 'D':
			attr.sched_deadline = strtoull(optarg, NULL, 10);
			break;
		case 'T':
			attr.sched_period = strtoull(optarg, NULL, 10);
			break;
		case 'u':
			use = optarg;
			break;
		case 'e':
			exp_errno = optarg;
			break;
		case 'k':
			exp_hook = optarg;
			break;
		default:
			errno = EINVAL;
			harness_fail("usage");
		}
	}
	if (policy < 0) {
		errno = EINVAL;
		harness_fail("--policy is required");
	}
	attr.sched_policy = policy;

	ktap_header((exp_errno ? 2 : 0) + !!exp_hook);
	ktap_diag("pid", "%d", getpid());
	before = sched_getscheduler(0);
	ktap_diag("policy_before", "%s", policy_name(before));

	if (!strcmp(use, "setscheduler")) {
		param.sched_priority = attr.sched_priority;
		ret = sched_setscheduler(0, policy, &param);
	} else if (!strcmp(use, "setattr")) {
		ret = syscall(SYS_sched_setattr, 0, &attr, 0);
	} else {
		errno = EINVAL;
		harness_fail("--use setattr|setscheduler");
	}
	err = ret ? errno : 0;
	ktap_diag("syscall", "sched_%s", use);
	ktap_diag("ret", "%d", ret);
	ktap_diag("errno", "%s", errno_name(err));

	after = sched_getscheduler(0);
	ktap_diag("policy_after", "%s", policy_name(after));

	if (exp_errno) {
		snprintf(why, sizeof(why), "got %s, expected %s",
			 errno_name(err), exp_errno);
		ktap_result(!strcmp(errno_name(err), exp_errno),
			    "sched_setattr_errno", why);
		snprintf(why, sizeof(why), "policy is %s, expected %s",
			 policy_name(after),
			 policy_name(err ? before : policy));
		ktap_result(after == (err ? before : policy),
			    "policy_after_call", why);
	}
	if (exp_hook)
		ktap_expect_hook("hook_calls", exp_hook);
	return 0;
}
