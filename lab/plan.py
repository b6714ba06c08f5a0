"""The plan: the lab's main checks as lab-init command lines, run at boot.

One definition of each scenario serves two runs: lab-init's plan mode
reads them from a file at boot (what an exported LAVA job runs, see
lab/lava.py), and `run_on_guest` sends the same lines over the console of
a lab boot. Every outcome is a test case of its scenario: each step's
verdict (did the command succeed) and each KTAP test the guest programs
print, all judged inside the guest, so both runs give comparable results.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.arches import Arch
from lab.checks import CGROUP2, SECURITYFS, TestLsm
from lab.console import BootedGuest
from lab.errors import LabError
from lab.guest import CpioWriter
from lab.kbuild import KernelImage
from lab.ktap import KtapReport, parse_ktap

# Where the plan goes in the initramfs, and the kernel argument naming it.
PLAN_PATH = "/etc/lab/plan"
PLAN_ARG = f"lab.plan={PLAN_PATH}"
GUEST_BIN = "/bin"
LOG = f"{SECURITYFS}/labtest/log"
RULE = f"{SECURITYFS}/labtest/rule"
RESULTS = ("pass", "fail", "skip")
NAME_RE = re.compile(r"^[a-z0-9_]+$")


class PlanError(LabError):
    """The kernel cannot run the plan (no test LSM, hook not expanded)."""

    phase = "plan"


@dataclass(frozen=True)
class Step:
    """One lab-init command of a scenario; `run` takes a program name
    (found under /bin) and runs it in `cgroup` when one is given."""

    name: str
    verb: str
    args: tuple[str, ...]
    cgroup: str | None = None

    def line(self) -> str:
        """The command line as lab-init's plan mode reads it."""
        if self.verb != "run":
            return " ".join((self.name, self.verb, *self.args))
        program, *rest = self.args
        path = f"{GUEST_BIN}/{program}"
        if self.cgroup:
            return " ".join((self.name, "runcg", self.cgroup, path, *rest))
        return " ".join((self.name, "run", path, *rest))


@dataclass(frozen=True)
class Scenario:
    """A named list of steps; its cases are the steps and the KTAP tests."""

    name: str
    summary: str
    steps: tuple[Step, ...]
    # The KTAP tests its programs print when they run to the end.
    ktap_cases: tuple[str, ...] = ()

    def cases(self) -> list[str]:
        return [step.name for step in self.steps] + list(self.ktap_cases)


@dataclass(frozen=True)
class CaseResult:
    """One test case of a plan run: pass, fail or skip."""

    scenario: str
    case: str
    result: str
    detail: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.scenario, self.case)


@dataclass(frozen=True)
class Plan:
    arch: str
    scenarios: tuple[Scenario, ...] = field(default_factory=tuple)

    def text(self) -> str:
        """The plan file lab-init reads."""
        lines = [f"# kernel-lab plan for {self.arch}: {len(self.scenarios)} scenarios"]
        for scenario in self.scenarios:
            lines.append(f"# {scenario.summary}")
            lines.append(f"@scenario {scenario.name}")
            lines.extend(step.line() for step in scenario.steps)
        return "\n".join(lines) + "\n"

    def archive(self) -> bytes:
        """A gzip cpio holding the plan file, to append to an initramfs."""
        cpio = CpioWriter()
        parts = PLAN_PATH.strip("/").split("/")
        for depth in range(1, len(parts)):
            cpio.directory("/".join(parts[:depth]))
        cpio.file(PLAN_PATH.strip("/"), self.text().encode(), mode=0o644)
        return gzip.compress(cpio.finish(), mtime=0)

    def expected_cases(self) -> set[tuple[str, str]]:
        return {(s.name, case) for s in self.scenarios for case in s.cases()}


def _cpuset_steps(path: str, cpus: str) -> tuple[Step, ...]:
    """A cgroup v2 child with the cpuset controller and these CPUs."""
    control = f"{CGROUP2}/cgroup.subtree_control"
    return (
        Step("enable_cpuset", "write", (control, "+cpuset")),
        Step("make_cpuset", "mkdir", (path,)),
        Step("set_cpuset_cpus", "write", (f"{path}/cpuset.cpus", cpus)),
    )


def _clean_lsm(deny: str | None = None) -> tuple[Step, ...]:
    """Empty the test LSM's log and set its rule (none, or `deny`)."""
    steps = (
        Step("clear_log", "write", (LOG, "clear")),
        Step("clear_rule", "write", (RULE, "clear")),
    )
    return steps + ((Step("deny_rule", "write", (RULE, deny)),) if deny else ())


def _run(name: str, command: str, cgroup: str | None = None) -> Step:
    """A guest program run: "affinity --mask 0-1 ..." (no argument of the
    lab's programs holds a space)."""
    return Step(name, "run", tuple(command.split()), cgroup)


AFFINITY_CASES = ("sched_setaffinity_errno", "affinity_after_call", "hook_calls")
SETATTR_CASES = ("sched_setattr_errno", "policy_after_call", "hook_calls")


