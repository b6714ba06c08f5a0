"""The stock LSMs next to the changed hook: SELinux, with a permissive policy
loaded, denies nothing the affinity checks are allowed in the default boot.

Smack and SELinux both want the exclusive LSM slot and the kernel's
CONFIG_LSM gives it to Smack, so the SELinux checks share a second boot
per arch (lab.selinux.BOOT): the default order minus Smack
(lsm=...,selinux,labtest,...), enforcing=0, and an initramfs that also
carries a dummy policy built for the kernel: one type allowed everything
in the kernel's class map. The guest loads it through selinuxfs once per
boot and runs the same checks as the default boot. Any "avc:  denied" on
the console during a check (permissive mode logs what enforcing mode
would refuse) fails the check: before reading the console, an audit mark
is sent and waited for, so every record the check caused is printed.
"""

from __future__ import annotations

import itertools
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
from lab.kbuild import KernelImage
from lab.ktap import KtapReport
from lab.plugin import watch_guest
from lab.session import LabRun

SELINUXFS = selinux.SELINUXFS
# What mdp gives every initial SID and every task.
DUMMY_CONTEXT = "user_u:base_r:base_t"
_marks = itertools.count(1)


@dataclass
class SelinuxBoot:
    """The shared SELinux boot, seen from one check."""

    guest: BootedGuest
    console_log: Path
    # Where this check's part of the console starts.
    console_start: int
    load: ProgramRun

    def boot_console(self) -> str:
        """What this boot printed on the console so far."""
        return self.console_log.read_bytes().decode(errors="replace")

    def denials(self, whole_boot: bool = False) -> list[str]:
        """The AVC denials logged since this check began (or the boot did).
        An audit mark is sent first and waited for: kauditd prints records
        in order, so once the mark is out, so is every denial before it."""
        mark = f"lab-audit-mark-{next(_marks)}"
        run_program(self.guest, "audit_mark", mark).assert_ok()
        with self.console_log.open("rb") as f:
            f.seek(0 if whole_boot else self.console_start)
            console = f.read().decode(errors="replace")
        assert mark in console, (
            f"audit mark {mark} is in /dev/kmsg but not on the console: "
            "denials on the console could be missing too"
        )
        return selinux.avc_denials(console)


@pytest.fixture
def selinux_boot(
    request: pytest.FixtureRequest, lab_run: LabRun, lab_arch: str
) -> SelinuxBoot:
    """The arch's SELinux boot (booted once, policy loaded), from now on.
    The run's transport carries the commands, as in the default boot."""
    unavailable = lab_run.transport_unavailable(lab_arch)
    if unavailable:
        pytest.skip(unavailable)
    booted = lab_run.variant_guest(lab_arch, selinux.BOOT)
    guest = booted.guest
    watch_guest(request.node, guest)
    start = guest.console_log.stat().st_size
    return SelinuxBoot(guest, guest.console_log, start, booted.setup)


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
    assert selinux_boot.denials(whole_boot=True) == []
    assert selinux.policy_load_audited(selinux_boot.boot_console()), (
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
    assert selinux_boot.denials() == []


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
    assert selinux_boot.denials() == []


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
    assert selinux_boot.denials() == []
