"""The LAVA export: the job and device YAML, the monitors' pattern on a
real plan console, and the results read back from real lava-run logs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from kernels import EXPANDED_KERNEL

from lab import lava
from lab.arches import MIPS, X86_64
from lab.cli import main
from lab.guest import GuestBundle
from lab.plan import PLAN_ARG, build_plan
from lab.progress import Progress

DATA = Path(__file__).parent / "data"
KERNEL = replace(EXPANDED_KERNEL, hook_has_attr=True)
DEBIAN_PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """An exported job from stand-in kernel and initramfs files."""
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "bzImage").write_bytes(b"kernel")
    (entry / "initramfs.cpio.gz").write_bytes(b"initramfs")
    kernel = replace(KERNEL, image=entry / "bzImage")
    bundle = GuestBundle("x86_64", entry, entry / "initramfs.cpio.gz")
    lava.export_job(
        X86_64, kernel, bundle, build_plan(X86_64, kernel), tmp_path / "job"
    )
    return tmp_path / "job"


def test_job_is_a_qemu_tmpfs_job_with_one_monitor_per_scenario(job_dir: Path) -> None:
    job = yaml.safe_load((job_dir / lava.JOB_FILE).read_text())
    deploy, boot, test = (next(iter(a.values())) for a in job["actions"])

    assert job["device_type"] == "qemu"
    assert job["context"]["arch"] == "amd64"
    assert "-smp 2" in job["context"]["extra_options"]
    assert deploy["to"] == "tmpfs"
    assert deploy["images"]["kernel"]["url"] == (job_dir / "bzImage").as_uri()
    assert PLAN_ARG in deploy["images"]["kernel"]["image_arg"]
    assert "console=ttyS0" in deploy["images"]["kernel"]["image_arg"]
    assert deploy["images"]["ramdisk"]["image_arg"] == "-initrd {ramdisk}"
    assert (boot["method"], boot["media"]) == ("qemu", "tmpfs")
    names = [m["name"] for m in test["monitors"]]
    assert names == [s.name for s in build_plan(X86_64, KERNEL).scenarios]
    assert test["monitors"][0]["start"] == f"@@LAB:SCENARIO {names[0]}@@"


def test_ramdisk_is_the_initramfs_followed_by_the_plan(job_dir: Path) -> None:
    ramdisk = (job_dir / lava.RAMDISK_FILE).read_bytes()
    plan = build_plan(X86_64, KERNEL)

    assert ramdisk == b"initramfs" + plan.archive()
    assert (job_dir / lava.PLAN_FILE).read_text() == plan.text()
    assert lava.expected_cases(job_dir) == plan.expected_cases()


def test_url_base_points_the_images_at_a_web_server(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(b"kernel")
    plan = build_plan(X86_64, KERNEL)

    job = lava.job_definition(
        X86_64, KERNEL, plan, image, image, url_base="http://lab.example/jobs/1/"
    )

    images = job["actions"][0]["deploy"]["images"]
    assert images["kernel"]["url"] == "http://lab.example/jobs/1/bzImage"
    assert images["kernel"]["sha256sum"] == lava.file_sha256(image)


def test_device_dictionary_boots_the_lab_machine_without_network() -> None:
    device = lava.device_dictionary(MIPS)
    qemu = device["actions"]["boot"]["methods"]["qemu"]["parameters"]

    assert device["available_architectures"] == ["mips"]
    assert qemu["command"] == "qemu-system-mips"
    assert "-machine malta" in qemu["options"]
    assert "-net none" in qemu["options"]
    # One TCG thread, as the lab boots Malta (lab/arches.py says why).
    assert qemu["extra"] == [
        "-cpu 34Kf",
        "-smp 2",
        "-no-reboot",
        "-accel tcg,thread=single",
    ]


@pytest.mark.skipif(
    not DEBIAN_PYTHON.exists()
    or subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import lava_common"], capture_output=True
    ).returncode,
    reason="lava-dispatcher (Debian) is not installed",
)
def test_job_and_device_pass_lava_schemas(job_dir: Path) -> None:
    """lava_common's own validation, in Debian's Python where it lives."""
    check = (
        "import sys, yaml\n"
        "from lava_common.schemas import validate\n"
        "from lava_common.schemas.device import validate as validate_device\n"
        "validate(yaml.safe_load(open(sys.argv[1])))\n"
        "validate_device(yaml.safe_load(open(sys.argv[2])))\n"
    )
    proc = subprocess.run(
        [
            str(DEBIAN_PYTHON),
            "-c",
            check,
            str(job_dir / lava.JOB_FILE),
            str(job_dir / lava.DEVICE_FILE),
        ],
        capture_output=True,
        text=True,
    )

    assert proc.returncode == 0, proc.stderr


def test_monitor_pattern_finds_every_case_of_a_plan_console() -> None:
    """The console of a real plan boot (as lava-run logged it)."""
    console = (DATA / "plan_console.log").read_text()
    pattern = re.compile(lava.MONITOR_PATTERN)
    plan = build_plan(X86_64, KERNEL)

    found = set()
    for scenario in plan.scenarios:
        start = console.index(f"@@LAB:SCENARIO {scenario.name}@@")
        end = console.index(f"@@LAB:SCENARIO-END {scenario.name}@@")
        for m in pattern.finditer(console, start, end):
            assert lava.MONITOR_FIXUP[m["result"]] == "pass"
            found.add((scenario.name, m["test_case_id"]))

    assert found == plan.expected_cases()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ok 2 clear_rule\r\n", ("ok", "clear_rule")),
        (
            "not ok 5 hook_calls # got none:0, expected none:0;0-1:0\r\n",
            ("not ok", "hook_calls"),
        ),  # fmt: skip
        ("not ok 4 make_cpuset # rc=1\r\n", ("not ok", "make_cpuset")),
        # A line still arriving: LAVA must wait for the whole name.
        ("ok 2 clea", None),
        ("# hook_calls: none:0\r\n", None),
    ],
)
def test_monitor_pattern_on_ktap_lines(
    text: str, expected: tuple[str, str] | None
) -> None:
    m = re.search(lava.MONITOR_PATTERN, text)

    assert (m and (m["result"], m["test_case_id"])) == expected


def test_results_of_a_real_lava_run() -> None:
    results = lava.read_results(DATA / "lava_run.log")
    plan = build_plan(X86_64, KERNEL)

    assert results.job_result == "pass"
    assert {c.key for c in results.cases} == plan.expected_cases()
    assert {c.result for c in results.cases} == {"pass"}
    assert results.problems(plan.expected_cases()) == []


def test_a_failed_case_is_a_problem_and_a_junit_failure() -> None:
    results = lava.read_results(DATA / "lava_run_case_failed.log")

    assert results.job_result == "pass"
    assert results.problems() == ["untruncated_mask_in_cpuset/hook_calls: fail"]
    suites = ET.fromstring(lava.junit_xml(results))
    failed = [
        case.get("name")
        for case in suites.iter("testcase")
        if case.find("failure") is not None
    ]
    assert failed == ["hook_calls"]


def test_server_output_yaml_reads_the_same(tmp_path: Path) -> None:
    """A LAVA server's output.yaml is the same lines as a YAML list."""
    lines = (DATA / "lava_run.log").read_text().splitlines()
    server_log = tmp_path / "output.yaml"
    server_log.write_text("".join(f"- {line}\n" for line in lines))

    assert lava.read_results(server_log) == lava.read_results(DATA / "lava_run.log")


