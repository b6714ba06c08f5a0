"""lab/bpf.py without compiling: the cache key, the archive, the initrd pair.

Archives are read back with the system's cpio, listing only (-t) or to
stdout: nothing is extracted on the host, and no program is run.
"""

from __future__ import annotations

import gzip
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from kernels import EXPANDED_KERNEL

from lab import bpf
from lab.arches import MIPS, X86_64
from lab.cache import LabCache, concat_files
from lab.errors import BuildError, ToolMissing
from lab.progress import Progress

SOURCES = {"setsched.bpf.c": b"int x;", "bpf-affinity.c": b"int main;"}
TOOLS = ["Debian clang version 14.0.6", "gcc (Debian 12.2.0-14) 12.2.0"]


def cpio(archive: bytes, *args: str) -> str:
    proc = subprocess.run(
        ["cpio", "--quiet", *args], input=archive, capture_output=True, check=True
    )
    return proc.stdout.decode()


def test_key_is_stable_and_independent_of_source_order() -> None:
    reordered = dict(reversed(list(SOURCES.items())))

    assert bpf.bpf_key("k" * 64, SOURCES, TOOLS) == bpf.bpf_key(
        "k" * 64, reordered, TOOLS
    )
    assert len(bpf.bpf_key("k" * 64, SOURCES, TOOLS)) == 16


@pytest.mark.parametrize(
    "change",
    ["kernel", "source content", "source name", "clang", "loader compiler"],
)
def test_key_changes_with_each_input(change: str) -> None:
    kernel, sources, tools = "k" * 64, dict(SOURCES), list(TOOLS)
    if change == "kernel":
        kernel = "j" * 64
    elif change == "source content":
        sources["setsched.bpf.c"] = b"int y;"
    elif change == "source name":
        sources["renamed.bpf.c"] = sources.pop("setsched.bpf.c")
    elif change == "clang":
        tools[0] = "Debian clang version 19.1.7"
    else:
        tools[1] = "gcc (Debian 13.1.0) 13.1.0"

    assert bpf.bpf_key(kernel, sources, tools) != bpf.bpf_key("k" * 64, SOURCES, TOOLS)


def test_sources_are_the_bpf_directory_and_ktap_header() -> None:
    names = {p.relative_to(bpf.GUEST_SRC).as_posix() for p in bpf.bpf_sources()}

    assert {
        "bpf/setsched.bpf.c",
        "bpf/setsched_nocheck.bpf.c",
        "bpf/bpf-affinity.c",
        "bpf/setsched.h",
        "ktap.h",
    } <= names
    # Kept out of guest/*.c, which every arch's guest bundle compiles.
    assert not [name for name in names if "/" not in name and name.endswith(".c")]


def stand_ins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for the built files; packed, never run or loaded.
    (bin_dir / "bpf-affinity").write_bytes(b"loader stand-in")
    (bin_dir / "setsched.bpf.o").write_bytes(b"\x7fELF object stand-in")
    return bin_dir


def test_archive_holds_programs_under_bin_with_their_modes(tmp_path: Path) -> None:
    archive = bpf.bpf_archive(stand_ins(tmp_path))

    listing = cpio(archive, "-itv").splitlines()
    names = [line.split()[-1] for line in listing]
    assert names == ["bin", "bin/bpf-affinity", "bin/setsched.bpf.o"]
    modes = {line.split()[-1]: line.split()[0] for line in listing}
    assert modes["bin"] == "drwxr-xr-x"
    assert modes["bin/bpf-affinity"] == "-rwxr-xr-x"
    assert modes["bin/setsched.bpf.o"] == "-rw-r--r--"
    assert cpio(archive, "-i", "--to-stdout", "bin/bpf-affinity") == "loader stand-in"


def test_concatenated_archives_decompress_to_both(tmp_path: Path) -> None:
    first, second = tmp_path / "first.gz", tmp_path / "second.gz"
    first.write_bytes(gzip.compress(b"first archive", mtime=0))
    second.write_bytes(gzip.compress(b"second archive", mtime=0))
    out = tmp_path / "both.gz"

    concat_files([first, second], out)

    assert gzip.decompress(out.read_bytes()) == b"first archivesecond archive"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_boot_initrd_is_written_once_per_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: Progress
) -> None:
    cache = LabCache(tmp_path / "cache")
    entry = cache.root / "bpf" / "x86_64-0123456789abcdef"
    entry.mkdir(parents=True)
    archive = entry / "bpf.cpio.gz"
    archive.write_bytes(b"bpf archive")
    monkeypatch.setattr(bpf, "build_bpf", lambda *args: archive)
    initramfs = tmp_path / "initramfs.cpio.gz"
    initramfs.write_bytes(b"guest bundle")

    first = bpf.boot_initrd(X86_64, EXPANDED_KERNEL, initramfs, cache, progress)
    again = bpf.boot_initrd(X86_64, EXPANDED_KERNEL, initramfs, cache, progress)
    initramfs.write_bytes(b"another guest bundle")
    other = bpf.boot_initrd(X86_64, EXPANDED_KERNEL, initramfs, cache, progress)

    assert first == again != other
    assert first.read_bytes() == b"guest bundlebpf archive"
    assert other.read_bytes() == b"another guest bundlebpf archive"


def test_no_build_for_an_arch_without_bpf_lsm(
    tmp_path: Path, progress: Progress
) -> None:
    kernel = replace(EXPANDED_KERNEL, vmlinux_h=tmp_path / "vmlinux.h")

    with pytest.raises(BuildError, match="trampolines"):
        bpf.build_bpf(MIPS, kernel, LabCache(tmp_path / "cache"), progress)


def test_no_build_for_a_kernel_without_btf(tmp_path: Path, progress: Progress) -> None:
    with pytest.raises(BuildError, match="DEBUG_INFO_BTF"):
        bpf.build_bpf(X86_64, EXPANDED_KERNEL, LabCache(tmp_path / "cache"), progress)


def test_missing_clang_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: Progress
) -> None:
    vmlinux_h = tmp_path / "vmlinux.h"
    vmlinux_h.write_text("/* stand-in */\n")
    kernel = replace(EXPANDED_KERNEL, vmlinux_h=vmlinux_h)
    monkeypatch.setattr(bpf.shutil, "which", lambda tool: None)

    with pytest.raises(ToolMissing, match="apt-get install clang llvm"):
        bpf.build_bpf(X86_64, kernel, LabCache(tmp_path / "cache"), progress)
