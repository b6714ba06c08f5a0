// SPDX-License-Identifier: GPL-2.0
/*
 * lab-init: the guest side of the lab's console protocol.
 *
 * As /init of the lab's initramfs it mounts what the checks need and
 * then serves commands read line by line from the console; under
 * virtme-ng it is started from the guest's shell with --runner and does
 * the same on its standard input. Each command line is
 *
 *	<id> run <path> [args...]
 *	<id> runcg <cgroup dir> <path> [args...]
 *	<id> cat <path>
 *	<id> write <path> [text]	(truncates first; append <path> appends)
 *	<id> mkdir <path>
 *	<id> rmdir <path>
 *	<id> mount <fstype> <target> [options]
 *	<id> umount <target>
 *	<id> poweroff
 *
 * and its output is framed as "@@LAB:BEGIN <id>@@" ... "@@LAB:END <id>
 * rc=<n>@@", where rc is the exit status (128 + signal when killed).
 *
 * On the console, ids are numbers that grow by one per command. The host
 * sends a line again when it sees no BEGIN for it in a while (a line can
 * be lost on a loaded host); a line whose id is not above the last one
 * served is answered with "@@LAB:SEEN <id>@@" and not run again.
 *
 * Plan mode: with lab.plan=<path> on the kernel command line it reads the
 * same command lines from that file instead of the console, then powers
 * off. A plan is made of scenarios: "@scenario <name>" starts one, and
 * lab-init frames it with "@@LAB:SCENARIO <name>@@" ... "@@LAB:SCENARIO-END
 * <name>@@". After each command it prints the command's verdict as a KTAP
 * test line named by the command's id ("ok <n> <id>", or "not ok <n> <id>
 * # rc=<rc>"); the programs print their own KTAP. Lines starting with "#"
 * are comments. This is what a LAVA job runs (lab/lava.py).
 *
 * For the SSH transport (lab/ssh.py) the kernel command line carries
 * lab.ip=<address>/<prefix> (eth0 and lo are brought up) and lab.sshd=1
 * (/usr/sbin/sshd is started before READY). lab-init is root's login
 * shell there: sshd runs "lab-init -c '<verb> [args]'", which serves that
 * one command with its output on stdout, its own errors on stderr, and
 * exits with the command's rc. The console keeps serving as above.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define LINE_MAX_LEN	4096
#define ARGS_MAX	64
#define PLAN_ARG	"lab.plan="
/* Console log level in plan mode: warnings and worse still show. */
#define PLAN_CONSOLE_LEVEL	5
#define SYSLOG_CONSOLE_LEVEL	8
/* Only the lab's initramfs has it (lab/guest.py): -c runs nowhere else. */
#define GUEST_MARKER	"/etc/kernel-lab-guest"
#define SSHD		"/usr/sbin/sshd"

/*
 * Where lab-init's own error messages go: the console (stdout) when it
 * serves the console, stderr for one command under sshd, so that the
 * host gets the command's output and lab-init's complaints apart.
 */
static FILE *errout;

static const struct {
	const char *source, *target, *type;
	bool optional;	/* the kernel may lack it: no message then */
} mounts[] = {
	{ "proc", "/proc", "proc", false },
	{ "sysfs", "/sys", "sysfs", false },
	{ "devtmpfs", "/dev", "devtmpfs", false },
	{ "tmpfs", "/tmp", "tmpfs", false },
	{ "securityfs", "/sys/kernel/security", "securityfs", false },
	{ "tracefs", "/sys/kernel/tracing", "tracefs", false },
	{ "cgroup2", "/sys/fs/cgroup", "cgroup2", false },
	{ "smackfs", "/sys/fs/smackfs", "smackfs", true },
	{ "bpf", "/sys/fs/bpf", "bpf", true },
};

/* Mount what is not mounted yet; a failure is reported, not fatal. */
static void mount_all(void)
{
	size_t i;

	for (i = 0; i < sizeof(mounts) / sizeof(mounts[0]); i++) {
		mkdir(mounts[i].target, 0755);
		if (!mount(mounts[i].source, mounts[i].target, mounts[i].type,
			   0, NULL) || errno == EBUSY)
			continue;
		if (mounts[i].optional && (errno == ENODEV || errno == ENOENT))
			continue;
		printf("lab-init: mount %s: %s\n", mounts[i].target,
		       strerror(errno));
	}
}

/* Commands must not be echoed back into the output they frame. */
static void console_quiet(void)
{
	struct termios t;

	if (tcgetattr(0, &t))
		return;
	t.c_lflag &= ~(ECHO | ECHONL);
	tcsetattr(0, TCSANOW, &t);
}

