// SPDX-License-Identifier: GPL-2.0
/*
 * bpf-affinity: load a task_setscheduler BPF LSM program, attach it, then
 * call sched_setaffinity() and report what the program saw.
 *
 *   bpf-affinity --prog FILE.bpf.o [--reserve CPU]
 *                [--mask LIST | --policy batch]
 *                [--expect-load ok|rejected] [--expect-errno NAME]
 *                [--expect-affinity LIST|unchanged]
 *
 * The program (see setsched.h) records the calls of this process only
 * and refuses masks that name the --reserve CPU. --mask calls
 * sched_setaffinity(), --policy sched_setattr() (a call with attributes
 * and no mask); with neither, the run only shows whether it loads.
 *
 * Diagnostics: pid, load (ok, rejected by the verifier, or failed),
 * load_errno and verifier (the log's error line) when it did not load,
 * attach, then for a call: ret and errno, the affinity before and after
 * (--mask), and what the program recorded (bpf_events, bpf_seen_mask,
 * bpf_seen_attr, bpf_target, bpf_verdict of the first record). The
 * verifier's whole log follows as "# | " lines. A program the verifier
 * rejects is a result, not a harness failure: exit 0.
 */
#include "ktap.h"

#include <getopt.h>
#include <linux/types.h>
#include <stdbool.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "setsched.h"

#define LOG_BYTES (256 * 1024)

struct recorded {
	int events;
	struct setsched_event first;
};

static char verifier_log[LOG_BYTES];

/* libbpf's own chatter is for people; keep only its warnings. */
static int libbpf_print(enum libbpf_print_level level, const char *fmt,
			va_list ap)
{
	if (level != LIBBPF_WARN)
		return 0;
	return vfprintf(stderr, fmt, ap);
}

/* Set one int of the object's .rodata, by its name in the BTF. */
static int set_rodata_int(struct bpf_object *obj, const char *name, int value)
{
	const struct btf *btf = bpf_object__btf(obj);
	const struct btf_var_secinfo *var;
	const struct btf_type *sec;
	struct bpf_map *map;
	const void *init;
	char *data;
	size_t size;
	int id, i, err;

	if (!btf)
		return -ENOENT;
	id = btf__find_by_name_kind(btf, ".rodata", BTF_KIND_DATASEC);
	if (id < 0)
		return -ENOENT;
	sec = btf__type_by_id(btf, id);
	var = btf_var_secinfos(sec);
	for (i = 0; i < btf_vlen(sec); i++, var++) {
		if (!strcmp(btf__name_by_offset(btf,
				btf__type_by_id(btf, var->type)->name_off),
			    name))
			break;
	}
	if (i == btf_vlen(sec) || var->size != sizeof(value))
		return -ENOENT;

	bpf_object__for_each_map(map, obj) {
		size_t len = strlen(bpf_map__name(map));

		if (!bpf_map__is_internal(map) || len < 7 ||
		    strcmp(bpf_map__name(map) + len - 7, ".rodata"))
			continue;
		init = bpf_map__initial_value(map, &size);
		if (!init || var->offset + sizeof(value) > size)
			return -EINVAL;
		data = malloc(size);
		if (!data)
			return -ENOMEM;
		memcpy(data, init, size);
		memcpy(data + var->offset, &value, sizeof(value));
		err = bpf_map__set_initial_value(map, data, size);
		free(data);
		return err;
	}
	return -ENOENT;
}

