"""One lab run: per arch, the kernel, the guest bundle, the accelerator and
the booted guest that the checks share.

The plugin and the `lab` command both drive a LabRun. A guest is booted
once and reused; when a check leaves it crashed or hung, the next check
gets a fresh boot. Every boot writes its console log and QEMU command
into the run's results directory. QEMU runs on this machine, or on the
--lab-host (lab/remote.py) the run logs in to on first need.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from lab.qemu import LOCAL_HOST, AccelChoice, QemuHost, choose_accel, qemu_argv
from lab.remote import HostAddress, RemoteHost
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
    # --lab-host: QEMU runs there, over SSH; None: on this machine.
    lab_host: HostAddress | None = None
    lab_host_key: Path | None = None
    lab_host_known_hosts: Path | None = None


@dataclass(frozen=True)
class BootVariant:
    """A boot of the arch's kernel other than the default one, shared by the
    checks that need it as the default boot is: its own initramfs (made
    from the default one) and kernel command line, and a setup step run
    once after each boot, whose result the checks can read."""

    name: str
    initrd: Callable[[LabRun, Arch, KernelImage, Path], Path]
    cmdline: Callable[[KernelImage], tuple[str, ...]]
    setup: Callable[[BootedGuest], Any]


@dataclass
class VariantGuest:
    """A booted variant and what its setup step returned."""

    guest: BootedGuest
    setup: Any


@dataclass
class ArchState:
    """What the run has for one arch so far."""

    arch: Arch
    kernel: KernelImage | None = None
    bundle: GuestBundle | None = None
    accel: AccelChoice | None = None
    guest: BootedGuest | None = None
    boots: list[float] = field(default_factory=list)
    variants: dict[str, VariantGuest] = field(default_factory=dict)
    variant_boots: dict[str, list[float]] = field(default_factory=dict)
    # A failure to build or boot, kept so later checks report it at once.
    failure: LabError | None = None


class LabRun:
    """The state of one run of the lab across arches."""

    def __init__(self, options: LabOptions, progress: Progress | None = None) -> None:
        self.options = options
        self.progress = progress or Progress()
        self.cache = LabCache(options.cache)
        self.results = RunResults.create(options.results, options.run_label)
        self.results.setup = {
            "launcher": options.launcher,
            "transport": options.transport,
            "qemu_host": str(options.lab_host) if options.lab_host else "local",
        }
        self.source = options.source
        self.states: dict[str, ArchState] = {}
        self._qemu_host: QemuHost | None = None
        self._qemu_host_failure: LabError | None = None

    def state(self, arch_name: str) -> ArchState:
        if arch_name not in self.states:
            self.states[arch_name] = ArchState(get_arch(arch_name))
        return self.states[arch_name]

    @property
    def qemu_host(self) -> QemuHost:
        """Where QEMU runs: this machine, or the --lab-host (logged in once;
        a failure to log in is kept and given to every later check)."""
        if self._qemu_host_failure is not None:
            raise self._qemu_host_failure
        if self._qemu_host is None:
            address = self.options.lab_host
            if address is None:
                self._qemu_host = LOCAL_HOST
            else:
                try:
                    self._qemu_host = RemoteHost.connect(
                        address,
                        self.options.lab_host_key,
                        self.options.lab_host_known_hosts,
                        self.progress,
                    )
                except LabError as err:
                    self._qemu_host_failure = err
                    raise
        return self._qemu_host

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
            host = self.qemu_host
            host.require_qemu(state.arch)
            state.accel = choose_accel(
                self.options.accel,
                state.arch,
                kernel.image,
                bundle.initramfs,
                self.cache,
                self.progress,
                host=host,
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

    def qemu_guest(
        self, arch_name: str, argv: list[str], console_log: Path
    ) -> BootedGuest:
        """A guest (not booted yet) of a plain QEMU command, on the run's
        QEMU host: the files the command names are copied there first."""
        state = self.state(arch_name)
        return self.qemu_host.guest(argv, console_log, "/bin", self.timeouts(state))

    def _boot(
        self, state: ArchState, kernel: KernelImage, bundle: GuestBundle
    ) -> BootedGuest:
        assert state.accel is not None
        number = len(state.boots) + 1
        console_log = self.results.boot_file(state.arch, "console.log", number)
        cmd_file = self.results.boot_file(state.arch, "qemu.cmd", number)
        self._say_boot(state, kernel, self.options.launcher, number)
        if self.options.launcher == "vng" and state.arch.vng:
            launch = vng.session_launch(
                state.arch, kernel.image, bundle, state.accel.accel
            )
            if not state.arch.no_bpf_lsm and kernel.vmlinux_h is not None:
                # vng's guest sees the host's files: the BPF programs are
                # read from their cache entry, not from an initramfs.
                archive = bpf.build_bpf(state.arch, kernel, self.cache, self.progress)
                launch.more_program_dirs.append(str(archive.parent / "bin"))
            guest = BootedGuest(
                launch.argv,
                console_log,
                launch.program_dir,
                self.timeouts(state),
                env=launch.env,
                startup=launch.startup,
                more_program_dirs=launch.more_program_dirs,
            )
            self._start(state, guest, cmd_file)
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
        return guest

    def transport_unavailable(self, arch_name: str) -> str:
        """Why the chosen transport cannot reach this arch's guest ("" if
        it can): checks are skipped with it."""
        if self.options.transport == "ssh":
            return self.ssh_unavailable(arch_name)
        return ""

    def ssh_unavailable(self, arch_name: str) -> str:
        """Why this run cannot reach the arch's guest over SSH ("" if it can)."""
        arch = self.state(arch_name).arch
        if arch.no_ssh:
            return f"no SSH transport on {arch.name}: {arch.no_ssh}"
        if self.options.lab_host is not None:
            return (
                f"no SSH transport to a guest on the --lab-host {self.options.lab_host}"
                " (its forwarded port is on that host's loopback)"
            )
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
        """Boot the arch's kernel under plain QEMU with initrd, on the run's
        QEMU host (this machine or the --lab-host), and connect the
        transport (the run's unless given); the QEMU command goes to
        cmd_file."""
        state = self.state(arch_name)
        accel = self.accel(arch_name)
        kernel = self.kernel(arch_name)
        endpoint = None
        if (transport or self.options.transport) == "ssh":
            if self.options.lab_host is not None:
                raise LabError(
                    "--lab-transport ssh does not reach a guest on a --lab-host "
                    "yet: use the console transport there"
                )
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
        guest = self.qemu_guest(arch_name, argv, console_log)
        return self._start(state, guest, cmd_file, endpoint)

    def _say_boot(
        self, state: ArchState, kernel: KernelImage, how: str, number: int
    ) -> None:
        assert state.accel is not None
        where = f" on {self.options.lab_host}" if self.options.lab_host else ""
        self.progress.phase(
            f"boot {state.arch.name}: {kernel.release} under "
            f"{state.accel.accel.upper()} ({how}, {self.options.transport}{where}), "
            f"boot {number}"
        )

    def _start(
        self,
        state: ArchState,
        guest: BootedGuest,
        cmd_file: Path,
        endpoint: ssh.SshEndpoint | None = None,
    ) -> BootedGuest:
        """Boot a guest, wait for lab-init (and sshd); boot_seconds is the
        time until the guest takes commands on its transport."""
        cmd_file.write_text(self._where() + shlex.join(guest.argv) + "\n")
        timeouts = self.timeouts(state)
        started = time.monotonic()
        try:
            guest.boot()
            if endpoint is not None:
                ssh.attach(guest, endpoint, timeouts.boot)
        except LabError:
            guest.kill()
            raise
        guest.boot_seconds = time.monotonic() - started
        self.progress.phase(f"boot {state.arch.name}: up in {guest.boot_seconds:.1f} s")
        return guest

    def variant_guest(self, arch_name: str, variant: BootVariant) -> VariantGuest:
        """The running guest of a boot variant; boots one (plain QEMU, the
        run's transport) and runs the variant's setup if there is none
        alive. A failing setup powers the guest off and raises."""
        state = self.state(arch_name)
        booted = state.variants.get(variant.name)
        if booted is not None and booted.guest.alive:
            return booted
        if booted is not None:
            booted.guest.kill()
            del state.variants[variant.name]

        self.accel(arch_name)
        kernel = self.kernel(arch_name)
        base = self.bundle(arch_name).initramfs
        initrd = variant.initrd(self, state.arch, kernel, base)
        boots = state.variant_boots.setdefault(variant.name, [])
        number = len(boots) + 1
        console_log = self.results.boot_file(
            state.arch, f"console.{variant.name}.log", number
        )
        cmd_file = self.results.boot_file(
            state.arch, f"qemu.{variant.name}.cmd", number
        )
        self._say_boot(state, kernel, f"qemu, {variant.name}", number)
        guest = self.start_guest(
            arch_name,
            initrd,
            console_log,
            cmd_file,
            extra_cmdline=variant.cmdline(kernel),
        )
        boots.append(guest.boot_seconds)
        self.results.add_boot(
            state.arch, guest.boot_seconds, guest.release, variant.name
        )
        try:
            result = variant.setup(guest)
        except BaseException:
            guest.poweroff()
            raise
        booted = state.variants[variant.name] = VariantGuest(guest, result)
        return booted

    def _where(self) -> str:
        """qemu.cmd's first line for a QEMU on the --lab-host."""
        if self.options.lab_host is None:
            return ""
        return f"# run on {self.options.lab_host}, in the run's temporary directory\n"

    def retire_guest(self, arch_name: str) -> None:
        """Power off the arch's guest: a check left it in a state the next
        checks must not inherit (a cgroup v1 mount, an offline CPU)."""
        state = self.state(arch_name)
        if state.guest is not None:
            state.guest.poweroff()
            state.guest = None

    def close(self, kill: bool = False) -> None:
        """Power off (or kill) every guest and write the run's summary;
        kill is for an interrupted run. On a --lab-host, what still runs
        there is killed and the run's directory removed."""
        try:
            for state in self.states.values():
                guests = [v.guest for v in state.variants.values()]
                if state.guest is not None:
                    guests.insert(0, state.guest)
                for guest in guests:
                    if kill:
                        guest.kill()
                    else:
                        guest.poweroff()
                state.guest = None
                state.variants.clear()
        finally:
            if self._qemu_host is not None:
                self._qemu_host.close()
                self._qemu_host = None
            self.results.finish(interrupted=kill)
