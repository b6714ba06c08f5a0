"""The pytest plugin, run in a pytester sandbox: options, markers, arch ids."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from lab.arches import ARCHES, X86_64

# Here, not in tests/unit/conftest.py: pytest refuses pytest_plugins in a
# conftest below the rootdir when it is run as `pytest` from the top.
pytest_plugins = ["pytester"]

ARCH_TEST = """
def test_boots(lab_arch):
    assert lab_arch
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in the sandbox, without plugins of this host that slow it down."""
    return pytester.runpytest(
        "-p", "no:hypothesispytest", "-p", "no:cacheprovider", *args
    )


@pytest.fixture
def second_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    """A second machine in the table, so that selecting one arch shows."""
    monkeypatch.setitem(ARCHES, "mips", replace(X86_64, name="mips"))
    return "mips"


def test_markers_list_every_arch(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")

    assert result.ret == 0
    for name in ARCHES:
        result.stdout.fnmatch_lines(
            [f"@pytest.mark.{name}: checks that boot a {name} guest"]
        )
    result.stdout.fnmatch_lines(["@pytest.mark.arches(*names):*"])


def test_markers_follow_the_arch_table(
    pytester: pytest.Pytester, second_arch: str
) -> None:
    result = run(pytester, "--markers")

    result.stdout.fnmatch_lines(["@pytest.mark.mips: checks that boot a mips guest"])


def test_lab_arch_test_runs_once_per_arch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sandbox_arch=ARCH_TEST)

    result = run(pytester, "--collect-only", "-q")

    assert result.ret == 0
    ids = [
        line for line in result.outlines if line.startswith("test_sandbox_arch.py::")
    ]
    assert ids == [f"test_sandbox_arch.py::test_boots[{name}]" for name in ARCHES]


def test_arch_marker_selects_one_arch(
    pytester: pytest.Pytester, second_arch: str
) -> None:
    pytester.makepyfile(test_sandbox_arch=ARCH_TEST)

    every = run(pytester, "--collect-only", "-q")
    x86 = run(pytester, "--collect-only", "-q", "-m", "x86_64")
    mips = run(pytester, "--collect-only", "-q", "-m", "mips")

    every.stdout.fnmatch_lines(
        [
            "test_sandbox_arch.py::test_boots[x86_64]",
            "test_sandbox_arch.py::test_boots[mips]",
        ]
    )
    assert [ln for ln in x86.outlines if "::" in ln] == [
        "test_sandbox_arch.py::test_boots[x86_64]"
    ]
    assert [ln for ln in mips.outlines if "::" in ln] == [
        "test_sandbox_arch.py::test_boots[mips]"
    ]


def test_lab_marker_selects_arch_tests_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sandbox_arch=ARCH_TEST + "\n\ndef test_plain():\n    pass\n"
    )

    result = run(pytester, "--collect-only", "-q", "-m", "not lab")

    assert [ln for ln in result.outlines if "::" in ln] == [
        "test_sandbox_arch.py::test_plain"
    ]


def test_arches_marker_limits_a_test(
    pytester: pytest.Pytester, second_arch: str
) -> None:
    pytester.makepyfile(
        test_sandbox_arch="""
import pytest

@pytest.mark.arches("mips", "riscv64")
def test_mips_only(lab_arch):
    assert lab_arch == "mips"
"""
    )

    result = run(pytester, "-q")

    result.assert_outcomes(passed=1)
    collected = run(pytester, "--collect-only", "-q")
    assert [ln for ln in collected.outlines if "::" in ln] == [
        "test_sandbox_arch.py::test_mips_only[mips]"
    ]


def test_help_shows_the_lab_options(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--help")

    assert result.ret == 0
    result.stdout.fnmatch_lines(["kernel-lab: build, boot and test kernels:"])
    for option in (
        "--kernel-tree",
        "--lab-series",
        "--lab-accel",
        "--lab-transport",
        "--lab-cache",
        "--lab-results",
        "--lab-host",
        "--lab-host-key",
        "--lab-host-known-hosts",
    ):
        result.stdout.fnmatch_lines([f"*{option}*"])
    result.stdout.fnmatch_lines(["*--lab-accel*{auto,kvm,tcg}*"])


def test_bad_accel_is_refused_by_the_command_line(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--lab-accel", "hvf")

    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--lab-accel*invalid choice*hvf*"])


@pytest.mark.parametrize(
    "value", ["127.0.0.1", "root@", "root@host:port", "a@b@c", "root@host:70000"]
)
def test_malformed_lab_host_is_a_usage_error(
    pytester: pytest.Pytester, value: str
) -> None:
    result = run(pytester, "--lab-host", value)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lab-host*"])


def test_lab_host_needs_the_qemu_launcher(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--lab-host", "root@127.0.0.1:2222", "--lab-launcher", "vng")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lab-host*needs --lab-launcher qemu*"])


@pytest.mark.parametrize("option", ["--lab-host-key", "--lab-host-known-hosts"])
def test_lab_host_login_option_without_lab_host_is_a_usage_error(
    pytester: pytest.Pytester, option: str
) -> None:
    result = run(pytester, f"{option}=/some/file")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{option} without --lab-host*"])


def test_ssh_transport_under_vng_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sandbox=ARCH_TEST)

    result = run(pytester, "--lab-transport", "ssh", "--lab-launcher", "vng")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lab-transport ssh needs --lab-launcher qemu*"])


def test_bad_transport_is_refused_by_the_command_line(
    pytester: pytest.Pytester,
) -> None:
    result = run(pytester, "--lab-transport", "telnet")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lab-transport*invalid choice*telnet*"])


FAKE_RUN_CONFTEST = """
import pytest


