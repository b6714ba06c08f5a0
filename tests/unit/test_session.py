"""LabRun: timeouts (TCG runs guest code slower, so every wait grows), the
host its QEMU runs on, and boot variants (a second kernel command line,
booted once and shared)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab import session
from lab.arches import X86_64
from lab.console import BootedGuest
from lab.errors import GuestError
from lab.guest import GuestBundle
from lab.kbuild import KernelImage
from lab.qemu import LOCAL_HOST, AccelChoice
from lab.remote import HostAddress, RemoteHostError
from lab.session import TCG_SLOWDOWN, ArchState, BootVariant, LabOptions, LabRun


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


# -- boot variants: one shared boot per variant, set up once ------------------

FAKE = Path(__file__).with_name("fake_guest.py")


def ready_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabRun:
    """A run whose x86_64 kernel, bundle and accel are known and whose
    "QEMU" is fake_guest.py (it speaks lab-init's protocol)."""
    run = run_with(tmp_path)
    state = run.state("x86_64")
    state.kernel = KernelImage(
        "x86_64",
        "k",
        tmp_path,
        tmp_path / "bzImage",
        tmp_path / "config",
        tmp_path / "build.log",
        "6.12.118",
        True,
        True,
        "test",
        0.0,
        True,
    )
    state.bundle = GuestBundle("x86_64", tmp_path, tmp_path / "initramfs")
    state.accel = AccelChoice("tcg", "test")
    monkeypatch.setattr(
        session, "qemu_argv", lambda *a, **k: [sys.executable, str(FAKE), "normal"]
    )
    return run


def variant(setup: Callable[[BootedGuest], Any]) -> BootVariant:
    return BootVariant(
        "selinux",
        lambda run, arch, kernel, base: base,
        lambda kernel: ("lsm=selinux",),
        setup,
    )


def test_variant_boots_once_and_keeps_its_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = ready_run(tmp_path, monkeypatch)
    setups: list[BootedGuest] = []
    boot = variant(lambda guest: setups.append(guest) or "loaded")

    first = run.variant_guest("x86_64", boot)
    again = run.variant_guest("x86_64", boot)
    run.close()

    assert again is first and first.setup == "loaded"
    assert setups == [first.guest]
    summary = run.results.summary()["arches"]["x86_64"]
    assert summary["boots"] == 0
    assert len(summary["variant_boot_seconds"]["selinux"]) == 1
    assert (run.results.arch_dir("x86_64") / "console.selinux.log").exists()


def test_variant_is_booted_afresh_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = ready_run(tmp_path, monkeypatch)
    boot = variant(lambda guest: None)
    first = run.variant_guest("x86_64", boot)

    with pytest.raises(GuestError, match="panic"):
        first.guest.run("panic")
    second = run.variant_guest("x86_64", boot)
    run.close()

    assert second.guest is not first.guest
    assert (run.results.arch_dir("x86_64") / "console.selinux.2.log").exists()


def test_failed_variant_setup_powers_the_guest_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = ready_run(tmp_path, monkeypatch)
    booted: list[BootedGuest] = []

    def setup(guest: BootedGuest) -> None:
        booted.append(guest)
        raise GuestError("policy load failed")

    with pytest.raises(GuestError, match="policy load failed"):
        run.variant_guest("x86_64", variant(setup))

    assert not booted[0].alive
    assert run.state("x86_64").variants == {}


def test_ssh_transport_is_unavailable_on_mips_with_the_reason(tmp_path: Path) -> None:
    ssh_run = LabRun(LabOptions(transport="ssh", cache=tmp_path, results=tmp_path))
    console_run = LabRun(LabOptions(cache=tmp_path, results=tmp_path))

    assert ssh_run.transport_unavailable("x86_64") == ""
    assert "big-endian" in ssh_run.transport_unavailable("mips")
    assert console_run.transport_unavailable("mips") == ""


def test_summary_and_junit_say_how_the_guests_ran(tmp_path: Path) -> None:
    options = LabOptions(
        cache=tmp_path / "cache",
        results=tmp_path / "results",
        transport="ssh",
    )

    run = LabRun(options)
    run.results.arch_report("x86_64")
    run.results.finish()

    summary = run.results.summary()
    assert (summary["launcher"], summary["transport"], summary["qemu_host"]) == (
        "qemu",
        "ssh",
        "local",
    )
    junit = (run.results.dir / "junit.xml").read_text()
    assert '<property name="transport" value="ssh"' in junit
    assert '<property name="qemu_host" value="local"' in junit


def test_no_ssh_to_a_guest_on_a_lab_host(tmp_path: Path) -> None:
    options = LabOptions(
        cache=tmp_path / "cache",
        results=tmp_path / "results",
        lab_host=HostAddress("root", "127.0.0.1", 2222),
    )

    reason = LabRun(options).ssh_unavailable("x86_64")

    assert "--lab-host root@127.0.0.1:2222" in reason
