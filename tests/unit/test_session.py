"""LabRun's timeouts: TCG runs guest code slower, so every wait grows."""

from __future__ import annotations

from pathlib import Path

from lab.arches import X86_64
from lab.qemu import AccelChoice
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


def test_ssh_transport_is_unavailable_on_mips_with_the_reason(tmp_path: Path) -> None:
    ssh_run = LabRun(LabOptions(transport="ssh", cache=tmp_path, results=tmp_path))
    console_run = LabRun(LabOptions(cache=tmp_path, results=tmp_path))

    assert ssh_run.transport_unavailable("x86_64") == ""
    assert "big-endian" in ssh_run.transport_unavailable("mips")
    assert console_run.transport_unavailable("mips") == ""
