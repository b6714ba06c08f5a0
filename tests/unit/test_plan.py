"""The plan: its file for lab-init's plan mode, its archive, and the lab's
own run of it over the console (with a stand-in guest)."""

from __future__ import annotations

import gzip
from dataclasses import replace

import pytest
from kernels import EXPANDED_KERNEL, STOCK_KERNEL

from lab.arches import MIPS, X86_64
from lab.console import CommandResult
from lab.plan import (
    NAME_RE,
    PLAN_PATH,
    PlanError,
    Step,
    build_plan,
    host_hook_calls,
    run_on_guest,
)

ATTR_KERNEL = replace(EXPANDED_KERNEL, hook_has_attr=True)


def test_plan_file_has_a_scenario_line_then_its_steps() -> None:
    plan = build_plan(X86_64, EXPANDED_KERNEL)
    lines = plan.text().splitlines()

    first = plan.scenarios[0]
    start = lines.index(f"@scenario {first.name}")
    assert lines[start + 1 : start + 1 + len(first.steps)] == [
        step.line() for step in first.steps
    ]
    assert "run_affinity runcg /sys/fs/cgroup/plan /bin/affinity --mask 0-1" in (
        plan.text()
    )


def test_step_lines_are_lab_init_commands_named_by_the_step() -> None:
    assert Step("make_cpuset", "mkdir", ("/sys/fs/cgroup/plan",)).line() == (
        "make_cpuset mkdir /sys/fs/cgroup/plan"
    )
    assert Step("deny_rule", "write", ("/rule", "deny_cpus 1")).line() == (
        "deny_rule write /rule deny_cpus 1"
    )
    assert Step("run_setattr", "run", ("setattr", "--policy", "batch")).line() == (
        "run_setattr run /bin/setattr --policy batch"
    )


def test_plan_archive_is_a_gzip_cpio_with_the_plan_file() -> None:
    plan = build_plan(X86_64, EXPANDED_KERNEL)

    cpio = gzip.decompress(plan.archive())

    assert cpio.startswith(b"070701")
    assert PLAN_PATH.strip("/").encode() + b"\0" in cpio
    assert plan.text().encode() in cpio
    assert cpio.rstrip(b"\0").endswith(b"TRAILER!!!")


def test_plan_needs_the_test_lsm_and_the_expanded_hook() -> None:
    with pytest.raises(PlanError, match="expanded hook and the test LSM"):
        build_plan(X86_64, STOCK_KERNEL)


def test_fifo_scenario_only_with_the_sched_attr_follow_up() -> None:
    without = [s.name for s in build_plan(X86_64, EXPANDED_KERNEL).scenarios]
    with_attr = [s.name for s in build_plan(X86_64, ATTR_KERNEL).scenarios]

    assert "rt_rule_refuses_fifo_99" not in without
    assert with_attr == [*without, "rt_rule_refuses_fifo_99"]


def test_case_names_are_unique_per_scenario_and_lava_safe() -> None:
    plan = build_plan(X86_64, ATTR_KERNEL)

    for scenario in plan.scenarios:
        cases = scenario.cases()
        assert len(cases) == len(set(cases)), scenario.name
        assert all(NAME_RE.match(case) for case in cases)
    assert len(plan.expected_cases()) == sum(len(s.cases()) for s in plan.scenarios)


def test_expectations_follow_the_arch_rules() -> None:
    """MIPS FPAFF reports {0,1} after the partial request; x86_64 {0}."""
    x86 = build_plan(X86_64, EXPANDED_KERNEL).text()
    mips = build_plan(MIPS, EXPANDED_KERNEL).text()

    assert "--mask 0-1 --expect-errno 0 --expect-affinity 0 " in x86
    assert "--mask 0-1 --expect-errno 0 --expect-affinity 0-1 " in mips
    assert "--mask 1 --expect-errno EINVAL --expect-affinity unchanged" in x86
    assert "--mask 1 --expect-errno 0 --expect-affinity 0-1" in mips


class ScriptedGuest:
    """Answers the plan's commands: rc 0 and no output, KTAP for programs,
    and a chosen rc for one command."""

    def __init__(self, fail: str = "", ktap: str = "") -> None:
        self.fail = fail
        self.ktap = ktap
        self.sent: list[str] = []

    def command(self, verb: str, *args: str) -> CommandResult:
        text = " ".join((verb, *args))
        self.sent.append(text)
        rc = 1 if self.fail and self.fail in text else 0
        return CommandResult(
            text, rc, "lab-init: mkdir: File exists\n" if rc else "", 0
        )

    def run(self, program: str, *args: str, cgroup: str | None = None) -> CommandResult:
        result = self.command("run", program, *args)
        return replace(result, output=self.ktap)


KTAP = """KTAP version 1
1..3
# pid: 42
# hook_calls: none:0;0-1:0
ok 1 sched_setaffinity_errno
not ok 2 affinity_after_call # got 0-1, expected 0
ok 3 hook_calls
"""


def test_lab_run_judges_steps_by_rc_and_programs_by_ktap() -> None:
    plan = build_plan(X86_64, EXPANDED_KERNEL)
    guest = ScriptedGuest(fail="mkdir /sys/fs/cgroup/plan", ktap=KTAP)
    seen = []

    results = run_on_guest(
        guest,  # type: ignore[arg-type]
        plan,
        after_scenario=lambda scenario, reports: seen.append(
            (scenario.name, len(reports))
        ),
    )

    by_key = {r.key: r for r in results}
    first = plan.scenarios[0].name
    assert by_key[(first, "make_cpuset")].result == "fail"
    assert "rc=1" in by_key[(first, "make_cpuset")].detail
    assert by_key[(first, "clear_log")].result == "pass"
    assert by_key[(first, "affinity_after_call")].result == "fail"
    assert by_key[(first, "hook_calls")].result == "pass"
    assert seen == [(s.name, 1) for s in plan.scenarios]
    assert guest.sent[0] == "write /sys/kernel/security/labtest/log clear"


class LogGuest:
    def __init__(self, log: str) -> None:
        self.log = log

    def cat(self, path: str) -> str:
        assert path.endswith("/labtest/log")
        return self.log


def test_host_formats_hook_calls_as_the_guest_programs_do() -> None:
    log = (
        "seq=1 caller=42 target=42 comm=lab-init mask=none attr=none ret=0\n"
        "seq=2 caller=7 target=7 comm=other mask=0 attr=none ret=0\n"
        "seq=3 caller=42 target=42 comm=affinity mask=0-1 attr=none ret=-13\n"
        "seq=4 caller=42 target=43 comm=affinity mask=1 attr=none ret=0\n"
    )

    calls = host_hook_calls(LogGuest(log), EXPANDED_KERNEL, 42)  # type: ignore[arg-type]

    assert calls == "none:0;0-1:-13;1:0@43"
