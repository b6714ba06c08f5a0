"""The lab itself on a real guest: crashes and hangs are caught, explained
with the console tail, and the next check gets a fresh boot."""

from __future__ import annotations

import pytest

from lab.checks import run_program
from lab.console import BootedGuest
from lab.errors import GuestError
from lab.session import LabRun

pytestmark = [pytest.mark.selftest, pytest.mark.dirties_guest]


def test_guest_panic_fails_with_console_tail_then_next_check_boots_afresh(
    lab_run: LabRun, lab_arch: str, guest: BootedGuest
) -> None:
    boots = len(lab_run.state(lab_arch).boots)

    with pytest.raises(GuestError) as caught:
        guest.write("/proc/sysrq-trigger", "c")

    err = caught.value
    assert "kernel panic" in err.message
    assert "sysrq" in err.tail.lower(), err.tail
    assert err.log == guest.console_log
    assert not guest.alive

    fresh = lab_run.guest(lab_arch)
    assert fresh is not guest and fresh.alive
    assert len(lab_run.state(lab_arch).boots) == boots + 1
    assert fresh.cat("/proc/sys/kernel/tainted").strip() == "0"


def test_guest_hang_is_detected_then_next_check_boots_afresh(
    lab_run: LabRun, lab_arch: str, guest: BootedGuest
) -> None:

    with pytest.raises(GuestError) as caught:
        guest.command("run", guest.program("stall"), timeout=3)

    assert "guest hang" in caught.value.message
    assert "stalling_for: -1" in caught.value.tail
    assert not guest.alive

    fresh = lab_run.guest(lab_arch)
    run = run_program(fresh, "stall", "0")
    assert run.fact("stalling_for") == "0"
