"""find_crash / find_warnings on golden console logs of a 6.12 x86_64 guest."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from lab import patterns
from lab.patterns import find_crash, find_warnings


def test_clean_boot_and_run_has_no_crash_and_no_warning(
    golden: Callable[[str], str],
) -> None:
    text = golden("clean_boot")

    assert find_crash(text) is None
    assert find_warnings(text) == []


def test_sysrq_panic_is_kernel_panic(golden: Callable[[str], str]) -> None:
    assert find_crash(golden("panic")) == (
        "kernel panic",
        "Kernel panic - not syncing: sysrq triggered crash",
    )


def test_oops_is_reported_before_the_panic_that_follows_it(
    golden: Callable[[str], str],
) -> None:
    assert find_crash(golden("oops")) == (
        "oops",
        "BUG: kernel NULL pointer dereference, address: 0000000000000000",
    )


def test_oops_line_alone_is_an_oops() -> None:
    text = "[    7.205061] Oops: 0002 [#1] SMP\n"

    assert find_crash(text) == ("oops", "Oops: 0002 [#1] SMP")


def test_warning_is_not_a_crash_but_is_found(golden: Callable[[str], str]) -> None:
    text = golden("warning")

    assert find_crash(text) is None
    assert find_warnings(text) == [
        "WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40"
    ]


def test_soft_lockup_is_soft_lockup_not_oops(golden: Callable[[str], str]) -> None:
    assert find_crash(golden("soft_lockup")) == (
        "soft lockup",
        "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [stall:60]",
    )


def test_rcu_stall_is_rcu_stall(golden: Callable[[str], str]) -> None:
    assert find_crash(golden("rcu_stall")) == (
        "rcu stall",
        "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    )


def test_init_death_is_named_init_died(golden: Callable[[str], str]) -> None:
    """The panic line of a dying init is the only place "Attempted to kill
    init!" appears; the lab names that crash "init died"."""
    found = find_crash(golden("init_died"))

    assert found is not None
    assert found[0] == "init died"
    assert "Attempted to kill init! exitcode=0x00000009" in found[1]


@pytest.mark.parametrize("name", ["panic", "oops", "soft_lockup", "rcu_stall"])
def test_serial_line_endings_do_not_leak_into_the_line(
    golden: Callable[[str], str], name: str
) -> None:
    lf = find_crash(golden(name))
    crlf = find_crash(golden(name).replace("\n", "\r\n").encode())

    assert crlf is not None and crlf == lf
    assert "\r" not in crlf[1]


def test_two_warnings_are_found_in_order() -> None:
    text = (
        "[    9.310002] WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 "
        "foo+0x12/0x40\r\n"
        "[    9.410002] WARNING: CPU: 0 PID: 58 at mm/slub.c:99 bar+0x1/0x8\r\n"
    )

    assert find_warnings(text.encode()) == [
        "WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40",
        "WARNING: CPU: 0 PID: 58 at mm/slub.c:99 bar+0x1/0x8",
    ]


def test_panic_line_as_it_reaches_pexpect_through_two_ttys() -> None:
    """The guest's tty and pexpect's pty each turn \\n into \\r\\n."""
    console = b"[    5.713273] Kernel panic - not syncing: sysrq triggered crash\r\r\n"

    assert find_crash(console) == (
        "kernel panic",
        "Kernel panic - not syncing: sysrq triggered crash",
    )


@pytest.mark.parametrize(
    "text",
    [
        b"@@LAB:END 20 rc=0@@",
        b"@@LAB:END 20 rc=[    2.079299] clocksource: Switched to clocksource"
        b" tsc\r\r\n0@@",
        b"@@LAB:E[    2.0] x\r\nND 20 rc=0@@",
        b"@@LAB:END 20 rc=0@[    3.1] y\r\n@",
    ],
)
def test_end_marker_matches_with_a_kernel_message_inside(text: bytes) -> None:
    found = re.search(patterns.end_of(20), text)

    assert found is not None and found.group("rc") == b"0"


def test_end_marker_of_another_command_does_not_match() -> None:
    assert re.search(patterns.end_of(20), b"@@LAB:END 201 rc=0@@") is None
    assert re.search(patterns.begin_of(7), b"@@LAB:BEGIN 77@@") is None
