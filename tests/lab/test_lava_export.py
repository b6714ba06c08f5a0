"""The LAVA export, run for real: Debian's lava-run boots the exported job.

The plan (lab/plan.py) runs twice on the same kernel: over the console of
the session's lab boot, and inside the LAVA job that `lab lava-job`
exports, booted by lava-run on a local qemu device dictionary. Both runs
must pass every test case of the plan, and give the same cases with the
same outcomes. Runs per arch (LAVA's qemu device type knows amd64 and
mips).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lab import lava
from lab.arches import Arch
from lab.console import BootedGuest
from lab.guest import GuestBundle
from lab.kbuild import KernelImage
from lab.ktap import KtapReport
from lab.plan import (
    CaseResult,
    Plan,
    Scenario,
    build_plan,
    host_hook_calls,
    run_on_guest,
)
from lab.session import LabRun

pytestmark = pytest.mark.lava


def _outcomes(cases: list[CaseResult]) -> dict[tuple[str, str], str]:
    return {case.key: case.result for case in cases}


def _lab_run_of_plan(
    guest: BootedGuest, kernel: KernelImage, plan: Plan, reports: list[KtapReport]
) -> list[CaseResult]:
    """The plan over the lab's console; what each program says the test
    LSM saw is checked against the host's own reading of the log."""

    def host_agrees(scenario: Scenario, ktap: list[KtapReport]) -> None:
        reports.extend(ktap)
        for report in ktap:
            pid = int(report.diagnostics["pid"])
            guest_says = report.diagnostics.get("hook_calls", "no-calls")
            assert host_hook_calls(guest, kernel, pid) == guest_says, (
                f"{scenario.name}: the guest program read the test LSM's log "
                f"as {guest_says!r}, the host reads it otherwise"
            )

    return run_on_guest(guest, plan, after_scenario=host_agrees)


def test_lava_run_of_exported_job_matches_lab_run(
    guest: BootedGuest,
    kernel: KernelImage,
    arch: Arch,
    guest_bundle: GuestBundle,
    lab_run: LabRun,
    tmp_path: Path,
    ktap_reports: list[KtapReport],
) -> None:
    """`lab lava-job` exports the plan; lava-run boots it and reports every
    KTAP test as a LAVA test case: all pass, and they are the cases and
    outcomes of the lab's own run of the plan on this kernel."""
    plan = build_plan(arch, kernel)
    expected = plan.expected_cases()

    lab_cases = _lab_run_of_plan(guest, kernel, plan, ktap_reports)
    job = lava.export_job(arch, kernel, guest_bundle, plan, tmp_path / "job")
    log_path = lava.run_lava(job.directory, tmp_path / "out", lab_run.progress)
    results = lava.read_results(log_path)

    # Kept beside the run for a person: the job, the LAVA log, both results.
    keep = lab_run.results.arch_dir(arch) / "lava"
    shutil.copytree(
        job.directory,
        keep / "job",
        ignore=shutil.ignore_patterns("*.gz", job.kernel.name),
    )
    shutil.copy(log_path, keep / lava.LAVA_LOG)
    lab_outcomes, lava_outcomes = _outcomes(lab_cases), _outcomes(results.cases)
    (keep / "compare.txt").write_text(
        "".join(
            f"{s}/{c}: lab {lab_outcomes.get((s, c), '-')}, "
            f"lava {lava_outcomes.get((s, c), '-')}\n"
            for s, c in sorted(expected | set(lava_outcomes) | set(lab_outcomes))
        )
    )

    problems = [
        f"lab: {c.scenario}/{c.case}: {c.result} {c.detail}".strip()
        for c in lab_cases
        if c.result != "pass"
    ]
    problems += [
        f"lab: {s}/{c}: missing" for s, c in sorted(expected - set(lab_outcomes))
    ]
    problems += [f"lava: {problem}" for problem in results.problems(expected)]
    assert not problems, (
        f"the plan's runs (LAVA log: {log_path}; both: {keep / 'compare.txt'}):\n  "
        + "\n  ".join(problems)
    )
    assert lava_outcomes == lab_outcomes
