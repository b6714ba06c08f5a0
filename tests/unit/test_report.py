"""RunResults: summary.json and junit.xml of a run, and its directories."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from kernels import EXPANDED_KERNEL

from lab.arches import X86_64
from lab.kbuild import KernelImage
from lab.ktap import parse_ktap
from lab.qemu import AccelChoice
from lab.report import CheckOutcome, RunResults

MASK_KTAP = """\
KTAP version 1
1..3
ok 1 sched_setaffinity returns 0
not ok 2 hook saw 0-1 # hook saw 0
ok 3 cpuset v1 restricts the mask # SKIP no cpuset v1 hierarchy
"""

DENY_KTAP = "KTAP version 1\n1..2\nok 1 returns EACCES\nok 2 affinity unchanged\n"


@pytest.fixture
def kernel(tmp_path: Path) -> KernelImage:
    entry = tmp_path / "cache/kernels/x86_64-1111111111111111"
    entry.mkdir(parents=True)
    (entry / "build.log").write_text("# kernel-lab build x86_64\n")
    (entry / "config").write_text("CONFIG_SMP=y\n")
    return replace(
        EXPANDED_KERNEL,
        entry=entry,
        build_log=entry / "build.log",
        config=entry / "config",
    )


@pytest.fixture
def results(tmp_path: Path, kernel: KernelImage) -> RunResults:
    """A finished run: a kernel, two boots and four checks, one per outcome."""
    results = RunResults.create(tmp_path / "results")
    results.add_kernel(X86_64, kernel, kernel.source)
    results.set_accel(X86_64, AccelChoice("tcg", "/dev/kvm does not exist"))
    results.add_boot(X86_64, 4.2345, "6.12.118")
    results.add_boot(X86_64, 3.9, "6.12.118")
    results.add_check(
        CheckOutcome(
            "test_hook_sees_untruncated_mask_in_cpuset[x86_64]",
            "x86_64",
            "failed",
            2.5,
            message="guest program reported: not ok 2 hook saw 0-1",
            details="AssertionError: ...",
            console="\x1b[0m[   12.3] cgroup: lab1\nok 1 sched_setaffinity returns 0\n",
            ktap=[parse_ktap(MASK_KTAP)],
        )
    )
    results.add_check(
        CheckOutcome(
            "test_lsm_deny_rule_refuses_mask[x86_64]",
            "x86_64",
            "passed",
            1.0,
            ktap=[parse_ktap(DENY_KTAP)],
        )
    )
    results.add_check(
        CheckOutcome(
            "test_guest_panic_boots_afresh[x86_64]",
            "x86_64",
            "error",
            7.0,
            message="[boot] QEMU exited (status 1) during boot",
        )
    )
    results.add_check(
        CheckOutcome(
            "test_vng_boots[x86_64]", "x86_64", "skipped", 0.0, message="vng not found"
        )
    )
    results.finish()
    return results


def test_summary_has_arch_facts(results: RunResults) -> None:
    summary = json.loads((results.dir / "summary.json").read_text())

    arch = summary["arches"]["x86_64"]
    assert arch["release"] == "6.12.118"
    assert arch["accel"] == "tcg"
    assert arch["accel_reason"] == "/dev/kvm does not exist"
    assert arch["boot_seconds"] == [4.23, 3.9]
    assert arch["boots"] == 2
    assert arch["hook_expanded"] is True
    assert arch["kernel_key"] == "1" * 64


def test_summary_has_checks_and_counts(results: RunResults) -> None:
    summary = json.loads((results.dir / "summary.json").read_text())

    assert [c["outcome"] for c in summary["checks"]] == [
        "failed",
        "passed",
        "error",
        "skipped",
    ]
    assert summary["counts"] == {"failed": 1, "passed": 1, "error": 1, "skipped": 1}
    assert summary["checks"][0]["ktap"][1] == {
        "name": "hook saw 0-1",
        "ok": False,
        "directive": "hook saw 0",
    }


def junit(results: RunResults) -> ET.Element:
    return ET.parse(results.dir / "junit.xml").getroot()


def test_junit_has_a_case_per_check_and_per_ktap_subtest(results: RunResults) -> None:
    [suite] = junit(results).iter("testsuite")

    names = [case.get("name") for case in suite.iter("testcase")]
    assert names == [
        "test_hook_sees_untruncated_mask_in_cpuset[x86_64]",
        "sched_setaffinity returns 0",
        "hook saw 0-1",
        "cpuset v1 restricts the mask",
        "test_lsm_deny_rule_refuses_mask[x86_64]",
        "returns EACCES",
        "affinity unchanged",
        "test_guest_panic_boots_afresh[x86_64]",
        "test_vng_boots[x86_64]",
    ]
    assert suite.get("tests") == "9"


def test_junit_keeps_failures_errors_and_skips_apart(results: RunResults) -> None:
    [suite] = junit(results).iter("testsuite")
    cases = {case.get("name"): case for case in suite.iter("testcase")}

    def kinds(name: str) -> list[str]:
        return [child.tag for child in cases[name] if child.tag != "system-out"]

    assert kinds("test_hook_sees_untruncated_mask_in_cpuset[x86_64]") == ["failure"]
    assert kinds("hook saw 0-1") == ["failure"]
    assert kinds("cpuset v1 restricts the mask") == ["skipped"]
    assert kinds("sched_setaffinity returns 0") == []
    assert kinds("test_guest_panic_boots_afresh[x86_64]") == ["error"]
    assert kinds("test_vng_boots[x86_64]") == ["skipped"]
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "2",
        "1",
        "2",
    )


def test_junit_ktap_reasons_and_classnames(results: RunResults) -> None:
    cases = {case.get("name"): case for case in junit(results).iter("testcase")}

    failure = cases["hook saw 0-1"].find("failure")
    assert failure is not None and failure.get("message") == "hook saw 0"
    skipped = cases["cpuset v1 restricts the mask"].find("skipped")
    assert skipped is not None and skipped.get("message") == "no cpuset v1 hierarchy"
    assert cases["hook saw 0-1"].get("classname") == (
        "kernel_lab.x86_64.test_hook_sees_untruncated_mask_in_cpuset[x86_64]"
    )


def test_junit_properties_name_kernel_and_hook(results: RunResults) -> None:
    [suite] = junit(results).iter("testsuite")

    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["kernel_release"] == "6.12.118"
    assert properties["hook_expanded"] == "True"
    assert properties["accel"] == "tcg"
    assert properties["arch"] == "x86_64"


def test_junit_carries_the_console_of_a_check(results: RunResults) -> None:
    cases = {case.get("name"): case for case in junit(results).iter("testcase")}

    out = cases["test_hook_sees_untruncated_mask_in_cpuset[x86_64]"].find("system-out")
    assert out is not None and "ok 1 sched_setaffinity returns 0" in (out.text or "")


def test_build_log_and_config_are_copied_beside_the_run(results: RunResults) -> None:
    arch_dir = results.dir / "x86_64"

    assert (arch_dir / "build.log").read_text() == "# kernel-lab build x86_64\n"
    assert (arch_dir / "config").read_text() == "CONFIG_SMP=y\n"


def test_each_boot_gets_its_own_files(tmp_path: Path) -> None:
    results = RunResults(tmp_path, "run")

    assert results.boot_file(X86_64, "console.log", 1).name == "console.log"
    assert results.boot_file(X86_64, "console.log", 2).name == "console.2.log"
    assert results.boot_file(X86_64, "qemu.cmd", 3).name == "qemu.3.cmd"


def test_runs_in_the_same_second_get_their_own_dirs(tmp_path: Path) -> None:
    first = RunResults.create(tmp_path)
    second = RunResults.create(tmp_path)

    assert first.dir != second.dir
    assert first.dir.is_dir() and second.dir.is_dir()
    assert (tmp_path / "latest").resolve() == second.dir.resolve()


def test_xdist_workers_runs_are_named_by_worker(tmp_path: Path) -> None:
    gw0 = RunResults.create(tmp_path, "gw0")
    gw1 = RunResults.create(tmp_path, "gw1")
    again = RunResults.create(tmp_path, "gw0")

    assert gw0.run_id.endswith("-gw0") and gw1.run_id.endswith("-gw1")
    assert len({gw0.dir, gw1.dir, again.dir}) == 3
