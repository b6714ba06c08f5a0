/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Waiting for a kernel log record in /dev/kmsg, for the guest programs
 * that must know the kernel has logged something (an audit record) before
 * they report: selinux_load, audit_mark.
 */
#ifndef LAB_KMSG_H
#define LAB_KMSG_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* /dev/kmsg, positioned after the records logged so far (-1 if none). */
static inline int kmsg_open_at_end(void)
{
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);

	if (fd >= 0)
		lseek(fd, 0, SEEK_END);
	return fd;
}

static inline long kmsg_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Whether a record after fd's position contains text within wait_ms. */
static inline bool kmsg_wait_for(int fd, const char *text, long wait_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	long deadline = kmsg_now_ms() + wait_ms;
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
		if (kmsg_now_ms() >= deadline ||
		    poll(&pfd, 1, deadline - kmsg_now_ms()) <= 0)
			return false;
	}
}

#endif
