"""BootedGuest against fake_guest.py, a script that speaks lab-init's protocol.

Nothing here starts QEMU: the fake prints what lab-init and the kernel
would print on the serial console, so every wait of the console can be
driven to a clean answer, a crash, a hang or QEMU's exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import console
from lab.console import RESENDS, BootedGuest, Timeouts, command_output
from lab.errors import BootError, GuestError

FAKE = Path(__file__).with_name("fake_guest.py")
QUICK = Timeouts(boot=10.0, command=10.0, poweroff=5.0)

# make_guest(mode="normal", timeouts=QUICK): a guest on the fake, not booted.
MakeGuest = Callable[..., BootedGuest]


@pytest.fixture(autouse=True)
def short_crash_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake that hangs after a crash line would otherwise be read for 3 s.
    monkeypatch.setattr(console, "CRASH_TRACE_SECONDS", 0.3)


@pytest.fixture
def make_guest(tmp_path: Path) -> Iterator[MakeGuest]:
    made: list[BootedGuest] = []

    def make(mode: str = "normal", timeouts: Timeouts = QUICK) -> BootedGuest:
        guest = BootedGuest(
            argv=[sys.executable, str(FAKE), mode],
            console_log=tmp_path / "results" / f"console.{len(made) + 1}.log",
            program_dir="/bin",
            timeouts=timeouts,
        )
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.kill()


@pytest.fixture
def guest(make_guest: MakeGuest) -> BootedGuest:
    booted = make_guest()
    booted.boot()
    return booted


def test_boot_returns_time_and_sets_release_and_machine(make_guest: MakeGuest) -> None:
    guest = make_guest()

    seconds = guest.boot()

    assert 0 < seconds < QUICK.boot
    assert guest.boot_seconds == seconds
    assert guest.release == "6.12.118"
    assert guest.machine == "x86_64"
    assert guest.alive


def test_ready_line_split_by_a_kernel_message_still_boots(
    make_guest: MakeGuest,
) -> None:
    guest = make_guest("ready-split")

    guest.boot()

    assert (guest.release, guest.machine) == ("6.12.118", "x86_64")
    assert guest.run("ok").rc == 0


def test_command_returns_rc_and_output_without_markers(guest: BootedGuest) -> None:
    result = guest.run("ok")

    assert result.rc == 0
    assert result.command == "run /bin/ok"
    assert result.output == "KTAP version 1\n1..1\n# pid: 57\nok 1 affinity is 0\n"
    assert "@@LAB" not in result.output
    assert result.warnings == []


def test_nonzero_rc_is_returned_not_raised(guest: BootedGuest) -> None:
    result = guest.run("exit3")

    assert result.rc == 3
    assert result.output == "affinity: bad argument --frob\n"
    assert guest.alive


def test_consecutive_commands_get_their_own_output(guest: BootedGuest) -> None:
    first = guest.cat("/sys/kernel/security/lsm")
    second = guest.run("ok", cgroup="/sys/fs/cgroup/lab1")

    assert first == "lockdown,capability,yama,smack,selinux,labtest,bpf\n"
    assert second.command == "runcg /sys/fs/cgroup/lab1 /bin/ok"
    assert second.output.startswith("KTAP version 1\n")


def test_lost_line_is_sent_again_and_run_once(
    guest: BootedGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BootedGuest, "_nudge", 0.5)

    lost = guest.run("lost")
    after = guest.run("ok")

    assert (lost.rc, lost.output.splitlines()[-1]) == (0, "ok 1 taken the second time")
    assert lost.seconds >= 0.5
    # The copy sent again ran once: the next command gets its own output.
    assert "SEEN" not in after.output and "taken" not in after.output
    assert guest.console_log.read_text().count("taken the second time") == 1


def test_line_taken_late_is_not_run_twice(
    guest: BootedGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BootedGuest, "_nudge", 0.3)

    late = guest.run("late")
    after = guest.run("ok")

    assert (late.rc, late.output.splitlines()[-1]) == (0, "ok 1 late but once")
    assert after.rc == 0 and "late" not in after.output
    log = guest.console_log.read_text()
    # Sent again twice (0.3 s, 0.6 s), and each copy answered "seen", not run.
    assert log.count("late but once") == 1
    assert log.count("@@LAB:SEEN ") == RESENDS == 2


def test_stalled_console_output_is_woken_by_an_empty_line(
    guest: BootedGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BootedGuest, "_nudge", 0.3)

    result = guest.run("stuck-tx")
    after = guest.run("ok")

    assert (result.rc, result.output.splitlines()[-1]) == (
        0,
        "ok 1 sent after the wake-up",
    )
    assert after.rc == 0


def test_end_marker_split_by_a_kernel_message_still_ends_the_command(
    guest: BootedGuest,
) -> None:
    result = guest.run("split-end", timeout=5)

    assert result.rc == 3
    assert result.output.splitlines()[-1] == "ok 1 done"
    assert "clocksource" not in result.output


def test_qemu_killed_by_a_signal_says_which(guest: BootedGuest) -> None:
    with pytest.raises(GuestError) as caught:
        guest.run("sigkill")

    assert "QEMU exited (killed by signal 9 (SIGKILL))" in caught.value.message
    assert not caught.value.kernel_fault


def test_panic_raises_guest_error_with_panic_in_tail(guest: BootedGuest) -> None:
    with pytest.raises(GuestError) as caught:
        guest.run("panic")

    err = caught.value
    assert "kernel panic" in err.message
    assert "Kernel panic - not syncing: sysrq triggered crash" in err.message
    assert "Kernel panic - not syncing: sysrq triggered crash" in err.tail
    assert err.log == guest.console_log
    assert err.kernel_fault is True
    assert not guest.alive
    assert guest.crashed is not None and guest.crashed.startswith("kernel panic")


def test_oops_is_reported_as_oops(guest: BootedGuest) -> None:
    with pytest.raises(GuestError) as caught:
        guest.run("oops")

    assert caught.value.message.startswith("oops during command 'run /bin/oops'")
    assert "BUG: kernel NULL pointer dereference" in caught.value.message
    assert not guest.alive


def test_command_after_crash_refuses_at_once(guest: BootedGuest) -> None:
    with pytest.raises(GuestError):
        guest.run("panic")

    with pytest.raises(GuestError) as caught:
        guest.run("ok")

    assert "guest is not running (kernel panic" in caught.value.message


def test_hang_raises_guest_hang(make_guest: MakeGuest) -> None:
    guest = make_guest(timeouts=Timeouts(boot=10.0, command=0.3, poweroff=1.0))
    guest.boot()

    with pytest.raises(GuestError) as caught:
        guest.run("hang")

    assert "guest hang" in caught.value.message
    assert "# stalling_for: -1" in caught.value.tail
    assert caught.value.kernel_fault is True
    assert not guest.alive


def test_command_timeout_overrides_the_default(guest: BootedGuest) -> None:
    with pytest.raises(GuestError) as caught:
        guest.run("hang", timeout=0.3)

    assert "guest hang" in caught.value.message


def test_qemu_exit_during_command_raises_qemu_exited(guest: BootedGuest) -> None:
    with pytest.raises(GuestError) as caught:
        guest.run("quit")

    assert "QEMU exited (status 7" in caught.value.message
    assert caught.value.kernel_fault is False
    assert not guest.alive
    assert guest.exit_status == 7


def test_guest_reset_during_command_is_the_kernels_fault(guest: BootedGuest) -> None:
    """-no-reboot turns a reset (a triple fault) into QEMU exiting 0."""
    with pytest.raises(GuestError) as caught:
        guest.run("reset")

    assert "QEMU exited (status 0" in caught.value.message
    assert caught.value.kernel_fault is True


def test_warning_lands_in_result_and_guest(guest: BootedGuest) -> None:
    line = "WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40"

    result = guest.run("warn")
    guest.run("ok")

    assert result.rc == 0
    assert result.warnings == [line]
    assert guest.warnings == [line]
    assert guest.alive


def test_warning_printed_after_the_end_marker_is_not_lost(guest: BootedGuest) -> None:
    """The kernel's printk and lab-init's stdout share the console: a WARNING
    caused by one command may come out just after its end marker."""
    guest.run("late-warn")
    guest.run("ok")

    assert guest.warnings == [
        "WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40"
    ]


def test_poweroff_ends_the_process(guest: BootedGuest) -> None:
    guest.poweroff()

    assert not guest.alive
    assert guest.exit_status == 0
    assert "reboot: Power down" in guest.console_log.read_text()


def test_console_goes_to_its_own_file(guest: BootedGuest) -> None:
    guest.run("ok")
    guest.poweroff()

    text = guest.console_log.read_text()
    assert "Run /init as init process" in text
    assert "@@LAB:READY 6.12.118 x86_64@@" in text
    assert "ok 1 affinity is 0" in text


def test_panic_during_boot_raises_boot_error(make_guest: MakeGuest) -> None:
    guest = make_guest("boot-panic")

    with pytest.raises(BootError) as caught:
        guest.boot()

    assert "kernel panic during boot" in caught.value.message
    assert "sysrq triggered crash" in caught.value.tail


def test_qemu_exit_during_boot_raises_boot_error(make_guest: MakeGuest) -> None:
    guest = make_guest("boot-exit")

    with pytest.raises(BootError) as caught:
        guest.boot()

    assert caught.value.message.startswith("QEMU exited (status 1")
    assert caught.value.message.endswith("during boot")


def test_no_ready_marker_in_time_is_a_boot_hang(make_guest: MakeGuest) -> None:
    guest = make_guest("boot-hang", Timeouts(boot=0.3, command=1.0, poweroff=1.0))

    with pytest.raises(BootError) as caught:
        guest.boot()

    assert "guest hang" in caught.value.message
    assert "Run /init as init process" in caught.value.tail


def test_missing_qemu_binary_is_a_boot_error(tmp_path: Path) -> None:
    guest = BootedGuest(
        argv=[str(tmp_path / "no-such-qemu")],
        console_log=tmp_path / "console.log",
        program_dir="/bin",
        timeouts=QUICK,
    )

    with pytest.raises(BootError, match="could not start"):
        guest.boot()
    guest.kill()


def test_panic_message_has_whole_line_when_console_trickles(
    guest: BootedGuest,
) -> None:
    """A UART under emulation hands over a few bytes at a time; the error
    must still name the panic's reason, not just its first words."""
    with pytest.raises(GuestError) as caught:
        guest.run("trickle-panic")

    assert "sysrq triggered crash" in caught.value.message


