"""Kernel source -> patched worktree -> config -> image, cached by content.

A build is keyed by what decides its output: the source (tarball hash or
git commit and diff), the patch series, the merged kconfig fragments, the
compiler and the arch. One build per key runs at a time (a file lock), in
a scratch directory under the cache; the finished entry is renamed into
place, so a crash or Ctrl-C never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.arches import Arch
from lab.cache import LabCache, file_sha256
from lab.errors import BuildError, ToolMissing, tail_of
from lab.progress import Progress

log = logging.getLogger(__name__)

LAB_ROOT = Path(__file__).resolve().parent.parent
KCONFIG_DIR = LAB_ROOT / "kconfigs"
DEFAULT_SERIES = LAB_ROOT / "patches"
DEFAULT_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
TEST_LSM_FRAGMENT = "test-lsm"
TEST_LSM_SERIES = "series.test-lsm"
# Bump when the way a build is made changes, so old entries are not reused.
BUILD_FORMAT = 1
# A tight build needs about 2.5 GB while it runs; refuse early below this.
MIN_FREE_BYTES = 4 * 1024**3
HOOK_RE = re.compile(r"LSM_HOOK\(\s*int\s*,\s*0\s*,\s*task_setscheduler\s*,([^)]*)\)")


@dataclass(frozen=True)
class KernelSource:
    """Where a kernel comes from: a source tarball or a tree, plus a series.

    `series_file` names the list of patches to apply from the series
    directory: `series` for the whole series, `series.test-lsm` for a
    user's tree, which only gets the lab's test LSM on top.
    """

    path: Path
    series: Path | None
    series_file: str = "series"

    @property
    def is_tarball(self) -> bool:
        return self.path.is_file()

    def describe(self) -> str:
        if self.series is None:
            return f"{self.path} (no patches)"
        return f"{self.path} + {self.series / self.series_file}"

    def patches(self, series_file: str | None = None) -> list[Path]:
        """The series in the order it applies: its list file, else by name."""
        if self.series is None:
            return []
        order = self.series / (series_file or self.series_file)
        if order.is_file():
            names = [
                line.strip()
                for line in order.read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
            return [self.series / name for name in names]
        if series_file is not None:
            return []
        return sorted(self.series.glob("*.patch"))

    def test_lsm_patches(self) -> set[str]:
        """Names of the patches that add the test LSM (series.test-lsm)."""
        return {p.name for p in self.patches(TEST_LSM_SERIES)}

    def check(self) -> None:
        """Refuse a source that cannot be built, before any work is done."""
        if not self.path.exists():
            hint = ""
            if self.path == DEFAULT_TARBALL:
                hint = " (install it: apt-get install linux-source-6.12)"
            raise BuildError(f"kernel source {self.path} does not exist{hint}")
        if self.path.is_dir() and not (self.path / "Makefile").is_file():
            raise BuildError(f"{self.path} is not a kernel tree (no Makefile)")
        if self.series is not None:
            if not self.series.is_dir():
                raise BuildError(f"patch series {self.series} is not a directory")
            for patch in self.patches():
                if not patch.is_file():
                    raise BuildError(f"patch {patch} listed in the series is missing")


def resolve_source(tree: Path, series: str | None) -> KernelSource:
    """The source the user asked for: --kernel-tree and --lab-series.

    The default source gets the whole series; a tree of the user's gets
    only the test LSM; `none` gets nothing; a path gets that series.
    """
    tree = tree.expanduser().resolve()
    if series == "none":
        return KernelSource(tree, None)
    if series is not None:
        return KernelSource(tree, Path(series).expanduser().resolve())
    if tree == DEFAULT_TARBALL:
        return KernelSource(tree, DEFAULT_SERIES)
    return KernelSource(tree, DEFAULT_SERIES, TEST_LSM_SERIES)


@dataclass(frozen=True)
class KernelImage:
    """A built kernel in the cache, with what the lab learnt about it."""

    arch: str
    key: str
    entry: Path
    image: Path
    config: Path
    build_log: Path
    release: str
    hook_expanded: bool
    test_lsm: bool
    source: str
    build_seconds: float
    cached: bool
    # "tarball:<sha256>" or "git:<commit>:<diff hash or clean>".
    source_id: str = ""
    # The hook also takes the sched_attr (the follow-up patch).
    hook_has_attr: bool = False
    # vmlinux.h of the kernel's BTF, where it has BTF (for BPF programs).
    vmlinux_h: Path | None = None

    @property
    def commit(self) -> str:
        """The tree's commit, for a kernel built from git ("" otherwise)."""
        return self.source_id.split(":")[1] if self.source_id.startswith("git:") else ""