static int write_file(const char *path, const char *text, bool append)
{
	size_t len = strlen(text);
	int fd, ret = 0;

	fd = open(path, O_WRONLY | (append ? O_APPEND : O_TRUNC));
	if (fd < 0)
		return -errno;
	if (len && write(fd, text, len) != (ssize_t)len)
		ret = -errno;
	if (close(fd) && !ret)
		ret = -errno;
	return ret;
}

static int cat_file(const char *path)
{
	char buf[4096];
	ssize_t n;
	int fd;

	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, n, stdout);
	close(fd);
	return n < 0 ? -errno : 0;
}

/* "<fstype> <target> [options]": mount fstype (as source too) on target. */
static int mount_one(char *spec)
{
	char *type, *target, *options;

	type = strtok(spec, " ");
	target = strtok(NULL, " ");
	options = strtok(NULL, "");
	if (!type || !target)
		return -EINVAL;
	mkdir(target, 0755);
	return mount(type, target, type, 0, options) ? -errno : 0;
}

static int run_program(char **argv, const char *cgroup)
{
	char procs[512];
	int status, err;
	pid_t pid;

	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		if (cgroup) {
			snprintf(procs, sizeof(procs), "%s/cgroup.procs",
				 cgroup);
			err = write_file(procs, "0", false);
			if (err) {
				fprintf(errout, "lab-init: join %s: %s\n", cgroup,
				       strerror(-err));
				exit(127);
			}
		}
		execv(argv[0], argv);
		fprintf(errout, "lab-init: exec %s: %s\n", argv[0], strerror(errno));
		exit(127);
	}
	if (waitpid(pid, &status, 0) < 0)
		return -errno;
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

/*
 * Run one command; returns its rc. Errors of the builtins are printed
 * and give rc 1, so the host can show them.
 */
static int serve(char *verb, char *rest)
{
	char *argv[ARGS_MAX + 1];
	char *text, *cgroup = NULL;
	int argc = 0, ret;

	if (!strcmp(verb, "write") || !strcmp(verb, "append")) {
		/* No text: open (truncating for write) and write nothing. */
		text = strchr(rest, ' ');
		if (text)
			*text++ = '\0';
		ret = write_file(rest, text ? text : "", !strcmp(verb, "append"));
	} else if (!strcmp(verb, "cat")) {
		ret = cat_file(rest);
	} else if (!strcmp(verb, "mkdir")) {
		ret = mkdir(rest, 0755) ? -errno : 0;
	} else if (!strcmp(verb, "rmdir")) {
		ret = rmdir(rest) ? -errno : 0;
	} else if (!strcmp(verb, "mount")) {
		ret = mount_one(rest);
	} else if (!strcmp(verb, "umount")) {
		ret = umount(rest) ? -errno : 0;
	} else if (!strcmp(verb, "run") || !strcmp(verb, "runcg")) {
		for (text = strtok(rest, " "); text && argc < ARGS_MAX;
		     text = strtok(NULL, " "))
			argv[argc++] = text;
		argv[argc] = NULL;
		if (!strcmp(verb, "runcg") && argc) {
			cgroup = argv[0];
			memmove(argv, argv + 1, argc * sizeof(argv[0]));
			argc--;
		}
		if (!argc) {
			fprintf(errout, "lab-init: %s: no program\n", verb);
			return 1;
		}
		ret = run_program(argv, cgroup);
		if (ret >= 0)
			return ret;
	} else {
		fprintf(errout, "lab-init: unknown command %s\n", verb);
		return 1;
	}
	if (ret < 0) {
		fprintf(errout, "lab-init: %s %s: %s\n", verb, rest, strerror(-ret));
		return 1;
	}
	return 0;
}

/* The value of "name=" on the kernel command line, or NULL. */
static const char *cmdline_value(const char *name, char *buf, size_t size)
{
	size_t len = strlen(name);
	char *word, *save;
	ssize_t n;
	int fd;

	fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		return NULL;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n <= 0)
		return NULL;
	buf[n] = '\0';
	for (word = strtok_r(buf, " \n", &save); word;
	     word = strtok_r(NULL, " \n", &save))
		if (!strncmp(word, name, len) && word[len] == '=')
			return word + len + 1;
	return NULL;
}

/* Bring an interface up, with an IPv4 address and prefix if given. */
static int interface_up(int sock, const char *name, const char *address,
			int prefix)
{
	struct sockaddr_in *sin;
	struct ifreq ifr;

	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
	if (address) {
		sin = (struct sockaddr_in *)&ifr.ifr_addr;
		sin->sin_family = AF_INET;
		if (inet_pton(AF_INET, address, &sin->sin_addr) != 1)
			return -EINVAL;
		if (ioctl(sock, SIOCSIFADDR, &ifr))
			return -errno;
		sin->sin_addr.s_addr = htonl(prefix ? ~0u << (32 - prefix) : 0);
		if (ioctl(sock, SIOCSIFNETMASK, &ifr))
			return -errno;
	}
	if (ioctl(sock, SIOCGIFFLAGS, &ifr))
		return -errno;
	ifr.ifr_flags |= IFF_UP;
	return ioctl(sock, SIOCSIFFLAGS, &ifr) ? -errno : 0;
}

