"""LAVA export: the lab's kernel, initramfs and plan as a LAVA job.

`export_job` writes a job directory: the kernel, the initramfs with the
plan appended (lab/plan.py), job.yaml (device type qemu: deploy to tmpfs,
boot with QEMU, one `monitors` test per scenario turning each KTAP line
into a LAVA test case) and device.yaml, a device dictionary for running
the job here with Debian's lava-run. `run_lava` runs it; `read_results`
reads a LAVA log (lava-run's, or a LAVA server's output.yaml) back.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from junit_xml import TestCase, TestSuite, to_xml_report_string

from lab.arches import Arch
from lab.cache import concat_files, file_sha256
from lab.errors import LabError, ToolMissing, tail_of
from lab.guest import GuestBundle
from lab.kbuild import KernelImage
from lab.plan import PLAN_ARG, CaseResult, Plan
from lab.progress import Progress
from lab.qemu import kernel_cmdline

log = logging.getLogger(__name__)

JOB_FILE = "job.yaml"
DEVICE_FILE = "device.yaml"
PLAN_FILE = "plan.txt"
CASES_FILE = "cases.txt"
RAMDISK_FILE = "ramdisk.cpio.gz"
LAVA_LOG = "lava.log"
LAVA_RUN = "lava-run"
# One KTAP test line, "ok 3 name" or "not ok 3 name # reason": the result
# and the name are what LAVA records (the monitors' pattern). The blank
# after the name makes it whole: LAVA matches while the line arrives.
MONITOR_PATTERN = r"(?P<result>not ok|ok) \d+ (?P<test_case_id>[a-z0-9_]+)\s"
MONITOR_FIXUP = {"ok": "pass", "not ok": "fail"}
# Minutes: a TCG boot takes seconds; the plan under ten.
JOB_MINUTES = 10
BOOT_MINUTES = 3
TEST_MINUTES = 5


class LavaError(LabError):
    """lava-run failed, or its log holds no result of the job."""

    phase = "lava"


@dataclass(frozen=True)
class LavaJob:
    """An exported job directory and what is in it."""

    directory: Path
    job: Path
    device: Path
    kernel: Path
    ramdisk: Path
    plan: Plan


def scenario_monitor(name: str) -> dict[str, Any]:
    """The LAVA monitor of one scenario: from lab-init's scenario frame to
    its end, each KTAP test line is a test case of test suite `name`."""
    return {
        "name": name,
        "start": f"@@LAB:SCENARIO {name}@@",
        "end": f"@@LAB:SCENARIO-END {name}@@",
        "pattern": MONITOR_PATTERN,
        "fixupdict": dict(MONITOR_FIXUP),
    }


def image_url(path: Path, url_base: str | None) -> str:
    """file:// for lava-run here; under url_base for a LAVA instance."""
    if url_base:
        return f"{url_base.rstrip('/')}/{path.name}"
    return path.resolve().as_uri()


def job_definition(
    arch: Arch,
    kernel: KernelImage,
    plan: Plan,
    kernel_file: Path,
    ramdisk_file: Path,
    url_base: str | None = None,
) -> dict[str, Any]:
    """The LAVA job (qemu device type) that boots kernel_file with the
    plan in ramdisk_file and reports each KTAP test as a test case."""
    if not arch.lava_arch:
        raise LavaError(f"no LAVA arch is known for {arch.name} (lab/arches.py)")
    append = kernel_cmdline(arch, (PLAN_ARG,))
    return {
        "job_name": f"kernel-lab {arch.name} {kernel.release}: "
        f"{len(plan.scenarios)} scenarios of the task_setscheduler hook",
        "device_type": "qemu",
        "visibility": "public",
        "priority": "medium",
        "timeouts": {
            "job": {"minutes": JOB_MINUTES},
            "action": {"minutes": BOOT_MINUTES},
            "connection": {"minutes": 2},
        },
        # The qemu device type renders these into the QEMU command. KVM is
        # off: the lab's checks are timed for TCG and KVM is no promise.
        "context": {
            "arch": arch.lava_arch,
            "no_kvm": True,
            "memory": arch.memory_mb,
            "extra_options": _qemu_extra(arch),
        },
        "metadata": {
            "kernel-lab.arch": arch.name,
            "kernel-lab.release": kernel.release,
            "kernel-lab.kernel-key": kernel.key,
            "kernel-lab.source": kernel.source,
        },
        "actions": [
            {
                "deploy": {
                    "to": "tmpfs",
                    "timeout": {"minutes": BOOT_MINUTES},
                    "images": {
                        "kernel": {
                            "url": image_url(kernel_file, url_base),
                            "sha256sum": file_sha256(kernel_file),
                            "image_arg": f'-kernel {{kernel}} -append "{append}"',
                        },
                        "ramdisk": {
                            "url": image_url(ramdisk_file, url_base),
                            "sha256sum": file_sha256(ramdisk_file),
                            "image_arg": "-initrd {ramdisk}",
                        },
                    },
                }
            },
            {
                "boot": {
                    "method": "qemu",
                    "media": "tmpfs",
                    "timeout": {"minutes": BOOT_MINUTES},
                }
            },
            {
                "test": {
                    "timeout": {"minutes": TEST_MINUTES},
                    "monitors": [scenario_monitor(s.name) for s in plan.scenarios],
                }
            },
        ],
    }


