// SPDX-License-Identifier: GPL-2.0
/*
 * affinity: call sched_setaffinity() on itself and report what happened.
 *
 *   affinity --mask LIST [--expect-errno NAME] [--expect-affinity LIST]
 *            [--expect-ran-on LIST]
 *
 * Diagnostics: pid, the affinity before and after, the mask requested,
 * the return value and errno, Cpus_allowed_list from /proc/self/status
 * and the CPUs the task was seen running on afterwards. Each --expect-*
 * option adds one KTAP test comparing a fact with what the host expects.
 */
#include "ktap.h"

#include <getopt.h>
#include <unistd.h>


#define SPIN_ROUNDS 20000

/* The CPUs this task runs on over a number of yields. */
static void observe_cpus(cpu_set_t *seen)
{
	int i, cpu;

	CPU_ZERO(seen);
	for (i = 0; i < SPIN_ROUNDS; i++) {
		cpu = sched_getcpu();
		if (cpu >= 0)
			CPU_SET(cpu, seen);
		if (i % 64 == 0)
			sched_yield();
	}
}

static void expect_list(const char *name, const char *want,
			const cpu_set_t *got)
{
	char buf[256], why[320];
	cpu_set_t wanted;

	if (cpulist_parse(want, &wanted)) {
		errno = EINVAL;
		harness_fail("bad --expect list");
	}
	cpulist_format(got, buf, sizeof(buf));
	snprintf(why, sizeof(why), "got %s, expected %s", buf, want);
	ktap_result(CPU_EQUAL(&wanted, got), name, why);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "mask", required_argument, NULL, 'm' },
		{ "expect-errno", required_argument, NULL, 'e' },
		{ "expect-affinity", required_argument, NULL, 'a' },
		{ "expect-ran-on", required_argument, NULL, 'r' },
		{ NULL, 0, NULL, 0 },
	};
	const char *mask = NULL, *exp_errno = NULL, *exp_aff = NULL;
	const char *exp_ran = NULL;
	cpu_set_t request, before, after, seen;
	char buf[256], why[320];
	int opt, ret, err, planned;

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'm':
			mask = optarg;
			break;
		case 'e':
			exp_errno = optarg;
			break;
		case 'a':
			exp_aff = optarg;
			break;
		case 'r':
			exp_ran = optarg;
			break;
		default:
			errno = EINVAL;
			harness_fail("usage");
		}
	}
	if (!mask || cpulist_parse(mask, &request)) {
		errno = EINVAL;
		harness_fail("--mask LIST is required");
	}

	planned = !!exp_errno + !!exp_aff + !!exp_ran;
	ktap_header(planned);
	ktap_diag("pid", "%d", getpid());

	if (sched_getaffinity(0, sizeof(before), &before))
		harness_fail("sched_getaffinity");
	ktap_diag("affinity_before", "%s",
		  cpulist_format(&before, buf, sizeof(buf)));
	ktap_diag("request", "%s", cpulist_format(&request, buf, sizeof(buf)));

	ret = sched_setaffinity(0, sizeof(request), &request);
	err = ret ? errno : 0;
	ktap_diag("ret", "%d", ret);
	ktap_diag("errno", "%s", errno_name(err));

	if (sched_getaffinity(0, sizeof(after), &after))
		harness_fail("sched_getaffinity");
	ktap_diag("affinity_after", "%s",
		  cpulist_format(&after, buf, sizeof(buf)));
	ktap_diag("status_cpus_allowed", "%s",
		  proc_status_field("Cpus_allowed_list", buf, sizeof(buf)));

	observe_cpus(&seen);
	ktap_diag("ran_on", "%s", cpulist_format(&seen, buf, sizeof(buf)));

	if (exp_errno) {
		snprintf(why, sizeof(why), "got %s, expected %s",
			 errno_name(err), exp_errno);
		ktap_result(!strcmp(errno_name(err), exp_errno),
			    "sched_setaffinity_errno", why);
	}
	if (exp_aff) {
		if (!strcmp(exp_aff, "unchanged"))
			exp_aff = cpulist_format(&before, buf, sizeof(buf));
		expect_list("affinity_after_call", exp_aff, &after);
	}
	if (exp_ran)
		expect_list("ran_only_on_expected_cpus", exp_ran, &seen);
	return 0;
}