/* The line of the log that says why: the last before "processed ...". */
static const char *verifier_reason(char *buf, size_t size)
{
	static char copy[LOG_BYTES];
	const char *why = "(no verifier log)";
	char *line, *save = NULL;

	snprintf(copy, sizeof(copy), "%s", verifier_log);
	for (line = strtok_r(copy, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		if (!strncmp(line, "processed ", 10))
			break;
		if (*line)
			why = line;
	}
	snprintf(buf, size, "%s", why);
	return buf;
}

static void print_verifier_log(void)
{
	char *line, *save = NULL;

	for (line = strtok_r(verifier_log, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save))
		printf("# | %s\n", line);
	fflush(stdout);
}

static int on_event(void *ctx, void *data, size_t size)
{
	struct recorded *rec = ctx;

	if (size < sizeof(struct setsched_event))
		return 0;
	if (!rec->events++)
		memcpy(&rec->first, data, sizeof(rec->first));
	return 0;
}

static void read_events(struct bpf_object *obj, struct recorded *rec)
{
	struct ring_buffer *rb;
	struct bpf_map *map;

	map = bpf_object__find_map_by_name(obj, SETSCHED_EVENTS_MAP);
	if (!map)
		harness_fail("no " SETSCHED_EVENTS_MAP " map in the object");
	rb = ring_buffer__new(bpf_map__fd(map), on_event, rec, NULL);
	if (!rb)
		harness_fail("ring_buffer__new");
	if (ring_buffer__consume(rb) < 0)
		harness_fail("ring_buffer__consume");
	ring_buffer__free(rb);
}

static void report_events(const struct recorded *rec)
{
	const struct setsched_event *ev = &rec->first;

	ktap_diag("bpf_events", "%d", rec->events);
	if (!rec->events)
		return;
	if (ev->has_mask)
		ktap_diag("bpf_seen_mask", "%#llx",
			  (unsigned long long)ev->mask_word);
	else
		ktap_diag("bpf_seen_mask", "none");
	ktap_diag("bpf_seen_attr", "%s", ev->has_attr ? "present" : "none");
	ktap_diag("bpf_target", "%u", ev->target);
	ktap_diag("bpf_verdict", "%d", ev->verdict);
}

/* What the host asked for, and what happened. */
struct scenario {
	const char *path, *mask, *policy;
	const char *exp_load, *exp_errno, *exp_aff;
	int reserve;
	cpu_set_t request, before, after;
	const char *load;
	bool called;
	int call_err;
};

static void parse_args(int argc, char **argv, struct scenario *s)
{
	static const struct option opts[] = {
		{ "prog", required_argument, NULL, 'p' },
		{ "reserve", required_argument, NULL, 'r' },
		{ "mask", required_argument, NULL, 'm' },
		{ "policy", required_argument, NULL, 'P' },
		{ "expect-load", required_argument, NULL, 'l' },
		{ "expect-errno", required_argument, NULL, 'e' },
		{ "expect-affinity", required_argument, NULL, 'a' },
		{ NULL, 0, NULL, 0 },
	};
	int opt;

	s->reserve = -1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'p':
			s->path = optarg;
			break;
		case 'r':
			s->reserve = atoi(optarg);
			break;
		case 'm':
			s->mask = optarg;
			break;
		case 'P':
			s->policy = optarg;
			break;
		case 'l':
			s->exp_load = optarg;
			break;
		case 'e':
			s->exp_errno = optarg;
			break;
		case 'a':
			s->exp_aff = optarg;
			break;
		default:
			errno = EINVAL;
			harness_fail("usage");
		}
	}
	if (!s->path || (s->mask && cpulist_parse(s->mask, &s->request)) ||
	    (s->mask && s->policy) || s->reserve < -1 || s->reserve >= 64 ||
	    (s->exp_errno && !s->mask && !s->policy) ||
	    (s->exp_aff && !s->mask) ||
	    (s->policy && strcmp(s->policy, "batch"))) {
		errno = EINVAL;
		harness_fail("usage: --prog FILE [--reserve 0..63] "
			     "[--mask LIST | --policy batch]; --expect-errno "
			     "needs a call, --expect-affinity --mask");
	}
}

/* Open, configure and load the object; attach it when it loaded. */
static struct bpf_link *load_and_attach(struct bpf_object *obj,
					struct scenario *s)
{
	struct bpf_program *prog;
	struct bpf_link *link;
	char buf[512];
	int err;

	bpf_object__for_each_program(prog, obj)
		bpf_program__set_log_buf(prog, verifier_log,
					 sizeof(verifier_log));
	err = set_rodata_int(obj, SETSCHED_TGID_VAR, getpid());
	if (!err)
		err = set_rodata_int(obj, SETSCHED_RESERVED_VAR, s->reserve);
	if (err) {
		errno = -err;
		harness_fail("setting the program's .rodata");
	}

	err = bpf_object__load(obj);
	if (err) {
		s->load = verifier_log[0] ? "rejected" : "failed";
		ktap_diag("load", "%s", s->load);
		ktap_diag("load_errno", "%s", errno_name(-err));
		ktap_diag("verifier", "%s",
			  verifier_reason(buf, sizeof(buf)));
		print_verifier_log();
		return NULL;
	}
	s->load = "ok";
	ktap_diag("load", "ok");
	prog = bpf_object__next_program(obj, NULL);
	link = prog ? bpf_program__attach(prog) : NULL;
	ktap_diag("attach", "%s", link ? "ok" : "failed");
	if (!link)
		ktap_diag("attach_errno", "%s", errno_name(errno));
	return link;
}

