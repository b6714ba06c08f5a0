"""results/<run-id>/: what one run leaves behind for a person or a CI job.

results/<run-id>/summary.json     arch, release, accel, boots, checks
results/<run-id>/junit.xml        one case per check per arch, plus
                                  one per KTAP subtest of the guest
results/<run-id>/<arch>/          build.log, config, and per boot
                                  console.log, qemu.cmd (boot 2 on:
                                  console.2.log, qemu.2.cmd)
results/latest -> <run-id>
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from junit_xml import TestCase, TestSuite, to_xml_report_string

from lab.errors import LabError
from lab.ktap import KtapReport

if TYPE_CHECKING:
    from lab.arches import Arch
    from lab.kbuild import KernelImage
    from lab.qemu import AccelChoice


@dataclass
class CheckOutcome:
    """One pytest test of the lab, as the report shows it."""

    name: str
    arch: str
    outcome: str  # passed, failed, error, skipped
    seconds: float
    message: str = ""
    details: str = ""
    console: str = ""
    ktap: list[KtapReport] = field(default_factory=list)
    # For a lab error: its phase, and whether the kernel under test caused it.
    phase: str = ""
    kernel_fault: bool = False


@dataclass
class ArchReport:
    arch: str
    release: str = ""
    kernel_key: str = ""
    source: str = ""
    commit: str = ""
    hook_expanded: bool | None = None
    test_lsm: bool | None = None
    build_seconds: float | None = None
    build_cached: bool | None = None
    accel: str = ""
    accel_reason: str = ""
    boot_seconds: list[float] = field(default_factory=list)
    # Boots of other configurations of the kernel (lsm= for SELinux), by name.
    variant_boot_seconds: dict[str, list[float]] = field(default_factory=dict)
    # A build or setup failure that kept this arch from booting.
    failure: str = ""


class RunResults:
    """Collects a run's facts and writes them under results/<run-id>/."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.root = root
        self.run_id = run_id
        self.dir = root / run_id
        self.arches: dict[str, ArchReport] = {}
        self.checks: list[CheckOutcome] = []
        self.started = time.time()
        # How the guests were run: launcher, transport, QEMU host.
        self.setup: dict[str, str] = {}

    @classmethod
    def create(cls, root: Path, label: str = "") -> RunResults:
        """A new results/<run-id>/; a label (an xdist worker: gw0) ends the id."""
        root = root.expanduser()
        root.mkdir(parents=True, exist_ok=True)
        base = time.strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
        # Two runs started in the same second get their own directories.
        for n in range(1000):
            run_id = base if n == 0 else f"{base}.{n}"
            try:
                (root / run_id).mkdir()
                break
            except FileExistsError:
                continue
        results = cls(root, run_id)
        results._point_latest()
        return results

    def _point_latest(self) -> None:
        link = self.root / "latest"
        tmp = self.root / f".latest.{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.run_id)
            os.replace(tmp, link)
        except OSError:
            pass

    def arch_dir(self, arch: Arch | str) -> Path:
        name = arch if isinstance(arch, str) else arch.name
        path = self.dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def arch_report(self, arch: Arch | str) -> ArchReport:
        name = arch if isinstance(arch, str) else arch.name
        return self.arches.setdefault(name, ArchReport(name))

    def boot_file(self, arch: Arch, name: str, number: int) -> Path:
        """console.log, console.2.log, ... (console.selinux.2.log): one file
        per boot."""
        if number > 1:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}.{number}{dot}{ext}"
        return self.arch_dir(arch) / name

    def add_kernel(self, arch: Arch, kernel: KernelImage, source: str) -> None:
        report = self.arch_report(arch)
        report.release = kernel.release
        report.kernel_key = kernel.key
        report.source = source
        report.commit = kernel.commit
        report.hook_expanded = kernel.hook_expanded
        report.test_lsm = kernel.test_lsm
        report.build_seconds = kernel.build_seconds
        report.build_cached = kernel.cached
        out = self.arch_dir(arch)
        for src, name in ((kernel.build_log, "build.log"), (kernel.config, "config")):
            if src.is_file():
                (out / name).write_bytes(src.read_bytes())

    def add_failure(self, arch: Arch, err: LabError) -> None:
        """A build (or setup) failure: its message, and its log beside the run."""
        report = self.arch_report(arch)
        report.failure = f"[{err.phase}] {err.message}"
        if err.log is not None and err.log.is_file():
            name = "build.log" if err.phase == "build" else err.log.name
            (self.arch_dir(arch) / name).write_bytes(err.log.read_bytes())

    def set_accel(self, arch: Arch, choice: AccelChoice) -> None:
        report = self.arch_report(arch)
        report.accel = choice.accel
        report.accel_reason = choice.reason

    def add_boot(
        self, arch: Arch, seconds: float, release: str, variant: str = ""
    ) -> None:
        report = self.arch_report(arch)
        if variant:
            boots = report.variant_boot_seconds.setdefault(variant, [])
            boots.append(round(seconds, 2))
        else:
            report.boot_seconds.append(round(seconds, 2))
        report.release = report.release or release

    def add_check(self, check: CheckOutcome) -> None:
        self.checks.append(check)

    # -- writing ---------------------------------------------------------

    def summary(self, interrupted: bool = False) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for check in self.checks:
            counts[check.outcome] = counts.get(check.outcome, 0) + 1
        return {
            "run_id": self.run_id,
            "started": time.strftime(
                "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)
            ),
            "seconds": round(time.time() - self.started, 1),
            "interrupted": interrupted,
            **self.setup,
            "counts": counts,
            "arches": {
                name: {
                    "release": a.release,
                    "kernel_key": a.kernel_key,
                    "source": a.source,
                    "commit": a.commit,
                    "hook_expanded": a.hook_expanded,
                    "test_lsm": a.test_lsm,
                    # The entry's own build time; cached: this run built nothing.
                    "build_seconds": a.build_seconds,
                    "build_cached": a.build_cached,
                    "failure": a.failure,
                    "accel": a.accel,
                    "accel_reason": a.accel_reason,
                    "boot_seconds": a.boot_seconds,
                    "boots": len(a.boot_seconds),
                    "variant_boot_seconds": a.variant_boot_seconds,
                }
                for name, a in sorted(self.arches.items())
            },
            "checks": [
                {
                    "name": c.name,
                    "arch": c.arch,
                    "outcome": c.outcome,
                    "seconds": round(c.seconds, 2),
                    "message": c.message,
                    "phase": c.phase,
                    "kernel_fault": c.kernel_fault,
                    "ktap": [
                        {"name": r.name, "ok": r.ok, "directive": r.directive}
                        for k in c.ktap
                        for r in k.results
                    ],
                }
                for c in self.checks
            ],
        }

    def junit_suites(self) -> list[TestSuite]:
        suites = []
        arch_names = sorted({c.arch for c in self.checks} | set(self.arches))
        for arch in arch_names:
            report = self.arches.get(arch, ArchReport(arch))
            cases = []
            for check in (c for c in self.checks if c.arch == arch):
                cases.append(_check_case(check))
                cases.extend(_ktap_cases(check))
            properties = {
                "arch": arch,
                "kernel_release": report.release,
                "kernel_source": report.source,
                "kernel_commit": report.commit,
                "kernel_key": report.kernel_key,
                "hook_expanded": str(report.hook_expanded),
                "accel": report.accel,
                **self.setup,
            }
            suites.append(TestSuite(f"kernel-lab.{arch}", cases, properties=properties))
        return suites

    def finish(self, interrupted: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary(interrupted)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.dir / "junit.xml").write_text(to_xml_report_string(self.junit_suites()))


def _check_case(check: CheckOutcome) -> TestCase:
    case = TestCase(
        check.name,
        classname=f"kernel_lab.{check.arch}",
        elapsed_sec=check.seconds,
        stdout=check.console or None,
    )
    if check.outcome == "failed":
        case.add_failure_info(check.message or "failed", check.details)
    elif check.outcome == "error":
        case.add_error_info(check.message or "error", check.details)
    elif check.outcome == "skipped":
        case.add_skipped_info(check.message or "skipped")
    return case


def _ktap_cases(check: CheckOutcome) -> list[TestCase]:
    cases = []
    for report in check.ktap:
        for result in report.results:
            case = TestCase(
                result.name, classname=f"kernel_lab.{check.arch}.{check.name}"
            )
            if result.skipped:
                case.add_skipped_info(result.reason)
            elif not result.ok:
                case.add_failure_info(result.directive or "not ok")
            cases.append(case)
    return cases
