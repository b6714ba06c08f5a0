"""The SSH transport on a real guest: sshd from the lab's initramfs, reached
through QEMU's port forward on 127.0.0.1, keeps a command's stdout and
stderr apart, passes its exit status back, copies files both ways over
SFTP, and is trusted only with the host key the lab generated.

Under --lab-transport ssh these use the run's guest; otherwise one guest
is booted with the SSH transport for them, so a console run checks the
transport too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import ssh
from lab.console import BootedGuest
from lab.errors import BootError, GuestError
from lab.session import LabRun

pytestmark = pytest.mark.selftest

SshGuest = Callable[[str], BootedGuest]


@pytest.fixture(scope="session")
def ssh_guests(lab_run: LabRun) -> Iterator[SshGuest]:
    """ssh_guests(arch): a booted guest whose commands go over SSH."""
    booted: dict[str, BootedGuest] = {}

    def get(arch_name: str) -> BootedGuest:
        if lab_run.options.transport == "ssh":
            return lab_run.guest(arch_name)
        guest = booted.get(arch_name)
        if guest is None or not guest.alive:
            arch = lab_run.state(arch_name).arch
            arch_dir = lab_run.results.arch_dir(arch)
            guest = lab_run.start_guest(
                arch_name,
                lab_run.bundle(arch_name).initramfs,
                arch_dir / "console.ssh.log",
                arch_dir / "qemu.ssh.cmd",
                transport="ssh",
            )
            booted[arch_name] = guest
        return guest

    yield get
    for guest in booted.values():
        guest.poweroff()


@pytest.fixture
def ssh_guest(ssh_guests: SshGuest, lab_run: LabRun, lab_arch: str) -> BootedGuest:
    unavailable = lab_run.ssh_unavailable(lab_arch)
    if unavailable:
        pytest.skip(unavailable)
    return ssh_guests(lab_arch)


def transport_of(guest: BootedGuest) -> ssh.SshTransport:
    assert isinstance(guest.transport, ssh.SshTransport), guest.transport
    return guest.transport


def test_ssh_command_keeps_stdout_and_stderr_apart_with_exit_status(
    ssh_guest: BootedGuest,
) -> None:
    """A program writing to both streams in turn: each stream arrives on
    its own, whole and in order, and its exit status 3 comes back; a
    command lab-init refuses reports on stderr with rc 1."""
    result = ssh_guest.run("streams", "3")
    missing = ssh_guest.command("cat", "/no/such/file")

    assert result.rc == 3, result
    assert result.output == "".join(f"# stdout_line: {i}\n" for i in (1, 2, 3))
    assert result.stderr == "".join(f"streams: stderr line {i}\n" for i in (1, 2, 3))
    assert (missing.rc, missing.output) == (1, ""), missing
    assert "cat /no/such/file: No such file or directory" in missing.stderr


def test_sftp_put_then_get_round_trips_a_file(
    ssh_guest: BootedGuest, tmp_path: Path
) -> None:
    """A binary file copied in reads back byte for byte, and lab-init in
    the guest sees what was copied (a text file through `cat`)."""
    data = os.urandom(300 * 1024)
    (tmp_path / "blob").write_bytes(data)
    (tmp_path / "note").write_text("copied in over SFTP\n")

    ssh_guest.put(tmp_path / "blob", "/tmp/blob")
    ssh_guest.put(tmp_path / "note", "/tmp/note")
    ssh_guest.get("/tmp/blob", tmp_path / "blob.back")

    assert (tmp_path / "blob.back").read_bytes() == data
    assert ssh_guest.cat("/tmp/note") == "copied in over SFTP\n"


def test_sftp_get_of_a_missing_file_fails_clearly(
    ssh_guest: BootedGuest, tmp_path: Path
) -> None:
    with pytest.raises(GuestError, match="/no/such/file"):
        ssh_guest.get("/no/such/file", tmp_path / "x")

    assert ssh_guest.alive


def test_host_key_other_than_the_labs_is_refused(ssh_guest: BootedGuest) -> None:
    """A client that expects another host key for this guest's port
    refuses the connection; with the lab's key it logs in."""
    endpoint = transport_of(ssh_guest).endpoint
    stranger = ssh.new_key()
    wrong = ssh.SshEndpoint(endpoint.host, endpoint.port, stranger, endpoint.client_key)

    with pytest.raises(ssh.HostKeyRejected) as caught:
        ssh.connect(wrong, timeout=30)
    right = ssh.connect(endpoint, timeout=30)
    right.close()

    offered = endpoint.host_key.get_fingerprint().hex()
    expected = stranger.get_fingerprint().hex()
    assert f"offered host key {offered}" in caught.value.message
    assert f"not the lab's {expected}: refused" in caught.value.message


def test_forwarded_port_listens_on_loopback_only(ssh_guest: BootedGuest) -> None:
    """QEMU binds the forward to 127.0.0.1: /proc/net/tcp shows the port's
    listening socket on 127.0.0.1 and on no other address."""
    port = transport_of(ssh_guest).endpoint.port
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, local_port = local.split(":")
        if int(local_port, 16) == port and state == "0A":
            listening.append(address)

    assert listening == ["0100007F"], listening


def test_sshd_that_cannot_start_fails_the_boot_at_once_with_its_error(
    lab_run: LabRun, lab_arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An sshd_config sshd refuses: lab-init reports sshd's exit on the
    console and the boot fails then, with sshd's own complaint in the tail,
    instead of waiting out the boot timeout."""
    arch = lab_run.state(lab_arch).arch
    unavailable = lab_run.ssh_unavailable(lab_arch)
    if unavailable:
        pytest.skip(unavailable)
    monkeypatch.setattr(ssh, "SSHD_CONFIG", ssh.SSHD_CONFIG + "NoSuchOption yes\n")
    arch_dir = lab_run.results.arch_dir(arch)
    timeout = lab_run.timeouts(lab_run.state(lab_arch)).boot

    started = time.monotonic()
    with pytest.raises(BootError) as caught:
        lab_run.start_guest(
            lab_arch,
            lab_run.bundle(lab_arch).initramfs,
            arch_dir / "console.bad-sshd.log",
            arch_dir / "qemu.bad-sshd.cmd",
            transport="ssh",
        )

    assert "sshd exited with status 255" in caught.value.message
    assert "Bad configuration option: NoSuchOption" in caught.value.tail
    assert caught.value.log == arch_dir / "console.bad-sshd.log"
    # It did not wait for the boot timeout to pass.
    assert time.monotonic() - started < timeout / 2