/* lab.ip=<address>/<prefix>: lo up, eth0 up with that address. */
static void network_up(const char *spec)
{
	char address[64], *slash;
	int sock, prefix, err;

	snprintf(address, sizeof(address), "%s", spec);
	slash = strchr(address, '/');
	prefix = slash ? atoi(slash + 1) : 32;
	if (slash)
		*slash = '\0';
	if (prefix < 0 || prefix > 32) {
		printf("lab-init: lab.ip=%s: bad prefix\n", spec);
		return;
	}
	sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		printf("lab-init: network: %s\n", strerror(errno));
		return;
	}
	err = interface_up(sock, "lo", NULL, 0);
	if (err)
		printf("lab-init: lo up: %s\n", strerror(-err));
	err = interface_up(sock, "eth0", address, prefix);
	if (err)
		printf("lab-init: eth0 %s up: %s\n", spec, strerror(-err));
	close(sock);
}

static volatile pid_t sshd_pid;

/*
 * sshd ended (it failed to start, or died): say so on the console at
 * once, so that the host stops waiting for it (lab/ssh.py).
 */
static void sshd_reaper(int sig)
{
	int saved_errno = errno, status, len;
	char msg[64];

	(void)sig;
	if (sshd_pid <= 0 || waitpid(sshd_pid, &status, WNOHANG) != sshd_pid)
		goto out;
	sshd_pid = 0;
	len = snprintf(msg, sizeof(msg), "@@LAB:SSHD-EXIT status=%d@@\n",
		       WIFSIGNALED(status) ? 128 + WTERMSIG(status) :
					     WEXITSTATUS(status));
	if (write(STDOUT_FILENO, msg, len) < 0)
		goto out;
out:
	errno = saved_errno;
}

/*
 * Start sshd in the foreground (a child of init, so it lives as long as
 * the guest), with its log on the console: the lab's sshd_config keeps
 * that to errors. The host retries its connection until sshd answers.
 */
static void start_sshd(void)
{
	char *argv[] = { SSHD, "-D", "-e", NULL };
	struct sigaction sa = { .sa_handler = sshd_reaper,
				.sa_flags = SA_RESTART | SA_NOCLDSTOP };
	sigset_t chld, old;
	pid_t pid;
	int fd;

	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);
	/* An sshd that dies at once must find sshd_pid set. */
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &old);
	fflush(stdout);
	pid = fork();
	if (pid > 0)
		sshd_pid = pid;
	if (pid) {
		if (pid < 0)
			printf("lab-init: sshd: %s\n", strerror(errno));
		sigprocmask(SIG_SETMASK, &old, NULL);
		return;
	}
	signal(SIGCHLD, SIG_DFL);
	sigprocmask(SIG_SETMASK, &old, NULL);
	fd = open("/dev/null", O_RDONLY);
	if (fd >= 0) {
		dup2(fd, 0);
		close(fd);
	}
	setsid();
	execv(argv[0], argv);
	printf("lab-init: exec %s: %s\n", argv[0], strerror(errno));
	exit(127);
}

/* The SSH transport's pieces, as the kernel command line asks. */
static void start_ssh_transport(void)
{
	char buf[4096];
	const char *value;

	value = cmdline_value("lab.ip", buf, sizeof(buf));
	if (value)
		network_up(value);
	value = cmdline_value("lab.sshd", buf, sizeof(buf));
	if (value && !strcmp(value, "1"))
		start_sshd();
}

/*
 * "lab-init -c '<verb> [args]'", as sshd runs root's login shell: serve
 * that one command and exit with its rc. Only in the lab's guest.
 */
static int serve_one(const char *command)
{
	char line[LINE_MAX_LEN], *verb, *rest;

	if (access(GUEST_MARKER, F_OK)) {
		fprintf(stderr, "lab-init: -c serves the lab's SSH transport and "
			"runs only in the lab's guest (no %s here)\n",
			GUEST_MARKER);
		return 2;
	}
	errout = stderr;
	snprintf(line, sizeof(line), "%s", command);
	verb = strtok(line, " ");
	rest = strtok(NULL, "");
	if (!verb) {
		fprintf(stderr, "lab-init: -c: no command\n");
		return 2;
	}
	return serve(verb, rest ? rest : "");
}

static void power_off(void)
{
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	/* Only reached when power-off failed: say so, then halt. */
	printf("lab-init: power off: %s\n", strerror(errno));
	fflush(stdout);
	for (;;)
		pause();
}

