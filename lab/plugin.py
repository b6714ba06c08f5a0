"""The pytest plugin: options, markers, fixtures and the run's report.

A test that takes the `lab_arch` fixture runs once per arch in the arch
table, marked with the arch's name, so `pytest -m mips` selects the MIPS
runs. The `guest` fixture hands it the arch's booted guest (one boot per
session, a fresh one after a crash); `kernel` gives the built image.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pluggy import Result

from lab.arches import ARCHES, Arch, get_arch
from lab.checks import HookNotExpanded
from lab.console import CRLF_RE, BootedGuest
from lab.errors import LabError
from lab.guest import GuestBundle
from lab.kbuild import DEFAULT_SERIES, DEFAULT_TARBALL, KernelImage, resolve_source
from lab.ktap import KtapReport
from lab.progress import Progress
from lab.qemu import ACCELS, AccelChoice
from lab.remote import HostAddress
from lab.report import CheckOutcome
from lab.session import LAUNCHERS, TRANSPORTS, LabOptions, LabRun

RUN_KEY = pytest.StashKey[LabRun]()
OPTIONS_KEY = pytest.StashKey[LabOptions]()
GUEST_KEY = pytest.StashKey[BootedGuest]()
WARN_START_KEY = pytest.StashKey[int]()
CONSOLE_START_KEY = pytest.StashKey[tuple[Path, int]]()
KTAP_KEY = pytest.StashKey[list[KtapReport]]()
OUTCOME_KEY = pytest.StashKey[dict[str, Any]]()
LAB_ERROR_KEY = pytest.StashKey[LabError]()


def positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An option type: a number above zero (a timeout of -5 s, 0 make jobs
    are mistakes, refused as usage errors)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above zero, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kernel-lab", "kernel-lab: build, boot and test kernels")
    group.addoption(
        "--kernel-tree",
        metavar="PATH",
        default=str(DEFAULT_TARBALL),
        help="kernel source: a git tree, or a source tarball (default: %(default)s)",
    )
    group.addoption(
        "--lab-series",
        metavar="PATH|none",
        default=None,
        help="patch series applied to the source; 'none' builds it as it "
        f"is (default: {DEFAULT_SERIES} on the default source, only "
        "the test LSM on a tree of yours)",
    )
    group.addoption(
        "--lab-accel",
        choices=ACCELS,
        default="auto",
        help="accelerator: auto probes KVM and falls back to TCG (default: auto)",
    )
    group.addoption(
        "--lab-launcher",
        choices=LAUNCHERS,
        default="qemu",
        help="boot with plain QEMU and the lab's initramfs, or with "
        "virtme-ng where it supports the arch (default: qemu)",
    )
    group.addoption(
        "--lab-transport",
        choices=TRANSPORTS,
        default="console",
        help="what carries the checks' commands: lab-init on the serial "
        "console, or SSH to an sshd in the guest with files over SFTP "
        "(x86_64, plain QEMU launcher; default: console)",
    )
    group.addoption(
        "--lab-cache",
        metavar="DIR",
        default="~/.cache/kernel-lab",
        help="build cache (default: %(default)s)",
    )
    group.addoption(
        "--lab-results",
        metavar="DIR",
        default="results",
        help="where results/<run-id>/ goes (default: %(default)s)",
    )
    group.addoption(
        "--lab-jobs",
        metavar="N",
        type=positive(int),
        default=None,
        help="parallel make jobs (default: number of CPUs)",
    )
    group.addoption(
        "--lab-build-timeout",
        metavar="S",
        type=positive(float),
        default=3600.0,
        help="seconds a kernel build may take (default: %(default)s)",
    )
    group.addoption(
        "--lab-boot-timeout",
        metavar="S",
        type=positive(float),
        default=60.0,
        help="seconds to reach the lab's init, x3 under TCG (default: %(default)s)",
    )
    group.addoption(
        "--lab-check-timeout",
        metavar="S",
        type=positive(float),
        default=30.0,
        help="seconds one guest command may take, x3 under TCG (default: %(default)s)",
    )
    group.addoption(
        "--lab-host",
        metavar="USER@HOST[:PORT]",
        default=None,
        help="run QEMU on that machine over SSH (default: here)",
    )
    group.addoption(
        "--lab-host-key",
        metavar="PATH",
        default=None,
        help="private key to log in to --lab-host (default: the SSH agent "
        "and ~/.ssh/id_*)",
    )
    group.addoption(
        "--lab-host-known-hosts",
        metavar="PATH",
        default=None,
        help="known_hosts file with --lab-host's host key; an unknown key "
        "is refused (default: ~/.ssh/known_hosts)",
    )


def _lab_host(config: pytest.Config) -> HostAddress | None:
    text = config.getoption("--lab-host")
    if text is None:
        given = [
            name
            for name in ("--lab-host-key", "--lab-host-known-hosts")
            if config.getoption(name)
        ]
        if given:
            raise pytest.UsageError(
                f"{' and '.join(given)} without --lab-host: they are for "
                "logging in to a --lab-host (QEMU runs here otherwise)"
            )
        return None
    try:
        address = HostAddress.parse(text)
    except ValueError as err:
        raise pytest.UsageError(str(err)) from err
    if config.getoption("--lab-launcher") != "qemu":
        raise pytest.UsageError(
            "--lab-host runs plain QEMU there: it needs --lab-launcher qemu"
        )
    return address


def _path_option(config: pytest.Config, name: str) -> Path | None:
    value = config.getoption(name)
    return Path(value).expanduser().resolve() if value else None


def options_from(config: pytest.Config) -> LabOptions:
    source = resolve_source(
        Path(config.getoption("--kernel-tree")), config.getoption("--lab-series")
    )
    return LabOptions(
        source=source,
        accel=config.getoption("--lab-accel"),
        launcher=config.getoption("--lab-launcher"),
        transport=config.getoption("--lab-transport"),
        cache=Path(config.getoption("--lab-cache")),
        results=Path(config.getoption("--lab-results")),
        jobs=config.getoption("--lab-jobs"),
        build_timeout=config.getoption("--lab-build-timeout"),
        boot_timeout=config.getoption("--lab-boot-timeout"),
        check_timeout=config.getoption("--lab-check-timeout"),
        # Under pytest -n each worker has a run (and results dir) of its own.
        run_label=getattr(config, "workerinput", {}).get("workerid", ""),
        lab_host=_lab_host(config),
        lab_host_key=_path_option(config, "--lab-host-key"),
        lab_host_known_hosts=_path_option(config, "--lab-host-known-hosts"),
    )


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(
    config: pytest.Config,
) -> Generator[None, int | pytest.ExitCode, int | pytest.ExitCode]:
    """`pytest -n N` without --dist: keep each arch's checks on one worker
    (--dist loadgroup, by the xdist_group mark each arch's tests carry), so
    that a worker boots only its own arches, once. A wrapper runs before
    pytest-xdist, which would otherwise turn a bare -n into --dist load."""
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Workers parse the command line again, which has no --dist: tell them
    that the lab chose loadgroup (read in pytest_configure)."""
    node.workerinput["lab_loadgroup"] = node.config.option.dist == "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    for name in ARCHES:
        config.addinivalue_line("markers", f"{name}: checks that boot a {name} guest")
    config.addinivalue_line("markers", "lab: tests that build and boot a kernel")
    config.addinivalue_line(
        "markers", "arches(*names): limit a lab test to these arches"
    )
    config.addinivalue_line("markers", "vng: tests of the virtme-ng launcher")
    config.addinivalue_line("markers", "bisect: the end-to-end git bisect run test")
    config.addinivalue_line(
        "markers", "lava: the LAVA export, run with Debian's lava-run"
    )
    config.addinivalue_line(
        "markers",
        "remote: tests of --lab-host (QEMU over SSH, against an sshd they start)",
    )
    config.addinivalue_line(
        "markers", "dirties_guest: the check leaves its guest unusable; run it last"
    )
    config.addinivalue_line(
        "markers",
        "selftest: tests of the lab itself on a real guest (not of the kernel)",
    )
    if getattr(config, "workerinput", {}).get("lab_loadgroup"):
        # pytest-xdist's worker reads this when it names tests by group.
        config.option.loadgroup = True
    if not config.pluginmanager.hasplugin("xdist"):
        # pytest-xdist registers it when installed; without it, no warning.
        config.addinivalue_line("markers", "xdist_group(name): pytest-xdist group")
    options = options_from(config)
    if options.transport == "ssh" and options.launcher == "vng":
        raise pytest.UsageError(
            "--lab-transport ssh needs --lab-launcher qemu: the SSH transport "
            "boots sshd from the lab's initramfs, and virtme-ng boots the "
            "host's root instead"
        )
    if options.transport == "ssh" and options.lab_host is not None:
        raise pytest.UsageError(
            "--lab-transport ssh with --lab-host is not supported yet: the "
            "guest's forwarded SSH port is on the lab host's loopback; use "
            "the console transport there"
        )
    config.stash[OPTIONS_KEY] = options


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Checks that leave their guest unusable (a crash on purpose, a cgroup
    v1 mount) run after all others, so the others share one boot per arch."""
    items.sort(key=lambda item: item.get_closest_marker("dirties_guest") is not None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lab_arch" not in metafunc.fixturenames:
        return
    limit = metafunc.definition.get_closest_marker("arches")
    names = list(limit.args) if limit else list(ARCHES)
    # xdist_group: under pytest -n, all checks of one arch share a worker.
    params = [
        pytest.param(
            name,
            marks=[
                getattr(pytest.mark, name),
                pytest.mark.lab,
                pytest.mark.xdist_group(name),
            ],
            id=name,
        )
        for name in names
        if name in ARCHES
    ]
    metafunc.parametrize("lab_arch", params)


def _terminal_progress(config: pytest.Config) -> Progress:
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def write(text: str) -> None:
        if reporter is None:
            return
        if capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write(text)
                reporter.flush()
        else:
            reporter.write(text)
            reporter.flush()

    tty = bool(reporter is not None and reporter.isatty)
    return Progress(write=write, tty=tty)


@pytest.fixture(scope="session")
def lab_run(pytestconfig: pytest.Config) -> LabRun:
    """The run's state: built kernels, guests, results directory."""
    if RUN_KEY not in pytestconfig.stash:
        run = LabRun(pytestconfig.stash[OPTIONS_KEY], _terminal_progress(pytestconfig))
        pytestconfig.stash[RUN_KEY] = run
    return pytestconfig.stash[RUN_KEY]


@pytest.fixture
def arch(lab_arch: str) -> Arch:
    """The machine record of the arch this test runs on."""
    return get_arch(lab_arch)


@pytest.fixture
def kernel(lab_run: LabRun, lab_arch: str) -> KernelImage:
    """The kernel built for this arch (from the cache when it is there)."""
    return lab_run.kernel(lab_arch)


@pytest.fixture
def accel(lab_run: LabRun, lab_arch: str) -> AccelChoice:
    """KVM or TCG for this arch (probed once per host, see lab/qemu.py)."""
    return lab_run.accel(lab_arch)


@pytest.fixture
def guest_bundle(lab_run: LabRun, lab_arch: str) -> GuestBundle:
    """The guest programs and initramfs of this arch."""
    return lab_run.bundle(lab_arch)


@pytest.fixture
def ktap_reports(request: pytest.FixtureRequest) -> list[KtapReport]:
    """KTAP reports of the guest programs a test ran, for the JUnit XML."""
    reports: list[KtapReport] = []
    request.node.stash[KTAP_KEY] = reports
    return reports


@pytest.fixture
def guest(
    request: pytest.FixtureRequest, lab_run: LabRun, lab_arch: str
) -> Iterator[BootedGuest]:
    """The booted guest of this arch; a crashed one is replaced first."""
    unavailable = lab_run.transport_unavailable(lab_arch)
    if unavailable:
        pytest.skip(unavailable)
    booted = lab_run.guest(lab_arch)
    watch_guest(request.node, booted)
    yield booted


def watch_guest(item: pytest.Item, booted: BootedGuest) -> None:
    """Make the test's report cover this guest: the kernel WARNINGs and the
    console slice from now to the test's end."""
    item.stash[GUEST_KEY] = booted
    item.stash[WARN_START_KEY] = len(booted.warnings)
    item.stash[CONSOLE_START_KEY] = (
        booted.console_log,
        booted.console_log.stat().st_size,
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = session.config.stash.get(RUN_KEY, None)
    if run is not None:
        # Interrupted: end QEMU at once rather than ask the guest politely.
        run.close(kill=exitstatus == pytest.ExitCode.INTERRUPTED)
        reporter = session.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[lab] results: {run.results.dir}")
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["lab_results"] = str(run.results.dir)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest -n: name each worker's results directory on the controller."""
    results = getattr(node, "workeroutput", {}).get("lab_results")
    reporter = node.config.pluginmanager.getplugin("terminalreporter")
    if results and reporter is not None:
        reporter.write_line(f"[lab] results ({node.gateway.id}): {results}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()

    # A kernel without the expanded hook: say so, without a traceback.
    if call.excinfo is not None and isinstance(call.excinfo.value, HookNotExpanded):
        report.longrepr = str(call.excinfo.value)

    # A lab failure explains itself: show its message, not a traceback.
    if call.excinfo is not None and isinstance(call.excinfo.value, LabError):
        err = call.excinfo.value
        report.longrepr = str(err)
        item.stash[LAB_ERROR_KEY] = err

    # A kernel WARNING during the check fails the check that caused it.
    booted = item.stash.get(GUEST_KEY, None)
    if report.when == "call" and booted is not None and report.passed:
        new = booted.warnings[item.stash[WARN_START_KEY] :]
        if new:
            report.outcome = "failed"
            report.longrepr = "kernel WARNING during this check:\n  " + "\n  ".join(new)

    _record(item, report)


def _record(item: pytest.Item, report: pytest.TestReport) -> None:
    """Fold setup/call/teardown into one CheckOutcome for the results."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "lab_arch" not in callspec.params:
        return
    state = item.stash.setdefault(
        OUTCOME_KEY, {"outcome": "passed", "seconds": 0.0, "message": "", "details": ""}
    )
    state["seconds"] += report.duration
    if report.failed and state["outcome"] == "passed":
        state["outcome"] = "failed" if report.when == "call" else "error"
        state["details"] = str(report.longrepr)
        state["message"] = (
            state["details"].strip().splitlines()[-1][:300] if state["details"] else ""
        )
    elif report.skipped and state["outcome"] == "passed":
        state["outcome"] = "skipped"
        longrepr = report.longrepr
        state["message"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)

    if report.when != "teardown":
        return
    run = item.config.stash.get(RUN_KEY, None)
    if run is None:
        return
    lab_error = item.stash.get(LAB_ERROR_KEY, None)
    run.results.add_check(
        CheckOutcome(
            phase=lab_error.phase if lab_error else "",
            kernel_fault=lab_error.kernel_fault if lab_error else False,
            name=item.name,
            arch=callspec.params["lab_arch"],
            outcome=state["outcome"],
            seconds=state["seconds"],
            message=state["message"],
            details=state["details"],
            console=_console_slice(item),
            ktap=item.stash.get(KTAP_KEY, []),
        )
    )


def _console_slice(item: pytest.Item) -> str:
    start = item.stash.get(CONSOLE_START_KEY, None)
    if start is None:
        return ""
    path, offset = start
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return CRLF_RE.sub("\n", f.read(256 * 1024).decode(errors="replace"))
    except OSError:
        return ""
