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

#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
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

/* /dev/kmsg, positioned after the records logged so far (-1 if none). */
static int kmsg_open_at_end(void)
{
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);

	if (fd >= 0)
		lseek(fd, 0, SEEK_END);
	return fd;
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Whether a record containing text is logged within RECORD_WAIT_MS. */
static bool wait_for_record(int fd, const char *text)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	long deadline = now_ms() + RECORD_WAIT_MS;
	char record[8192];
	ssize_t n;

	if (fd < 0)
		return false;
	for (;;) {
		n = read(fd, record, sizeof(record) - 1);
		if (n > 0) {
			record[n] = '\0';
			if (strstr(record, text))
				return true;
			continue;
		}
		/* EPIPE: records were overwritten before we read them. */
		if (n < 0 && errno == EPIPE)
			continue;
		if (n < 0 && errno != EAGAIN)
			return false;
		if (now_ms() >= deadline ||
		    poll(&pfd, 1, deadline - now_ms()) <= 0)
			return false;
	}
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
		audited = wait_for_record(kmsg, LOAD_RECORD);
	ktap_diag("written", "%zd", written);
	ktap_diag("errno", "%s", errno_name(err));
	ktap_diag("load_audited", "%s", audited ? "yes" : "no");

	snprintf(why, sizeof(why), "%s took %zd of %zu bytes: %s", load,
		 written, size, err ? strerror(err) : "short write");
	ktap_result(written == (ssize_t)size, "policy_loaded", why);
	free(policy);
	return 0;
}
