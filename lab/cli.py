"""`lab`: the lab from the shell.

lab doctor               what this host has and lacks, KVM or not
lab build --arch A       build (or find in the cache) the kernel
lab test [pytest args]   run the checks: pytest with the lab's tests
lab bisect [--arch A]    a `git bisect run` step: 0 good, 1 bad, 125 skip
lab lava-job --arch A    export a LAVA job that runs the lab's plan
lab lava-run DIR         run an exported job here with lava-run (root)
lab lava-results LOG     read a LAVA log back: summary, JUnit XML
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lab.arches import ARCHES, Arch, UnknownArch, get_arch
from lab.bisect import ABORT
from lab.cache import DEFAULT_CACHE, LabCache
from lab.errors import LabError, ToolMissing
from lab.kbuild import DEFAULT_TARBALL, KernelSource, build_kernel, resolve_source
from lab.progress import Progress
from lab.qemu import LOCAL_HOST, QemuHost
from lab.remote import HostAddress, RemoteHost, lab_host_args

if TYPE_CHECKING:
    from lab.lava import LavaResults

LAB_TESTS = Path(__file__).resolve().parent.parent / "tests"


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel-tree",
        type=Path,
        default=DEFAULT_TARBALL,
        help="kernel source: git tree or tarball (default: %(default)s)",
    )
    parser.add_argument(
        "--lab-series",
        default=None,
        help="patch series directory, or 'none' (default: patches/ "
        "for the default source)",
    )
    parser.add_argument("--lab-cache", type=Path, default=DEFAULT_CACHE)


def _host_address(text: str) -> HostAddress:
    try:
        return HostAddress.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _lab_host_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lab-host",
        type=_host_address,
        default=None,
        metavar="USER@HOST[:PORT]",
        help="the machine that runs QEMU, over SSH (default: this one)",
    )
    parser.add_argument("--lab-host-key", type=Path, default=None, metavar="PATH")
    parser.add_argument(
        "--lab-host-known-hosts", type=Path, default=None, metavar="PATH"
    )


def _source(args: argparse.Namespace) -> KernelSource:
    return resolve_source(args.kernel_tree, args.lab_series)


def cmd_doctor(args: argparse.Namespace) -> int:
    missing = 0
    print(f"host: {platform.machine()}, Python {platform.python_version()}")
    tools = {
        "make": "make",
        "tar": "tar",
        "patch": "patch",
        "ccache": "ccache",
        "vng": "virtme-ng (pip)",
    }
    for arch in ARCHES.values():
        tools[arch.qemu] = arch.packages[0]
        tools[arch.cc] = arch.packages[-1]
    for tool, package in tools.items():
        path = shutil.which(tool)
        print(f"  {tool:28} {path or 'MISSING (' + package + ')'}")
        missing += path is None
    source = DEFAULT_TARBALL
    print(f"default source: {source} {'present' if source.exists() else 'MISSING'}")
    missing += not source.exists()
    cache = LabCache(args.lab_cache)
    memo = cache.read_memo()
    for arch in ARCHES.values():
        print(f"kvm for {arch.name}: {_kvm_verdict(LOCAL_HOST, arch, memo)}")
    free = shutil.disk_usage(cache.root).free / 1024**3
    print(f"cache: {cache.root} ({free:.0f} GB free)")
    if args.lab_host is not None:
        missing += _doctor_lab_host(args, memo)
    return 1 if missing else 0


def _kvm_verdict(host: QemuHost, arch: Arch, memo: dict[str, object]) -> str:
    reason = host.kvm_precondition(arch)
    probe = memo.get(f"kvm-probe:{host.identity(arch)}") if reason is None else None
    if isinstance(probe, dict):
        works = "works" if probe["works"] else "does not work"
        return f"{works} (cached probe: {probe['reason']})"
    return reason or "possible; a probe boot decides (--lab-accel auto)"


def _doctor_lab_host(args: argparse.Namespace, memo: dict[str, object]) -> int:
    """What the --lab-host has: QEMU per arch, KVM; the count of missing."""
    missing = 0
    host = RemoteHost.connect(
        args.lab_host, args.lab_host_key, args.lab_host_known_hosts, Progress()
    )
    try:
        print(f"lab host {host.name}: {host.machine()}")
        for arch in ARCHES.values():
            try:
                host.require_qemu(arch)
            except ToolMissing:
                print(f"  {arch.qemu:28} MISSING ({arch.packages[0]})")
                missing += 1
                continue
            print(f"  {arch.qemu:28} present")
            print(f"  kvm for {arch.name}: {_kvm_verdict(host, arch, memo)}")
    finally:
        host.close()
    return missing


def cmd_build(args: argparse.Namespace) -> int:
    arch = get_arch(args.arch)
    image = build_kernel(
        arch, _source(args), LabCache(args.lab_cache), Progress(), jobs=args.jobs
    )
    state = "cached" if image.cached else f"built in {image.build_seconds:.0f} s"
    print(
        f"{image.image}\n  release {image.release}, {state}, "
        f"hook {'expanded' if image.hook_expanded else 'not expanded'}"
    )
    return 0


def cmd_bisect(args: argparse.Namespace, rest: list[str]) -> int:
    """One git bisect step: build the checked-out tree, run, map to 0/1/125."""
    import pytest

    from lab import bisect

    # A mistake of the user's must stop the bisect, not skip every commit.
    try:
        get_arch(args.arch)
    except UnknownArch as err:
        print(f"lab bisect: {err}", file=sys.stderr)
        return bisect.ABORT
    cache = args.lab_cache.expanduser().resolve()
    results = (args.lab_results or cache / "bisect-results").expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    selection = f"{args.arch} and not vng and not bisect and not selftest"
    # Paths resolved here: pytest reads them after the chdir below.
    lab_host = lab_host_args(
        args.lab_host,
        args.lab_host_key.expanduser().resolve() if args.lab_host_key else None,
        args.lab_host_known_hosts.expanduser().resolve()
        if args.lab_host_known_hosts
        else None,
    )
    argv = [
        str(LAB_TESTS / "lab"),
        "-m", selection,
        "--kernel-tree", str(args.kernel_tree.expanduser().resolve()),
        "--lab-cache", str(cache),
        "--lab-results", str(results),
        "-p", "no:cacheprovider",
        *(["--lab-series", args.lab_series] if args.lab_series else []),
        *lab_host,
        *rest,
    ]  # fmt: skip
    print(f"lab bisect: pytest {' '.join(argv)}", file=sys.stderr)
    # Run from the results directory: plugins that write into the working
    # directory must not write into the user's tree.
    here = Path.cwd()
    os.chdir(results)
    try:
        status = int(pytest.main(argv))
    finally:
        os.chdir(here)
    code, why = bisect.verdict(status, bisect.read_summary(results))
    word = {bisect.GOOD: "good", bisect.BAD: "bad", bisect.SKIP: "skip"}.get(
        code, "abort"
    )
    print(f"lab bisect: {word} ({code}): {why}", file=sys.stderr)
    return code


def _nonempty_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def cmd_lava_job(args: argparse.Namespace) -> int:
    """Build (or find) kernel and guest programs, write the LAVA job."""
    from lab import lava
    from lab.guest import build_guest
    from lab.plan import build_plan

    arch = get_arch(args.arch)
    # Bad options before the build: minutes, on a cold cache.
    lava.check_url_base(args.url_base)
    output = (args.output or Path(f"lava-{arch.name}")).resolve()
    lava.output_dir(output, "the job")
    try:
        cache = LabCache(args.lab_cache)
    except OSError as err:
        raise LabError(
            f"cannot use the lab cache {args.lab_cache}: {err.strerror}"
        ) from None
    progress = Progress()
    kernel = build_kernel(arch, _source(args), cache, progress, jobs=args.jobs)
    bundle = build_guest(arch, cache, progress)
    plan = build_plan(arch, kernel)
    job = lava.export_job(arch, kernel, bundle, plan, output, args.url_base)
    cases = sum(len(s.cases()) for s in plan.scenarios)
    print(
        f"{job.job}\n  {arch.name} {kernel.release}: {len(plan.scenarios)} "
        f"scenarios, {cases} test cases\n  kernel {job.kernel}\n"
        f"  ramdisk {job.ramdisk} (the plan: {job.directory / lava.PLAN_FILE})"
    )
    if args.url_base:
        print(f"  images at {args.url_base}: serve {output} there, then")
        print(f"  lavacli jobs submit {job.job}")
    else:
        print(f"  run it here: lab lava-run {output}")
    return 0


def cmd_lava_run(args: argparse.Namespace) -> int:
    """Run an exported job with lava-run; print and write its results."""
    from lab import lava

    job_dir = args.job_dir.resolve()
    if not (job_dir / lava.JOB_FILE).is_file():
        print(f"lab lava-run: no {lava.JOB_FILE} in {job_dir}", file=sys.stderr)
        return 2
    out = (args.output or job_dir / "lava-out").resolve()
    expected = lava.expected_cases(job_dir)
    # Everything that would fail after the run, before it: no local
    # images (--url-base: lava-run would download them), unwritable paths.
    lava.check_local_images(job_dir)
    lava.output_dir(out, "lava-run's output")
    junit = lava.output_file(args.junit or out / "junit.xml", "the JUnit XML")
    log_path = lava.run_lava(job_dir, out, Progress())
    return _report_lava(log_path, junit, expected)


def cmd_lava_results(args: argparse.Namespace) -> int:
    from lab import lava

    expected = lava.expected_cases(args.job) if args.job else None
    junit = lava.output_file(args.junit, "the JUnit XML") if args.junit else None
    return _report_lava(args.log, junit, expected)


def _report_lava(
    log_path: Path, junit: Path | None, expected: set[tuple[str, str]] | None
) -> int:
    from lab import lava

    results = lava.read_results(log_path)
    for case in results.cases:
        print(f"{case.result:5} {case.scenario}/{case.case}")
    problems = results.problems(expected)
    print(
        f"LAVA job: {'fail' if problems else 'pass'}; {_lava_count(results, expected)}"
    )
    for problem in problems:
        print(f"  {problem}")
    if results.failed():
        # Why: the end of the target's console and LAVA's errors.
        tail = lava.log_tail(log_path)
        print(f"LAVA log: {log_path}" + ("; its last lines:" if tail else ""))
        for line in tail.splitlines():
            print(f"  | {line}")
    else:
        print(f"LAVA log: {log_path}")
    if junit is not None:
        lava.write_output(junit, lava.junit_xml(results), "the JUnit XML")
        print(f"JUnit XML: {junit}")
    return 1 if problems else 0


def _lava_count(results: LavaResults, expected: set[tuple[str, str]] | None) -> str:
    """How many cases passed: of the expected ones when they are known."""
    if expected is None:
        passed = sum(c.result == "pass" for c in results.cases)
        return f"{passed} of {len(results.cases)} test cases passed"
    passed = sum(c.result == "pass" and c.key in expected for c in results.cases)
    missing = len(expected - {c.key for c in results.cases})
    text = f"{passed} of {len(expected)} expected test cases passed"
    return text + (f", {missing} missing" if missing else "")


def cmd_test(args: argparse.Namespace, rest: list[str]) -> int:
    import pytest

    return int(pytest.main([str(LAB_TESTS / "lab"), *rest]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check this host's tools")
    doctor.add_argument("--lab-cache", type=Path, default=DEFAULT_CACHE)
    _lab_host_args(doctor)
    build = sub.add_parser("build", help="build the kernel for an arch")
    build.add_argument("--arch", default="x86_64")
    build.add_argument("--jobs", type=int, default=None)
    _source_args(build)
    sub.add_parser("test", help="run the lab's checks (pytest arguments follow)")
    bis = sub.add_parser(
        "bisect",
        help="a git bisect run step: exit 0 good, 1 bad, 125 skip (pytest args follow)",
    )
    bis.add_argument("--arch", default="x86_64")
    bis.add_argument(
        "--lab-results", type=Path, default=DEFAULT_CACHE / "bisect-results"
    )
    _source_args(bis)
    _lab_host_args(bis)
    bis.set_defaults(kernel_tree=Path.cwd())
    job = sub.add_parser(
        "lava-job", help="export a LAVA job (qemu device type) running the plan"
    )
    job.add_argument("--arch", default="x86_64")
    job.add_argument("--jobs", type=int, default=None)
    job.add_argument(
        "--output",
        type=_nonempty_path,
        default=None,
        help="job directory (default: lava-ARCH)",
    )
    job.add_argument(
        "--url-base",
        default=None,
        help="URL the job's images are served from, for a LAVA instance "
        "(default: file:// paths, for lava-run here)",
    )
    _source_args(job)
    run = sub.add_parser("lava-run", help="run an exported job here with lava-run")
    run.add_argument("job_dir", type=Path)
    run.add_argument(
        "--output", type=_nonempty_path, default=None, help="default: JOB_DIR/lava-out"
    )
    run.add_argument("--junit", type=_nonempty_path, default=None)
    res = sub.add_parser("lava-results", help="read a LAVA log back into JUnit XML")
    res.add_argument("log", type=Path, help="lava-run's log, or a job's output.yaml")
    res.add_argument("--junit", type=_nonempty_path, default=None)
    res.add_argument(
        "--job",
        type=Path,
        default=None,
        help="the exported job directory: report its cases that are missing",
    )

    try:
        args, rest = parser.parse_known_args(argv)
        if getattr(args, "lab_host", "") is None:
            given = [
                f"--{name.replace('_', '-')}"
                for name in ("lab_host_key", "lab_host_known_hosts")
                if getattr(args, name)
            ]
            if given:
                parser.error(
                    f"{' and '.join(given)} without --lab-host: they are for "
                    "logging in to a --lab-host"
                )
    except SystemExit as stop:
        # argparse exits 2 on a usage error, which git bisect run takes for
        # "bad": a mistake in a bisect step's options must stop the bisect.
        words = sys.argv[1:] if argv is None else argv
        if stop.code == 2 and words[:1] == ["bisect"]:
            return ABORT
        raise
    try:
        if args.command == "doctor":
            return cmd_doctor(args)
        if rest and args.command not in ("test", "bisect"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "build":
            return cmd_build(args)
        if args.command == "bisect":
            return cmd_bisect(args, rest)
        if args.command == "lava-job":
            return cmd_lava_job(args)
        if args.command == "lava-run":
            return cmd_lava_run(args)
        if args.command == "lava-results":
            return cmd_lava_results(args)
        return cmd_test(args, rest)
    except (LabError, UnknownArch) as err:
        print(f"lab: {err}", file=sys.stderr)
        # In a bisect, a lab that cannot run must not mark the commit bad.
        return 125 if args.command == "bisect" else 2
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
