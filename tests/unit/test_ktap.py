"""parse_ktap on what the guest programs print, and KtapReport.problems()."""

from __future__ import annotations

from lab.ktap import parse_ktap

PASSING = """\
KTAP version 1
1..3
# pid: 57
# errno: 0
# affinity: 0
ok 1 sched_setaffinity returns 0
ok 2 affinity is 0
ok 3 ran on 0
"""

FAILING = """\
KTAP version 1
1..2
# pid: 61
ok 1 sched_setaffinity returns EACCES
not ok 2 affinity is unchanged # affinity is 0, wanted 0-1
"""

SKIPPING = """\
KTAP version 1
1..2
ok 1 cpuset v2 restricts the mask
ok 2 cpuset v1 restricts the mask # SKIP no cpuset v1 hierarchy in this kernel
"""


def test_passing_run_has_all_results_and_facts() -> None:
    report = parse_ktap(PASSING)

    assert report.version == "1"
    assert report.planned == 3
    assert [(r.number, r.name, r.ok) for r in report.results] == [
        (1, "sched_setaffinity returns 0", True),
        (2, "affinity is 0", True),
        (3, "ran on 0", True),
    ]
    assert report.diagnostics == {"pid": "57", "errno": "0", "affinity": "0"}
    assert report.complete
    assert report.problems() == []


def test_failing_subtest_keeps_its_reason() -> None:
    report = parse_ktap(FAILING)

    [failed] = report.failed
    assert failed.number == 2
    assert failed.name == "affinity is unchanged"
    assert failed.directive == "affinity is 0, wanted 0-1"
    assert not failed.skipped
    assert report.problems() == [
        "not ok 2 affinity is unchanged: affinity is 0, wanted 0-1"
    ]


def test_skip_is_ok_with_its_reason_and_no_problem() -> None:
    report = parse_ktap(SKIPPING)

    skipped = report.results[1]
    assert skipped.ok and skipped.skipped
    assert skipped.name == "cpuset v1 restricts the mask"
    assert skipped.reason == "no cpuset v1 hierarchy in this kernel"
    assert not report.results[0].skipped
    assert report.problems() == []


def test_truncated_report_is_incomplete() -> None:
    report = parse_ktap(
        "KTAP version 1\n1..3\n# pid: 57\nok 1 sched_setaffinity returns 0\n"
    )

    assert not report.complete
    assert report.problems() == ["planned 3 results, got 1"]


def test_report_without_plan_is_a_problem() -> None:
    report = parse_ktap("KTAP version 1\nok 1 sched_setaffinity returns 0\n")

    assert report.planned is None
    assert not report.complete
    assert len(report.problems()) == 1


def test_report_without_version_says_program_did_not_start() -> None:
    report = parse_ktap("affinity: cannot open /sys/fs/cgroup: No such file\n")

    assert report.version is None
    assert report.results == []
    assert report.problems() == [
        "no KTAP version line: the program did not start its report"
    ]


def test_failure_and_missing_results_are_both_reported() -> None:
    report = parse_ktap("KTAP version 1\n1..3\nnot ok 1 mask seen # hook saw 0\n")

    assert report.problems() == [
        "not ok 1 mask seen: hook saw 0",
        "planned 3 results, got 1",
    ]


def test_kernel_lines_between_results_are_noise() -> None:
    text = (
        "KTAP version 1\n"
        "1..2\n"
        "[   12.345678] random: crng init done\n"
        "ok 1 sched_setaffinity returns 0\n"
        "[   12.400001] cgroup: lab1: cpuset.cpus set to 0\n"
        "# pid: 57\n"
        "ok 2 ran on 0\n"
    )

    report = parse_ktap(text)

    assert [r.number for r in report.results] == [1, 2]
    assert report.complete and report.problems() == []
    assert report.diagnostics == {"pid": "57"}
    assert report.noise == [
        "[   12.345678] random: crng init done",
        "[   12.400001] cgroup: lab1: cpuset.cpus set to 0",
    ]


def test_console_line_endings_are_accepted() -> None:
    report = parse_ktap(PASSING.replace("\n", "\r\n"))

    assert report.complete
    assert report.results[2].name == "ran on 0"
    assert report.diagnostics["pid"] == "57"
