"""qemu_argv for x86_64, and choose_accel's probe, fallback and memo."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lab import qemu
from lab.arches import MIPS, X86_64
from lab.cache import LabCache
from lab.errors import AccelUnavailable
from lab.progress import Progress

IMAGE = Path("/cache/kernels/x86_64-0123456789abcdef/bzImage")
INITRAMFS = Path("/cache/guest/x86_64-fedcba9876543210/initramfs.cpio.gz")


def option(argv: list[str], name: str) -> str:
    """The value that follows an option; fails if the option is not there once."""
    assert argv.count(name) == 1, argv
    return argv[argv.index(name) + 1]


def test_tcg_argv_uses_qemu64_and_tcg() -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "tcg")

    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-accel") == "tcg"
    assert option(argv, "-cpu") == "qemu64"
    assert option(argv, "-M") == "pc"
    assert option(argv, "-smp") == "2"
    assert option(argv, "-m") == "256"
    assert option(argv, "-kernel") == str(IMAGE)
    assert option(argv, "-initrd") == str(INITRAMFS)


def test_kvm_argv_uses_host_cpu_and_kvm() -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "kvm")

    assert option(argv, "-accel") == "kvm"
    assert option(argv, "-cpu") == "host"


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_panic_ends_qemu_instead_of_rebooting(accel: str) -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, accel)

    assert "-no-reboot" in argv
    append = option(argv, "-append").split()
    assert "console=ttyS0" in append
    assert "panic=-1" in append


def test_console_chardev_does_not_turn_ctrl_c_into_a_signal() -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "tcg")

    chardev = option(argv, "-chardev").split(",")
    assert chardev[0] == "stdio"
    assert "signal=off" in chardev
    chardev_id = next(p for p in chardev if p.startswith("id=")).removeprefix("id=")
    assert option(argv, "-serial") == f"chardev:{chardev_id}"


def test_extra_cmdline_is_appended() -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "tcg", ("lsm.debug", "quiet"))

    # After the console, panic=-1 and the arch's own options.
    append = option(argv, "-append")
    assert append.startswith("console=ttyS0 panic=-1 ")
    assert append.endswith(" lsm.debug quiet")
    assert all(opt in append.split() for opt in X86_64.cmdline)


class ProbeCounter:
    """A probe_kvm stand-in that answers a fixed result and counts its calls."""

    def __init__(self, works: bool, reason: str) -> None:
        self.answer = (works, reason)
        self.calls = 0

    def __call__(self, arch: object, image: Path, initramfs: Path) -> tuple[bool, str]:
        self.calls += 1
        return self.answer


@pytest.fixture
def kvm_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/kvm is there and opens; the host's identity is fixed."""
    monkeypatch.setattr(qemu, "kvm_precondition", lambda arch: None)
    monkeypatch.setattr(
        qemu, "host_identity", lambda arch: "x86_64|6.12|cpu|qemu 9|kvm"
    )


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the KVM probe must not run")

    monkeypatch.setattr(qemu, "probe_kvm", refuse)
    monkeypatch.setattr(qemu, "kvm_precondition", refuse)


def choose(requested: str, cache: LabCache, progress: Progress) -> qemu.AccelChoice:
    return qemu.choose_accel(requested, X86_64, IMAGE, INITRAMFS, cache, progress)


def test_tcg_is_taken_without_a_probe(
    no_probe: None, tmp_path: Path, progress: Progress
) -> None:
    choice = choose("tcg", LabCache(tmp_path), progress)

    assert choice.accel == "tcg"


def test_unknown_accel_is_refused(tmp_path: Path, progress: Progress) -> None:
    with pytest.raises(AccelUnavailable, match="unknown accelerator 'hvf'"):
        choose("hvf", LabCache(tmp_path), progress)


