"""Every path that reaches security_task_setscheduler(), on each arch.

The test LSM records, for each call, the calling and the target task and
the mask (or "none"). Each test makes one kind of call and checks that the
hook saw the right task and the mask as requested, or no mask where the
caller changes no affinity (cpuset attach and fork).
"""

from __future__ import annotations

import pytest

from lab.arches import Arch
from lab.checks import CGROUP2, Cpuset, TestLsm, run_program
from lab.console import BootedGuest
from lab.kbuild import KernelImage
from lab.ktap import KtapReport
from lab.session import LabRun


def test_affinity_of_another_task_hook_gets_that_task_and_the_mask(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """sched_setaffinity(child, {0}): the hook's task is the child, the
    caller is the parent, the mask is the request."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest,
        "affinity --target child --mask 0 --expect-errno 0 --expect-affinity 0",
        reports=ktap_reports,
    )

    run.assert_ok()
    target = int(run.fact("target"))
    assert target != run.pid
    calls = lsm.records(caller=run.pid)
    assert [(c.target, c.mask) for c in calls] == [(target, "0")], calls


def test_thread_affinity_by_tid_hook_gets_the_thread(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """sched_setaffinity(tid, {1}) on a thread of the caller: the hook's
    task is that thread, not the thread group leader."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest,
        "affinity --target thread --mask 1 --expect-errno 0 --expect-affinity 1",
        reports=ktap_reports,
    )

    run.assert_ok()
    tid = int(run.fact("target"))
    assert tid != run.pid
    calls = lsm.records(caller=run.pid)
    assert [(c.target, c.mask) for c in calls] == [(tid, "1")], calls


def test_cpusetsize_shorter_than_kernel_mask_hook_sees_the_bytes_given(
    guest: BootedGuest, kernel: KernelImage, arch: Arch, ktap_reports: list[KtapReport]
) -> None:
    """{0,1} with a cpusetsize of 1 byte, less than the kernel's cpumask:
    the kernel copies that byte and zero-fills the rest, and the hook sees
    exactly what the byte holds. The arches differ by byte order: on
    x86_64 the first byte holds CPUs 0-7, so the hook sees {0,1} and the
    call succeeds; on 32-bit big-endian MIPS it holds CPUs 24-31 of the
    first long, so the hook sees an empty mask and the call fails."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    expect = f"--expect-errno {arch.affinity.one_byte_errno}"

    run = run_program(
        guest, f"affinity --mask 0-1 --size 1 {expect}", reports=ktap_reports
    )

    run.assert_ok()
    masks = [c.mask for c in lsm.records(caller=run.pid)]
    assert masks == [arch.affinity.one_byte_mask], masks


def test_cpusetsize_longer_than_kernel_mask_hook_sees_no_bits_past_it(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """cpusetsize of 128 bytes with a bit set for CPU 1000: the kernel
    copies only its own cpumask's bytes, so the hook sees {0}."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest,
        "affinity --mask 0 --size 128 --beyond 1000 --expect-errno 0",
        reports=ktap_reports,
    )

    run.assert_ok()
    assert [c.mask for c in lsm.records(caller=run.pid)] == ["0"]


def test_request_equal_to_cpuset_reaches_hook_unchanged(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """cpuset.cpus=1 and a request of {1}: nothing to cut, the hook and
    the task both get {1}, and the task runs on CPU 1."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    with Cpuset(guest, cpus="1") as cpuset:
        run = run_program(
            guest,
            "affinity --mask 1 --expect-errno 0 --expect-affinity 1 --expect-ran-on 1",
            cgroup=cpuset.path,
            reports=ktap_reports,
        )

    run.assert_ok()
    assert [c.mask for c in lsm.records(caller=run.pid)] == ["none", "1"]


def test_empty_mask_is_refused_and_hook_saw_it_empty(
    guest: BootedGuest, kernel: KernelImage, ktap_reports: list[KtapReport]
) -> None:
    """An empty mask fails with EINVAL on both arches; the hook is asked
    first and sees the empty mask."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    run = run_program(
        guest, "affinity --mask empty --expect-errno EINVAL", reports=ktap_reports
    )

    run.assert_ok()
    assert [c.mask for c in lsm.records(caller=run.pid)] == ["empty"]