def _qemu_extra(arch: Arch) -> list[str]:
    """QEMU options beyond the device type's: the lab's CPU and CPU count;
    no reboot, so that a panic (panic=-1) ends QEMU and the job at once."""
    return [f"-cpu {arch.cpu_tcg}", f"-smp {arch.smp}", "-no-reboot"]


def device_dictionary(arch: Arch) -> dict[str, Any]:
    """A qemu device, rendered as lava-run reads it, for running a job on
    this host: what LAVA's qemu device type gives for the job's context,
    with no network device (the plan needs none)."""
    return {
        "constants": {
            "posix": {
                "lava_test_sh_cmd": "/bin/sh",
                "lava_test_results_dir": "/lava-%s",
                "lava_test_shell_file": "~/.bashrc",
            },
            "shutdown-message": "The system is going down for reboot NOW",
            "kernel-start-message": "Linux version [0-9]",
            "default-shell-prompt": "lava-test: # ",
            "spawn_maxread": "4092",
            # One attempt: a failed boot is a result, not something to retry.
            "failure_retry": 1,
            "boot_retry": 1,
        },
        "parameters": {"pass": None},
        "available_architectures": [arch.lava_arch],
        "actions": {
            "deploy": {
                "connections": {"serial": None},
                "methods": {"image": {"parameters": {}}},
            },
            "boot": {
                "connections": {"serial": None},
                "methods": {
                    "qemu": {
                        "parameters": {
                            "command": arch.qemu,
                            "boot_options": {"console": arch.console},
                            "options": [
                                f"-machine {arch.machine}",
                                "-nographic",
                                "-net none",
                                f"-m {arch.memory_mb}",
                                "-monitor none",
                            ],
                            "extra": _qemu_extra(arch),
                        }
                    }
                },
            },
        },
        "timeouts": {
            "actions": {
                "boot-qemu-image": {"minutes": BOOT_MINUTES},
                "boot-image-retry": {"minutes": BOOT_MINUTES},
                "power-off": {"seconds": 10},
            },
            "connections": {},
        },
    }


def export_job(
    arch: Arch,
    kernel: KernelImage,
    bundle: GuestBundle,
    plan: Plan,
    output: Path,
    url_base: str | None = None,
) -> LavaJob:
    """Write the job directory: kernel, ramdisk, plan, job and device."""
    output.mkdir(parents=True, exist_ok=True)
    kernel_file = output / kernel.image.name
    shutil.copyfile(kernel.image, kernel_file)
    plan_archive = output / "plan.cpio.gz"
    plan_archive.write_bytes(plan.archive())
    ramdisk = output / RAMDISK_FILE
    # The kernel unpacks concatenated archives: the plan lands on top.
    concat_files([bundle.initramfs, plan_archive], ramdisk)
    plan_archive.unlink()
    (output / PLAN_FILE).write_text(plan.text())
    (output / CASES_FILE).write_text(
        "".join(f"{s}/{c}\n" for s, c in sorted(plan.expected_cases()))
    )

    job = output / JOB_FILE
    definition = job_definition(arch, kernel, plan, kernel_file, ramdisk, url_base)
    job.write_text(_yaml(definition))
    device = output / DEVICE_FILE
    device.write_text(_yaml(device_dictionary(arch)))
    return LavaJob(output, job, device, kernel_file, ramdisk, plan)


def expected_cases(job_dir: Path) -> set[tuple[str, str]]:
    """The test cases an exported job must report (its cases.txt)."""
    path = job_dir / CASES_FILE
    try:
        lines = path.read_text().split()
    except OSError as err:
        raise LavaError(f"cannot read {path}: {err.strerror}") from None
    pairs = [tuple(line.split("/", 1)) for line in lines]
    return {(p[0], p[1]) for p in pairs if len(p) == 2}


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=200)


def local_job_id() -> str:
    """A job id of this run only: lava-run works in
    /var/lib/lava/dispatcher/tmp/<job id> and removes it at the end, so two
    runs with one id (two sessions at once) pull the files from under each
    other ("Connection closed", every case missing)."""
    return f"kernel-lab-{os.getpid()}-{secrets.token_hex(3)}"


