"""Guest programs and the initramfs that carries them, built once per content.

The C sources in guest/ are compiled static for the arch; lab-init becomes
/init and the programs go to /bin. The cpio archive (newc format) is
written here rather than by the kernel's gen_init_cpio, so it needs no
kernel tree and no root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.arches import Arch
from lab.cache import LabCache
from lab.errors import BuildError, ToolMissing
from lab.kbuild import LAB_ROOT, compiler_version
from lab.progress import Progress

log = logging.getLogger(__name__)

GUEST_SRC = LAB_ROOT / "guest"
INIT_PROGRAM = "lab-init"
# Only the lab's initramfs has it: `lab-init -c` refuses to run elsewhere.
GUEST_MARKER = "etc/kernel-lab-guest"
CFLAGS = ("-O2", "-static", "-Wall", "-Wextra", "-D_GNU_SOURCE")
GUEST_FORMAT = 2


@dataclass(frozen=True)
class GuestBundle:
    """Guest programs for one arch and the initramfs that holds them."""

    arch: str
    entry: Path
    initramfs: Path

    @property
    def bin_dir(self) -> Path:
        """The programs on the host, where virtme-ng's guest sees them."""
        return self.entry / "bin"


def guest_programs() -> list[Path]:
    return sorted(GUEST_SRC.glob("*.c"))


def guest_key(arch: Arch) -> str:
    digest = hashlib.sha256()
    digest.update(
        f"{GUEST_FORMAT} {arch.name} {' '.join(CFLAGS + arch.guest_cflags)}".encode()
    )
    digest.update(compiler_version(arch.guest_cc).encode())
    for src in sorted(GUEST_SRC.glob("*.[ch]")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    return digest.hexdigest()[:16]


def build_guest(arch: Arch, cache: LabCache, progress: Progress) -> GuestBundle:
    """The guest bundle for arch: from the cache, or compiled and packed now."""
    if shutil.which(arch.guest_cc) is None:
        raise ToolMissing(
            f"guest compiler {arch.guest_cc} not found; install: "
            f"apt-get install {' '.join(arch.packages)}"
        )

    def fill(scratch: Path) -> dict[str, object]:
        progress.phase(f"pack {arch.name}: compiling guest programs")
        _compile_all(arch, scratch / "bin")
        _write_initramfs(scratch / "bin", scratch / "initramfs.cpio.gz")
        return {"programs": sorted(p.name for p in (scratch / "bin").iterdir())}

    entry = cache.entry("guest", f"{arch.name}-{guest_key(arch)}", fill)
    return GuestBundle(arch.name, entry, entry / "initramfs.cpio.gz")


def _compile_all(arch: Arch, out: Path) -> None:
    out.mkdir(parents=True)
    for src in guest_programs():
        argv = [
            arch.guest_cc,
            *CFLAGS,
            *arch.guest_cflags,
            "-o",
            str(out / src.stem),
            str(src),
        ]
        log.info("pack %s: %s", arch.name, shlex.join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(
                f"guest program {src.name} did not compile", None, proc.stderr
            )


class CpioWriter:
    """A minimal writer of the newc cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name.encode()) + 1,
            0,
        ]
        self.ino += 1
        header = "070701" + "".join(f"{v:08x}" for v in fields)
        self.buf.write(header.encode() + name.encode() + b"\0")
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _write_initramfs(bin_dir: Path, out: Path) -> None:
    cpio = CpioWriter()
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file(
        GUEST_MARKER,
        b"The kernel-lab guest's initramfs (see guest/lab-init.c).\n",
        0o644,
    )
    cpio.file("init", (bin_dir / INIT_PROGRAM).read_bytes())
    for prog in sorted(bin_dir.iterdir()):
        cpio.file(f"bin/{prog.name}", prog.read_bytes())
    # mtime=0 so that the same programs give the same archive.
    with gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as f:
        f.write(cpio.finish())
