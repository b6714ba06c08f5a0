"""The lab's cache directory: finished builds, scratch space, locks, memos.

Layout under the cache root (default ~/.cache/kernel-lab, --lab-cache):

    kernels/<arch>-<key>/   finished kernel builds (manifest.json last)
    guest/<arch>-<key>/     guest programs and initramfs
    bpf/<arch>-<key>/       BPF programs and loader built for one kernel
    selinux/<arch>-<key>/   the dummy SELinux policy for one kernel
    ssh/keys-1/             the lab's SSH host and client keys (lab/ssh.py)
    ssh/<arch>-<key>/       the guest's sshd archive (--lab-transport ssh)
    scratch/                builds in progress (removed when they end)
    failed/                 build logs of failed builds
    locks/                  one lock file per key
    ccache/                 the compiler cache shared by all builds
    memo.json               file hashes and host probes
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lab.errors import BuildError
from lab.progress import Progress

DEFAULT_CACHE = Path.home() / ".cache" / "kernel-lab"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def concat_files(parts: Sequence[Path], out: Path, align: int = 1) -> None:
    """Write the parts one after the other into out, atomically; with
    align, each part starts at a multiple of it (zeros in between)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(b"\0" * (-f.tell() % align))
                with part.open("rb") as src:
                    shutil.copyfileobj(src, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LabCache:
    """A cache root and the operations on it that need care."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        for sub in ("kernels", "guest", "scratch", "failed", "locks", "ccache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def kernels_dir(self) -> Path:
        return self.root / "kernels"

    @property
    def guest_dir(self) -> Path:
        return self.root / "guest"

    @property
    def ccache_dir(self) -> Path:
        return self.root / "ccache"

    @property
    def failed_dir(self) -> Path:
        return self.root / "failed"

    def scratch_dir(self, name: str) -> Path:
        """A fresh directory for one build; the caller removes it. Its name
        carries the owner's pid, so leftovers of a killed run can be told."""
        prefix = f"{name}.{os.getpid()}."
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "scratch"))

    def entry(
        self, kind: str, name: str, fill: Callable[[Path], dict[str, object]]
    ) -> Path:
        """The cache entry <kind>/<name>, made by fill(scratch) when missing.

        fill writes the entry's files into a scratch directory and returns
        its manifest; the manifest is written last and the directory renamed
        into place under the key's lock, so a crash leaves no half entry.
        """
        entry = self.root / kind / name
        with self.lock(f"{kind}-{name}"):
            if (entry / "manifest.json").is_file():
                return entry
            scratch = self.scratch_dir(f"{kind}-{name}")
            try:
                manifest = fill(scratch)
                (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2))
                if entry.exists():
                    shutil.rmtree(entry)
                entry.parent.mkdir(parents=True, exist_ok=True)
                os.rename(scratch, entry)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return entry

    def joined_initrd(self, initramfs: Path, extra: Path) -> Path:
        """The guest bundle's initramfs followed by another cpio archive
        (BPF programs, a SELinux policy), written once per content beside
        `extra`. The kernel unpacks concatenated archives one after the
        other, so the bundle file itself stays as it is."""
        both = f"aligned {file_sha256(initramfs)} {file_sha256(extra)}"
        out = (
            extra.parent
            / f"initrd-{hashlib.sha256(both.encode()).hexdigest()[:16]}.cpio.gz"
        )
        with self.lock(f"initrd-{extra.parent.name}"):
            if not out.is_file():
                # An uncompressed archive must start 4-byte aligned in the
                # whole initrd; the kernel skips the zeros before it.
                concat_files([initramfs, extra], out, align=4)
        return out

    def remove_orphans(self) -> list[Path]:
        """Remove scratch directories whose run is gone (killed, or a second
        Ctrl-C while it cleaned up); returns what was removed."""
        removed = []
        for path in (self.root / "scratch").iterdir():
            parts = path.name.rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    @contextlib.contextmanager
    def lock(self, name: str, progress: Progress | None = None) -> Iterator[None]:
        """Hold the lock of one key; tells the user when it has to wait."""
        path = self.root / "locks" / f"{name}.lock"
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    progress.phase(f"waiting for another run that holds {name}")
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise BuildError(
                f"only {free / 1024**3:.1f} GB free under {self.root}; "
                f"a kernel build needs {needed / 1024**3:.0f} GB"
            )

    def memo_file_hash(self, path: Path) -> str:
        """sha256 of a large file, remembered by its path, size and mtime."""
        st = path.stat()
        memo_key = f"sha256:{path}:{st.st_size}:{st.st_mtime_ns}"
        memo = self.read_memo()
        if memo_key not in memo:
            memo[memo_key] = file_sha256(path)
            self.remember(memo_key, memo[memo_key])
        return str(memo[memo_key])

    def read_memo(self) -> dict[str, object]:
        try:
            data = json.loads((self.root / "memo.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_memo(self, memo: dict[str, object]) -> None:
        """Replace memo.json atomically, so a reader never sees half of it."""
        with self.lock("memo"):
            self._replace_memo(memo)

    def remember(self, key: str, value: object) -> None:
        """Add one entry to memo.json. The lock spans the read and the write:
        two runs at once (pytest -n) must not drop each other's entries."""
        with self.lock("memo"):
            memo = self.read_memo()
            memo[key] = value
            self._replace_memo(memo)

    def _replace_memo(self, memo: dict[str, object]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix="memo.")
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f, indent=1, sort_keys=True)
        os.replace(tmp, self.root / "memo.json")
