"""A real BPF LSM program on the expanded task_setscheduler hook.

The use the change exists for: a policy that refuses an affinity request
naming a reserved CPU, even where the cpuset would cut that CPU out of
the mask anyway. The program (guest/bpf/setsched.bpf.c) is built against
the kernel's BTF and loaded in the guest by bpf-affinity, which then
makes the call itself and reports what the program recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.arches import Arch
from lab.checks import (
    Cpuset,
    ProgramRun,
    cpulist_to_word,
    require_attr_hook,
    run_program,
)
from lab.console import BootedGuest
from lab.kbuild import KernelImage
from lab.ktap import KtapReport

LOADER = "bpf-affinity"
CHECKED = "setsched.bpf.o"
UNCHECKED = "setsched_nocheck.bpf.o"


@pytest.fixture(autouse=True)
def bpf_lsm_arch(arch: Arch) -> Iterator[None]:
    """Skip where BPF LSM cannot run, before a kernel is built or booted."""
    if arch.no_bpf_lsm:
        pytest.skip(arch.no_bpf_lsm)
    yield


def require_bpf(kernel: KernelImage) -> None:
    """The programs take the hook's three arguments (p, in_mask, attr) and
    need the BTF."""
    require_attr_hook(kernel)
    assert kernel.vmlinux_h is not None, (
        f"kernel {kernel.entry} has no BTF (CONFIG_DEBUG_INFO_BTF), so the lab "
        "built no BPF programs for it"
    )


def run_loader(
    guest: BootedGuest,
    prog: str,
    args: str,
    reports: list[KtapReport],
    cgroup: str | None = None,
) -> ProgramRun:
    """Load one of the BPF programs with bpf-affinity and let it make the
    call that args describe ("--reserve 1 --mask 0-1 --expect-...")."""
    return run_program(
        guest,
        f"{LOADER} --prog {guest.program(prog)} {args}",
        cgroup=cgroup,
        reports=reports,
    )


def test_bpf_lsm_sees_requested_mask_in_cpuset(
    guest: BootedGuest,
    kernel: KernelImage,
    arch: Arch,
    ktap_reports: list[KtapReport],
) -> None:
    """cpuset.cpus=0, sched_setaffinity({0,1}): the BPF program is handed
    {0,1} (0x3), not the cpuset's {0}, and no sched_attr; the call goes
    on as the arch's syscall does in a cpuset."""
    require_bpf(kernel)

    rule = arch.affinity
    expect = (
        f"--expect-errno {rule.partial_errno} --expect-affinity {rule.partial_affinity}"
    )

    with Cpuset(guest, cpus="0") as cpuset:
        run = run_loader(
            guest,
            CHECKED,
            f"--mask 0-1 --expect-load ok {expect}",
            ktap_reports,
            cgroup=cpuset.path,
        )

    run.assert_ok()
    assert run.fact("attach") == "ok"
    assert run.fact("bpf_events") == "1"
    assert run.fact("bpf_seen_mask") == hex(cpulist_to_word("0-1"))
    assert run.fact("bpf_seen_attr") == "none"
    assert run.fact("bpf_target") == str(run.pid)
    assert run.fact("bpf_verdict") == "0"


def test_bpf_lsm_denies_mask_with_reserved_cpu_and_keeps_affinity(
    guest: BootedGuest,
    kernel: KernelImage,
    ktap_reports: list[KtapReport],
) -> None:
    """CPU 1 reserved, cpuset.cpus=0, sched_setaffinity({0,1}): the cpuset
    would have cut CPU 1 out, but the program judges the request, refuses
    it with EPERM, and the affinity stays as it was."""
    require_bpf(kernel)

    with Cpuset(guest, cpus="0") as cpuset:
        run = run_loader(
            guest,
            CHECKED,
            "--reserve 1 --mask 0-1 --expect-load ok "
            "--expect-errno EPERM --expect-affinity unchanged",
            ktap_reports,
            cgroup=cpuset.path,
        )

    run.assert_ok()
    assert run.fact("bpf_events") == "1"
    assert run.fact("bpf_seen_mask") == hex(cpulist_to_word("0-1"))
    assert run.fact("bpf_verdict") == "-1"


def test_bpf_lsm_allows_mask_without_reserved_cpu(
    guest: BootedGuest,
    kernel: KernelImage,
    ktap_reports: list[KtapReport],
) -> None:
    """The control of the denial: CPU 1 reserved, sched_setaffinity({0})
    succeeds and the program allowed it."""
    require_bpf(kernel)

    run = run_loader(
        guest,
        CHECKED,
        "--reserve 1 --mask 0 --expect-load ok --expect-errno 0 --expect-affinity 0",
        ktap_reports,
    )

    run.assert_ok()
    assert run.fact("bpf_seen_mask") == hex(cpulist_to_word("0"))
    assert run.fact("bpf_verdict") == "0"


def test_bpf_lsm_sees_attr_and_no_mask_for_sched_setattr(
    guest: BootedGuest,
    kernel: KernelImage,
    ktap_reports: list[KtapReport],
) -> None:
    """sched_setattr(SCHED_BATCH) reaches the program with the attributes
    and a NULL mask, which the program checked before reading; with CPU 1
    reserved it is not refused, as it asks for no CPUs."""
    require_bpf(kernel)

    run = run_loader(
        guest,
        CHECKED,
        "--reserve 1 --policy batch --expect-load ok --expect-errno 0",
        ktap_reports,
    )

    run.assert_ok()
    assert run.fact("bpf_events") == "1"
    assert run.fact("bpf_seen_mask") == "none"
    assert run.fact("bpf_seen_attr") == "present"
    assert run.fact("bpf_verdict") == "0"


def test_verifier_rejects_mask_read_without_null_check(
    guest: BootedGuest,
    kernel: KernelImage,
    ktap_reports: list[KtapReport],
) -> None:
    """The hook names its mask argument in_mask__nullable: a program that
    reads the mask without checking it for NULL is refused by the
    verifier, the same program with the check loads."""
    require_bpf(kernel)

    unchecked = run_loader(guest, UNCHECKED, "--expect-load rejected", ktap_reports)
    checked = run_loader(guest, CHECKED, "--expect-load ok", ktap_reports)

    unchecked.assert_ok()
    checked.assert_ok()
    assert unchecked.fact("load_errno") == "EACCES"
    # The mask argument is a trusted pointer that may be NULL.
    assert "invalid mem access 'trusted_ptr_or_null_'" in unchecked.fact("verifier"), (
        unchecked.result.output
    )
    assert "trusted_ptr_or_null_cpumask" in unchecked.result.output
    assert checked.fact("attach") == "ok"
