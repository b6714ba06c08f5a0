// SPDX-License-Identifier: GPL-2.0
/*
 * stall: print a line, then sleep for the given seconds (default: for
 * ever). The lab's own tests use it to check that a guest that stops
 * answering is detected as a hang and replaced by a fresh boot.
 */
#include "ktap.h"

#include <unistd.h>

int main(int argc, char **argv)
{
	long seconds = argc > 1 ? atol(argv[1]) : -1;

	ktap_diag("pid", "%d", getpid());
	ktap_diag("stalling_for", "%ld", seconds);
	while (seconds < 0 || seconds-- > 0)
		sleep(1);
	return 0;
}
