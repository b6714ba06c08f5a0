"""What checks read from a guest: the test LSM's log, kprobe traces, masks."""

from __future__ import annotations

from pathlib import Path

import pytest
from kernels import EXPANDED_KERNEL, STOCK_KERNEL

from lab.arches import X86_64
from lab.checks import (
    HookNotExpanded,
    HookRecord,
    KprobeHit,
    KprobeWitness,
    cpulist_to_word,
    parse_kprobe_trace,
    parse_records,
    require_expanded_hook,
)

LSM_LOG = """\
seq=1 caller=1 target=1 comm=init mask=0-1 ret=0
seq=2 caller=57 target=57 comm=affinity mask=none ret=0
seq=3 caller=57 target=57 comm=affinity mask=0-1 ret=0
seq=4 caller=58 target=57 comm=affinity mask=empty ret=-13
seq=5 caller=12 target=12 comm=kworker/0:1 H mask=1 ret=0
"""

TRACE = (Path(__file__).parent / "data" / "kprobe_trace.txt").read_text()

STOCK_TRACE_LINE = (
    "        affinity-57      [000] d..1.    12.345678: setsched: "
    "(security_task_setscheduler+0x0/0x50) task=0xffff888003c3bd30\n"
)


def test_records_are_parsed_with_mask_kinds() -> None:
    records = parse_records(LSM_LOG)

    assert records[1:4] == [
        HookRecord(seq=2, caller=57, target=57, comm="affinity", mask="none", ret=0),
        HookRecord(seq=3, caller=57, target=57, comm="affinity", mask="0-1", ret=0),
        HookRecord(seq=4, caller=58, target=57, comm="affinity", mask="empty", ret=-13),
    ]


def test_record_comm_may_hold_spaces() -> None:
    record = parse_records(LSM_LOG)[4]

    assert (record.comm, record.mask) == ("kworker/0:1 H", "1")


def test_records_skip_lines_that_are_not_records() -> None:
    text = "labtest: log cleared\n  seq=9 caller=57 target=57 comm=a mask=0 ret=0  \n"

    assert [r.seq for r in parse_records(text)] == [9]


def test_kprobe_trace_gives_pid_comm_pointer_and_word() -> None:
    hits = parse_kprobe_trace(TRACE, "setsched")

    assert hits == [
        KprobeHit(pid=57, comm="affinity", mask_ptr=0xFFFFC90000213E40, mask_word=0x3),
        KprobeHit(pid=1, comm="lab-init", mask_ptr=0xFFFFC90000013E40, mask_word=0x1),
    ]


def test_kprobe_trace_of_stock_kernel_has_no_mask() -> None:
    [hit] = parse_kprobe_trace(STOCK_TRACE_LINE, "setsched")

    assert hit == KprobeHit(pid=57, comm="affinity", mask_ptr=None, mask_word=None)


def test_kprobe_trace_keeps_only_the_asked_event() -> None:
    [hit] = parse_kprobe_trace(TRACE, "other")

    assert hit.pid == 57 and hit.mask_word is None


def witness(kernel: object, **kwargs: str) -> KprobeWitness:
    # definition() never talks to the guest.
    return KprobeWitness(None, X86_64, kernel, **kwargs)  # type: ignore[arg-type]


def test_witness_on_expanded_kernel_fetches_mask_and_word() -> None:
    assert witness(EXPANDED_KERNEL).definition() == (
        "p:kernel_lab/setsched security_task_setscheduler "
        "task=%di:x64 mask=%si:x64 word=+0(%si):x64"
    )


def test_witness_on_stock_kernel_does_not_fetch_the_mask_register() -> None:
    definition = witness(STOCK_KERNEL).definition()

    assert definition == "p:kernel_lab/setsched security_task_setscheduler task=%di:x64"
    assert "%si" not in definition


def test_witness_on_another_function_does_not_fetch_a_mask() -> None:
    definition = witness(
        EXPANDED_KERNEL, function="__x64_sys_sched_setaffinity", event="setaff"
    ).definition()

    assert definition == "p:kernel_lab/setaff __x64_sys_sched_setaffinity task=%di:x64"


@pytest.mark.parametrize(
    ("cpus", "word"),
    [("0", 0b1), ("1", 0b10), ("0-1", 0b11), ("0,2-3", 0b1101), ("7", 0x80)],
)
def test_cpulist_to_word(cpus: str, word: int) -> None:
    assert cpulist_to_word(cpus) == word


def test_stock_kernel_fails_a_mask_check_with_a_reason() -> None:
    with pytest.raises(HookNotExpanded, match="hook not expanded"):
        require_expanded_hook(STOCK_KERNEL)

    require_expanded_hook(EXPANDED_KERNEL)
