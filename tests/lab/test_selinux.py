"""The stock LSMs next to the changed hook: SELinux, with a permissive policy
loaded, denies nothing the affinity checks are allowed in the default boot.

Smack and SELinux both want the exclusive LSM slot and the kernel's
CONFIG_LSM gives it to Smack, so each check boots its own guest with the
default order minus Smack (lsm=...,selinux,labtest,...) and an initramfs
that also carries a dummy policy built for the kernel (lab/selinux.py):
one type allowed everything in the kernel's class map. The guest loads it
through selinuxfs and runs the same checks as the default boot; any
"avc:  denied" on the console (permissive mode logs what enforcing mode
would refuse) fails the check.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import selinux
from lab.arches import Arch
from lab.checks import (
    SECURITYFS,
    ProgramRun,
    TestLsm,
    check_untruncated_mask_in_cpuset,
    run_program,
)
from lab.console import BootedGuest
from lab.guest import GuestBundle
from lab.kbuild import KernelImage
from lab.ktap import KtapReport
from lab.qemu import AccelChoice
from lab.session import LabRun

SELINUXFS = "/sys/fs/selinux"
# What mdp gives every initial SID and every task.
DUMMY_CONTEXT = "user_u:base_r:base_t"


@dataclass
class SelinuxBoot:
    """A guest booted with SELinux in place of Smack, the policy loaded."""

    guest: BootedGuest
    console_log: Path
    console_start: int
    load: ProgramRun

    def console(self) -> str:
        """What this boot printed on the console so far."""
        with self.console_log.open("rb") as f:
            f.seek(self.console_start)
            return f.read().decode(errors="replace")

    def denials_after_poweroff(self) -> list[str]:
        """Power off (so every audit record is on the console), then the
        AVC denials the boot logged."""
        self.guest.poweroff()
        return selinux.avc_denials(self.console())


@pytest.fixture
def selinux_boot(
    lab_run: LabRun,
    lab_arch: str,
    kernel: KernelImage,
    arch: Arch,
    accel: AccelChoice,
    guest_bundle: GuestBundle,
) -> Iterator[SelinuxBoot]:
    """The arch's kernel booted with lsm=<default order, SELinux for Smack>,
    enforcing=0, and the dummy policy loaded; powered off at the end. The
    run's transport carries the commands, as in the default boot."""
    unavailable = lab_run.transport_unavailable(lab_arch)
    if unavailable:
        pytest.skip(unavailable)
    initrd = selinux.boot_initrd(
        arch,
        kernel,
        lab_run.source,
        guest_bundle.initramfs,
        lab_run.cache,
        lab_run.progress,
    )
    cmdline = selinux.boot_cmdline(kernel.config.read_text())
    arch_dir = lab_run.results.arch_dir(arch)
    console_log = arch_dir / "console.selinux.log"
    start = console_log.stat().st_size if console_log.exists() else 0
    guest = lab_run.start_guest(
        lab_arch,
        initrd,
        console_log,
        arch_dir / "qemu.selinux.cmd",
        extra_cmdline=cmdline,
    )
    try:
        guest.mount("selinuxfs", SELINUXFS)
        load = run_program(guest, "selinux_load", selinux.GUEST_POLICY)
        load.assert_ok()
        yield SelinuxBoot(guest, console_log, start, load)
    finally:
        guest.poweroff()


def test_selinux_runs_permissive_with_dummy_policy_next_to_test_lsm(
    selinux_boot: SelinuxBoot, kernel: KernelImage
) -> None:
    """The boot has SELinux and the test LSM active (Smack left out for
    SELinux to take the exclusive slot), the kernel took the whole policy,
    it labels tasks with its one context, SELinux stays permissive, and
    the policy load's audit record reached the console."""
    guest = selinux_boot.guest

    lsms = guest.cat(f"{SECURITYFS}/lsm").strip().split(",")
    enforce = guest.cat(f"{SELINUXFS}/enforce").strip()
    process_class = guest.command("cat", f"{SELINUXFS}/class/process/index")
    context = guest.cat("/proc/self/attr/current").strip("\0\n")

    # A kernel built without the series (--lab-series none) has no test LSM.
    expected = {"selinux", "labtest"} if kernel.test_lsm else {"selinux"}
    assert expected <= set(lsms), f"lsm: {lsms}"
    assert "smack" not in lsms, f"lsm: {lsms}"
    assert selinux_boot.load.fact("written") == selinux_boot.load.fact("policy_bytes")
    assert selinux_boot.load.fact("load_audited") == "yes"
    assert process_class.rc == 0, f"no class map after the load: {process_class}"
    assert context == DUMMY_CONTEXT, f"lab-init runs as {context!r}"
    assert enforce == "0", f"SELinux is enforcing ({SELINUXFS}/enforce: {enforce})"
    assert selinux_boot.denials_after_poweroff() == []
    assert selinux.policy_load_audited(selinux_boot.console()), (
        "no audit record of the policy load on the console: SELinux's audit "
        "messages do not reach it, so a missing AVC denial would prove nothing"
    )


def test_hook_sees_untruncated_mask_in_cpuset_under_selinux(
    selinux_boot: SelinuxBoot,
    kernel: KernelImage,
    arch: Arch,
    ktap_reports: list[KtapReport],
) -> None:
    """cpuset.cpus=0, sched_setaffinity({0,1}) as in the default boot: the
    call and the cpuset changes pass SELinux, the task runs on {0}, the
    arch's rule holds, and the test LSM saw {0,1}. No AVC denial."""
    check_untruncated_mask_in_cpuset(selinux_boot.guest, kernel, arch, ktap_reports)
    assert selinux_boot.denials_after_poweroff() == []


def test_sched_setattr_passes_selinux_and_reaches_hook_without_mask(
    selinux_boot: SelinuxBoot, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """sched_setattr(SCHED_BATCH) succeeds with SELinux active, and the test
    LSM saw the call with no mask. No AVC denial."""
    guest = selinux_boot.guest
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest, "setattr --policy batch --expect-errno 0", reports=ktap_reports
    )
    calls = lsm.records(caller=run.pid)

    run.assert_ok()
    assert [(c.target, c.mask) for c in calls] == [(run.pid, "none")], calls
    assert selinux_boot.denials_after_poweroff() == []


def test_lsm_deny_rule_still_refuses_with_eacces_under_selinux(
    selinux_boot: SelinuxBoot, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """With SELinux allowing everything, the test LSM's rule 'deny masks
    that contain CPU 1' still refuses sched_setaffinity({0,1}) with EACCES
    and keeps the affinity; without the rule the same call passes. The
    refusal is the test LSM's: no AVC denial."""
    guest = selinux_boot.guest
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    lsm.deny_cpus("1")
    try:
        denied = run_program(
            guest,
            "affinity --mask 0-1 --expect-errno EACCES --expect-affinity unchanged",
            reports=ktap_reports,
        )
    finally:
        lsm.allow_all()
    allowed = run_program(
        guest,
        "affinity --mask 0-1 --expect-errno 0 --expect-affinity 0-1",
        reports=ktap_reports,
    )
    denied_calls = lsm.records(caller=denied.pid)
    allowed_calls = lsm.records(caller=allowed.pid)

    denied.assert_ok()
    allowed.assert_ok()
    assert [(c.mask, c.ret) for c in denied_calls] == [("0-1", -13)], denied_calls
    assert [(c.mask, c.ret) for c in allowed_calls] == [("0-1", 0)], allowed_calls
    assert selinux_boot.denials_after_poweroff() == []
