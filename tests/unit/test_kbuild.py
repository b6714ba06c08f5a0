"""The build key, the tree and config checks of kbuild, and KernelSource."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lab import kbuild
from lab.arches import X86_64
from lab.cache import LabCache
from lab.errors import BuildError
from lab.kbuild import KernelSource

GCC = "gcc (Debian 12.2.0-14) 12.2.0"

STOCK_HOOK = "LSM_HOOK(int, 0, task_setscheduler, struct task_struct *p)\n"
EXPANDED_HOOK = (
    "LSM_HOOK(int, 0, task_setscheduler, struct task_struct *p,\n"
    "\t const struct cpumask *in_mask__nullable)\n"
)


@pytest.fixture
def compiler(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """compiler_version answers what the test puts in version["gcc"]."""
    version = {"gcc": GCC}
    monkeypatch.setattr(kbuild, "compiler_version", lambda cc: version[cc])
    return version


@pytest.fixture
def kconfigs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A copy of the lab's kconfig fragments that a test may change."""
    copy = tmp_path / "kconfigs"
    shutil.copytree(kbuild.KCONFIG_DIR, copy)
    monkeypatch.setattr(kbuild, "KCONFIG_DIR", copy)
    return copy


@pytest.fixture
def source(tmp_path: Path) -> KernelSource:
    """A source tarball (any bytes do) and a two-patch series."""
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"not really xz, but hashed all the same\n")
    series = tmp_path / "series"
    series.mkdir()
    (series / "0001-lsm-pass-mask.patch").write_text(
        "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
    )
    (series / "0002-labtest.patch").write_text(
        "--- a/y\n+++ b/y\n@@ -1 +1 @@\n-c\n+d\n"
    )
    (series / "series").write_text("0001-lsm-pass-mask.patch\n0002-labtest.patch\n")
    return KernelSource(tarball, series)


@pytest.fixture
def cache(tmp_path: Path) -> LabCache:
    return LabCache(tmp_path / "cache")


def key_of(source: KernelSource, cache: LabCache) -> str:
    return kbuild.build_key(X86_64, source, cache).digest


# -- build_key -----------------------------------------------------------