def test_an_incomplete_job_and_missing_cases_are_problems(tmp_path: Path) -> None:
    log = tmp_path / "lava.log"
    log.write_text(
        '{"dt": "2026-12-04T19:16:05", "lvl": "results", "msg": {"case": '
        '"clear_log", "definition": "deny_rule_refuses_mask", "result": "pass"}}\n'
        '{"dt": "2026-12-04T19:16:09", "lvl": "results", "msg": {"case": "job", '
        '"definition": "lava", "result": "fail", "error_msg": "lava test '
        'monitoring reached end of file", "error_type": "Test"}}\n'
    )
    expected = {("deny_rule_refuses_mask", "clear_log"), ("x", "hook_calls")}

    problems = lava.read_results(log).problems(expected)

    # The job ended early: the cases it did not reach are one line.
    assert problems == [
        "the LAVA job did not complete: lava test monitoring reached end of file",
        "1 expected case not reported: the job ended early",
    ]


def test_a_log_without_results_is_an_error(tmp_path: Path) -> None:
    log = tmp_path / "lava.log"
    log.write_text("lava-run should be executed as root\n")

    with pytest.raises(lava.LavaError, match="no LAVA results"):
        lava.read_results(log)


def test_lava_run_command_uses_the_jobs_device(tmp_path: Path) -> None:
    argv = lava.lava_run_argv(tmp_path / "job", tmp_path / "out", "kernel-lab-1-a")

    assert argv[0] == "lava-run"
    assert argv[argv.index("--job-id") + 1] == "kernel-lab-1-a"
    assert argv[argv.index("--device") + 1] == str(tmp_path / "job" / "device.yaml")
    assert argv[-1] == str(tmp_path / "job" / "job.yaml")


