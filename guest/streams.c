// SPDX-License-Identifier: GPL-2.0
/*
 * streams: write to stdout and stderr in turn, then exit with the given
 * status. The lab's own tests use it to check that a transport keeps the
 * two streams apart (SSH) and passes the exit status back.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	int status = argc > 1 ? atoi(argv[1]) : 0;
	int i;

	setvbuf(stdout, NULL, _IONBF, 0);
	for (i = 1; i <= 3; i++) {
		printf("# stdout_line: %d\n", i);
		fprintf(stderr, "streams: stderr line %d\n", i);
	}
	return status;
}
