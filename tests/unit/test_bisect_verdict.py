"""lab bisect's mapping of a run to git bisect's exit codes."""

from __future__ import annotations

from typing import Any

from lab.bisect import ABORT, BAD, GOOD, SKIP, verdict


def check(outcome: str, phase: str = "", kernel_fault: bool = False) -> dict[str, Any]:
    return {
        "name": f"test_x[{outcome}]",
        "outcome": outcome,
        "message": "msg",
        "phase": phase,
        "kernel_fault": kernel_fault,
    }


def summary(*checks: dict[str, Any]) -> dict[str, Any]:
    return {"checks": list(checks)}


def test_all_passed_is_good() -> None:
    assert verdict(0, summary(check("passed"), check("passed")))[0] == GOOD


def test_a_failed_check_is_bad() -> None:
    assert verdict(1, summary(check("passed"), check("failed")))[0] == BAD


def test_a_kernel_panic_is_bad() -> None:
    crashed = check("error", phase="run", kernel_fault=True)
    assert verdict(1, summary(check("passed"), crashed))[0] == BAD


def test_a_tree_that_does_not_build_is_skipped_even_if_others_failed() -> None:
    build = check("error", phase="build")
    assert verdict(1, summary(check("failed"), build))[0] == SKIP


def test_qemu_failing_by_itself_is_skipped() -> None:
    qemu = check("error", phase="boot", kernel_fault=False)
    code, why = verdict(1, summary(check("passed"), qemu))
    assert code == SKIP and "could not run" in why


def test_a_missing_tool_is_skipped() -> None:
    assert verdict(1, summary(check("error", phase="setup")))[0] == SKIP


def test_an_unusable_lab_host_is_skipped() -> None:
    unreachable = check("error", phase="remote")
    code, why = verdict(1, summary(unreachable))
    assert code == SKIP and "remote failed" in why


def test_an_empty_selection_aborts_the_bisect() -> None:
    assert verdict(5, None)[0] == ABORT


def test_an_interrupt_aborts_the_bisect() -> None:
    assert verdict(2, summary())[0] == ABORT


def test_only_skipped_checks_skip_the_commit() -> None:
    assert verdict(0, summary(check("skipped")))[0] == SKIP


def test_no_summary_skips() -> None:
    assert verdict(1, None)[0] == SKIP
