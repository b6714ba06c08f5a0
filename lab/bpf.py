"""BPF LSM programs and their loader for one kernel, packed as an extra initrd.

guest/bpf/*.bpf.c are compiled with clang against the kernel's vmlinux.h
(so once per kernel), the other guest/bpf/*.c statically with libbpf; a
gzip cpio of them under bin/ is appended to the guest bundle's initramfs.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.arches import Arch
from lab.cache import LabCache
from lab.errors import BuildError, ToolMissing
from lab.guest import CFLAGS, GUEST_SRC, CpioWriter
from lab.kbuild import KernelImage, compiler_version
from lab.progress import Progress

log = logging.getLogger(__name__)

BPF_SRC = GUEST_SRC / "bpf"
# Bump when the way the objects or the archive are made changes.
BPF_FORMAT = 1
CLANG = "clang"
STRIP = "llvm-strip"
BPF_CFLAGS = ("-target", "bpf", "-O2", "-g", "-Wall")
# Static archives the loader links, and the Debian package of each.
STATIC_LIBS = {
    "libbpf.a": "libbpf-dev",
    "libelf.a": "libelf-dev",
    "libz.a": "zlib1g-dev",
    "libzstd.a": "libzstd-dev",
}
LOADER_LIBS = ("-lbpf", "-lelf", "-lz", "-lzstd")
OBJECT_SUFFIX = ".bpf.o"


def bpf_sources() -> list[Path]:
    """Every file whose content decides the archive (ktap.h: the loader's)."""
    return sorted(BPF_SRC.glob("*.[ch]")) + [GUEST_SRC / "ktap.h"]


def bpf_key(kernel_key: str, sources: Mapping[str, bytes], tools: Sequence[str]) -> str:
    """The content key of one build: kernel, sources and tool versions."""
    digest = hashlib.sha256()
    digest.update(f"{BPF_FORMAT} {kernel_key}\0".encode())
    digest.update(" ".join(BPF_CFLAGS + CFLAGS + LOADER_LIBS).encode() + b"\0")
    for tool in tools:
        digest.update(tool.encode() + b"\0")
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name] + b"\0")
    return digest.hexdigest()[:16]


def bpf_archive(bin_dir: Path) -> bytes:
    """A newc cpio of the programs under bin/: objects 0644, loaders 0755."""
    cpio = CpioWriter()
    cpio.directory("bin")
    for path in sorted(bin_dir.iterdir()):
        mode = 0o644 if path.name.endswith(OBJECT_SUFFIX) else 0o755
        cpio.file(f"bin/{path.name}", path.read_bytes(), mode)
    return cpio.finish()


def boot_initrd(
    arch: Arch,
    kernel: KernelImage,
    initramfs: Path,
    cache: LabCache,
    progress: Progress,
) -> Path:
    """The guest bundle's initramfs followed by the kernel's BPF archive.

    The kernel unpacks concatenated archives one after the other, so the
    bundle file is left as it is; the pair is written once per content.
    """
    archive = build_bpf(arch, kernel, cache, progress)
    return cache.joined_initrd(initramfs, archive)


def build_bpf(
    arch: Arch, kernel: KernelImage, cache: LabCache, progress: Progress
) -> Path:
    """The gzip cpio of BPF programs and loader for kernel: cached or built."""
    if arch.no_bpf_lsm:
        raise BuildError(f"no BPF LSM programs for {arch.name}: {arch.no_bpf_lsm}")
    if kernel.vmlinux_h is None or not kernel.vmlinux_h.is_file():
        raise BuildError(
            f"kernel {kernel.entry} has no vmlinux.h: BPF programs need a kernel "
            "built with CONFIG_DEBUG_INFO_BTF"
        )
    tools = _tool_versions(arch, cache)
    sources = {p.name: p.read_bytes() for p in bpf_sources()}
    name = f"{arch.name}-{bpf_key(kernel.key, sources, tools)}"
    vmlinux_h = kernel.vmlinux_h

    def fill(scratch: Path) -> dict[str, object]:
        progress.phase(f"pack {arch.name}: compiling BPF programs for {kernel.release}")
        started = time.monotonic()
        bin_dir = scratch / "bin"
        bin_dir.mkdir()
        for src in sorted(BPF_SRC.glob("*.bpf.c")):
            _compile_object(arch, src, vmlinux_h.parent, bin_dir)
        for src in sorted(set(BPF_SRC.glob("*.c")) - set(BPF_SRC.glob("*.bpf.c"))):
            _compile_loader(arch, src, bin_dir)
        with gzip.GzipFile(scratch / "bpf.cpio.gz", "wb", mtime=0) as f:
            f.write(bpf_archive(bin_dir))
        log.info(
            "pack %s: BPF programs in %.1f s", arch.name, time.monotonic() - started
        )
        return {
            "arch": arch.name,
            "kernel_key": kernel.key,
            "tools": tools,
            "programs": sorted(p.name for p in bin_dir.iterdir()),
        }

    return cache.entry("bpf", name, fill) / "bpf.cpio.gz"


def _tool_versions(arch: Arch, cache: LabCache) -> list[str]:
    """clang, the loader's compiler and libbpf; ToolMissing names packages."""
    for tool in (CLANG, STRIP):
        if shutil.which(tool) is None:
            raise ToolMissing(
                f"{tool} not found: BPF programs need it; "
                "install it: apt-get install clang llvm"
            )
    clang = _run([CLANG, "--version"], "clang --version").splitlines()[0]
    versions = [clang, compiler_version(arch.guest_cc)]
    for lib, package in STATIC_LIBS.items():
        found = _run([arch.guest_cc, f"-print-file-name={lib}"], lib).strip()
        if not os.path.isabs(found):
            raise ToolMissing(
                f"{lib} not found by {arch.guest_cc}: the BPF loader is linked "
                f"static; install it: apt-get install {package}"
            )
        if lib == "libbpf.a":
            versions.append(f"libbpf.a {cache.memo_file_hash(Path(found))}")
    return versions


def _compile_object(arch: Arch, src: Path, include: Path, out: Path) -> None:
    obj = out / src.name.replace(".bpf.c", OBJECT_SUFFIX)
    _build(
        [
            CLANG,
            *BPF_CFLAGS,
            f"-D__TARGET_ARCH_{arch.kernel_arch}",
            "-I",
            str(include),
            "-I",
            str(BPF_SRC),
            "-c",
            str(src),
            "-o",
            str(obj),
        ],
        arch,
        f"BPF program {src.name}",
    )
    # DWARF is for people; the loader needs only the BTF that stays.
    _build([STRIP, "-g", str(obj)], arch, f"stripping {obj.name}")


def _compile_loader(arch: Arch, src: Path, out: Path) -> None:
    argv = [
        arch.guest_cc,
        *CFLAGS,
        *arch.guest_cflags,
        "-I",
        str(GUEST_SRC),
        "-I",
        str(BPF_SRC),
        "-o",
        str(out / src.stem),
        str(src),
        *LOADER_LIBS,
    ]
    _build(argv, arch, f"BPF loader {src.name}")


def _build(argv: list[str], arch: Arch, what: str) -> None:
    log.info("pack %s: %s", arch.name, shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(
            f"{what} did not build (exit {proc.returncode})",
            None,
            (proc.stderr or proc.stdout)[-3000:],
        )


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolMissing(f"{what} failed: {proc.stderr.strip()}")
    return proc.stdout
