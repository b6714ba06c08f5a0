"""QEMU command lines, the host QEMU runs on, and the choice between KVM
and TCG.

KVM is used only where it really runs a guest: a host may have a /dev/kvm
under which a kernel never boots (a software nested hypervisor). The
probe boots the lab's own kernel under KVM once per host (this one, or
the --lab-host of lab/remote.py) and remembers the answer in the cache;
`auto` falls back to TCG with the reason logged.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lab.arches import Arch
from lab.cache import LabCache
from lab.console import BootedGuest, Timeouts
from lab.errors import AccelUnavailable, LabError, ToolMissing
from lab.progress import Progress

log = logging.getLogger(__name__)

ACCELS = ("auto", "kvm", "tcg")
PROBE_TIMEOUT = 30.0
# QEMU's user-mode network as the SSH transport uses it: the guest's
# address (lab-init sets it on eth0, see guest/lab-init.c) and its net.
GUEST_NET = "10.0.2.0/24"
GUEST_ADDRESS = "10.0.2.15"
GUEST_SSH_PORT = 22


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def kernel_cmdline(arch: Arch, extra: tuple[str, ...] = ()) -> str:
    """The guest's command line: console, panic ends QEMU, the arch's extras."""
    parts = [f"console={arch.console}", "panic=-1", *arch.cmdline, *extra]
    return " ".join(parts)


def ssh_network(host_port: int) -> tuple[list[str], tuple[str, ...]]:
    """QEMU options and kernel parameters for the SSH transport: a virtio
    NIC on the user-mode network, 127.0.0.1:host_port forwarded to the
    guest's sshd, and lab-init told to bring eth0 up and start sshd.

    restrict=on: the guest reaches neither the host nor beyond; only the
    forward (which QEMU binds on 127.0.0.1 alone) comes in. romfile=: no
    PXE option ROM to look for.
    """
    prefix = GUEST_NET.rsplit("/", 1)[1]
    netdev = (
        f"user,id=lab0,net={GUEST_NET},restrict=on,"
        f"hostfwd=tcp:127.0.0.1:{host_port}-{GUEST_ADDRESS}:{GUEST_SSH_PORT}"
    )
    options = [
        "-netdev",
        netdev,
        "-device",
        "virtio-net-pci,netdev=lab0,romfile=",
    ]
    return options, (f"lab.ip={GUEST_ADDRESS}/{prefix}", "lab.sshd=1")


def qemu_argv(
    arch: Arch,
    image: Path,
    initramfs: Path,
    accel: str,
    extra_cmdline: tuple[str, ...] = (),
    ssh_port: int | None = None,
) -> list[str]:
    """The full QEMU command for a plain boot with the lab's initramfs;
    with ssh_port, the network of the SSH transport too."""
    cpu = arch.cpu_kvm if accel == "kvm" and arch.cpu_kvm else arch.cpu_tcg
    network: list[str] = []
    if ssh_port is not None:
        network, ssh_cmdline = ssh_network(ssh_port)
        extra_cmdline = (*extra_cmdline, *ssh_cmdline)
        if accel == "tcg" and arch.tcg_rng_flag:
            # sshd waits in getrandom() until the kernel's RNG is seeded:
            # 1.5 s after lab-init under TCG, at once with the CPU's RNG.
            cpu += arch.tcg_rng_flag
    return [
        arch.qemu,
        "-M",
        arch.machine,
        "-accel",
        arch.tcg_accel if accel == "tcg" else accel,
        "-cpu",
        cpu,
        "-smp",
        str(arch.smp),
        "-m",
        str(arch.memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        # signal=off: a ^C on the console is the guest's, not QEMU's.
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-kernel",
        str(image),
        "-initrd",
        str(initramfs),
        "-append",
        kernel_cmdline(arch, extra_cmdline),
        *network,
        *arch.qemu_extra,
    ]


def require_qemu(arch: Arch) -> str:
    path = shutil.which(arch.qemu)
    if path is None:
        raise ToolMissing(
            f"{arch.qemu} not found; install it: apt-get install {arch.packages[0]}"
        )
    return path


def qemu_version(arch: Arch) -> str:
    out = subprocess.run([arch.qemu, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def host_identity(arch: Arch) -> str:
    """What decides whether KVM works here: kernel, CPU, QEMU, KVM modules."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    modules = ""
    try:
        modules = ",".join(
            sorted(
                line.split()[0]
                for line in Path("/proc/modules").read_text().splitlines()
                if line.startswith("kvm")
            )
        )
    except OSError:
        pass
    return "|".join((arch.name, platform.release(), model, qemu_version(arch), modules))