/* The path given as lab.plan= on the kernel command line, or NULL. */
static char *plan_path(void)
{
	static char cmdline[LINE_MAX_LEN];
	char *arg;
	FILE *f;

	f = fopen("/proc/cmdline", "r");
	if (!f)
		return NULL;
	if (!fgets(cmdline, sizeof(cmdline), f))
		cmdline[0] = '\0';
	fclose(f);
	for (arg = strtok(cmdline, " \n"); arg; arg = strtok(NULL, " \n"))
		if (!strncmp(arg, PLAN_ARG, strlen(PLAN_ARG)))
			return arg + strlen(PLAN_ARG);
	return NULL;
}

struct plan_state {
	char scenario[256];
	int step;
};

/* "@scenario <name>": close the scenario that runs, open the next one. */
static void plan_scenario(struct plan_state *plan, const char *name)
{
	if (plan->scenario[0])
		printf("@@LAB:SCENARIO-END %s@@\n", plan->scenario);
	snprintf(plan->scenario, sizeof(plan->scenario), "%s", name);
	plan->step = 0;
	if (name[0])
		printf("@@LAB:SCENARIO %s@@\n", name);
}

/*
 * Serve command lines from in until it ends or says poweroff; with a
 * plan, also the scenario lines and a verdict after each command.
 */
static void serve_lines(FILE *in, struct plan_state *plan)
{
	char line[LINE_MAX_LEN], *id, *verb, *rest, *end;
	long number, last = 0;
	int rc;

	while (fgets(line, sizeof(line), in)) {
		line[strcspn(line, "\r\n")] = '\0';
		if (plan && line[0] == '#')
			continue;
		id = strtok(line, " ");
		verb = strtok(NULL, " ");
		rest = strtok(NULL, "");
		if (plan && id && !strcmp(id, "@scenario")) {
			plan_scenario(plan, verb ? verb : "unnamed");
			continue;
		}
		if (!id || !verb)
			continue;
		/* On the console, ids are numbers, each served once. */
		if (!plan) {
			number = strtol(id, &end, 10);
			if (*end || number <= 0) {
				printf("lab-init: bad command id %s\n", id);
				continue;
			}
			if (number <= last) {
				printf("@@LAB:SEEN %s@@\n", id);
				continue;
			}
			last = number;
		}

		printf("@@LAB:BEGIN %s@@\n", id);
		if (!strcmp(verb, "poweroff")) {
			printf("@@LAB:END %s rc=0@@\n", id);
			break;
		}
		rc = serve(verb, rest ? rest : "");
		printf("@@LAB:END %s rc=%d@@\n", id, rc);
		if (plan && rc)
			printf("not ok %d %s # rc=%d\n", ++plan->step, id, rc);
		else if (plan)
			printf("ok %d %s\n", ++plan->step, id);

		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
	}
}

static void run_plan(const char *path)
{
	struct plan_state plan = { .scenario = "" };
	FILE *f = fopen(path, "r");

	if (!f) {
		printf("@@LAB:PLAN-ERROR %s: %s@@\n", path, strerror(errno));
		return;
	}
	/*
	 * A reader of the plan (LAVA's monitors) matches whole lines: a late
	 * kernel message (the TSC's refined calibration, seconds after boot)
	 * must not land inside one. Informational messages stay in the log.
	 */
	if (klogctl(SYSLOG_CONSOLE_LEVEL, NULL, PLAN_CONSOLE_LEVEL))
		printf("lab-init: console log level: %s\n", strerror(errno));
	printf("@@LAB:PLAN %s@@\n", path);
	serve_lines(f, &plan);
	fclose(f);
	plan_scenario(&plan, "");
	printf("@@LAB:PLAN-END %s@@\n", path);
}

int main(int argc, char **argv)
{
	struct utsname uts;
	const char *plan;
	bool runner;

	errout = stdout;
	if (argc == 3 && !strcmp(argv[1], "-c"))
		return serve_one(argv[2]);
	runner = argc > 1 && !strcmp(argv[1], "--runner");
	if (getpid() != 1 && !runner) {
		/* It mounts over /proc, /tmp and /sys: never on a host. */
		fprintf(stderr, "usage: lab-init runs as a guest's init, or "
			"inside a guest with --runner\n");
		return 2;
	}

	setvbuf(stdout, NULL, _IOLBF, 0);
	mount_all();
	console_quiet();
	if (!runner)
		start_ssh_transport();
	uname(&uts);
	printf("@@LAB:READY %s %s@@\n", uts.release, uts.machine);

	plan = runner ? NULL : plan_path();
	if (plan)
		run_plan(plan);
	else
		serve_lines(stdin, NULL);

	/*
	 * Asked to stop, the console closed, or the plan ran. As init, power
	 * off; as a runner, exit and let vng's init power off and pass the
	 * status on.
	 */
	if (runner)
		return 0;
	power_off();
	return 0;
}