@dataclass(frozen=True)
class BuildKey:
    """The content hash that names a build, and what went into it."""

    digest: str
    inputs: dict[str, str]

    @property
    def short(self) -> str:
        return self.digest[:16]


def compiler_version(cc: str) -> str:
    """First line of `cc --version`, or ToolMissing naming the package."""
    if shutil.which(cc) is None:
        package = "gcc" if cc == "gcc" else f"gcc-{cc.removesuffix('-gcc')}"
        raise ToolMissing(
            f"compiler {cc} not found; install it: apt-get install {package}"
        )
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def source_identity(source: KernelSource, cache: LabCache) -> str:
    """A string that changes whenever the source's content does."""
    if source.is_tarball:
        return "tarball:" + cache.memo_file_hash(source.path)
    if (source.path / ".git").exists():
        head = _git(source.path, "rev-parse", "HEAD").strip()
        diff = _git(source.path, "diff", "HEAD", "--binary")
        dirty = hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else "clean"
        return f"git:{head}:{dirty}"
    raise BuildError(
        f"{source.path} is neither a source tarball nor a git tree; "
        "the lab keys builds by commit, so commit the tree first"
    )


def fragments_for(arch: Arch, with_test_lsm: bool) -> list[Path]:
    names = list(arch.fragments)
    if with_test_lsm:
        names.append(TEST_LSM_FRAGMENT)
    return [KCONFIG_DIR / f"{name}.config" for name in names]


def build_key(arch: Arch, source: KernelSource, cache: LabCache) -> BuildKey:
    """Hash every input that decides the built image."""
    inputs = {
        "format": str(BUILD_FORMAT),
        "arch": arch.name,
        "source": source_identity(source, cache),
        "config_target": arch.config_target,
        "make_target": arch.make_target,
        "compiler": compiler_version(arch.cc),
    }
    patches = source.patches()
    inputs["series"] = " ".join(p.name for p in patches)
    for patch in patches:
        inputs[f"patch:{patch.name}"] = file_sha256(patch)
    for frag in fragments_for(arch, with_test_lsm=True):
        inputs[f"fragment:{frag.name}"] = file_sha256(frag)
    blob = json.dumps(inputs, sort_keys=True).encode()
    return BuildKey(hashlib.sha256(blob).hexdigest(), inputs)


def hook_is_expanded(tree: Path) -> bool:
    """Whether the tree's task_setscheduler hook takes a CPU mask."""
    defs = tree / "include/linux/lsm_hook_defs.h"
    match = HOOK_RE.search(defs.read_text(errors="replace")) if defs.is_file() else None
    return bool(match and "cpumask" in match.group(1))


def hook_has_attr(tree: Path) -> bool:
    """Whether the hook also takes the scheduling attributes (follow-up)."""
    defs = tree / "include/linux/lsm_hook_defs.h"
    match = HOOK_RE.search(defs.read_text(errors="replace")) if defs.is_file() else None
    return bool(match and "sched_attr" in match.group(1))


def wanted_symbols(fragments: list[Path]) -> dict[str, str]:
    """CONFIG_ lines of the fragments: symbol -> value ('n' for unset)."""
    wanted: dict[str, str] = {}
    for frag in fragments:
        for line in frag.read_text().splitlines():
            line = line.strip()
            if line.startswith("CONFIG_") and "=" in line:
                key, value = line.split("=", 1)
                wanted[key] = value
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                wanted[line[2:].split()[0]] = "n"
    return wanted


def config_mismatches(config: Path, wanted: dict[str, str]) -> list[str]:
    """Symbols of the fragments that olddefconfig dropped or changed."""
    have: dict[str, str] = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            have[key] = value
    problems = []
    for key, value in wanted.items():
        got = have.get(key, "n")
        if got != value:
            problems.append(f"{key}={value} wanted, config has {key}={got}")
    return problems


