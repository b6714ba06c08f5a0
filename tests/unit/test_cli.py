"""The `lab` command's own parsing (nothing here builds or boots)."""

from __future__ import annotations

import pytest

from lab.bisect import ABORT
from lab.cli import main


def test_bisect_takes_lab_host_next_to_its_key_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # --lab-host is not taken for an abbreviation of --lab-host-key: the
    # step gets as far as the unknown arch, which stops the bisect.
    code = main(["bisect", "--arch", "sparc", "--lab-host=root@127.0.0.1:2222"])

    assert code == ABORT
    assert "sparc" in capsys.readouterr().err


def test_bisect_usage_error_stops_the_bisect(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # argparse's own exit status 2 would mean "bad commit" to git bisect run.
    code = main(["bisect", "--lab-host=nonsense"])

    assert code == ABORT
    assert "expected user@host or user@host:port" in capsys.readouterr().err


def test_build_usage_error_keeps_argparse_status() -> None:
    with pytest.raises(SystemExit) as stop:
        main(["build", "--jobs", "many"])

    assert stop.value.code == 2


@pytest.mark.parametrize("option", ["--lab-host-key", "--lab-host-known-hosts"])
def test_bisect_login_option_without_lab_host_stops_the_bisect(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    code = main(["bisect", f"{option}=/some/file"])

    assert code == ABORT
    assert f"{option} without --lab-host" in capsys.readouterr().err


def test_doctor_login_option_without_lab_host_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Not silently a doctor of this host only.
    with pytest.raises(SystemExit) as stop:
        main(["doctor", "--lab-host-key=/some/file"])

    assert stop.value.code == 2
    assert "--lab-host-key without --lab-host" in capsys.readouterr().err
