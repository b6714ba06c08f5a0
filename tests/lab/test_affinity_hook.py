"""The expanded task_setscheduler hook, seen from a real guest.

Each test runs once per arch (`-m x86_64`, `-m mips`) in the session's
booted guest. The hook is observed by two witnesses: the test LSM's record
of every call, and a kprobe on security_task_setscheduler. What the
affinity syscall itself does in a cpuset differs by arch; the expected
rule comes from the arch table (lab/arches.py).
"""

from __future__ import annotations

from lab.arches import Arch
from lab.checks import (
    Cpuset,
    KprobeWitness,
    TestLsm,
    check_untruncated_mask_in_cpuset,
    cpulist_to_word,
    require_expanded_hook,
    run_program,
)
from lab.console import BootedGuest
from lab.kbuild import KernelImage
from lab.ktap import KtapReport


def test_hook_sees_untruncated_mask_in_cpuset(
    guest: BootedGuest, kernel: KernelImage, arch: Arch, ktap_reports: list[KtapReport]
) -> None:
    """cpuset.cpus=0, sched_setaffinity({0,1}): the call succeeds, the task
    runs on {0} only, and the hook was given {0,1}, not the cut-down {0}.

    What sched_getaffinity() reports afterwards differs by arch: {0} from
    the generic syscall; {0,1} from MIPS FPAFF, which reports the request
    it recorded or'd with the CPUs allowed, while /proc/self/status
    (Cpus_allowed_list) says {0} on both."""
    check_untruncated_mask_in_cpuset(guest, kernel, arch, ktap_reports)


def test_mask_outside_cpuset_follows_arch_rule_and_hook_sees_it(
    guest: BootedGuest, kernel: KernelImage, arch: Arch, ktap_reports: list[KtapReport]
) -> None:
    """cpuset.cpus=0, sched_setaffinity({1}), a mask with no CPU of the
    cpuset. The arches differ: the generic syscall (x86_64) fails with
    EINVAL and leaves the affinity as it was; the MIPS MT FPAFF syscall
    applies the mask, finds it outside the cpuset, resets the task to the
    whole cpuset and returns 0. On both, the hook saw {1}."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    rule = arch.affinity
    expect = (
        f"--expect-errno {rule.outside_errno} --expect-affinity {rule.outside_affinity}"
    )

    with Cpuset(guest, cpus="0") as cpuset:
        run = run_program(
            guest,
            f"affinity --mask 1 {expect}",
            cgroup=cpuset.path,
            reports=ktap_reports,
        )

    run.assert_ok()
    calls = lsm.records(caller=run.pid)
    assert [c.mask for c in calls] == ["none", "1"], calls


def test_lsm_deny_rule_refuses_mask_and_keeps_affinity(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """With the rule 'deny masks that contain CPU 1', sched_setaffinity({0,1})
    fails with the LSM's EACCES and the affinity is unchanged."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    lsm.deny_cpus("1")
    try:
        run = run_program(
            guest,
            "affinity --mask 0-1 --expect-errno EACCES --expect-affinity unchanged",
            reports=ktap_reports,
        )
    finally:
        lsm.allow_all()

    run.assert_ok()
    calls = lsm.records(caller=run.pid)
    assert [(c.mask, c.ret) for c in calls] == [("0-1", -13)], calls


def test_same_call_succeeds_without_deny_rule(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """The control of the deny test: no rule, sched_setaffinity({0,1})
    succeeds and the test LSM allowed it."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest,
        "affinity --mask 0-1 --expect-errno 0 --expect-affinity 0-1",
        reports=ktap_reports,
    )

    run.assert_ok()
    calls = lsm.records(caller=run.pid)
    assert [(c.mask, c.ret) for c in calls] == [("0-1", 0)], calls


def test_sched_setattr_reaches_hook_without_mask(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """sched_setattr(SCHED_BATCH) goes through the hook with a NULL mask:
    only affinity changes carry one."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest, "setattr --policy batch --expect-errno 0", reports=ktap_reports
    )

    run.assert_ok()
    calls = lsm.records(caller=run.pid)
    assert [(c.target, c.mask) for c in calls] == [(run.pid, "none")], calls


def test_kprobe_witness_sees_requested_mask_word(
    guest: BootedGuest, kernel: KernelImage, arch: Arch, ktap_reports: list[KtapReport]
) -> None:
    """Without the test LSM: a kprobe on security_task_setscheduler reads
    the mask argument of the affinity call in a cpuset.cpus=0 cpuset, and
    its first word is {0,1} (0x3), not the cpuset's {0} (0x1)."""
    with KprobeWitness(guest, arch, kernel) as probe, Cpuset(guest, cpus="0") as cpuset:
        run = run_program(
            guest, "affinity --mask 0-1", cgroup=cpuset.path, reports=ktap_reports
        )
        hits = probe.hits(pid=run.pid)

    # Two calls: joining the cpuset (no mask), then the affinity change.
    assert len(hits) == 2, (
        f"expected two hook calls by pid {run.pid}, the probe saw {hits}"
    )
    require_expanded_hook(kernel)
    attach, affinity = hits
    assert attach.mask_ptr == 0, f"cpuset attach passed a mask: {attach}"
    assert affinity.mask_ptr, (
        "the hook was called with a NULL mask for an affinity change"
    )
    assert affinity.mask_word == cpulist_to_word("0-1"), (
        f"mask word {affinity.mask_word:#x}, requested {cpulist_to_word('0-1'):#x}"
    )


def test_affinity_syscall_path_of_the_arch_reaches_hook_with_mask(
    guest: BootedGuest, kernel: KernelImage, arch: Arch, ktap_reports: list[KtapReport]
) -> None:
    """The arch's own sched_setaffinity entry (the generic syscall on
    x86_64, mipsmt_sys_sched_setaffinity with MIPS MT FPAFF) runs for the
    call, and the hook it calls gets the requested mask."""
    entry = KprobeWitness(
        guest, arch, kernel, function=arch.setaffinity_entry, event="entry"
    )
    with entry, KprobeWitness(guest, arch, kernel) as hook:
        run = run_program(guest, "affinity --mask 0-1", reports=ktap_reports)
        entered = entry.hits(pid=run.pid)
        hooked = hook.hits(pid=run.pid)

    assert len(entered) == 1, f"{arch.setaffinity_entry} ran {len(entered)} times"
    require_expanded_hook(kernel)
    assert [h.mask_word for h in hooked] == [cpulist_to_word("0-1")], hooked