def test_kvm_insists_when_kvm_cannot_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, progress: Progress
) -> None:
    monkeypatch.setattr(
        qemu, "kvm_precondition", lambda arch: "/dev/kvm does not exist"
    )
    probe = ProbeCounter(True, "never asked")
    monkeypatch.setattr(qemu, "probe_kvm", probe)

    with pytest.raises(AccelUnavailable) as caught:
        choose("kvm", LabCache(tmp_path), progress)

    assert "/dev/kvm does not exist" in caught.value.message
    assert probe.calls == 0


def test_kvm_is_refused_when_the_probe_boot_fails(
    kvm_usable: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    progress: Progress,
) -> None:
    monkeypatch.setattr(qemu, "probe_kvm", ProbeCounter(False, "probe boot hung"))

    with pytest.raises(AccelUnavailable, match="probe boot hung"):
        choose("kvm", LabCache(tmp_path), progress)


def test_auto_takes_kvm_when_the_probe_boots(
    kvm_usable: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    progress: Progress,
) -> None:
    monkeypatch.setattr(qemu, "probe_kvm", ProbeCounter(True, "reached lab-init"))

    choice = choose("auto", LabCache(tmp_path), progress)

    assert choice == qemu.AccelChoice("kvm", "reached lab-init")


def test_auto_falls_back_to_tcg_and_remembers_the_probe(
    kvm_usable: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probe = ProbeCounter(False, "a probe boot under KVM failed (guest hang)")
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    shown: list[str] = []
    progress = Progress(write=shown.append, tty=False)
    cache = LabCache(tmp_path)

    first = choose("auto", cache, progress)
    second = choose("auto", cache, progress)

    assert first.accel == second.accel == "tcg"
    assert first.reason == "a probe boot under KVM failed (guest hang)"
    assert second.reason.endswith("(cached probe)")
    assert probe.calls == 1
    assert sum("WARNING: accel x86_64: using TCG" in line for line in shown) == 2


def test_probe_memo_survives_a_new_cache_object(
    kvm_usable: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    progress: Progress,
) -> None:
    probe = ProbeCounter(False, "probe boot hung")
    monkeypatch.setattr(qemu, "probe_kvm", probe)

    choose("auto", LabCache(tmp_path), progress)
    choose("auto", LabCache(tmp_path), progress)

    assert probe.calls == 1


def test_probe_runs_again_on_another_host_identity(
    kvm_usable: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    progress: Progress,
) -> None:
    probe = ProbeCounter(False, "probe boot hung")
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    cache = LabCache(tmp_path)

    choose("auto", cache, progress)
    monkeypatch.setattr(
        qemu, "host_identity", lambda arch: "x86_64|6.13|cpu|qemu 9|kvm"
    )
    choose("auto", cache, progress)

    assert probe.calls == 2


def test_auto_without_kvm_falls_back_without_probing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        qemu, "kvm_precondition", lambda arch: "/dev/kvm does not exist"
    )
    probe = ProbeCounter(True, "never asked")
    monkeypatch.setattr(qemu, "probe_kvm", probe)
    shown: list[str] = []

    choice = choose("auto", LabCache(tmp_path), Progress(write=shown.append, tty=False))

    assert choice == qemu.AccelChoice("tcg", "/dev/kvm does not exist")
    assert probe.calls == 0
    assert shown == [
        "[lab] WARNING: accel x86_64: using TCG, not KVM: /dev/kvm does not exist\n"
    ]


def test_kvm_needs_a_matching_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu.platform, "machine", lambda: "aarch64")

    reason = qemu.kvm_precondition(X86_64)

    assert reason == "a x86_64 guest cannot use KVM on a aarch64 host"


def test_arch_without_kvm_host_never_uses_kvm() -> None:
    reason = qemu.kvm_precondition(replace(X86_64, name="mips", kvm_host=None))

    assert reason is not None and "mips guest cannot use KVM" in reason


def test_malta_runs_on_one_tcg_thread() -> None:
    argv = qemu.qemu_argv(MIPS, IMAGE, INITRAMFS, "tcg")

    assert option(argv, "-accel") == "tcg,thread=single"