static void call_setaffinity(struct scenario *s)
{
	char buf[256];
	int ret;

	if (sched_getaffinity(0, sizeof(s->before), &s->before))
		harness_fail("sched_getaffinity");
	ktap_diag("affinity_before", "%s",
		  cpulist_format(&s->before, buf, sizeof(buf)));
	ktap_diag("request", "%s",
		  cpulist_format(&s->request, buf, sizeof(buf)));
	ret = sched_setaffinity(0, sizeof(s->request), &s->request);
	s->call_err = ret ? errno : 0;
	s->called = true;
	ktap_diag("ret", "%d", ret);
	ktap_diag("errno", "%s", errno_name(s->call_err));
	if (sched_getaffinity(0, sizeof(s->after), &s->after))
		harness_fail("sched_getaffinity");
	ktap_diag("affinity_after", "%s",
		  cpulist_format(&s->after, buf, sizeof(buf)));
}

/* The kernel's struct sched_attr (its header clashes with glibc's). */
struct lab_sched_attr {
	__u32 size;
	__u32 sched_policy;
	__u64 sched_flags;
	__s32 sched_nice;
	__u32 sched_priority;
	__u64 sched_runtime;
	__u64 sched_deadline;
	__u64 sched_period;
	__u32 sched_util_min;
	__u32 sched_util_max;
};

static void call_setattr(struct scenario *s)
{
	struct lab_sched_attr attr = {
		.size = sizeof(attr),
		.sched_policy = SCHED_BATCH,
	};
	long ret;

	ret = syscall(SYS_sched_setattr, 0, &attr, 0);
	s->call_err = ret ? errno : 0;
	s->called = true;
	ktap_diag("ret", "%ld", ret);
	ktap_diag("errno", "%s", errno_name(s->call_err));
}

static void report_expectations(struct scenario *s)
{
	static const char *not_called =
		"not called: the program is not attached";
	char buf[256], why[320];

	if (s->exp_load) {
		snprintf(why, sizeof(why), "got %s, expected %s", s->load,
			 s->exp_load);
		ktap_result(!strcmp(s->load, s->exp_load), "program_load", why);
	}
	if (s->exp_errno) {
		snprintf(why, sizeof(why), "got %s, expected %s",
			 errno_name(s->call_err), s->exp_errno);
		ktap_result(s->called &&
			    !strcmp(errno_name(s->call_err), s->exp_errno),
			    s->mask ? "sched_setaffinity_errno" :
				      "sched_setattr_errno",
			    s->called ? why : not_called);
	}
	if (s->exp_aff && !s->called) {
		ktap_result(0, "affinity_after_call", not_called);
	} else if (s->exp_aff) {
		if (!strcmp(s->exp_aff, "unchanged"))
			s->exp_aff = cpulist_format(&s->before, buf,
						    sizeof(buf));
		ktap_expect_cpus("affinity_after_call", s->exp_aff, &s->after);
	}
}

int main(int argc, char **argv)
{
	struct scenario s = { 0 };
	struct recorded rec = { 0 };
	struct bpf_object *obj;
	struct bpf_link *link;

	parse_args(argc, argv, &s);
	libbpf_set_print(libbpf_print);
	obj = bpf_object__open_file(s.path, NULL);
	if (!obj)
		harness_fail(s.path);

	ktap_header(!!s.exp_load + !!s.exp_errno + !!s.exp_aff);
	ktap_diag("pid", "%d", getpid());
	ktap_diag("prog", "%s", s.path);
	if (s.reserve >= 0)
		ktap_diag("reserved_cpu", "%d", s.reserve);
	else
		ktap_diag("reserved_cpu", "none");

	link = load_and_attach(obj, &s);
	if (link && (s.mask || s.policy)) {
		if (s.mask)
			call_setaffinity(&s);
		else
			call_setattr(&s);
		read_events(obj, &rec);
		report_events(&rec);
	}
	bpf_link__destroy(link);
	bpf_object__close(obj);

	report_expectations(&s);
	return 0;
}
