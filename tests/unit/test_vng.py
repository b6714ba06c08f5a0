"""The virtme-ng command line: TCG is asked for explicitly, the console is vng's."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import vng
from lab.arches import X86_64

IMAGE = Path("/cache/kernels/x86_64-0123456789abcdef/bzImage")


@pytest.fixture(autouse=True)
def vng_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vng, "vng_binary", lambda: "/usr/local/bin/vng")


def test_tcg_disables_kvm_and_names_the_cpu() -> None:
    argv = vng.vng_argv(X86_64, IMAGE, "tcg", exec_command=None)

    assert argv[:3] == ["/usr/local/bin/vng", "--run", str(IMAGE)]
    assert "--disable-kvm" in argv
    assert "--qemu-opts=-cpu qemu64 -no-reboot" in argv
    assert "--exec" not in argv


def test_kvm_keeps_kvm_and_uses_the_host_cpu() -> None:
    argv = vng.vng_argv(X86_64, IMAGE, "kvm", exec_command="true")

    assert "--disable-kvm" not in argv
    assert "--qemu-opts=-cpu host -no-reboot" in argv
    assert argv[-2:] == ["--exec", "true"]


def test_append_leaves_the_console_to_vng() -> None:
    argv = vng.vng_argv(X86_64, IMAGE, "tcg", exec_command=None)

    append = argv[argv.index("--append") + 1]
    assert "console=" not in append
    assert "panic=-1" in append.split()
