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
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

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
# Seconds lava-run gets to clean up after SIGINT (Ctrl-C, a timeout)
# before it is killed: it removes its work directory then.
STOP_GRACE = 20.0
# What the log tail of a failed job shows: the target's console and
# LAVA's errors, decoded from LAVA's YAML lines.
TAIL_LEVELS = ("target", "error", "exception", "feedback")
TAIL_LINES = 15


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
    extra = [f"-cpu {arch.cpu_tcg}", f"-smp {arch.smp}", "-no-reboot"]
    if arch.tcg_accel != "tcg":
        # The machine's TCG threading, as the lab boots it (lab/arches.py).
        extra.append(f"-accel {arch.tcg_accel}")
    return extra


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
    check_url_base(url_base)
    output_dir(output, "the job")
    try:
        return _write_job(arch, kernel, bundle, plan, output, url_base)
    except OSError as err:
        raise LavaError(
            f"cannot write the job to {output}: {err.strerror or err}"
        ) from None


def _write_job(
    arch: Arch,
    kernel: KernelImage,
    bundle: GuestBundle,
    plan: Plan,
    output: Path,
    url_base: str | None,
) -> LavaJob:
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


def check_url_base(url_base: str | None) -> None:
    """A LAVA worker downloads the images over HTTP(S) from url_base."""
    if url_base is None:
        return
    url = urlparse(url_base)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise LavaError(
            f"--url-base {url_base!r} is not an http:// or https:// URL "
            "(where a LAVA worker downloads the job's images)"
        )


def output_dir(path: Path, what: str) -> Path:
    """Make the directory `what` is written to, or say why it cannot be."""
    if path.exists() and not path.is_dir():
        raise LavaError(f"cannot write {what} to {path}: not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LavaError(f"cannot write {what} to {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LavaError(f"cannot write {what} to {path}: permission denied")
    return path


def output_file(path: Path, what: str) -> Path:
    """Check that `what` can be written to path (a file), before the work
    that makes it; a file that was not there is not left behind."""
    if path.is_dir():
        raise LavaError(f"cannot write {what} to {path}: it is a directory")
    existed = path.exists()
    try:
        with path.open("ab"):
            pass
    except OSError as err:
        raise LavaError(f"cannot write {what} to {path}: {err.strerror}") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


def write_output(path: Path, text: str, what: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        raise LavaError(f"cannot write {what} to {path}: {err.strerror}") from None


def check_local_images(job_dir: Path) -> None:
    """lava-run here must read the job's images from JOB_DIR: a job
    exported with --url-base would download them (network), and a job dir
    copied elsewhere still names the original directory's files."""
    path = job_dir / JOB_FILE
    try:
        job = yaml.safe_load(path.read_text())
        images = job["actions"][0]["deploy"]["images"]
        urls = {name: str(image["url"]) for name, image in images.items()}
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise LavaError(f"cannot read the job's images from {path}: {err}") from None
    for name, url in urls.items():
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise LavaError(
                f"the job's {name} is {url}, not a file here: the job was "
                "exported with --url-base for a LAVA instance and lava-run "
                "would download it. Submit it to that instance (lavacli jobs "
                "submit), or export it again without --url-base to run it here"
            )
        image = Path(unquote(parsed.path))
        inside = job_dir / image.name
        if image.resolve() != inside.resolve() or not inside.is_file():
            raise LavaError(
                f"the job's {name} is {image}, not {inside}: the job names "
                "the images of the directory it was exported to. Export it "
                f"again into this directory (lab lava-job --output {job_dir})"
            )


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
    check_local_images(job_dir)
    if shutil.which(LAVA_RUN) is None:
        raise ToolMissing(
            "lava-run not found; install it: apt-get install lava-dispatcher"
        )
    if os.geteuid() != 0:
        raise LavaError("lava-run runs jobs as root only: run this as root")
    output_dir(out, "lava-run's output")
    argv = lava_run_argv(job_dir, out, local_job_id())
    log_path = out / LAVA_LOG
    log.info("lava: %s", shlex.join(argv))
    write_output(out / "lava-run.cmd", shlex.join(argv) + "\n", "the command")
    progress.phase(f"lava: running {job_dir / JOB_FILE} with lava-run")
    started = time.monotonic()
    with log_path.open("wb") as f:
        # A session of its own: Ctrl-C reaches lab only, which then stops
        # lava-run with one SIGINT (a second would cut its cleanup short).
        proc = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise LavaError(
                f"lava-run did not end in {timeout:.0f} s",
                log_path,
                log_tail(log_path) or tail_of(log_path),
            ) from None
        except BaseException:  # Ctrl-C: let lava-run clean up, then stop
            stop_process(proc)
            raise
    progress.phase(
        f"lava: lava-run exited {returncode} in {time.monotonic() - started:.1f} s"
    )
    return log_path


def stop_process(proc: subprocess.Popen[bytes], grace: float | None = None) -> None:
    """SIGINT once (lava-run cancels the job and removes its work
    directory), up to `grace` seconds for it to exit, then SIGKILL. A
    second Ctrl-C while waiting kills it at once."""
    grace = STOP_GRACE if grace is None else grace
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        log.info("lava: stopping lava-run (pid %d), up to %.0f s", proc.pid, grace)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        log.warning("lava: lava-run did not stop in time: killing it")
        proc.kill()
        proc.wait()


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
            missing = sorted(expected - got)
            if missing and self.job_result != "pass":
                # The job ended early: one line, not one per case.
                n = len(missing)
                out.append(
                    f"{n} expected case{'s' if n != 1 else ''} not reported: "
                    "the job ended early"
                )
            else:
                out += [f"{s}/{c}: missing" for s, c in missing]
            out += [f"{s}/{c}: not in the plan" for s, c in sorted(got - expected)]
        return out

    def failed(self) -> bool:
        """The job did not complete, or one of its cases did not pass."""
        return self.job_result != "pass" or any(c.result != "pass" for c in self.cases)


def read_results(path: Path) -> LavaResults:
    """Test cases from a LAVA log: lava-run's output (one YAML mapping a
    line) or a server's output.yaml (the same as a list). The job's own
    result is the case "job" of definition "lava"; LAVA's other
    definition "lava" cases (its actions) are not the plan's."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LavaError(f"cannot read the LAVA log {path}: {err.strerror}") from None
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
        text = raw.decode()
    except UnicodeDecodeError:
        raise LavaError(
            f"not a LAVA log: {path} (binary, not LAVA's YAML lines)"
        ) from None
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


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of the target's console and of LAVA's errors in a
    LAVA log, decoded from its YAML lines ("" when it has none)."""
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    out: list[str] = []
    for line in text.splitlines():
        entry = _log_entry(line)
        if entry is None or entry.get("lvl") not in TAIL_LEVELS:
            continue
        msg = str(entry.get("msg", "")).rstrip()
        if not msg:
            continue
        level = entry["lvl"]
        out.append(msg if level == "target" else f"[lava {level}] {msg}")
    return "\n".join(out[-lines:])


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