class FakeGuest:
    def __init__(self, console_log):
        self.console_log = console_log
        self.warnings = []


class FakeRun:
    def __init__(self, console_log):
        self.booted = FakeGuest(console_log)

    def transport_unavailable(self, arch):
        return ""

    def guest(self, arch):
        return self.booted


@pytest.fixture(scope="session")
def lab_run(tmp_path_factory):
    log = tmp_path_factory.mktemp("run") / "console.log"
    log.write_text("")
    return FakeRun(log)
"""


def test_kernel_warning_during_a_check_fails_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FAKE_RUN_CONFTEST)
    pytester.makepyfile(
        test_sandbox_warn="""
WARN = "WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40"

def test_a_warning(guest):
    guest.warnings.append(WARN)

def test_after_the_warning(guest):
    assert guest.warnings
"""
    )

    result = run(pytester, "-m", "x86_64")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*kernel WARNING during this check:*",
            "*WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40*",
            "FAILED test_sandbox_warn.py::test_a_warning[[]x86_64[]]*",
        ]
    )


def test_lab_error_is_shown_as_its_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sandbox_crash="""
from lab.errors import GuestError

def test_crash(lab_arch):
    raise GuestError("guest hang: no answer within 90 s during command 'run x'",
                     tail="# stalling_for: -1")
"""
    )

    result = run(pytester, "-m", "x86_64")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "[[]run[]] guest hang: no answer within 90 s during command 'run x'",
            "  last lines:",
            "  | # stalling_for: -1",
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")


def test_each_arch_is_one_xdist_group(
    pytester: pytest.Pytester, second_arch: str
) -> None:
    pytester.makepyfile(test_sandbox_arch=ARCH_TEST)
    pytester.makeconftest(
        """
def pytest_collection_modifyitems(items):
    for item in items:
        group = item.get_closest_marker("xdist_group").args[0]
        print(f"GROUP {item.name} {group}")
"""
    )

    result = run(pytester, "--collect-only", "-q", "-s")

    result.stdout.fnmatch_lines(
        ["GROUP test_boots[[]x86_64[]] x86_64", "GROUP test_boots[[]mips[]] mips"]
    )


def test_bare_n_distributes_by_arch_group(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makeconftest(
        """
def pytest_configure(config):
    print(f"DIST {config.option.dist}")
"""
    )

    result = run(pytester, "--collect-only", "-q", "-s", "-n", "2")
    explicit = run(pytester, "--collect-only", "-q", "-s", "-n", "2", "--dist", "load")

    result.stdout.fnmatch_lines(["DIST loadgroup"])
    explicit.stdout.fnmatch_lines(["DIST load"])


def test_n_2_workers_name_each_test_by_its_arch_group(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_sandbox_arch=ARCH_TEST + "\n\ndef test_again(lab_arch):\n    pass\n"
    )

    result = run(pytester, "-n", "2", "-v")

    # "[gw1] [ 25%] PASSED test_sandbox_arch.py::test_again[mips]" (older
    # pytest-xdist adds "@mips"): each arch's checks on one worker.
    workers: dict[str, set[str]] = {}
    for line in result.stdout.lines:
        found = re.search(r"\[(gw\d+)\].*PASSED.*::test_\w+\[(\w+)\]", line)
        if found:
            workers.setdefault(found.group(2), set()).add(found.group(1))
    assert result.ret == 0
    assert set(workers) == set(ARCHES), result.stdout.str()
    assert all(len(w) == 1 for w in workers.values()), workers


def test_checks_that_dirty_the_guest_run_last(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sandbox_order="""
import pytest

@pytest.mark.dirties_guest
def test_mounts_cgroup_v1():
    pass

def test_plain_check():
    pass
"""
    )

    result = run(pytester, "--collect-only", "-q")

    names = [line for line in result.outlines if "::" in line]
    assert [n.split("::")[1] for n in names] == [
        "test_plain_check",
        "test_mounts_cgroup_v1",
    ]


def test_ssh_transport_with_a_lab_host_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_sandbox=ARCH_TEST)

    result = run(
        pytester, "--lab-transport", "ssh", "--lab-host", "root@127.0.0.1:2222"
    )

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--lab-transport ssh with --lab-host is not supported*"]
    )


@pytest.mark.parametrize(
    "option", ["--lab-boot-timeout=-5", "--lab-check-timeout=0", "--lab-jobs=0"]
)
def test_a_number_that_is_not_above_zero_is_a_usage_error(
    pytester: pytest.Pytester, option: str
) -> None:
    result = run(pytester, option)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*must be above zero*"])
