"""virtme-ng as the second launcher: it boots the lab's kernel on the host's
root, passes the guest command's exit status back, and serves the same
console protocol as the plain QEMU launcher."""

from __future__ import annotations

import pytest

from lab import vng
from lab.arches import Arch
from lab.checks import run_program
from lab.console import BootedGuest
from lab.guest import GuestBundle
from lab.kbuild import KernelImage
from lab.qemu import AccelChoice
from lab.session import LabRun

pytestmark = [pytest.mark.vng, pytest.mark.arches("x86_64")]


@pytest.fixture
def vng_binary() -> str:
    """vng itself: a missing vng is a setup error, not a failed check."""
    return vng.vng_binary()


def test_vng_passes_guest_exit_status_back(
    vng_binary: str, kernel: KernelImage, arch: Arch, accel: AccelChoice
) -> None:
    done = vng.run_once(
        arch, kernel.image, accel.accel, "uname -r; nproc; exit 3", timeout=180
    )

    assert done.returncode == 3, (
        f"vng exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    assert done.stdout.split() == [kernel.release, str(arch.smp)], done.stdout


def test_vng_session_runs_affinity_check_like_plain_qemu(
    vng_binary: str,
    lab_run: LabRun,
    lab_arch: str,
    kernel: KernelImage,
    arch: Arch,
    accel: AccelChoice,
    guest_bundle: GuestBundle,
) -> None:
    launch = vng.session_launch(arch, kernel.image, guest_bundle, accel.accel)
    console_log = lab_run.results.arch_dir(arch) / "console.vng.log"
    timeouts = lab_run.timeouts(lab_run.state(lab_arch))
    guest = BootedGuest(
        launch.argv, console_log, launch.program_dir, timeouts, env=launch.env
    )
    try:
        guest.boot()
        assert guest.release == kernel.release
        run = run_program(
            guest,
            "affinity --mask 0 --expect-errno 0 --expect-affinity 0 --expect-ran-on 0",
        )
        run.assert_ok()
    finally:
        guest.poweroff()
    assert guest.exit_status == 0