def kvm_precondition(arch: Arch) -> str | None:
    """Why KVM cannot work at all for this arch here, or None."""
    if arch.kvm_host is None or platform.machine() != arch.kvm_host:
        return f"a {arch.name} guest cannot use KVM on a {platform.machine()} host"
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as err:
        return f"/dev/kvm cannot be opened: {err.strerror}"
    return None


def probe_kvm(
    arch: Arch, image: Path, initramfs: Path, host: QemuHost | None = None
) -> tuple[bool, str]:
    """Boot the lab's kernel under KVM on the host: does it reach lab-init?"""
    host = host or LOCAL_HOST
    with tempfile.TemporaryDirectory(prefix="kernel-lab-kvm-probe.") as tmp:
        console_log = Path(tmp) / "console.log"
        guest = host.guest(
            qemu_argv(arch, image, initramfs, "kvm"),
            console_log,
            "/bin",
            Timeouts(boot=PROBE_TIMEOUT, poweroff=5.0),
        )
        try:
            guest.boot()
        except LabError as err:
            lines = [
                ln
                for ln in console_log.read_text(errors="replace").splitlines()
                if ln.strip()
            ]
            last = lines[-1].strip() if lines else "no console output"
            return (
                False,
                f"a probe boot under KVM failed ({err.message}; last line: {last})",
            )
        finally:
            guest.poweroff()
    return True, "a probe boot under KVM reached lab-init"


class QemuHost(Protocol):
    """Where QEMU runs: this machine, or a --lab-host (lab/remote.py)."""

    name: str

    def machine(self) -> str: ...

    def require_qemu(self, arch: Arch) -> None: ...

    def kvm_precondition(self, arch: Arch) -> str | None: ...

    def identity(self, arch: Arch) -> str: ...

    def probe_kvm(
        self, arch: Arch, image: Path, initramfs: Path
    ) -> tuple[bool, str]: ...

    def guest(
        self, argv: list[str], console_log: Path, program_dir: str, timeouts: Timeouts
    ) -> BootedGuest:
        """A guest (not booted yet) whose QEMU runs on this host."""
        ...

    def close(self) -> None: ...


class LocalHost:
    """QEMU on this machine, through the module's functions."""

    name = "this host"

    def machine(self) -> str:
        return platform.machine()

    def require_qemu(self, arch: Arch) -> None:
        require_qemu(arch)

    def kvm_precondition(self, arch: Arch) -> str | None:
        return kvm_precondition(arch)

    def identity(self, arch: Arch) -> str:
        return host_identity(arch)

    def probe_kvm(self, arch: Arch, image: Path, initramfs: Path) -> tuple[bool, str]:
        return probe_kvm(arch, image, initramfs)

    def guest(
        self, argv: list[str], console_log: Path, program_dir: str, timeouts: Timeouts
    ) -> BootedGuest:
        return BootedGuest(argv, console_log, program_dir, timeouts)

    def close(self) -> None:
        pass


LOCAL_HOST = LocalHost()


def choose_accel(
    requested: str,
    arch: Arch,
    image: Path,
    initramfs: Path,
    cache: LabCache,
    progress: Progress,
    host: QemuHost = LOCAL_HOST,
) -> AccelChoice:
    """KVM or TCG for this arch on the host, as asked: auto probes, kvm
    insists. The probe's answer is cached per host identity."""
    if requested not in ACCELS:
        raise AccelUnavailable(
            f"unknown accelerator {requested!r}; use one of {', '.join(ACCELS)}"
        )
    if requested == "tcg":
        return AccelChoice("tcg", "asked for with --lab-accel tcg")

    reason = host.kvm_precondition(arch)
    works = False
    if reason is None:
        memo_key = f"kvm-probe:{host.identity(arch)}"
        memo = cache.read_memo()
        cached = memo.get(memo_key)
        if isinstance(cached, dict):
            works, reason = (
                bool(cached["works"]),
                str(cached["reason"]) + " (cached probe)",
            )
        else:
            progress.phase(
                f"accel {arch.name}: probing KVM on {host.name} with a test boot"
            )
            works, reason = host.probe_kvm(arch, image, initramfs)
            cache.remember(memo_key, {"works": works, "reason": reason})

    if works:
        return AccelChoice("kvm", reason)
    if requested != "kvm" and arch.kvm_host != host.machine():
        # Not a fallback: KVM never runs this guest on this kind of host.
        progress.phase(f"accel {arch.name}: TCG ({reason})")
        return AccelChoice("tcg", reason)
    if requested == "kvm":
        raise AccelUnavailable(
            f"--lab-accel kvm, but KVM cannot run a {arch.name} guest on "
            f"{host.name}: {reason}"
        )
    progress.warn(f"accel {arch.name}: using TCG, not KVM: {reason}")
    return AccelChoice("tcg", reason)
