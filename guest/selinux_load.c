// SPDX-License-Identifier: GPL-2.0
/*
 * selinux_load: load a binary SELinux policy into the kernel.
 *
 *   selinux_load POLICY [LOAD]
 *
 * selinuxfs takes a policy only whole, in one write() at offset 0 of its
 * load file (LOAD, default /sys/fs/selinux/load), which lab-init's text
 * builtins cannot do.
 *
 * The kernel prints on the console during the load (the policy's
 * capabilities) and a moment after it (kauditd's audit record of the
 * load). So that neither cuts into a line of the report, the console
 * is drained before the write, and the report after it waits for the
 * audit record to be logged (in /dev/kmsg, a few seconds at most).
 *
 * Diagnostics: the policy's size, the bytes written, the errno and
 * whether the audit record was logged. One KTAP test: the kernel took
 * the whole policy. Reading the policy file is the harness's part: a
 * missing or short file exits 2.
 */
#include "ktap.h"
#include "kmsg.h"

#include <fcntl.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#define DEFAULT_LOAD	"/sys/fs/selinux/load"
/* AUDIT_MAC_POLICY_LOAD, as the record's text has it. */
#define LOAD_RECORD	"type=1403 "
#define RECORD_WAIT_MS	5000

static char *read_policy(const char *path, size_t *size)
{
	struct stat st;
	size_t done = 0;
	ssize_t n;
	char *buf;
	int fd;

	fd = open(path, O_RDONLY);
	if (fd < 0 || fstat(fd, &st))
		harness_fail(path);
	buf = malloc(st.st_size ? st.st_size : 1);
	if (!buf)
		harness_fail("malloc");
	while (done < (size_t)st.st_size) {
		n = read(fd, buf + done, st.st_size - done);
		if (n <= 0)
			harness_fail(path);
		done += n;
	}
	close(fd);
	*size = done;
	return buf;
}

int main(int argc, char **argv)
{
	const char *load = argc > 2 ? argv[2] : DEFAULT_LOAD;
	char why[128];
	ssize_t written;
	size_t size;
	char *policy;
	int fd, kmsg, err = 0;
	bool audited = false;

	if (argc < 2 || argc > 3) {
		errno = EINVAL;
		harness_fail("usage: selinux_load POLICY [LOAD]");
	}
	policy = read_policy(argv[1], &size);

	ktap_header(1);
	ktap_diag("policy_bytes", "%zu", size);
	kmsg = kmsg_open_at_end();
	tcdrain(STDOUT_FILENO);
	fd = open(load, O_WRONLY);
	if (fd < 0) {
		err = errno;
		written = -1;
	} else {
		written = write(fd, policy, size);
		if (written < 0)
			err = errno;
		close(fd);
	}
	if (written == (ssize_t)size)
		audited = kmsg_wait_for(kmsg, LOAD_RECORD, RECORD_WAIT_MS);
	ktap_diag("written", "%zd", written);
	ktap_diag("errno", "%s", errno_name(err));
	ktap_diag("load_audited", "%s", audited ? "yes" : "no");

	snprintf(why, sizeof(why), "%s took %zd of %zu bytes: %s", load,
		 written, size, err ? strerror(err) : "short write");
	ktap_result(written == (ssize_t)size, "policy_loaded", why);
	free(policy);
	return 0;
}
