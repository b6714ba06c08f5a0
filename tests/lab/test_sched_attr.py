"""The sched_attr follow-up: the hook also gets the scheduling attributes.

A policy can now refuse what it could not see before: SCHED_FIFO at
priority 99, whichever syscall asks for it, while ordinary changes pass.
The test LSM's rule "deny_rt_above 50" stands for such a policy.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.checks import TestLsm, run_program
from lab.console import BootedGuest
from lab.kbuild import KernelImage
from lab.ktap import KtapReport

SCHED_FIFO, SCHED_BATCH, SCHED_DEADLINE = 1, 3, 6


@pytest.fixture
def rt_limited(guest: BootedGuest, kernel: KernelImage) -> Iterator[TestLsm]:
    """The test LSM with 'deny SCHED_FIFO/RR above priority 50' in force."""
    lsm = TestLsm(guest, kernel).require_attr()
    lsm.clear()
    lsm.deny_rt_above(50)
    yield lsm
    if guest.alive:
        lsm.allow_all()


@pytest.mark.parametrize("syscall", ["setattr", "setscheduler"])
def test_fifo_99_is_denied_by_rule_and_policy_unchanged(
    guest: BootedGuest,
    rt_limited: TestLsm,
    syscall: str,
    ktap_reports: list[KtapReport],
) -> None:
    """sched_setattr() and sched_setscheduler() to SCHED_FIFO 99 both fail
    with the LSM's EACCES, and the task keeps SCHED_OTHER."""
    run = run_program(
        guest,
        f"setattr --use {syscall} --policy fifo --priority 99 --expect-errno EACCES",
        reports=ktap_reports,
    )

    run.assert_ok()
    assert run.fact("policy_after") == "other"
    calls = rt_limited.records(caller=run.pid)
    assert len(calls) == 1 and calls[0].ret == -13, calls
    assert calls[0].attrs is not None
    assert (calls[0].attrs["policy"], calls[0].attrs["prio"]) == (SCHED_FIFO, 99)


def test_fifo_below_the_limit_passes_with_its_attributes_recorded(
    guest: BootedGuest, rt_limited: TestLsm, ktap_reports: list[KtapReport]
) -> None:
    """SCHED_FIFO 10 is under the limit: allowed, and the hook saw policy 1
    at priority 10 exactly as requested."""
    run = run_program(
        guest,
        "setattr --policy fifo --priority 10 --expect-errno 0",
        reports=ktap_reports,
    )

    run.assert_ok()
    (call,) = rt_limited.records(caller=run.pid)
    assert call.ret == 0 and call.mask == "none"
    assert call.attrs is not None
    assert (call.attrs["policy"], call.attrs["prio"]) == (SCHED_FIFO, 10)


def test_batch_with_nice_passes_under_the_rt_rule(
    guest: BootedGuest, rt_limited: TestLsm, ktap_reports: list[KtapReport]
) -> None:
    """SCHED_BATCH with nice 5 is no real-time request: allowed, and the
    nice value arrives in the attributes."""
    run = run_program(
        guest, "setattr --policy batch --nice 5 --expect-errno 0", reports=ktap_reports
    )

    run.assert_ok()
    (call,) = rt_limited.records(caller=run.pid)
    assert call.ret == 0 and call.attrs is not None
    assert (call.attrs["policy"], call.attrs["nice"]) == (SCHED_BATCH, 5)


def test_sched_deadline_parameters_arrive_intact(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """SCHED_DEADLINE runtime/deadline/period reach the hook unchanged."""
    lsm = TestLsm(guest, kernel).require_attr()
    lsm.clear()
    runtime, deadline, period = 10_000_000, 30_000_000, 100_000_000

    run = run_program(
        guest,
        f"setattr --policy deadline --runtime {runtime} --deadline {deadline} "
        f"--period {period} --expect-errno 0",
        reports=ktap_reports,
    )

    run.assert_ok()
    (call,) = lsm.records(caller=run.pid)
    assert call.attrs is not None
    got = [call.attrs[k] for k in ("policy", "runtime", "deadline", "period")]
    assert got == [SCHED_DEADLINE, runtime, deadline, period]


def test_affinity_change_passes_no_attributes(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """The converse: an affinity change carries a mask and no attributes."""
    lsm = TestLsm(guest, kernel).require_attr()
    lsm.clear()

    run = run_program(guest, "affinity --mask 0 --expect-errno 0", reports=ktap_reports)

    run.assert_ok()
    (call,) = lsm.records(caller=run.pid)
    assert (call.mask, call.attr) == ("0", "none")
