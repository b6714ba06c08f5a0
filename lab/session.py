"""One lab run: per arch, the kernel, the guest bundle, the accelerator and
the booted guest that the checks share.

The plugin and the `lab` command both drive a LabRun. A guest is booted
once and reused; when a check leaves it crashed or hung, the next check
gets a fresh boot. Every boot writes its console log and QEMU command
into the run's results directory.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import bpf, ssh, vng
from lab.arches import Arch, get_arch
from lab.cache import LabCache
from lab.console import BootedGuest, Timeouts
from lab.errors import LabError
from lab.guest import GuestBundle, build_guest
from lab.kbuild import (
    DEFAULT_TARBALL,
    KernelImage,
    KernelSource,
    build_kernel,
    resolve_source,
)
from lab.progress import Progress
from lab.qemu import AccelChoice, choose_accel, qemu_argv, require_qemu
from lab.report import RunResults

log = logging.getLogger(__name__)

LAUNCHERS = ("qemu", "vng")
TRANSPORTS = ssh.TRANSPORTS
# TCG runs guest code many times slower than KVM; timeouts scale with it.
TCG_SLOWDOWN = 3.0


@dataclass
class LabOptions:
    """What the user chose on the command line."""

    source: KernelSource = field(
        default_factory=lambda: resolve_source(DEFAULT_TARBALL, None)
    )
    accel: str = "auto"
    launcher: str = "qemu"
    # What carries the checks' commands: the serial console, or SSH.
    transport: str = "console"
    cache: Path = Path("~/.cache/kernel-lab")
    results: Path = Path("results")
    jobs: int | None = None
    build_timeout: float = 3600.0
    boot_timeout: float = 60.0
    check_timeout: float = 30.0
    # Ends the run id: the xdist worker (gw0) under pytest -n, else "".
    run_label: str = ""


@dataclass
class ArchState:
    """What the run has for one arch so far."""

    arch: Arch
    kernel: KernelImage | None = None
    bundle: GuestBundle | None = None
    accel: AccelChoice | None = None
    guest: BootedGuest | None = None
    boots: list[float] = field(default_factory=list)
    # A failure to build or boot, kept so later checks report it at once.
    failure: LabError | None = None


class LabRun:
    """The state of one run of the lab across arches."""

    def __init__(self, options: LabOptions, progress: Progress | None = None) -> None:
        self.options = options
        self.progress = progress or Progress()
        self.cache = LabCache(options.cache)
        self.results = RunResults.create(options.results, options.run_label)
        self.source = options.source
        self.states: dict[str, ArchState] = {}

    def state(self, arch_name: str) -> ArchState:
        if arch_name not in self.states:
            self.states[arch_name] = ArchState(get_arch(arch_name))
        return self.states[arch_name]

    # -- phases ----------------------------------------------------------

    def kernel(self, arch_name: str) -> KernelImage:
        """Build (or find in the cache) the kernel for an arch, once per run."""
        state = self.state(arch_name)
        if state.failure is not None:
            raise state.failure
        if state.kernel is None:
            try:
                state.kernel = build_kernel(
                    state.arch,
                    self.source,
                    self.cache,
                    self.progress,
                    jobs=self.options.jobs,
                    timeout=self.options.build_timeout,
                )
            except LabError as err:
                state.failure = err
                self.results.add_failure(state.arch, err)
                raise
            self.results.add_kernel(state.arch, state.kernel, self.source.describe())
        return state.kernel

    def bundle(self, arch_name: str) -> GuestBundle:
        state = self.state(arch_name)
        if state.bundle is None:
            state.bundle = build_guest(state.arch, self.cache, self.progress)
        return state.bundle

    def timeouts(self, state: ArchState) -> Timeouts:
        scale = TCG_SLOWDOWN if state.accel and state.accel.accel == "tcg" else 1.0
        return Timeouts(
            boot=self.options.boot_timeout * scale,
            command=self.options.check_timeout * scale,
            poweroff=10.0 * scale,
        )

    def accel(self, arch_name: str) -> AccelChoice:
        """KVM or TCG for this arch, chosen once per run (see qemu.py)."""
        state = self.state(arch_name)
        if state.accel is None:
            kernel = self.kernel(arch_name)
            bundle = self.bundle(arch_name)
            require_qemu(state.arch)
            state.accel = choose_accel(
                self.options.accel,
                state.arch,
                kernel.image,
                bundle.initramfs,
                self.cache,
                self.progress,
            )
            self.results.set_accel(state.arch, state.accel)
        return state.accel

    def guest(self, arch_name: str) -> BootedGuest:
        """The running guest of an arch; boots one if there is none alive."""
        state = self.state(arch_name)
        if state.guest is not None and state.guest.alive:
            return state.guest
        if state.guest is not None:
            state.guest.kill()
            state.guest = None

        self.accel(arch_name)
        state.guest = self._boot(state, self.kernel(arch_name), self.bundle(arch_name))
        return state.guest

    def _boot(
        self, state: ArchState, kernel: KernelImage, bundle: GuestBundle
    ) -> BootedGuest:
        assert state.accel is not None
        number = len(state.boots) + 1
        console_log = self.results.boot_file(state.arch, "console.log", number)
        cmd_file = self.results.boot_file(state.arch, "qemu.cmd", number)
        self.progress.phase(
            f"boot {state.arch.name}: {kernel.release} under "
            f"{state.accel.accel.upper()} ({self.options.launcher}, "
            f"{self.options.transport}), boot {number}"
        )
        if self.options.launcher == "vng" and state.arch.vng:
            launch = vng.session_launch(
                state.arch, kernel.image, bundle, state.accel.accel
            )
            if not state.arch.no_bpf_lsm and kernel.vmlinux_h is not None:
                # vng's guest sees the host's files: the BPF programs are
                # read from their cache entry, not from an initramfs.
                archive = bpf.build_bpf(state.arch, kernel, self.cache, self.progress)
                launch.more_program_dirs.append(str(archive.parent / "bin"))
            guest = self._launch(state, launch, console_log, cmd_file)
        else:
            initrd = bundle.initramfs
            if not state.arch.no_bpf_lsm and kernel.vmlinux_h is not None:
                # The BPF programs are built for this kernel: a second archive.
                initrd = bpf.boot_initrd(
                    state.arch, kernel, initrd, self.cache, self.progress
                )
            guest = self.start_guest(state.arch.name, initrd, console_log, cmd_file)
        state.boots.append(guest.boot_seconds)
        self.results.add_boot(state.arch, guest.boot_seconds, guest.release)
        self.progress.phase(f"boot {state.arch.name}: up in {guest.boot_seconds:.1f} s")
        return guest

    def transport_unavailable(self, arch_name: str) -> str:
        """Why the chosen transport cannot reach this arch's guest ("" if
        it can): checks are skipped with it."""
        arch = self.state(arch_name).arch
        if self.options.transport == "ssh" and arch.no_ssh:
            return f"--lab-transport ssh on {arch.name}: {arch.no_ssh}"
        return ""

    def start_guest(
        self,
        arch_name: str,
        initrd: Path,
        console_log: Path,
        cmd_file: Path,
        extra_cmdline: tuple[str, ...] = (),
        transport: str | None = None,
    ) -> BootedGuest:
        """Boot the arch's kernel under plain QEMU with initrd and connect
        the transport (the run's unless given); the QEMU command goes to
        cmd_file."""
        state = self.state(arch_name)
        accel = self.accel(arch_name)
        kernel = self.kernel(arch_name)
        endpoint = None
        if (transport or self.options.transport) == "ssh":
            # The guest's sshd: one more archive, a forwarded port, the keys.
            initrd = ssh.boot_initrd(state.arch, initrd, self.cache, self.progress)
            keys = ssh.lab_keys(self.cache)
            endpoint = ssh.SshEndpoint(
                ssh.LOOPBACK, ssh.free_port(), keys.host_key(), keys.client_key()
            )
        argv = qemu_argv(
            state.arch,
            kernel.image,
            initrd,
            accel.accel,
            extra_cmdline=extra_cmdline,
            ssh_port=endpoint.port if endpoint else None,
        )
        launch = vng.Launch(argv, program_dir="/bin")
        return self._launch(state, launch, console_log, cmd_file, endpoint)

    def _launch(
        self,
        state: ArchState,
        launch: vng.Launch,
        console_log: Path,
        cmd_file: Path,
        endpoint: ssh.SshEndpoint | None = None,
    ) -> BootedGuest:
        """Start a launch, wait for lab-init (and sshd); boot_seconds is
        the time until the guest takes commands on its transport."""
        cmd_file.write_text(shlex.join(launch.argv) + "\n")
        timeouts = self.timeouts(state)
        guest = BootedGuest(
            launch.argv,
            console_log,
            launch.program_dir,
            timeouts,
            env=launch.env,
            startup=launch.startup,
            more_program_dirs=launch.more_program_dirs,
        )
        started = time.monotonic()
        try:
            guest.boot()
            if endpoint is not None:
                ssh.attach(guest, endpoint, timeouts.boot)
        except LabError:
            guest.kill()
            raise
        guest.boot_seconds = time.monotonic() - started
        return guest

    def retire_guest(self, arch_name: str) -> None:
        """Power off the arch's guest: a check left it in a state the next
        checks must not inherit (a cgroup v1 mount, an offline CPU)."""
        state = self.state(arch_name)
        if state.guest is not None:
            state.guest.poweroff()
            state.guest = None

    def close(self, kill: bool = False) -> None:
        """Power off (or kill) every guest and write the run's summary;
        kill is for an interrupted run."""
        for state in self.states.values():
            if state.guest is not None:
                if kill:
                    state.guest.kill()
                else:
                    state.guest.poweroff()
                state.guest = None
        self.results.finish(interrupted=kill)
