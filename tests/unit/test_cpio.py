"""CpioWriter and the initramfs, read back with the system's cpio.

cpio only lists (-t) or writes to stdout (--to-stdout): nothing is
extracted on the host.
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

from lab import guest
from lab.guest import CpioWriter


def cpio(archive: bytes, *args: str) -> str:
    proc = subprocess.run(
        ["cpio", "--quiet", *args], input=archive, capture_output=True, check=True
    )
    return proc.stdout.decode()


def small_archive() -> bytes:
    writer = CpioWriter()
    writer.directory("bin")
    writer.directory("dev")
    writer.char_device("dev/console", 5, 1)
    writer.file("init", b"#!not-run\n")
    writer.file("bin/affinity", b"\x7fELF" + bytes(range(7)))
    return writer.finish()


def test_cpio_lists_every_entry_in_order() -> None:
    names = cpio(small_archive(), "-it").split()

    assert names == ["bin", "dev", "dev/console", "init", "bin/affinity"]


def test_console_is_a_char_device_5_1() -> None:
    listing = cpio(small_archive(), "-itv").splitlines()

    [console] = [line for line in listing if line.endswith(" dev/console")]
    assert console.startswith("crw-------")
    assert console.split()[4:6] == ["5,", "1"]
    [init] = [line for line in listing if line.endswith(" init")]
    assert init.startswith("-rwxr-xr-x")
    [bin_dir] = [line for line in listing if line.endswith(" bin")]
    assert bin_dir.startswith("drwxr-xr-x")


def test_file_contents_round_trip() -> None:
    # Lengths not a multiple of 4 exercise the padding after name and data.
    assert cpio(small_archive(), "-i", "--to-stdout", "init") == "#!not-run\n"
    data = subprocess.run(
        ["cpio", "--quiet", "-i", "--to-stdout", "bin/affinity"],
        input=small_archive(),
        capture_output=True,
        check=True,
    ).stdout
    assert data == b"\x7fELF" + bytes(range(7))


def test_archive_ends_with_trailer_on_a_4_byte_boundary() -> None:
    archive = small_archive()

    assert len(archive) % 4 == 0
    assert b"TRAILER!!!\0" in archive[-128:]


def test_initramfs_has_init_programs_and_console(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for the compiled programs; they are packed, never run.
    (bin_dir / "lab-init").write_bytes(b"lab-init stand-in")
    (bin_dir / "affinity").write_bytes(b"affinity stand-in")
    out = tmp_path / "initramfs.cpio.gz"

    guest._write_initramfs(bin_dir, out)

    archive = gzip.decompress(out.read_bytes())
    names = cpio(archive, "-it").split()
    assert {"bin", "dev", "proc", "sys", "tmp", "dev/console", "init"} <= set(names)
    assert {"bin/lab-init", "bin/affinity"} <= set(names)
    assert cpio(archive, "-i", "--to-stdout", "init") == "lab-init stand-in"


def test_initramfs_is_the_same_bytes_each_time(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "lab-init").write_bytes(b"lab-init stand-in")

    first, second = tmp_path / "1", tmp_path / "2"
    for out in (first, second):
        out.mkdir()
        guest._write_initramfs(bin_dir, out / "initramfs.cpio.gz")

    first_bytes = (first / "initramfs.cpio.gz").read_bytes()
    assert first_bytes == (second / "initramfs.cpio.gz").read_bytes()


def test_name_size_counts_bytes_not_characters() -> None:
    writer = CpioWriter()
    writer.file("bin/café", b"x")
    archive = writer.finish()

    # newc: "070701", then 13 eight-digit hex fields; c_namesize is the 12th.
    namesize = int(archive[6 + 11 * 8 : 6 + 12 * 8], 16)
    assert namesize == len("bin/café".encode()) + 1
