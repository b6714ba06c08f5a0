"""How a guest is launched: plain QEMU with the lab's initramfs, or virtme-ng.

Both give a `Launch`: the command, where the guest finds the lab's
programs, and what to type before lab-init answers. Under vng the guest
runs the host's root over 9p, so the programs are read from the cache
directory, and lab-init is started with --runner from vng's shell.

vng quirks on hosts like the lab's (see LAB-FACTS.md): KVM may exist but
not boot a kernel, so TCG goes with --disable-kvm and an explicit CPU model
(--qemu-opts, `=` form, which wins over vng's own -cpu); virtiofsd may not
work, so the root is 9p (--force-9p).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lab.arches import Arch
from lab.errors import ToolMissing
from lab.guest import INIT_PROGRAM, GuestBundle
from lab.qemu import kernel_cmdline


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    program_dir: str
    env: dict[str, str] | None = None
    startup: list[str] = field(default_factory=list)
    # Further directories of programs, as the guest sees them (vng: host
    # paths), searched after program_dir.
    more_program_dirs: list[str] = field(default_factory=list)


def vng_binary() -> str:
    """vng from PATH or from the running Python's bin directory."""
    found = shutil.which("vng") or shutil.which(
        "vng", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise ToolMissing(
            "vng (virtme-ng) not found; install it: pip install virtme-ng"
        )
    return found


def vng_env() -> dict[str, str]:
    """vng runs virtme-run by name: its directory must be on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(vng_binary()).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def vng_argv(
    arch: Arch,
    image: Path,
    accel: str,
    exec_command: str | None,
    kernel_messages: bool = False,
) -> list[str]:
    if not arch.vng:
        raise ToolMissing(f"virtme-ng cannot boot {arch.name}; use --lab-launcher qemu")
    cpu = arch.cpu_kvm if accel == "kvm" and arch.cpu_kvm else arch.cpu_tcg
    argv = [
        vng_binary(),
        "--run",
        str(image),
        "--force-9p",
        "--cpus",
        str(arch.smp),
        "--memory",
        f"{arch.memory_mb}M",
        f"--qemu-opts=-cpu {cpu} -no-reboot",
        "--append",
        kernel_cmdline(arch).replace(f"console={arch.console} ", ""),
    ]
    if accel == "tcg":
        argv.append("--disable-kvm")
    if kernel_messages:
        # The console must carry the kernel's panics and oopses, as under QEMU.
        argv.append("--verbose")
    if exec_command is not None:
        argv += ["--exec", exec_command]
    return argv


def session_launch(arch: Arch, image: Path, bundle: GuestBundle, accel: str) -> Launch:
    """A vng boot whose console is lab-init, for a session of checks."""
    runner = f"{bundle.bin_dir}/{INIT_PROGRAM} --runner"
    return Launch(
        vng_argv(arch, image, accel, exec_command=runner, kernel_messages=True),
        program_dir=str(bundle.bin_dir),
        env=vng_env(),
    )


def run_once(
    arch: Arch, image: Path, accel: str, command: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Boot, run one command under vng and return its exit status and output."""
    argv = vng_argv(arch, image, accel, exec_command=command)
    return subprocess.run(
        argv,
        env=vng_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