def build_plan(arch: Arch, kernel: KernelImage) -> Plan:
    """The exported scenarios for this arch's rules and this kernel.

    They are the main checks of tests/lab/test_affinity_hook.py and
    test_sched_attr.py, with the host's assertions on the test LSM's log
    made by the guest program itself (--expect-hook). They need the test
    LSM and the expanded hook (the lab's default series); the SCHED_FIFO
    scenario also needs the sched_attr follow-up."""
    if not kernel.hook_expanded or not kernel.test_lsm:
        raise PlanError(
            f"kernel {kernel.release} ({kernel.source}) cannot run the plan: it "
            "needs the expanded hook and the test LSM (the lab's default series)"
        )
    rule = arch.affinity
    cpuset = f"{CGROUP2}/plan"
    scenarios = [
        Scenario(
            "untruncated_mask_in_cpuset",
            "cpuset.cpus=0, sched_setaffinity({0,1}): the hook sees {0,1}",
            _clean_lsm()
            + _cpuset_steps(cpuset, "0")
            + (
                _run(
                    "run_affinity",
                    f"affinity --mask 0-1 --expect-errno {rule.partial_errno} "
                    f"--expect-affinity {rule.partial_affinity} --expect-ran-on 0 "
                    "--expect-cpus-allowed 0 --expect-hook none:0;0-1:0",
                    cgroup=cpuset,
                ),
                Step("remove_cpuset", "rmdir", (cpuset,)),
            ),
            AFFINITY_CASES[:2]
            + ("ran_only_on_expected_cpus", "cpus_allowed_list")
            + AFFINITY_CASES[2:],
        ),
        Scenario(
            "mask_outside_cpuset",
            "cpuset.cpus=0, sched_setaffinity({1}): the arch's rule; the hook sees {1}",
            _clean_lsm()
            + _cpuset_steps(cpuset, "0")
            + (
                _run(
                    "run_affinity",
                    f"affinity --mask 1 --expect-errno {rule.outside_errno} "
                    f"--expect-affinity {rule.outside_affinity} "
                    "--expect-hook none:0;1:0",
                    cgroup=cpuset,
                ),
                Step("remove_cpuset", "rmdir", (cpuset,)),
            ),
            AFFINITY_CASES,
        ),
        Scenario(
            "deny_rule_refuses_mask",
            "rule deny_cpus 1: sched_setaffinity({0,1}) fails with EACCES",
            _clean_lsm(deny="deny_cpus 1")
            + (
                _run(
                    "run_affinity",
                    "affinity --mask 0-1 --expect-errno EACCES "
                    "--expect-affinity unchanged --expect-hook 0-1:-13",
                ),
                Step("drop_rule", "write", (RULE, "clear")),
            ),
            AFFINITY_CASES,
        ),
        Scenario(
            "same_call_allowed_without_rule",
            "no rule: sched_setaffinity({0,1}) succeeds, the hook allowed it",
            _clean_lsm()
            + (
                _run(
                    "run_affinity",
                    "affinity --mask 0-1 --expect-errno 0 --expect-affinity 0-1 "
                    "--expect-hook 0-1:0",
                ),
            ),
            AFFINITY_CASES,
        ),
        Scenario(
            "sched_setattr_without_mask",
            "sched_setattr(SCHED_BATCH) reaches the hook with no mask",
            _clean_lsm()
            + (
                _run(
                    "run_setattr",
                    "setattr --policy batch --expect-errno 0 --expect-hook none:0",
                ),
            ),
            SETATTR_CASES,
        ),
    ]
    if kernel.hook_has_attr:
        scenarios.append(
            Scenario(
                "rt_rule_refuses_fifo_99",
                "rule deny_rt_above 50: sched_setattr(SCHED_FIFO 99) fails, EACCES",
                _clean_lsm(deny="deny_rt_above 50")
                + (
                    _run(
                        "run_setattr",
                        "setattr --policy fifo --priority 99 --expect-errno EACCES "
                        "--expect-hook none:-13",
                    ),
                    Step("drop_rule", "write", (RULE, "clear")),
                ),
                SETATTR_CASES,
            )
        )
    for scenario in scenarios:
        _check_names(scenario)
    return Plan(arch.name, tuple(scenarios))


def _check_names(scenario: Scenario) -> None:
    """Case names must be unique in a scenario and survive LAVA's case ids
    (lower case, runs of non-word characters turned into "_")."""
    cases = scenario.cases()
    bad = [c for c in [scenario.name, *cases] if not NAME_RE.match(c)]
    if bad or len(set(cases)) != len(cases):
        raise ValueError(f"scenario {scenario.name}: bad or repeated names {cases}")


def run_on_guest(
    guest: BootedGuest,
    plan: Plan,
    after_scenario: Callable[[Scenario, list[KtapReport]], None] | None = None,
) -> list[CaseResult]:
    """The lab's own run of the plan: each step over the console of a lab
    boot, judged as lab-init's plan mode judges it. after_scenario gets each
    scenario's KTAP reports while the guest still holds its state."""
    results = []
    for scenario in plan.scenarios:
        reports = []
        for step in scenario.steps:
            if step.verb == "run":
                program, *args = step.args
                result = guest.run(program, *args, cgroup=step.cgroup)
            else:
                result = guest.command(step.verb, *step.args)
            verdict = "pass" if result.rc == 0 else "fail"
            detail = "" if result.rc == 0 else f"rc={result.rc}: {result.output}"
            results.append(CaseResult(scenario.name, step.name, verdict, detail))
            if step.verb == "run":
                reports.append(parse_ktap(result.output))
                results.extend(
                    CaseResult(
                        scenario.name,
                        r.name,
                        "skip" if r.skipped else "pass" if r.ok else "fail",
                        r.directive,
                    )
                    for r in reports[-1].results
                )
        if after_scenario is not None:
            after_scenario(scenario, reports)
    return results


def host_hook_calls(guest: BootedGuest, kernel: KernelImage, pid: int) -> str:
    """The test LSM's record of one task's calls, read and formatted on the
    host the way the guest programs' --expect-hook writes them."""
    records = TestLsm(guest, kernel).records(caller=pid)
    return ";".join(
        f"{r.mask}:{r.ret}" + ("" if r.target == pid else f"@{r.target}")
        for r in records
    )