def test_lava_results_command_writes_junit_and_exits_by_outcome(
    tmp_path: Path, job_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit = tmp_path / "junit.xml"

    passed = main(["lava-results", str(DATA / "lava_run.log"), "--junit", str(junit)])
    failed = main(["lava-results", str(DATA / "lava_run_case_failed.log")])

    assert (passed, failed) == (0, 1)
    assert len(list(ET.parse(junit).iter("testcase"))) == 51  # 50 cases + lava/job
    out = capsys.readouterr().out
    assert "50 of 50 test cases passed" in out
    assert "untruncated_mask_in_cpuset/hook_calls: fail" in out


def test_lava_results_command_names_cases_the_job_did_not_report(
    tmp_path: Path, job_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "lava.log"
    lines = (DATA / "lava_run.log").read_text().splitlines()
    log.write_text("\n".join(line for line in lines if "drop_rule" not in line))

    status = main(["lava-results", str(log), "--job", str(job_dir)])

    assert status == 1
    out = capsys.readouterr().out
    assert "deny_rule_refuses_mask/drop_rule: missing" in out
    assert "rt_rule_refuses_fifo_99/drop_rule: missing" in out


def test_two_local_runs_get_their_own_job_ids() -> None:
    # lava-run's work directory is named by the job id, and removed after.
    first, second = lava.local_job_id(), lava.local_job_id()

    assert first != second
    assert first.startswith(f"kernel-lab-{os.getpid()}-")


def _incomplete_log(tmp_path: Path) -> Path:
    """lava-run's log of a job whose target stopped after two scenarios,
    as when "wait for prompt timed out": LAVA's error and a failed job."""
    lines = (DATA / "lava_run.log").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if "deny_rule_refuses_mask" in line)
    log = tmp_path / "lava.log"
    log.write_text(
        "\n".join(lines[:end])
        + "\n"
        + '{"dt": "2026-12-04T19:16:20", "lvl": "target", "msg": "Kernel panic - '
        'not syncing: lab"}\n'
        '{"dt": "2026-12-04T19:16:21", "lvl": "error", "msg": "wait for prompt '
        'timed out"}\n'
        '{"dt": "2026-12-04T19:16:21", "lvl": "debug", "msg": "not shown"}\n'
        '{"dt": "2026-12-04T19:16:22", "lvl": "results", "msg": {"case": "job", '
        '"definition": "lava", "result": "fail", "error_msg": "wait for prompt '
        'timed out", "error_type": "Infrastructure"}}\n'
    )
    return log


def test_an_incomplete_job_shows_the_end_of_its_log_and_no_case_list(
    tmp_path: Path, job_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _incomplete_log(tmp_path)
    reported = len(lava.read_results(log).cases)
    missing = len(lava.expected_cases(job_dir)) - reported

    status = main(["lava-results", str(log), "--job", str(job_dir)])

    out = capsys.readouterr().out
    assert status == 1
    assert f"LAVA job: fail; {reported} of 50 expected test cases passed" in out
    assert f"{missing} expected cases not reported: the job ended early" in out
    assert ": missing" not in out
    assert f"LAVA log: {log}; its last lines:" in out
    tail = out.split("its last lines:\n", 1)[1].splitlines()
    assert tail[-2:] == [
        "  | Kernel panic - not syncing: lab",
        "  | [lava error] wait for prompt timed out",
    ]
    assert len(tail) == lava.TAIL_LINES
    assert "not shown" not in out and '"lvl"' not in out


def test_a_failed_case_shows_the_end_of_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "lava.log"
    log.write_text(
        (DATA / "lava_run.log")
        .read_text()
        .replace("ok 5 hook_calls", "not ok 5 hook_calls # got 0:0")
        .replace(
            '"definition": "untruncated_mask_in_cpuset", "extra": {"test_case_id": '
            '"hook_calls"}, "level": "3.1", "result": "pass"',
            '"definition": "untruncated_mask_in_cpuset", "extra": {"test_case_id": '
            '"hook_calls"}, "level": "3.1", "result": "fail"',
        )
    )

    assert main(["lava-results", str(log)]) == 1

    out = capsys.readouterr().out
    assert "LAVA job: fail; 49 of 50 test cases passed" in out
    assert "untruncated_mask_in_cpuset/hook_calls: fail" in out
    assert f"LAVA log: {log}; its last lines:" in out
    assert out.rstrip().endswith("  | @@LAB:SCENARIO-END untruncated_mask_in_cpuset@@")


def test_headline_counts_the_expected_cases(
    job_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (job_dir / lava.CASES_FILE).open("a") as f:
        f.write("bogus/case\n")

    status = main(["lava-results", str(DATA / "lava_run.log"), "--job", str(job_dir)])

    out = capsys.readouterr().out
    assert status == 1
    assert "LAVA job: fail; 50 of 51 expected test cases passed, 1 missing" in out
    assert "  bogus/case: missing" in out


def test_a_binary_file_is_not_a_lava_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)

    assert main(["lava-results", str(garbage)]) == 2

    captured = capsys.readouterr()
    assert f"not a LAVA log: {garbage}" in captured.err
    assert "\x00" not in captured.out + captured.err


def _no_lava_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("lava-run was started")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lava-job", "--output", "/proc/nope"], "cannot write the job to /proc/nope"),
        (["lava-job", "--output", "FILE"], "cannot write the job to FILE: not a dir"),
        (
            ["lava-job", "--output", "JOB2", "--lab-cache", "/proc/foo"],
            "cannot use the lab cache /proc/foo",
        ),
        (["lava-job", "--url-base", "notaurl"], "is not an http:// or https:// URL"),
        (
            ["lava-results", "LOG", "--junit", "/proc/x.xml"],
            "cannot write the JUnit XML to /proc/x.xml",
        ),
        (
            ["lava-run", "JOB", "--output", "/proc/zz"],
            "cannot write lava-run's output to /proc/zz",
        ),
        (
            ["lava-run", "JOB", "--junit", "/proc/y.xml"],
            "cannot write the JUnit XML to /proc/y.xml",
        ),
    ],
)
def test_bad_output_paths_are_one_clear_line_before_any_work(
    argv: list[str],
    message: str,
    tmp_path: Path,
    job_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("not a directory")
    names = {
        "FILE": str(tmp_path / "file"),
        "JOB": str(job_dir),
        "JOB2": str(tmp_path / "job2"),
        "LOG": str(DATA / "lava_run.log"),
    }
    argv = [names.get(word, word) for word in argv]
    message = message.replace("FILE", names["FILE"])
    # Nothing may be built or run before the paths are known to be good.
    monkeypatch.setattr("lab.cli.build_kernel", _no_lava_run)
    monkeypatch.setattr(lava, "run_lava", _no_lava_run)

    assert main(argv) == 2

    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["lava-job", "lava-run", "lava-results"])
