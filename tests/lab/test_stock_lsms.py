"""The stock LSMs next to the changed hook: Smack still decides on its own.

These checks need no test LSM, so they also run (and must pass) on a
kernel without the lab's series (--lab-series none).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.checks import SECURITYFS, run_program
from lab.console import BootedGuest
from lab.ktap import KtapReport

SMACK_LOAD = "/sys/fs/smackfs/load2"
LABEL = "lab_target"


@pytest.fixture
def smack(guest: BootedGuest) -> Iterator[BootedGuest]:
    lsms = guest.cat(f"{SECURITYFS}/lsm").strip().split(",")
    assert "smack" in lsms, f"Smack is not active in this kernel (lsm: {lsms})"
    yield guest
    if guest.alive:
        guest.command("write", SMACK_LOAD, f"_ {LABEL} -")


def test_smack_rule_without_write_denies_affinity_of_another_label(
    smack: BootedGuest, ktap_reports: list[KtapReport]
) -> None:
    """A task labelled lab_target, and the rule "_ lab_target r": the
    caller (floor label "_", without CAP_MAC_OVERRIDE) may read that task
    but not write it, so Smack refuses sched_setaffinity() with EACCES and
    the affinity stays as it was."""
    smack.write(SMACK_LOAD, f"_ {LABEL} r")

    run = run_program(
        smack,
        f"affinity --target child --target-label {LABEL} --mask 0 "
        "--expect-errno EACCES --expect-affinity unchanged",
        reports=ktap_reports,
    )

    run.assert_ok()


def test_smack_rule_allowing_write_lets_the_same_call_pass(
    smack: BootedGuest, ktap_reports: list[KtapReport]
) -> None:
    """The control: with the rule "_ lab_target rw" the call succeeds."""
    smack.write(SMACK_LOAD, f"_ {LABEL} rw")

    run = run_program(
        smack,
        f"affinity --target child --target-label {LABEL} --mask 0 "
        "--expect-errno 0 --expect-affinity 0",
        reports=ktap_reports,
    )

    run.assert_ok()