class KernelBuild:
    """One build of one key, in a scratch directory under the cache."""

    def __init__(
        self,
        arch: Arch,
        source: KernelSource,
        key: BuildKey,
        cache: LabCache,
        progress: Progress,
        jobs: int,
        timeout: float,
    ) -> None:
        self.arch = arch
        self.source = source
        self.key = key
        self.cache = cache
        self.progress = progress
        self.jobs = jobs
        self.timeout = timeout
        self.scratch = cache.scratch_dir(f"{arch.name}-{key.short}")
        self.tree = self.scratch / "src"
        self.staged = self.scratch / "entry"
        self.log_path = self.staged / "build.log"

    def run(self) -> Path:
        """Build into a staged entry; returns it, ready to be renamed."""
        self.staged.mkdir(parents=True)
        started = time.monotonic()
        with self.log_path.open("w") as self.log_file:
            self._write_header()
            self._unpack()
            self._apply_series()
            test_lsm = (self.tree / "security/labtest/Kconfig").is_file()
            self._configure(test_lsm)
            self._make()
            release = self._capture(["make", "-s", *self._make_vars(), "kernelrelease"])
        self._stage(release.strip(), test_lsm, time.monotonic() - started)
        return self.staged

    def _write_header(self) -> None:
        self.log_file.write(
            f"# kernel-lab build {self.arch.name} key {self.key.digest}\n"
        )
        for name, value in self.key.inputs.items():
            self.log_file.write(f"# {name}: {value}\n")
        self.log_file.flush()

    def _make_vars(self) -> list[str]:
        cc = self.arch.cc
        if shutil.which("ccache"):
            cc = f"ccache {cc}"
        vars_ = [f"ARCH={self.arch.kernel_arch}", f"CC={cc}"]
        if self.arch.cross_compile:
            vars_.append(f"CROSS_COMPILE={self.arch.cross_compile}")
        return vars_

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ARCH": self.arch.kernel_arch,
                "CROSS_COMPILE": self.arch.cross_compile,
                "CCACHE_DIR": str(self.cache.ccache_dir),
                "CCACHE_BASEDIR": str(self.tree),
                "CCACHE_NOHASHDIR": "1",
                "KBUILD_BUILD_TIMESTAMP": "kernel-lab",
                "KBUILD_BUILD_USER": "lab",
                "KBUILD_BUILD_HOST": "kernel-lab",
                "LC_ALL": "C",
            }
        )
        return env

    def _step(self, what: str, argv: list[str], cwd: Path | None = None) -> None:
        """Run one step, its output into build.log; BuildError on failure."""
        self.log_file.write(f"\n$ {shlex.join(argv)}\n")
        self.log_file.flush()
        proc = subprocess.run(
            argv,
            cwd=cwd or self.tree,
            env=self._env(),
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            self.log_file.flush()
            raise BuildError(
                f"{what} failed (exit {proc.returncode})",
                self.log_path,
                tail_of(self.log_path),
            )

    def _capture(self, argv: list[str]) -> str:
        proc = subprocess.run(
            argv, cwd=self.tree, env=self._env(), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BuildError(f"{shlex.join(argv)} failed", self.log_path, proc.stderr)
        return proc.stdout

    def _unpack(self) -> None:
        self.progress.phase(f"build {self.arch.name}: unpacking {self.source.path}")
        self.tree.mkdir()
        if self.source.is_tarball:
            argv = ["tar", "-xf", str(self.source.path), "-C", str(self.tree)]
            self._step("unpacking the source", argv + ["--strip-components=1"])
            return
        # A user's tree is read, never written: export the commit, then
        # apply the uncommitted changes on the copy.
        archive = subprocess.Popen(
            ["git", "-C", str(self.source.path), "archive", "--format=tar", "HEAD"],
            stdout=subprocess.PIPE,
        )
        untar = subprocess.run(
            ["tar", "-xf", "-", "-C", str(self.tree)], stdin=archive.stdout
        )
        archive.wait()
        if archive.returncode or untar.returncode:
            raise BuildError(f"could not export {self.source.path} with git archive")
        diff = _git(self.source.path, "diff", "HEAD", "--binary")
        if diff:
            patch = self.scratch / "uncommitted.diff"
            patch.write_text(diff)
            self._step(
                "applying the tree's uncommitted changes", ["git", "apply", str(patch)]
            )

    def _apply_series(self) -> None:
        test_lsm = self.source.test_lsm_patches()
        for patch in self.source.patches():
            if patch.name in test_lsm and not self._test_lsm_fits(patch):
                continue
            self.progress.phase(f"build {self.arch.name}: applying {patch.name}")
            argv = ["patch", "-p1", "--forward", "--batch", "-i", str(patch)]
            try:
                self._step(f"patch {patch.name} does not apply", argv)
            except BuildError as err:
                err.message = (
                    f"patch {patch} does not apply to {self.source.path}"
                    f" (exit status of patch: see log)"
                )
                raise

    def _test_lsm_fits(self, patch: Path) -> bool:
        """Whether the test LSM goes on this tree: it needs the expanded
        hook, and a tree that has it already (a bisect of the series)
        keeps its own."""
        if (self.tree / "security/labtest").is_dir():
            self._note(
                f"{patch.name}: the tree has security/labtest already; not applied"
            )
            return False
        # TODO: the test LSM patch is written for the mask-only hook; a tree
        # with the sched_attr follow-up but no labtest needs 0004..0006 as
        # one patch - when such trees are tested.
        if not hook_is_expanded(self.tree):
            self._note(
                f"{patch.name}: hook not expanded in this tree; the test LSM "
                "cannot build there and is left out"
            )
            return False
        return True

    def _note(self, text: str) -> None:
        self.progress.phase(f"build {self.arch.name}: {text}")
        self.log_file.write(f"# {text}\n")
        self.log_file.flush()

    def _configure(self, test_lsm: bool) -> None:
        self.progress.phase(
            f"build {self.arch.name}: configuring ({self.arch.config_target})"
        )
        fragments = fragments_for(self.arch, test_lsm)
        self._step(
            "make " + self.arch.config_target,
            ["make", *self._make_vars(), self.arch.config_target],
        )
        merge = [
            "scripts/kconfig/merge_config.sh",
            "-m",
            ".config",
            *map(str, fragments),
        ]
        self._step("merging the kconfig fragments", merge)
        self._step("make olddefconfig", ["make", *self._make_vars(), "olddefconfig"])
        problems = config_mismatches(self.tree / ".config", wanted_symbols(fragments))
        if problems:
            self.log_file.write("\n# config symbols not as the fragments ask:\n")
            self.log_file.writelines(f"#   {p}\n" for p in problems)
            self.log_file.flush()
            raise BuildError(
                f"{len(problems)} kconfig symbol(s) not set as asked "
                "(a dependency is missing from the fragments)",
                self.log_path,
                "\n".join(problems),
            )

    def _make(self) -> None:
        argv = ["make", f"-j{self.jobs}", *self._make_vars(), self.arch.make_target]
        self.log_file.write(f"\n$ {shlex.join(argv)}\n")
        self.log_file.flush()
        log.info("build %s: %s", self.arch.name, shlex.join(argv))
        proc = subprocess.Popen(
            argv,
            cwd=self.tree,
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        started = time.monotonic()
        objects = 0
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.log_file.write(line)
                if line.startswith("  CC ") or line.startswith("  AS "):
                    objects += 1
                elapsed = time.monotonic() - started
                self.progress.tick(
                    f"build {self.arch.name}: {objects} objects compiled", elapsed
                )
                if elapsed > self.timeout:
                    raise BuildError(
                        f"build timed out after {self.timeout:.0f} s "
                        "(--lab-build-timeout)",
                        self.log_path,
                    )
            proc.wait()
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            self.log_file.flush()
        self.progress.done(f"build {self.arch.name}: make exited {proc.returncode}")
        if proc.returncode != 0:
            raise BuildError(
                f"make {self.arch.make_target} failed (exit {proc.returncode})",
                self.log_path,
                _error_tail(self.log_path),
            )

    def _stage(self, release: str, test_lsm: bool, seconds: float) -> None:
        image = self.tree / self.arch.image
        shutil.copy2(image, self.staged / Path(self.arch.image).name)
        shutil.copy2(self.tree / ".config", self.staged / "config")
        btf = "CONFIG_DEBUG_INFO_BTF=y" in (self.tree / ".config").read_text()
        if btf:
            self._dump_btf_header()
        manifest = {
            "arch": self.arch.name,
            "key": self.key.digest,
            "inputs": self.key.inputs,
            "image": Path(self.arch.image).name,
            "image_sha256": file_sha256(image),
            "release": release,
            "hook_expanded": hook_is_expanded(self.tree),
            "hook_has_attr": hook_has_attr(self.tree),
            "test_lsm": test_lsm,
            "btf": btf,
            "source": self.source.describe(),
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The manifest is written last: an entry without it is incomplete.
        (self.staged / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def _dump_btf_header(self) -> None:
        """vmlinux.h from the kernel's BTF, for BPF programs built against it."""
        if shutil.which("bpftool") is None:
            raise ToolMissing("bpftool not found; install it: apt-get install bpftool")
        argv = ["bpftool", "btf", "dump", "file", "vmlinux", "format", "c"]
        with (self.staged / "vmlinux.h").open("w") as out:
            proc = subprocess.run(
                argv, cwd=self.tree, stdout=out, stderr=subprocess.PIPE, text=True
            )
        if proc.returncode != 0:
            raise BuildError(
                "bpftool could not dump the kernel's BTF", self.log_path, proc.stderr
            )


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def _error_tail(log_path: Path) -> str:
    """The compiler errors of a failed make, else the log's last lines."""
    text = log_path.read_text(errors="replace").splitlines()
    errors = [i for i, line in enumerate(text) if " error:" in line or "Error " in line]
    if not errors:
        return tail_of(log_path)
    first = errors[0]
    return "\n".join(text[max(0, first - 5) : first + 15])


def _git(tree: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(tree), *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise BuildError(
            f"git {' '.join(args)} in {tree} failed: {proc.stderr.strip()}"
        )
    return proc.stdout


def load_entry(entry: Path, cached: bool) -> KernelImage:
    """Read a finished cache entry, checking that it is whole."""
    manifest = json.loads((entry / "manifest.json").read_text())
    image = entry / manifest["image"]
    if file_sha256(image) != manifest["image_sha256"]:
        raise ValueError(f"{image} does not match its manifest")
    return KernelImage(
        arch=manifest["arch"],
        key=manifest["key"],
        entry=entry,
        image=image,
        config=entry / "config",
        build_log=entry / "build.log",
        release=manifest["release"],
        hook_expanded=manifest["hook_expanded"],
        test_lsm=manifest["test_lsm"],
        source=manifest["source"],
        build_seconds=manifest["build_seconds"],
        cached=cached,
        source_id=manifest.get("inputs", {}).get("source", ""),
        hook_has_attr=manifest.get("hook_has_attr", False),
        vmlinux_h=entry / "vmlinux.h" if manifest.get("btf") else None,
    )


def build_kernel(
    arch: Arch,
    source: KernelSource,
    cache: LabCache,
    progress: Progress,
    jobs: int | None = None,
    timeout: float = 3600.0,
) -> KernelImage:
    """The kernel image for arch and source: from the cache, or built now."""
    source.check()
    key = build_key(arch, source, cache)
    name = f"{arch.name}-{key.short}"
    entry = cache.kernels_dir / name

    with cache.lock(name, progress):
        if entry.exists():
            try:
                image = load_entry(entry, cached=True)
                log.info("build %s: cache hit %s", arch.name, entry)
                progress.phase(f"build {arch.name}: cached ({entry})")
                return image
            except (OSError, ValueError, KeyError) as err:
                progress.warn(f"cache entry {entry} is damaged ({err}); rebuilding it")
                shutil.rmtree(entry)

        for orphan in cache.remove_orphans():
            progress.phase(f"removed {orphan}, left by a run that was killed")
        cache.check_free_space(MIN_FREE_BYTES)
        build = KernelBuild(
            arch, source, key, cache, progress, jobs or os.cpu_count() or 2, timeout
        )
        try:
            staged = build.run()
            os.rename(staged, entry)
        except BuildError as err:
            err.log = _keep_failed_log(build, cache)
            raise
        except KeyboardInterrupt:
            progress.phase(f"build {arch.name}: interrupted; removing {build.scratch}")
            raise
        finally:
            shutil.rmtree(build.scratch, ignore_errors=True)

    image = load_entry(entry, cached=False)
    log.info(
        "build %s: built %s in %.0f s", arch.name, image.release, image.build_seconds
    )
    return image


def _keep_failed_log(build: KernelBuild, cache: LabCache) -> Path | None:
    """Keep the log of a failed build, out of the scratch directory."""
    if not build.log_path.exists():
        return None
    kept = cache.failed_dir / f"{build.arch.name}-{build.key.short}.build.log"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build.log_path, kept)
    return kept


def image_summary(image: KernelImage) -> dict[str, object]:
    data = asdict(image)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
