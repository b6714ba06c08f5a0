// SPDX-License-Identifier: GPL-2.0
/*
 * audit_mark: put a mark in the kernel's audit stream and wait until the
 * kernel has logged it.
 *
 *   audit_mark TEXT
 *
 * Without auditd, kauditd prints audit records (SELinux's AVC denials
 * among them) some time after the call that caused them. Records leave
 * kauditd's queue in order, so once the mark sent now is in /dev/kmsg,
 * every record queued before it has been printed: a check can then read
 * the console for denials without powering the guest off.
 *
 * The mark is an AUDIT_USER_AVC message (the one user message the kernel
 * takes even when auditing is off), sent over NETLINK_AUDIT; it needs
 * CAP_AUDIT_WRITE. kauditd prints through printk_ratelimit(): the caller
 * turns the limit off (kernel.printk_ratelimit = 0) or a mark may be lost.
 *
 * One KTAP test: the mark was logged within MARK_WAIT_MS.
 */
#include "ktap.h"
#include "kmsg.h"

#include <linux/audit.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <unistd.h>

#define MARK_WAIT_MS	5000

/* Send text as an AUDIT_USER_AVC message; 0 or an errno. */
static int send_mark(const char *text)
{
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	struct {
		struct nlmsghdr nlh;
		char body[512];
	} msg = { 0 };
	size_t len = strlen(text) + 1;
	int fd, err = 0;

	if (len > sizeof(msg.body))
		return EMSGSIZE;
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_AUDIT);
	if (fd < 0)
		return errno;
	msg.nlh.nlmsg_len = NLMSG_LENGTH(len);
	msg.nlh.nlmsg_type = AUDIT_USER_AVC;
	msg.nlh.nlmsg_flags = NLM_F_REQUEST;
	memcpy(msg.body, text, len);
	if (sendto(fd, &msg, msg.nlh.nlmsg_len, 0, (struct sockaddr *)&kernel,
		   sizeof(kernel)) < 0)
		err = errno;
	close(fd);
	return err;
}

int main(int argc, char **argv)
{
	char why[128];
	int kmsg, err;
	bool logged = false;

	if (argc != 2) {
		errno = EINVAL;
		harness_fail("usage: audit_mark TEXT");
	}
	kmsg = kmsg_open_at_end();
	if (kmsg < 0)
		harness_fail("/dev/kmsg");

	ktap_header(1);
	err = send_mark(argv[1]);
	if (!err)
		logged = kmsg_wait_for(kmsg, argv[1], MARK_WAIT_MS);
	ktap_diag("errno", "%s", errno_name(err));
	snprintf(why, sizeof(why), "%s", err ? strerror(err) :
		 "not in /dev/kmsg within 5 s (printk_ratelimit on?)");
	ktap_result(logged, "mark_logged", why);
	return 0;
}