def test_mask_of_offline_cpu_is_refused_and_hook_saw_it(
    lab_run: LabRun,
    lab_arch: str,
    arch: Arch,
    guest: BootedGuest,
    kernel: KernelImage,
    ktap_reports: list[KtapReport],
) -> None:
    """CPU 1 taken offline, sched_setaffinity({1}) fails with EINVAL; the
    hook saw {1}, the CPU the caller asked for."""
    if arch.no_cpu_hotplug:
        pytest.skip(arch.no_cpu_hotplug)
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    online = "/sys/devices/system/cpu/cpu1/online"

    guest.write(online, "0")
    try:
        run = run_program(
            guest, "affinity --mask 1 --expect-errno EINVAL", reports=ktap_reports
        )
    finally:
        result = guest.command("write", online, "1")
        if result.rc != 0:
            lab_run.retire_guest(lab_arch)

    run.assert_ok()
    assert [c.mask for c in lsm.records(caller=run.pid)] == ["1"]


def test_moving_task_into_cpuset_reaches_hook_without_mask(
    guest: BootedGuest, kernel: KernelImage
) -> None:
    """A task moved into a cpuset (cgroup.procs) is checked by the hook
    through cpuset_can_attach(), with no mask: attach is not a request."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    with Cpuset(guest, cpus="0") as cpuset:
        run = run_program(guest, "stall 0", cgroup=cpuset.path)

    pid = int(run.fact("pid"))
    calls = lsm.records(caller=pid)
    assert [(c.target, c.mask) for c in calls] == [(pid, "none")], calls


def test_fork_into_cpuset_reaches_hook_without_mask(
    guest: BootedGuest, kernel: KernelImage
) -> None:
    """clone3(CLONE_INTO_CGROUP) into another cpuset: cpuset_can_fork()
    asks the hook about the new task, with no mask."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()

    with Cpuset(guest, cpus="0") as cpuset:
        run = run_program(guest, f"clone_into {cpuset.path}")
        leaf = cpuset.path.removeprefix(CGROUP2)

    assert run.fact("errno") == "0", run.result.output
    child = int(run.fact("child"))
    assert run.result.output.count(f"child_cgroup: 0::{leaf}") == 1, run.result.output
    calls = lsm.records(caller=run.pid)
    assert [(c.target, c.mask) for c in calls] == [(child, "none")], calls


@pytest.mark.dirties_guest
def test_cpuset_v1_hook_sees_untruncated_mask(
    lab_run: LabRun,
    lab_arch: str,
    arch: Arch,
    guest: BootedGuest,
    kernel: KernelImage,
    ktap_reports: list[KtapReport],
) -> None:
    """The legacy cpuset hierarchy (v1) cuts the request down the same way
    and asks the hook on attach too: the hook still gets {0,1}."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    rule = arch.affinity
    expect = (
        f"--expect-errno {rule.partial_errno} --expect-affinity {rule.partial_affinity}"
    )
    try:
        with Cpuset(guest, cpus="0", version=1) as cpuset:
            run = run_program(
                guest,
                f"affinity --mask 0-1 {expect} --expect-ran-on 0",
                cgroup=cpuset.path,
                reports=ktap_reports,
            )
        calls = lsm.records(caller=run.pid)
    finally:
        # The v1 hierarchy lingers after umount (its dying child cgroup
        # keeps it), holding the cpuset controller from v2: start afresh.
        lab_run.retire_guest(lab_arch)

    run.assert_ok()
    assert [c.mask for c in calls] == ["none", "0-1"], calls
