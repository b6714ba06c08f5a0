"""LabRun's timeouts (TCG runs guest code slower, so every wait grows) and
the host its QEMU runs on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lab.arches import X86_64
from lab.qemu import LOCAL_HOST, AccelChoice
from lab.remote import HostAddress, RemoteHostError
from lab.session import TCG_SLOWDOWN, ArchState, LabOptions, LabRun


def run_with(tmp_path: Path) -> LabRun:
    options = LabOptions(
        cache=tmp_path / "cache",
        results=tmp_path / "results",
        boot_timeout=60.0,
        check_timeout=30.0,
    )
    return LabRun(options)


def test_kvm_keeps_the_asked_timeouts(tmp_path: Path) -> None:
    state = ArchState(X86_64, accel=AccelChoice("kvm", "probe booted"))

    timeouts = run_with(tmp_path).timeouts(state)

    assert (timeouts.boot, timeouts.command) == (60.0, 30.0)


def test_tcg_scales_every_timeout(tmp_path: Path) -> None:
    run = run_with(tmp_path)
    kvm = run.timeouts(ArchState(X86_64, accel=AccelChoice("kvm", "")))

    tcg = run.timeouts(ArchState(X86_64, accel=AccelChoice("tcg", "no /dev/kvm")))

    assert TCG_SLOWDOWN > 1
    assert tcg.boot == kvm.boot * TCG_SLOWDOWN
    assert tcg.command == kvm.command * TCG_SLOWDOWN
    assert tcg.poweroff == kvm.poweroff * TCG_SLOWDOWN


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_without_lab_host_qemu_runs_here(tmp_path: Path) -> None:
    assert run_with(tmp_path).qemu_host is LOCAL_HOST


def test_a_lab_host_that_cannot_be_reached_fails_every_later_check_at_once(
    tmp_path: Path,
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    options = LabOptions(
        cache=tmp_path / "cache",
        results=tmp_path / "results",
        lab_host=HostAddress("root", "127.0.0.1", closed_port()),
        lab_host_known_hosts=known_hosts,
    )
    run = LabRun(options)

    with pytest.raises(RemoteHostError, match="cannot reach root@127.0.0.1") as first:
        _ = run.qemu_host
    with pytest.raises(RemoteHostError) as second:
        _ = run.qemu_host

    assert second.value is first.value