def test_trickled_soft_lockup_is_soft_lockup_not_oops(guest: BootedGuest) -> None:
    with pytest.raises(GuestError) as caught:
        guest.run("trickle-lockup")

    assert caught.value.message.startswith("soft lockup during"), caught.value.message


def test_kernel_message_glued_to_the_begin_marker_is_not_output() -> None:
    """Seen in CI: a late PS/2 probe message landed right after the marker."""
    raw = (
        "@@LAB:BEGIN 4@@[    1.519178] input: ImExPS/2 Generic Explorer Mouse as "
        "/devices/platform/i8042/serio1/input/input3\n\n0\n"
    )

    assert command_output(raw, 4) == "0\n"


def test_kernel_message_in_the_middle_of_a_line_is_taken_out() -> None:
    raw = "@@LAB:BEGIN 7@@\n# pid: 4[    2.000001] rcu: something\n2\nok 1 x\n"

    assert command_output(raw, 7) == "# pid: 42\nok 1 x\n"


def test_console_transport_copies_no_files_and_says_what_does(
    guest: BootedGuest, tmp_path: Path
) -> None:
    with pytest.raises(GuestError, match="file copies need --lab-transport ssh"):
        guest.put(tmp_path / "file", "/tmp/file")
    with pytest.raises(GuestError, match="file copies need --lab-transport ssh"):
        guest.get("/tmp/file", tmp_path / "file")

    assert guest.alive
    assert guest.command("cat", "/sys/kernel/security/lsm").stderr == ""
