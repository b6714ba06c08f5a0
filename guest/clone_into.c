// SPDX-License-Identifier: GPL-2.0
/*
 * clone_into: start a child straight into another cgroup with clone3()
 * and CLONE_INTO_CGROUP, the fork path on which cpusets ask the LSM
 * (cpuset_can_fork()) whether the new task may be placed there.
 *
 *   clone_into CGROUP_DIR
 *
 * Diagnostics: pid, child (its pid), ret and errno of clone3(), and the
 * child's cgroup as it saw it. Exits 0 whatever clone3() returned.
 */
#include "ktap.h"

#include <fcntl.h>
#include <linux/sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

/* glibc's headers may not carry struct clone_args: the kernel's layout. */
struct lab_clone_args {
	uint64_t flags;
	uint64_t pidfd;
	uint64_t child_tid;
	uint64_t parent_tid;
	uint64_t exit_signal;
	uint64_t stack;
	uint64_t stack_size;
	uint64_t tls;
	uint64_t set_tid;
	uint64_t set_tid_size;
	uint64_t cgroup;
};

int main(int argc, char **argv)
{
	struct lab_clone_args args = { 0 };
	char line[256];
	FILE *cg;
	long ret;
	int fd, err, status;

	if (argc != 2) {
		errno = EINVAL;
		harness_fail("usage: clone_into CGROUP_DIR");
	}
	fd = open(argv[1], O_RDONLY | O_DIRECTORY);
	if (fd < 0)
		harness_fail(argv[1]);

	ktap_header(0);
	ktap_diag("pid", "%d", getpid());
	args.flags = CLONE_INTO_CGROUP;
	args.exit_signal = SIGCHLD;
	args.cgroup = fd;
	ret = syscall(SYS_clone3, &args, sizeof(args));
	if (ret == 0) {
		cg = fopen("/proc/self/cgroup", "r");
		if (cg && fgets(line, sizeof(line), cg)) {
			line[strcspn(line, "\n")] = '\0';
			ktap_diag("child_cgroup", "%s", line);
		}
		_exit(0);
	}
	err = ret < 0 ? errno : 0;
	ktap_diag("child", "%ld", ret);
	ktap_diag("ret", "%ld", ret < 0 ? -1L : 0L);
	ktap_diag("errno", "%s", errno_name(err));
	if (ret > 0)
		waitpid(ret, &status, 0);
	return 0;
}
