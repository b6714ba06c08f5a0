"""lab/remote.py without SSH: host addresses, the rewritten QEMU command,
remote exit statuses. The transport itself is tested against a real sshd
in tests/lab/test_remote_host.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.arches import X86_64
from lab.qemu import qemu_argv
from lab.remote import HostAddress, RemoteHostError, exit_codes, remote_argv


def test_address_with_port() -> None:
    address = HostAddress.parse("lab@build-1.example:2222")

    assert address == HostAddress("lab", "build-1.example", 2222)
    assert str(address) == "lab@build-1.example:2222"
    assert address.known_hosts_name == "[build-1.example]:2222"


def test_address_without_port_is_port_22() -> None:
    address = HostAddress.parse("root@10.0.0.5")

    assert address.port == 22
    assert address.known_hosts_name == "10.0.0.5"


@pytest.mark.parametrize("text", ["host", "@host", "root@", "root@h:0", "r@h:x"])
def test_malformed_address_says_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="--lab-host"):
        HostAddress.parse(text)


def test_kernel_and_initrd_are_uploaded_and_replaced(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    initrd = tmp_path / "initrd.cpio.gz"
    image.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    argv = qemu_argv(X86_64, image, initrd, "tcg")
    uploaded: list[Path] = []

    def upload(path: Path) -> str:
        uploaded.append(path)
        return f"/tmp/kernel-lab.abcdefgh/{path.name}"

    remote = remote_argv(argv, upload)

    assert uploaded == [image, initrd]
    assert remote[remote.index("-kernel") + 1] == "/tmp/kernel-lab.abcdefgh/bzImage"
    assert (
        remote[remote.index("-initrd") + 1] == "/tmp/kernel-lab.abcdefgh/initrd.cpio.gz"
    )
    # Everything else is passed as it is.
    rest = [
        a for i, a in enumerate(remote) if remote[i - 1] not in ("-kernel", "-initrd")
    ]
    assert rest == [
        a for i, a in enumerate(argv) if argv[i - 1] not in ("-kernel", "-initrd")
    ]


def test_another_local_file_in_the_command_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")

    with pytest.raises(RemoteHostError, match="disk.img"):
        remote_argv(["qemu-system-x86_64", "-hda", str(disk)], lambda p: str(p))


@pytest.mark.parametrize(
    ("status", "codes"),
    [
        (0, (0, None)),
        (1, (1, None)),
        (137, (None, 9)),
        (134, (None, 6)),
        (-1, (None, None)),
    ],
)
def test_remote_exit_status_as_pexpect_has_it(
    status: int, codes: tuple[int | None, int | None]
) -> None:
    assert exit_codes(status) == codes