def test_build_key_is_stable_for_the_same_inputs(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    assert key_of(source, cache) == key_of(source, cache)
    assert key_of(source, cache) == key_of(source, LabCache(cache.root))


def test_build_key_changes_with_a_patch(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    before = key_of(source, cache)
    assert source.series is not None
    with (source.series / "0002-labtest.patch").open("a") as f:
        f.write("+e\n")

    assert key_of(source, cache) != before


def test_build_key_changes_with_a_fragment(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    before = key_of(source, cache)
    with (kconfigs / "x86_64.config").open("a") as f:
        f.write("CONFIG_VIRTIO_CONSOLE=y\n")

    assert key_of(source, cache) != before


def test_build_key_changes_with_the_test_lsm_fragment(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    before = key_of(source, cache)
    (kconfigs / "test-lsm.config").write_text("CONFIG_SECURITY_LABTEST=n\n")

    assert key_of(source, cache) != before


def test_build_key_changes_with_the_compiler(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    before = key_of(source, cache)
    compiler["gcc"] = "gcc (Debian 14.2.0-8) 14.2.0"

    assert key_of(source, cache) != before


def test_build_key_changes_with_the_source(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    before = key_of(source, cache)
    source.path.write_bytes(b"another kernel release, another size\n")

    assert key_of(source, cache) != before


def test_build_key_names_its_inputs(
    compiler: dict[str, str], kconfigs: Path, source: KernelSource, cache: LabCache
) -> None:
    key = kbuild.build_key(X86_64, source, cache)

    assert key.short == key.digest[:16]
    assert key.inputs["compiler"] == GCC
    assert key.inputs["arch"] == "x86_64"
    assert key.inputs["source"].startswith("tarball:")
    assert {"patch:0001-lsm-pass-mask.patch", "patch:0002-labtest.patch"} <= set(
        key.inputs
    )
    assert {
        "fragment:base.config",
        "fragment:x86_64.config",
        "fragment:test-lsm.config",
    } <= set(key.inputs)


def git(tree: Path, *args: str) -> None:
    subprocess.run(
        [
            "git",
            "-C",
            str(tree),
            "-c",
            "user.name=lab",
            "-c",
            "user.email=lab@localhost",
            *args,
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def git_tree(tmp_path: Path) -> KernelSource:
    tree = tmp_path / "linux"
    tree.mkdir()
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\n")
    git(tree, "init", "-q")
    git(tree, "add", "Makefile")
    git(tree, "commit", "-q", "-m", "v6.12")
    return KernelSource(tree, None)


def test_git_tree_key_follows_commit_and_uncommitted_changes(
    compiler: dict[str, str], kconfigs: Path, git_tree: KernelSource, cache: LabCache
) -> None:
    clean = kbuild.build_key(X86_64, git_tree, cache)
    (git_tree.path / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 13\n")
    dirty = kbuild.build_key(X86_64, git_tree, cache)
    git(git_tree.path, "commit", "-q", "-am", "v6.13")
    committed = kbuild.build_key(X86_64, git_tree, cache)

    assert clean.inputs["source"].endswith(":clean")
    assert not dirty.inputs["source"].endswith(":clean")
    assert len({clean.digest, dirty.digest, committed.digest}) == 3


def test_a_tree_without_git_has_no_build_key(
    compiler: dict[str, str], kconfigs: Path, tmp_path: Path, cache: LabCache
) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    (tree / "Makefile").write_text("VERSION = 6\n")

    with pytest.raises(BuildError, match="neither a source tarball nor a git tree"):
        kbuild.build_key(X86_64, KernelSource(tree, None), cache)


# -- hook_is_expanded ----------------------------------------------------


def write_hook_defs(tree: Path, hook: str) -> Path:
    defs = tree / "include/linux/lsm_hook_defs.h"
    defs.parent.mkdir(parents=True)
    defs.write_text(
        "LSM_HOOK(int, 0, task_setnice, struct task_struct *p, int nice)\n"
        "LSM_HOOK(int, 0, task_setioprio, struct task_struct *p, int ioprio)\n"
        + hook
        + "LSM_HOOK(int, 0, task_getscheduler, struct task_struct *p)\n"
    )
    return tree


def test_stock_hook_is_not_expanded(tmp_path: Path) -> None:
    assert kbuild.hook_is_expanded(write_hook_defs(tmp_path, STOCK_HOOK)) is False


def test_two_line_hook_with_cpumask_is_expanded(tmp_path: Path) -> None:
    assert kbuild.hook_is_expanded(write_hook_defs(tmp_path, EXPANDED_HOOK)) is True


def test_tree_without_hook_defs_is_not_expanded(tmp_path: Path) -> None:
    assert kbuild.hook_is_expanded(tmp_path) is False


# -- kconfig checks ------------------------------------------------------


def test_wanted_symbols_reads_values_and_unset_lines(tmp_path: Path) -> None:
    frag = tmp_path / "x.config"
    frag.write_text(
        "# A comment that is not a symbol.\n"
        "CONFIG_SMP=y\n"
        "CONFIG_NR_CPUS=8\n"
        'CONFIG_LSM="lockdown,yama,labtest"\n'
        "# CONFIG_MODULES is not set\n"
    )

    assert kbuild.wanted_symbols([frag]) == {
        "CONFIG_SMP": "y",
        "CONFIG_NR_CPUS": "8",
        "CONFIG_LSM": '"lockdown,yama,labtest"',
        "CONFIG_MODULES": "n",
    }


def test_later_fragment_wins(tmp_path: Path) -> None:
    base = tmp_path / "base.config"
    base.write_text("CONFIG_NR_CPUS=8\n")
    arch = tmp_path / "arch.config"
    arch.write_text("CONFIG_NR_CPUS=4\n")

    assert kbuild.wanted_symbols([base, arch]) == {"CONFIG_NR_CPUS": "4"}


def test_config_as_asked_has_no_mismatch(tmp_path: Path) -> None:
    config = tmp_path / ".config"
    config.write_text("CONFIG_SMP=y\nCONFIG_NR_CPUS=8\n# CONFIG_MODULES is not set\n")
    wanted = {"CONFIG_SMP": "y", "CONFIG_NR_CPUS": "8", "CONFIG_MODULES": "n"}

    assert kbuild.config_mismatches(config, wanted) == []


def test_config_mismatches_name_dropped_changed_and_set_symbols(tmp_path: Path) -> None:
    config = tmp_path / ".config"
    config.write_text(
        "CONFIG_SMP=y\n"
        "CONFIG_NR_CPUS=64\n"
        "CONFIG_MODULES=y\n"
        "# CONFIG_KPROBE_EVENTS is not set\n"
    )
    wanted = {
        "CONFIG_SMP": "y",
        "CONFIG_KPROBE_EVENTS": "y",
        "CONFIG_NR_CPUS": "8",
        "CONFIG_MODULES": "n",
    }

    assert kbuild.config_mismatches(config, wanted) == [
        "CONFIG_KPROBE_EVENTS=y wanted, config has CONFIG_KPROBE_EVENTS=n",
        "CONFIG_NR_CPUS=8 wanted, config has CONFIG_NR_CPUS=64",
        "CONFIG_MODULES=n wanted, config has CONFIG_MODULES=y",
    ]


# -- KernelSource ----------------------------------------------------------


def test_check_refuses_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        KernelSource(tmp_path / "linux-6.12.tar.xz", None).check()


def test_check_refuses_a_dir_without_makefile(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a kernel tree"):
        KernelSource(tmp_path, None).check()


def test_check_refuses_a_missing_series_dir(
    source: KernelSource, tmp_path: Path
) -> None:
    with pytest.raises(BuildError, match="is not a directory"):
        KernelSource(source.path, tmp_path / "no-such-series").check()


def test_check_refuses_a_patch_listed_but_missing(source: KernelSource) -> None:
    assert source.series is not None
    (source.series / "0002-labtest.patch").unlink()

    with pytest.raises(BuildError, match="0002-labtest.patch listed in the series"):
        source.check()


def test_check_accepts_a_tarball_and_its_series(source: KernelSource) -> None:
    source.check()


def test_patches_follow_the_series_file(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for name in ("0001-a.patch", "0002-b.patch", "0003-c.patch"):
        (series / name).write_text("")
    (series / "series").write_text(
        "# applied bottom-up on purpose\n0003-c.patch\n\n0001-a.patch\n"
    )

    patches = KernelSource(tmp_path / "src.tar.xz", series).patches()

    assert patches == [series / "0003-c.patch", series / "0001-a.patch"]


def test_patches_without_series_file_go_by_name(tmp_path: Path) -> None:
    for name in ("0002-b.patch", "0001-a.patch", "README"):
        (tmp_path / name).write_text("")

    patches = KernelSource(tmp_path / "src.tar.xz", tmp_path).patches()

    assert [p.name for p in patches] == ["0001-a.patch", "0002-b.patch"]


def test_no_series_means_no_patches(tmp_path: Path) -> None:
    assert KernelSource(tmp_path, None).patches() == []


def test_lab_series_lists_existing_patches() -> None:
    source = KernelSource(kbuild.DEFAULT_TARBALL, kbuild.DEFAULT_SERIES)

    patches = source.patches()

    # Every patch in the directory is in the series, in numbered order.
    on_disk = sorted(p.name for p in kbuild.DEFAULT_SERIES.glob("*.patch"))
    assert [p.name for p in patches] == on_disk
    assert all(p.is_file() for p in patches)
