// SPDX-License-Identifier: GPL-2.0
/*
 * affinity: call sched_setaffinity() and report what happened.
 *
 *   affinity --mask LIST [--target self|child|thread] [--size BYTES]
 *            [--beyond CPU] [--target-label LABEL]
 *            [--expect-errno NAME] [--expect-affinity LIST]
 *            [--expect-ran-on LIST] [--expect-cpus-allowed LIST]
 *            [--expect-hook CALLS]
 *
 * --target: the task whose affinity is set: this one (default), a child
 * process, or a thread of this process (by its TID). --size passes that
 * cpusetsize to the raw syscall (default: the size of cpu_set_t), and
 * --beyond sets one more bit far past the kernel's CPUs in the buffer.
 * The buffer is an array of longs, as cpu_set_t and the kernel's cpumask
 * are: on a big-endian arch its first byte holds the highest CPUs of the
 * first long, so a short --size keeps different CPUs than on x86_64.
 * --target-label gives the child a Smack label before the call, and makes
 * this task give up CAP_MAC_OVERRIDE and CAP_MAC_ADMIN first, so that
 * Smack's rules apply to it as to any unprivileged task.
 *
 * Diagnostics: pid, target, the target's affinity before and after, the
 * request, the return value and errno, Cpus_allowed_list of this task,
 * and the CPUs the target was seen running on afterwards (self only).
 * Each --expect-* option adds one KTAP test comparing a fact with what
 * the host expects: --expect-cpus-allowed compares Cpus_allowed_list of
 * /proc/self/status as it reads, --expect-hook the test LSM's record of
 * this task's calls (see hooklog.h).
 */
#include "hooklog.h"

#include <fcntl.h>
#include <getopt.h>
#include <linux/capability.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SPIN_ROUNDS 20000
#define BUF_BYTES 128
#define LONG_BITS (8 * sizeof(long))

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

static pid_t thread_tid;
static pthread_mutex_t thread_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t thread_ready = PTHREAD_COND_INITIALIZER;

static void *thread_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&thread_lock);
	thread_tid = syscall(SYS_gettid);
	pthread_cond_signal(&thread_ready);
	pthread_mutex_unlock(&thread_lock);
	for (;;)
		pause();
	return NULL;
}

static pid_t start_thread(void)
{
	pthread_t thread;

	if (pthread_create(&thread, NULL, thread_main, NULL))
		harness_fail("pthread_create");
	pthread_mutex_lock(&thread_lock);
	while (!thread_tid)
		pthread_cond_wait(&thread_ready, &thread_lock);
	pthread_mutex_unlock(&thread_lock);
	return thread_tid;
}

/*
 * A child that (optionally) takes a Smack label, then waits until the
 * parent closes the release pipe: it cannot rely on a kill, which Smack
 * refuses across labels just as it refuses the affinity change.
 */
static int release_fd = -1;

static pid_t start_child(const char *label)
{
	int ready[2], release[2], fd;
	pid_t pid;
	char c = 0;

	if (pipe(ready) || pipe(release))
		harness_fail("pipe");
	pid = fork();
	if (pid < 0)
		harness_fail("fork");
	if (pid == 0) {
		if (label) {
			fd = open("/proc/self/attr/smack/current", O_WRONLY);
			if (fd < 0 || write(fd, label, strlen(label)) < 0)
				c = 1;
			if (fd >= 0)
				close(fd);
		}
		close(release[1]);
		if (write(ready[1], &c, 1) != 1)
			_exit(1);
		while (read(release[0], &c, 1) > 0)
			;
		_exit(0);
	}
	close(release[0]);
	release_fd = release[1];
	if (read(ready[0], &c, 1) != 1 || c) {
		kill(pid, SIGKILL);
		errno = EPERM;
		harness_fail("child could not take its Smack label");
	}
	close(ready[0]);
	close(ready[1]);
	return pid;
}

