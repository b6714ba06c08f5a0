/* SPDX-License-Identifier: GPL-2.0 */
/*
 * KTAP output and CPU list helpers shared by the lab's guest programs.
 *
 * A guest program prints facts as "# key: value" diagnostics and the
 * expectations the host passed to it as KTAP test lines. It exits 0 when
 * it could run its scenario, whatever the outcome, and non-zero only when
 * the harness itself failed (bad arguments, missing file).
 */
#ifndef LAB_KTAP_H
#define LAB_KTAP_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int ktap_number;

static inline void ktap_header(int planned)
{
	printf("KTAP version 1\n1..%d\n", planned);
	fflush(stdout);
}

static inline void ktap_diag(const char *key, const char *fmt, ...)
{
	va_list ap;

	printf("# %s: ", key);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* One test line; "why" is printed as the reason when the test fails. */
static inline void ktap_result(int ok, const char *name, const char *why)
{
	ktap_number++;
	if (ok)
		printf("ok %d %s\n", ktap_number, name);
	else
		printf("not ok %d %s # %s\n", ktap_number, name, why);
	fflush(stdout);
}

static inline void ktap_skip(const char *name, const char *why)
{
	ktap_number++;
	printf("ok %d %s # SKIP %s\n", ktap_number, name, why);
	fflush(stdout);
}

static inline __attribute__((noreturn)) void harness_fail(const char *what)
{
	printf("# harness error: %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(2);
}

/* Parse "0-1,3" into a CPU set; returns -1 on a malformed list. */
static inline int cpulist_parse(const char *list, cpu_set_t *set)
{
	const char *p = list;
	char *end;
	long a, b;

	CPU_ZERO(set);
	if (!strcmp(list, "empty"))
		return 0;
	while (*p) {
		a = strtol(p, &end, 10);
		if (end == p || a < 0 || a >= CPU_SETSIZE)
			return -1;
		b = a;
		if (*end == '-') {
			p = end + 1;
			b = strtol(p, &end, 10);
			if (end == p || b < a || b >= CPU_SETSIZE)
				return -1;
		}
		for (; a <= b; a++)
			CPU_SET(a, set);
		if (*end == ',')
			end++;
		else if (*end)
			return -1;
		p = end;
	}
	return 0;
}

/* Format a CPU set as "0-1,3" (or "empty") into buf. */
static inline const char *cpulist_format(const cpu_set_t *set, char *buf,
					 size_t size)
{
	size_t len = 0;
	int cpu, last;

	buf[0] = '\0';
	for (cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, set))
			continue;
		last = cpu;
		while (last + 1 < CPU_SETSIZE && CPU_ISSET(last + 1, set))
			last++;
		len += snprintf(buf + len, size - len, "%s%d", len ? "," : "",
				cpu);
		if (last > cpu)
			len += snprintf(buf + len, size - len, "-%d", last);
		if (len >= size)
			break;
		cpu = last;
	}
	if (!len)
		snprintf(buf, size, "empty");
	return buf;
}

/* One KTAP test: is the CPU set got the list the host expects? */
static inline void ktap_expect_cpus(const char *name, const char *want,
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

/* errno as its symbolic name, for diagnostics the host can compare. */
static inline const char *errno_name(int err)
{
	switch (err) {
	case 0:
		return "0";
	case EPERM:
		return "EPERM";
	case ESRCH:
		return "ESRCH";
	case EINVAL:
		return "EINVAL";
	case EACCES:
		return "EACCES";
	case EFAULT:
		return "EFAULT";
	case EBUSY:
		return "EBUSY";
	case ENOMEM:
		return "ENOMEM";
	default:
		return strerror(err);
	}
}

/* Read one "Key:\tvalue" line of /proc/<pid>/status into buf. */
static inline const char *proc_status_field(const char *key, char *buf,
					    size_t size)
{
	char line[512];
	size_t klen = strlen(key);
	FILE *f = fopen("/proc/self/status", "r");

	snprintf(buf, size, "unknown");
	if (!f)
		return buf;
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, key, klen) || line[klen] != ':')
			continue;
		line[strcspn(line, "\n")] = '\0';
		snprintf(buf, size, "%s",
			 line + klen + 1 + strspn(line + klen + 1, " \t"));
		break;
	}
	fclose(f);
	return buf;
}

#endif /* LAB_KTAP_H */
