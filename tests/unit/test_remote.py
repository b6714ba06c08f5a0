"""lab/remote.py without SSH: host addresses, the rewritten QEMU command,
remote exit statuses. The transport itself is tested against a real sshd
in tests/lab/test_remote_host.py."""

from __future__ import annotations

import io
import logging
import socket
import threading
from pathlib import Path

import paramiko
import pexpect
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab import remote
from lab.arches import X86_64
from lab.progress import quiet
from lab.qemu import qemu_argv
from lab.remote import (
    ChannelSpawn,
    ConnectionLost,
    HostAddress,
    RemoteHost,
    RemoteHostError,
    exit_codes,
    remote_argv,
)


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


# -- the key and known_hosts files, checked before connecting ---------------


@pytest.fixture
def known_hosts(tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("")
    return path


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file's problem is found before any connection is tried."""

    def connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("connect() was called")

    monkeypatch.setattr(paramiko.SSHClient, "connect", connect)


def connect(key: Path | None, known: Path) -> RemoteHost:
    address = HostAddress("root", "127.0.0.1", 2222)
    return RemoteHost.connect(address, key, known, quiet())


def private_key_text(password: bytes | None = None) -> bytes:
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption
    )


@pytest.mark.usefixtures("no_connect")
def test_unreadable_key_is_reported_as_unreadable(
    tmp_path: Path, known_hosts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root a mode-000 file is readable: the read itself fails here.
    key = tmp_path / "id_lab"
    key.write_bytes(private_key_text())
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == key:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(RemoteHostError) as caught:
        connect(key, known_hosts)

    assert caught.value.message == (
        f"cannot read the --lab-host-key {key}: Permission denied"
    )


@pytest.mark.usefixtures("no_connect")
def test_encrypted_key_says_the_lab_cannot_use_a_passphrase(
    tmp_path: Path, known_hosts: Path
) -> None:
    key = tmp_path / "id_lab"
    key.write_bytes(private_key_text(b"secret passphrase"))

    with pytest.raises(RemoteHostError) as caught:
        connect(key, known_hosts)

    message = caught.value.message
    assert f"--lab-host-key {key} is encrypted" in message
    assert "ssh-agent" in message and "without one" in message
    assert "refused" not in message


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize("name", ["garbage", "id_lab.pub"])
def test_a_file_that_is_no_private_key_is_named(
    tmp_path: Path, known_hosts: Path, name: str
) -> None:
    key = tmp_path / name
    if name.endswith(".pub"):
        public = paramiko.Ed25519Key.from_private_key(
            io.StringIO(private_key_text().decode())
        )
        key.write_text(f"{public.get_name()} {public.get_base64()} lab\n")
    else:
        key.write_text("hello\n")

    with pytest.raises(RemoteHostError) as caught:
        connect(key, known_hosts)

    assert f"--lab-host-key {key} is not a private key" in caught.value.message
    assert ("public key" in caught.value.message) == name.endswith(".pub")


@pytest.mark.usefixtures("no_connect")
def test_a_directory_as_the_key_is_named_a_directory(
    tmp_path: Path, known_hosts: Path
) -> None:
    with pytest.raises(RemoteHostError) as caught:
        connect(tmp_path, known_hosts)

    assert caught.value.message == (
        f"--lab-host-key {tmp_path} is a directory, not a private key file"
    )


@pytest.mark.usefixtures("no_connect")
def test_a_directory_as_known_hosts_is_named_a_directory(tmp_path: Path) -> None:
    with pytest.raises(RemoteHostError) as caught:
        connect(None, tmp_path)

    assert caught.value.message == (
        f"--lab-host-known-hosts {tmp_path} is a directory, not a known_hosts file"
    )


def test_no_key_at_all_says_how_to_give_one(
    known_hosts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def connect_without_keys(*args: object, **kwargs: object) -> None:
        # What paramiko raises with no key given, none in ~/.ssh, no agent.
        raise paramiko.SSHException("No authentication methods available")

    monkeypatch.setattr(paramiko.SSHClient, "connect", connect_without_keys)

    with pytest.raises(RemoteHostError) as caught:
        connect(None, known_hosts)

    assert "give --lab-host-key or load a key into ssh-agent" in caught.value.message


def test_a_port_without_ssh_banner_says_no_ssh_server_answered(
    known_hosts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real listener on 127.0.0.1 that takes the connection and says
    nothing (CONNECT_TIMEOUT shortened to 1 s)."""
    monkeypatch.setattr(remote, "CONNECT_TIMEOUT", 1.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        thread = threading.Thread(
            target=lambda: accepted.append(server.accept()[0]), daemon=True
        )
        thread.start()
        address = HostAddress("root", "127.0.0.1", port)
        try:
            with pytest.raises(RemoteHostError) as caught:
                RemoteHost.connect(address, None, known_hosts, quiet())
        finally:
            thread.join(5)
            for conn in accepted:
                conn.close()

    assert caught.value.message.startswith(
        f"no SSH server answered on 127.0.0.1 port {port}"
    )
    assert "SSH banner" in caught.value.message


# -- a connection lost while QEMU runs ---------------------------------------


class FakeTransport:
    def __init__(self, active: bool) -> None:
        self.active = active

    def is_active(self) -> bool:
        return self.active


class FakeChannel:
    """A paramiko channel after its connection dropped (or QEMU exited)."""

    def __init__(self, exit_status: int | None, transport_active: bool) -> None:
        self.closed = True
        self.eof_received = True
        # paramiko sets status_event on close, exit status or not; -1
        # stays when none came.
        self.status_event = threading.Event()
        self.status_event.set()
        self.exit_status = -1 if exit_status is None else exit_status
        self.transport = FakeTransport(transport_active)

    def fileno(self) -> int:
        return -1

    def get_id(self) -> int:
        return 0

    def get_transport(self) -> FakeTransport:
        return self.transport

    def recv_ready(self) -> bool:
        return False

    def recv(self, size: int) -> bytes:
        return b""

    def exit_status_ready(self) -> bool:
        return True

    def recv_exit_status(self) -> int:
        return self.exit_status


def console_of(channel: FakeChannel, tmp_path: Path) -> ChannelSpawn:
    spawn = ChannelSpawn(
        channel,  # type: ignore[arg-type]
        "/tmp/kernel-lab.abcdefgh/qemu.1.pid",
        lambda pid_file: None,
        "root@lab-1:22",
    )
    spawn.console_log = tmp_path / "console.log"
    spawn.console_log.write_text("lab-init: READY\n")
    return spawn


def test_dropped_connection_is_reported_as_lost_not_as_qemu_exit(
    tmp_path: Path,
) -> None:
    console = console_of(FakeChannel(None, transport_active=False), tmp_path)

    with pytest.raises(ConnectionLost) as caught:
        console.expect(pexpect.EOF, timeout=1)

    assert caught.value.message == (
        "lost the SSH connection to root@lab-1:22 (QEMU there ends with it)"
    )
    assert caught.value.log == tmp_path / "console.log"
    assert "READY" in caught.value.tail
    assert not console.isalive()


def test_qemu_exit_there_is_still_end_of_file(tmp_path: Path) -> None:
    console = console_of(FakeChannel(1, transport_active=True), tmp_path)

    console.expect(pexpect.EOF, timeout=1)

    assert not console.isalive()
    assert console.exitstatus == 1


class FakeClient:
    def __init__(self) -> None:
        self.transport = FakeTransport(active=False)
        self.commands: list[str] = []
        self.closed = False

    def get_transport(self) -> FakeTransport:
        return self.transport

    def exec_command(self, command: str, timeout: float) -> None:
        self.commands.append(command)
        raise paramiko.SSHException("SSH session not active")

    def close(self) -> None:
        self.closed = True


def test_close_after_a_lost_connection_names_the_directory_left_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient()
    host = RemoteHost(
        HostAddress("root", "lab-1"),
        client,  # type: ignore[arg-type]
        quiet(),
    )
    host.remote_dir = "/tmp/kernel-lab.abcdefgh"

    with caplog.at_level(logging.WARNING, logger="lab.remote"):
        host.close()

    warnings = [r.getMessage() for r in caplog.records]
    assert any(
        "/tmp/kernel-lab.abcdefgh was left on that host" in w
        and "remove it by hand" in w
        for w in warnings
    ), warnings
    assert client.commands == [], "tried to run rm over a closed connection"
    assert client.closed


class DeadLinkChannel(FakeChannel):
    """Its connection went down; no read has noticed yet."""

    def sendall(self, data: bytes) -> None:
        raise EOFError()


def test_a_send_on_a_dropped_connection_says_the_connection_was_lost(
    tmp_path: Path,
) -> None:
    console = console_of(DeadLinkChannel(None, transport_active=False), tmp_path)

    with pytest.raises(ConnectionLost, match="lost the SSH connection to root@lab-1"):
        console.sendline("7 write /dev/null")