/* Give up the capabilities that let root bypass Smack's rules. */
static void drop_mac_override(void)
{
	struct __user_cap_header_struct head = {
		.version = _LINUX_CAPABILITY_VERSION_3,
	};
	struct __user_cap_data_struct data[2];
	int caps[] = { CAP_MAC_OVERRIDE, CAP_MAC_ADMIN };
	size_t i;

	if (syscall(SYS_capget, &head, data))
		harness_fail("capget");
	for (i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		data[caps[i] / 32].effective &= ~(1u << (caps[i] % 32));
		data[caps[i] / 32].permitted &= ~(1u << (caps[i] % 32));
	}
	if (syscall(SYS_capset, &head, data))
		harness_fail("capset");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "mask", required_argument, NULL, 'm' },
		{ "target", required_argument, NULL, 't' },
		{ "size", required_argument, NULL, 's' },
		{ "beyond", required_argument, NULL, 'b' },
		{ "target-label", required_argument, NULL, 'l' },
		{ "expect-errno", required_argument, NULL, 'e' },
		{ "expect-affinity", required_argument, NULL, 'a' },
		{ "expect-ran-on", required_argument, NULL, 'r' },
		{ "expect-cpus-allowed", required_argument, NULL, 'c' },
		{ "expect-hook", required_argument, NULL, 'k' },
		{ NULL, 0, NULL, 0 },
	};
	const char *mask = NULL, *exp_errno = NULL, *exp_aff = NULL;
	const char *exp_ran = NULL, *target_kind = "self", *label = NULL;
	const char *exp_allowed = NULL, *exp_hook = NULL;
	/* Longs, as the kernel's cpumask: bit order follows the arch's. */
	unsigned long buf_mask[BUF_BYTES / sizeof(long)] = { 0 };
	cpu_set_t request, before, after, seen;
	long size = sizeof(cpu_set_t), beyond = -1;
	char buf[256], allowed[256], why[320];
	int opt, ret, err, planned, cpu;
	pid_t target = 0, child = 0;

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'm':
			mask = optarg;
			break;
		case 't':
			target_kind = optarg;
			break;
		case 's':
			size = atol(optarg);
			break;
		case 'b':
			beyond = atol(optarg);
			break;
		case 'l':
			label = optarg;
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
		case 'c':
			exp_allowed = optarg;
			break;
		case 'k':
			exp_hook = optarg;
			break;
		default:
			errno = EINVAL;
			harness_fail("usage");
		}
	}
	if (!mask || cpulist_parse(mask, &request) || size < 1 ||
	    size > BUF_BYTES || beyond >= BUF_BYTES * 8) {
		errno = EINVAL;
		harness_fail("--mask LIST is required; --size 1..128");
	}

	if (!strcmp(target_kind, "child")) {
		target = child = start_child(label);
		if (label)
			drop_mac_override();
	} else if (!strcmp(target_kind, "thread")) {
		target = start_thread();
	} else if (strcmp(target_kind, "self")) {
		errno = EINVAL;
		harness_fail("--target self|child|thread");
	}

	planned = !!exp_errno + !!exp_aff + !!exp_ran + !!exp_allowed +
		  !!exp_hook;
	ktap_header(planned);
	ktap_diag("pid", "%d", getpid());
	ktap_diag("target", "%d", target ? target : getpid());

	if (sched_getaffinity(target, sizeof(before), &before))
		harness_fail("sched_getaffinity");
	ktap_diag("affinity_before", "%s",
		  cpulist_format(&before, buf, sizeof(buf)));
	ktap_diag("request", "%s", cpulist_format(&request, buf, sizeof(buf)));
	ktap_diag("size", "%ld", size);

	/* The raw syscall, so that any cpusetsize reaches the kernel. */
	for (cpu = 0; cpu < CPU_SETSIZE && cpu < BUF_BYTES * 8; cpu++)
		if (CPU_ISSET(cpu, &request))
			buf_mask[cpu / LONG_BITS] |= 1UL << (cpu % LONG_BITS);
	if (beyond >= 0)
		buf_mask[beyond / LONG_BITS] |= 1UL << (beyond % LONG_BITS);
	ret = syscall(SYS_sched_setaffinity, target, size, buf_mask);
	err = ret ? errno : 0;
	ktap_diag("ret", "%d", ret);
	ktap_diag("errno", "%s", errno_name(err));

	if (sched_getaffinity(target, sizeof(after), &after))
		harness_fail("sched_getaffinity");
	ktap_diag("affinity_after", "%s",
		  cpulist_format(&after, buf, sizeof(buf)));
	ktap_diag("status_cpus_allowed", "%s",
		  proc_status_field("Cpus_allowed_list", allowed,
				    sizeof(allowed)));

	if (!target) {
		observe_cpus(&seen);
		ktap_diag("ran_on", "%s", cpulist_format(&seen, buf,
							  sizeof(buf)));
	}
	if (child) {
		close(release_fd);
		waitpid(child, NULL, 0);
	}

	if (exp_errno) {
		snprintf(why, sizeof(why), "got %s, expected %s",
			 errno_name(err), exp_errno);
		ktap_result(!strcmp(errno_name(err), exp_errno),
			    "sched_setaffinity_errno", why);
	}
	if (exp_aff) {
		if (!strcmp(exp_aff, "unchanged"))
			exp_aff = cpulist_format(&before, buf, sizeof(buf));
		ktap_expect_cpus("affinity_after_call", exp_aff, &after);
	}
	if (exp_ran) {
		if (target) {
			ktap_skip("ran_only_on_expected_cpus",
				  "only observed for --target self");
		} else {
			ktap_expect_cpus("ran_only_on_expected_cpus", exp_ran,
				    &seen);
		}
	}
	if (exp_allowed) {
		snprintf(why, sizeof(why), "got %s, expected %s", allowed,
			 exp_allowed);
		ktap_result(!strcmp(allowed, exp_allowed), "cpus_allowed_list",
			    why);
	}
	if (exp_hook)
		ktap_expect_hook("hook_calls", exp_hook);
	return 0;
}