def lava_run_argv(job_dir: Path, out: Path, job_id: str) -> list[str]:
    """lava-run on the job with the job directory's device dictionary."""
    return [
        LAVA_RUN,
        "--job-id",
        job_id,
        "--output-dir",
        str(out / "tmp"),
        "--device",
        str(job_dir / DEVICE_FILE),
        str(job_dir / JOB_FILE),
    ]


def run_lava(
    job_dir: Path, out: Path, progress: Progress, timeout: float = JOB_MINUTES * 60
) -> Path:
    """Run the job with lava-run here; its log (LAVA's YAML lines) goes to
    out/lava.log, which is returned. lava-run must run as root."""
    if shutil.which(LAVA_RUN) is None:
        raise ToolMissing(
            "lava-run not found; install it: apt-get install lava-dispatcher"
        )
    if os.geteuid() != 0:
        raise LavaError("lava-run runs jobs as root only: run this as root")
    out.mkdir(parents=True, exist_ok=True)
    argv = lava_run_argv(job_dir, out, local_job_id())
    log_path = out / LAVA_LOG
    log.info("lava: %s", shlex.join(argv))
    (out / "lava-run.cmd").write_text(shlex.join(argv) + "\n")
    progress.phase(f"lava: running {job_dir / JOB_FILE} with lava-run")
    started = time.monotonic()
    with log_path.open("wb") as f:
        try:
            proc = subprocess.run(
                argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise LavaError(
                f"lava-run did not end in {timeout:.0f} s", log_path, tail_of(log_path)
            ) from None
    progress.phase(
        f"lava: lava-run exited {proc.returncode} in {time.monotonic() - started:.1f} s"
    )
    return log_path


@dataclass(frozen=True)
class LavaResults:
    """What a LAVA log says: each test case, and the job's own verdict."""

    cases: list[CaseResult]
    job_result: str  # pass, fail, or "" when the log has no job verdict
    job_error: str = ""

    def problems(self, expected: set[tuple[str, str]] | None = None) -> list[str]:
        """Why this run is not a clean pass of the expected cases."""
        out = []
        if self.job_result != "pass":
            out.append(
                f"the LAVA job did not complete: {self.job_error or 'no verdict'}"
            )
        out += [
            f"{c.scenario}/{c.case}: {c.result}"
            for c in self.cases
            if c.result != "pass"
        ]
        if expected is not None:
            got = {c.key for c in self.cases}
            out += [f"{s}/{c}: missing" for s, c in sorted(expected - got)]
            out += [f"{s}/{c}: not in the plan" for s, c in sorted(got - expected)]
        return out


def read_results(path: Path) -> LavaResults:
    """Test cases from a LAVA log: lava-run's output (one YAML mapping a
    line) or a server's output.yaml (the same as a list). The job's own
    result is the case "job" of definition "lava"; LAVA's other
    definition "lava" cases (its actions) are not the plan's."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise LavaError(f"cannot read the LAVA log {path}: {err.strerror}") from None
    cases: list[CaseResult] = []
    job_result, job_error = "", ""
    for line in text.splitlines():
        entry = _log_entry(line)
        if entry is None or entry.get("lvl") != "results":
            continue
        msg = entry.get("msg")
        if not isinstance(msg, dict):
            continue
        definition, case = str(msg.get("definition", "")), str(msg.get("case", ""))
        result = str(msg.get("result", ""))
        if definition == "lava":
            if case == "job":
                job_result, job_error = result, str(msg.get("error_msg", ""))
            continue
        cases.append(CaseResult(definition, case, result))
    if not job_result and not cases:
        raise LavaError(f"no LAVA results in {path}", path, tail_of(path))
    return LavaResults(cases, job_result, job_error)


def _log_entry(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if line.startswith("- "):
        line = line[2:]
    if not line.startswith("{"):
        return None
    try:
        entry = yaml.safe_load(line)
    except yaml.YAMLError:
        return None
    return entry if isinstance(entry, dict) else None


def junit_xml(results: LavaResults, suite_prefix: str = "lava") -> str:
    """JUnit XML: a test suite per scenario, a case per LAVA test case,
    and the job's own verdict as the case lava/job."""
    suites: dict[str, list[TestCase]] = {}
    for c in results.cases:
        case = TestCase(c.case, classname=f"{suite_prefix}.{c.scenario}")
        if c.result == "fail":
            case.add_failure_info("fail")
        elif c.result == "skip":
            case.add_skipped_info("skip")
        elif c.result != "pass":
            case.add_error_info(f"LAVA result {c.result!r}")
        suites.setdefault(c.scenario, []).append(case)
    job = TestCase("job", classname=f"{suite_prefix}.lava")
    if results.job_result != "pass":
        job.add_failure_info(results.job_error or "the job did not complete")
    suites.setdefault("lava", []).append(job)
    return to_xml_report_string(
        [TestSuite(f"{suite_prefix}.{name}", cases) for name, cases in suites.items()]
    )