def test_an_empty_output_path_is_refused(command: str, tmp_path: Path) -> None:
    option = "--output" if command != "lava-results" else "--junit"
    argv = [command, *([str(tmp_path)] if command != "lava-job" else [])]

    with pytest.raises(SystemExit) as stop:
        main([*argv, option, ""])

    assert stop.value.code == 2


def test_a_job_for_a_lava_instance_is_not_run_here(
    tmp_path: Path,
    job_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its images are URLs: lava-run would download them."""
    kernel = replace(KERNEL, image=job_dir / "bzImage")
    bundle = GuestBundle("x86_64", job_dir, job_dir / lava.RAMDISK_FILE)
    lava.export_job(
        X86_64,
        kernel,
        bundle,
        build_plan(X86_64, kernel),
        tmp_path / "remote",
        url_base="https://files.example.org/job1",
    )
    monkeypatch.setattr(subprocess, "Popen", _no_lava_run)

    with pytest.raises(lava.LavaError, match="exported with --url-base"):
        lava.run_lava(tmp_path / "remote", tmp_path / "out", Progress())
    assert main(["lava-run", str(tmp_path / "remote")]) == 2
    assert "export it again without --url-base" in capsys.readouterr().err


def test_url_base_must_be_http(tmp_path: Path, job_dir: Path) -> None:
    kernel = replace(KERNEL, image=job_dir / "bzImage")
    bundle = GuestBundle("x86_64", job_dir, job_dir / lava.RAMDISK_FILE)

    with pytest.raises(lava.LavaError, match="not an http"):
        lava.export_job(
            X86_64, kernel, bundle, build_plan(X86_64, kernel), tmp_path / "j", "x"
        )


def test_a_copied_job_must_use_its_own_images(
    tmp_path: Path, job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(job_dir, copy)
    (copy / "bzImage").unlink()
    monkeypatch.setattr(subprocess, "Popen", _no_lava_run)

    lava.check_local_images(job_dir)  # the original is fine
    with pytest.raises(lava.LavaError, match=f"not {copy / 'bzImage'}"):
        lava.run_lava(copy, tmp_path / "out", Progress())


TRAP_SCRIPT = """
import signal, sys, time
done = sys.argv[1]
def cleanup(*_):
    time.sleep({cleanup})  # longer than subprocess.run's 0.25 s
    open(done, "w").write("cleaned up")
    sys.exit(3)
signal.signal(signal.SIGINT, {handler})
signal.signal(signal.SIGTERM, {handler})
open(done + ".started", "w").close()
time.sleep(60)
"""


def _fake_lava_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handler: str, cleanup: float
) -> Path:
    """lava-run stands in: a script that cleans up on SIGINT (or not)."""
    script = tmp_path / "fake_lava_run.py"
    script.write_text(TRAP_SCRIPT.format(handler=handler, cleanup=cleanup))
    done = tmp_path / "done"
    monkeypatch.setattr(
        lava, "lava_run_argv", lambda *a: [sys.executable, str(script), str(done)]
    )
    monkeypatch.setattr(lava.shutil, "which", lambda name: name)
    monkeypatch.setattr(lava.os, "geteuid", lambda: 0)
    return done


def _interrupt_when_started(done: Path) -> None:
    """Ctrl-C for lab (a SIGINT to this process only) once the fake runs."""

    def interrupt(signum: int, frame: object) -> None:
        if done.with_name("done.started").exists():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)


def test_ctrl_c_lets_lava_run_clean_up_before_it_ends(
    tmp_path: Path, job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _fake_lava_run(tmp_path, monkeypatch, "cleanup", cleanup=1.0)
    _interrupt_when_started(done)

    try:
        with pytest.raises(KeyboardInterrupt):
            lava.run_lava(job_dir, tmp_path / "out", Progress())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    assert done.read_text() == "cleaned up"


def test_a_lava_run_that_ignores_sigint_is_killed_after_the_grace(
    tmp_path: Path, job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _fake_lava_run(tmp_path, monkeypatch, "signal.SIG_IGN", cleanup=0)
    monkeypatch.setattr(lava, "STOP_GRACE", 1.0)
    _interrupt_when_started(done)
    started = time.monotonic()

    try:
        with pytest.raises(KeyboardInterrupt):
            lava.run_lava(job_dir, tmp_path / "out", Progress())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    assert 1.0 <= time.monotonic() - started < 10
    assert not done.exists()


def test_a_lava_run_over_its_time_is_stopped_with_its_cleanup(
    tmp_path: Path, job_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _fake_lava_run(tmp_path, monkeypatch, "cleanup", cleanup=0.5)

    with pytest.raises(lava.LavaError, match="did not end in 2 s"):
        lava.run_lava(job_dir, tmp_path / "out", Progress(), timeout=2)

    assert done.read_text() == "cleaned up"
