"""build_kernel's cache: a whole entry is reused, a damaged one rebuilt.

KernelBuild.run is replaced, so nothing is unpacked or compiled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lab import kbuild
from lab.arches import X86_64
from lab.cache import LabCache
from lab.errors import BuildError
from lab.kbuild import KernelBuild, KernelSource
from lab.progress import Progress

IMAGE_BYTES = b"\x4d\x5a fake bzImage " * 64


def write_entry(entry: Path, key: str, image: bytes = IMAGE_BYTES) -> Path:
    """A finished cache entry, as KernelBuild._stage leaves it."""
    entry.mkdir(parents=True)
    (entry / "bzImage").write_bytes(image)
    (entry / "config").write_text("CONFIG_SMP=y\n")
    (entry / "build.log").write_text("# kernel-lab build x86_64\n")
    manifest = {
        "arch": "x86_64",
        "key": key,
        "inputs": {},
        "image": "bzImage",
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "release": "6.12.118",
        "hook_expanded": True,
        "test_lsm": True,
        "source": "linux-source-6.12.tar.xz + series series",
        "build_seconds": 412.3,
        "built_at": "2025-12-04T16:00:00+0000",
    }
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


class FakeRun:
    """Stands in for KernelBuild.run: stages an entry, counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        monkeypatch.setattr(KernelBuild, "run", lambda build: self.run(build))

    def run(self, build: KernelBuild) -> Path:
        self.calls += 1
        write_entry(build.staged, build.key.digest, b"rebuilt bzImage")
        return build.staged


def refuse_to_build(build: KernelBuild) -> Path:
    raise AssertionError("KernelBuild.run must not be called on a cache hit")


@pytest.fixture
def source(tmp_path: Path) -> KernelSource:
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"a kernel source tarball\n")
    series = tmp_path / "series"
    series.mkdir()
    (series / "0001-x.patch").write_text("--- a/x\n+++ b/x\n")
    return KernelSource(tarball, series)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabCache:
    monkeypatch.setattr(
        kbuild, "compiler_version", lambda cc: "gcc (Debian 12.2.0-14) 12.2.0"
    )
    # A rebuild checks for 4 GB free; the test's disk need not have them.
    monkeypatch.setattr(LabCache, "check_free_space", lambda self, needed: None)
    return LabCache(tmp_path / "cache")


@pytest.fixture
def entry(source: KernelSource, cache: LabCache) -> Path:
    key = kbuild.build_key(X86_64, source, cache)
    return write_entry(cache.kernels_dir / f"x86_64-{key.short}", key.digest)


def test_whole_entry_is_returned_without_building(
    monkeypatch: pytest.MonkeyPatch,
    source: KernelSource,
    cache: LabCache,
    entry: Path,
    progress: Progress,
) -> None:
    monkeypatch.setattr(KernelBuild, "run", refuse_to_build)

    image = kbuild.build_kernel(X86_64, source, cache, progress)

    assert image.cached is True
    assert image.entry == entry
    assert image.image == entry / "bzImage"
    assert image.release == "6.12.118"
    assert image.hook_expanded is True


def test_cache_hit_leaves_no_scratch_behind(
    monkeypatch: pytest.MonkeyPatch,
    source: KernelSource,
    cache: LabCache,
    entry: Path,
    progress: Progress,
) -> None:
    monkeypatch.setattr(KernelBuild, "run", refuse_to_build)

    kbuild.build_kernel(X86_64, source, cache, progress)

    assert list((cache.root / "scratch").iterdir()) == []


def test_corrupt_image_is_detected_and_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
    source: KernelSource,
    cache: LabCache,
    entry: Path,
) -> None:
    (entry / "bzImage").write_bytes(b"truncated")
    run = FakeRun(monkeypatch)
    shown: list[str] = []

    image = kbuild.build_kernel(
        X86_64, source, cache, Progress(write=shown.append, tty=False)
    )

    assert run.calls == 1
    assert any("is damaged" in line and str(entry) in line for line in shown)
    assert image.cached is False
    assert image.entry == entry
    assert (entry / "bzImage").read_bytes() == b"rebuilt bzImage"
    assert list((cache.root / "scratch").iterdir()) == []


def test_entry_without_manifest_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
    source: KernelSource,
    cache: LabCache,
    entry: Path,
    progress: Progress,
) -> None:
    (entry / "manifest.json").unlink()
    run = FakeRun(monkeypatch)

    image = kbuild.build_kernel(X86_64, source, cache, progress)

    assert run.calls == 1
    assert image.cached is False


def test_failed_rebuild_keeps_its_log_and_no_entry(
    monkeypatch: pytest.MonkeyPatch,
    source: KernelSource,
    cache: LabCache,
    entry: Path,
    progress: Progress,
) -> None:
    (entry / "bzImage").write_bytes(b"truncated")

    def failing_run(build: KernelBuild) -> Path:
        build.staged.mkdir(parents=True)
        build.log_path.write_text("drivers/x.c:1:1: error: expected ';'\n")
        raise BuildError("make bzImage failed (exit 2)", build.log_path)

    monkeypatch.setattr(KernelBuild, "run", failing_run)

    with pytest.raises(BuildError) as caught:
        kbuild.build_kernel(X86_64, source, cache, progress)

    assert not entry.exists()
    assert caught.value.log is not None
    assert caught.value.log.parent == cache.failed_dir
    assert "error: expected ';'" in caught.value.log.read_text()
    assert list((cache.root / "scratch").iterdir()) == []


def test_second_build_of_a_new_entry_is_a_cache_hit(
    monkeypatch: pytest.MonkeyPatch,
    source: KernelSource,
    cache: LabCache,
    progress: Progress,
) -> None:
    run = FakeRun(monkeypatch)

    first = kbuild.build_kernel(X86_64, source, cache, progress)
    second = kbuild.build_kernel(X86_64, source, cache, progress)

    assert (first.cached, second.cached) == (False, True)
    assert run.calls == 1
    assert second.entry == first.entry
