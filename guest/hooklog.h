/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The test LSM's record of hook calls, read by a guest program itself.
 *
 * A program given --expect-hook compares the calls it made (records whose
 * caller is its own pid, in order) with what the plan expects, as one KTAP
 * test. Each call is written "<mask>:<ret>", "@<target>" added when the
 * target is another task, the calls joined by ";": "none:0;0-1:0" is the
 * cpuset join (no mask) followed by an allowed affinity change to {0,1}.
 */
#ifndef LAB_HOOKLOG_H
#define LAB_HOOKLOG_H

#include "ktap.h"

#include <unistd.h>

#define HOOKLOG_PATH "/sys/kernel/security/labtest/log"

/*
 * Append this task's calls from one log line ("seq=.. caller=.. target=..
 * comm=.. mask=.. [attr=..] ret=..") to buf; other lines are skipped.
 */
static inline void hooklog_add(const char *line, char *buf, size_t size)
{
	const char *mask, *ret;
	int seq, caller, target;
	size_t len = strlen(buf), masklen;

	if (sscanf(line, "seq=%d caller=%d target=%d", &seq, &caller,
		   &target) != 3 || caller != getpid())
		return;
	mask = strstr(line, " mask=");
	ret = strstr(line, " ret=");
	if (!mask || !ret)
		return;
	mask += strlen(" mask=");
	masklen = strcspn(mask, " \n");
	snprintf(buf + len, size - len, "%s%.*s:%d", len ? ";" : "",
		 (int)masklen, mask, atoi(ret + strlen(" ret=")));
	len = strlen(buf);
	if (target != getpid())
		snprintf(buf + len, size - len, "@%d", target);
}

/* One KTAP test: are this task's hook calls the expected ones? */
static inline void ktap_expect_hook(const char *name, const char *want)
{
	char line[512], got[1024] = "", why[1200];
	FILE *f = fopen(HOOKLOG_PATH, "r");

	if (!f) {
		snprintf(why, sizeof(why), "cannot read %s: %s", HOOKLOG_PATH,
			 strerror(errno));
		ktap_result(0, name, why);
		return;
	}
	while (fgets(line, sizeof(line), f))
		hooklog_add(line, got, sizeof(got));
	fclose(f);
	if (!got[0])
		snprintf(got, sizeof(got), "no-calls");
	ktap_diag("hook_calls", "%s", got);
	snprintf(why, sizeof(why), "got %s, expected %s", got, want);
	ktap_result(!strcmp(got, want), name, why);
}

#endif /* LAB_HOOKLOG_H */
