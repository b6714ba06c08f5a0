"""The SSH transport without QEMU: QEMU's network options, the lab's keys,
the sshd archive, and connections to an SSH server run in this process
on 127.0.0.1 (paramiko's server side), which stands in for the guest's
sshd; a pipe stands in for the guest's console."""

from __future__ import annotations

import gzip
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

from lab import patterns, qemu, ssh
from lab.arches import MIPS, X86_64
from lab.cache import LabCache
from lab.console import CommandResult
from lab.errors import BootError, GuestError, ToolMissing
from lab.progress import Progress

IMAGE = Path("/cache/kernels/x86_64-0123456789abcdef/bzImage")
INITRAMFS = Path("/cache/guest/x86_64-fedcba9876543210/initramfs.cpio.gz")

LDD_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007ffd1a5e4000)
\tlibcrypt.so.1 => /lib/x86_64-linux-gnu/libcrypt.so.1 (0x00007f3d9364f000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3d92c1e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3d937dc000)
"""


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, argv
    return argv[argv.index(name) + 1]


# -- QEMU -----------------------------------------------------------------


def test_ssh_argv_forwards_a_loopback_port_to_the_guests_sshd() -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "tcg", ssh_port=40022)

    netdev = option(argv, "-netdev").split(",")
    assert "hostfwd=tcp:127.0.0.1:40022-10.0.2.15:22" in netdev
    assert "restrict=on" in netdev
    assert option(argv, "-device") == "virtio-net-pci,netdev=lab0,romfile="
    assert option(argv, "-append").split()[-2:] == [
        "lab.ip=10.0.2.15/24",
        "lab.sshd=1",
    ]


def test_ssh_argv_gives_the_tcg_cpu_an_rng_for_sshd() -> None:
    tcg = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "tcg", ssh_port=40022)
    kvm = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "kvm", ssh_port=40022)

    assert option(tcg, "-cpu") == "qemu64,+rdrand"
    assert option(kvm, "-cpu") == "host"


def test_console_argv_has_no_network() -> None:
    argv = qemu.qemu_argv(X86_64, IMAGE, INITRAMFS, "tcg")

    assert "-netdev" not in argv and "-device" not in argv
    assert "lab." not in option(argv, "-append")
    assert option(argv, "-cpu") == "qemu64"


def test_free_port_is_a_high_port_nobody_listens_on() -> None:
    port = ssh.free_port()

    assert port >= 1024
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect((ssh.LOOPBACK, port))


# -- keys and the archive ---------------------------------------------------


def test_keys_are_made_once_per_cache_and_private_ones_are_0600(
    tmp_path: Path,
) -> None:
    cache = LabCache(tmp_path / "cache")

    first = ssh.lab_keys(cache)
    again = ssh.lab_keys(cache)

    assert first.entry == again.entry == tmp_path / "cache" / "ssh" / ssh.KEYS_NAME
    assert first.host_key() == again.host_key()
    # The client trusts the public half, read from the .pub file.
    assert not first.host_key().can_sign()
    assert first.host_key() == ssh.load_key(first.host_key_file)
    assert first.host_key() != first.client_key()
    for path in (first.host_key_file, first.client_key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = first.host_key_file.with_name(ssh.HOST_KEY + ".pub").read_text()
    assert public.startswith(f"ssh-ed25519 {first.host_key().get_base64()} ")


def test_ldd_output_gives_libraries_and_loader_not_vdso() -> None:
    assert ssh.parse_ldd(LDD_OUTPUT) == [
        Path("/lib/x86_64-linux-gnu/libcrypt.so.1"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]


def cpio_list(archive: bytes) -> dict[str, str]:
    """name -> the mode column of `cpio -itv` (nothing is extracted)."""
    proc = subprocess.run(
        ["cpio", "--quiet", "-itv"], input=archive, capture_output=True, check=True
    )
    return {
        line.split()[-1]: line.split()[0] for line in proc.stdout.decode().splitlines()
    }


def cpio_file(archive: bytes, name: str) -> str:
    proc = subprocess.run(
        ["cpio", "--quiet", "-i", "--to-stdout", name],
        input=archive,
        capture_output=True,
        check=True,
    )
    return proc.stdout.decode()


@pytest.fixture
def archive(tmp_path: Path) -> tuple[bytes, ssh.SshKeys]:
    keys = ssh.lab_keys(LabCache(tmp_path / "cache"))
    fake_sshd = tmp_path / "sshd"
    fake_sshd.write_bytes(b"\x7fELF not really\n")
    return ssh.ssh_archive([fake_sshd], keys), keys


def test_archive_lets_root_in_with_the_lab_client_key_only(
    archive: tuple[bytes, ssh.SshKeys],
) -> None:
    data, keys = archive
    modes = cpio_list(data)

    authorized = cpio_file(data, "root/.ssh/authorized_keys")
    assert authorized == ssh.authorized_line(keys.client_key())
    assert modes["root"] == "drwx------"
    assert modes["root/.ssh"] == "drwx------"
    assert modes["root/.ssh/authorized_keys"] == "-rw-------"
    assert modes[f"etc/ssh/{ssh.HOST_KEY}"] == "-rw-------"
    assert cpio_file(data, f"etc/ssh/{ssh.HOST_KEY}").encode() == (
        keys.host_key_file.read_bytes()
    )


def test_archive_makes_lab_init_roots_shell_and_keeps_sshd_to_keys(
    archive: tuple[bytes, ssh.SshKeys], tmp_path: Path
) -> None:
    data, _ = archive
    modes = cpio_list(data)
    config = cpio_file(data, "etc/ssh/sshd_config").splitlines()

    root = cpio_file(data, "etc/passwd").splitlines()[0].split(":")
    assert root[0] == "root" and root[5:] == ["/root", "/bin/lab-init"]
    assert "sshd" in cpio_file(data, "etc/passwd")
    for line in (
        "UsePAM no",
        "PasswordAuthentication no",
        "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp",
    ):
        assert line in config
    assert modes["run/sshd"].startswith("d") and modes["var/empty"].startswith("d")
    # The program keeps its host path: tmp_path/sshd, without the leading /.
    assert str(tmp_path / "sshd").lstrip("/") in modes


def test_no_ssh_on_an_arch_without_it_says_why() -> None:
    with pytest.raises(ToolMissing, match="big-endian"):
        ssh.require_host_binaries(MIPS)


def test_an_sshd_of_another_arch_is_refused(tmp_path: Path) -> None:
    not_elf = tmp_path / "sshd"
    not_elf.write_text("#!/bin/sh\n")

    with pytest.raises(ToolMissing, match="not an x86_64 program"):
        ssh.require_host_binaries(X86_64, not_elf)


def test_archive_is_cached_and_appended_to_the_initrd(tmp_path: Path) -> None:
    cache = LabCache(tmp_path / "cache")
    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes(gzip.compress(b"first archive"))

    joined = ssh.boot_initrd(X86_64, initrd, cache, Progress(write=lambda _: None))
    again = ssh.boot_initrd(X86_64, initrd, cache, Progress(write=lambda _: None))

    assert joined == again
    assert joined.parent.parent == cache.root / "ssh"
    data = joined.read_bytes()
    first = initrd.read_bytes()
    # The kernel takes an uncompressed archive only at a 4-byte boundary.
    start = len(first) + (-len(first) % 4)
    assert data[: len(first)] == first
    assert data[len(first) : start] == b"\0" * (start - len(first))
    assert data[start:].startswith(b"070701")
    assert "root/.ssh/authorized_keys" in cpio_list(data[start:])


# -- connections, against an SSH server in this process ---------------------


@dataclass
class FakeSshd(paramiko.ServerInterface):
    """Accepts the client key; `exec` runs one of a few scripted commands."""

    client_key: paramiko.PKey
    commands: list[str] = field(default_factory=list)

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == "root" and key == self.client_key:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(
        self, channel: paramiko.Channel, command: bytes
    ) -> bool:
        text = command.decode()
        self.commands.append(text)
        threading.Thread(target=self._exec, args=(channel, text), daemon=True).start()
        return True

    def _exec(self, channel: paramiko.Channel, text: str) -> None:
        # paramiko answers the exec request after this method's caller
        # returns; a channel closed before that answer fails exec_command.
        time.sleep(0.1)
        if text == "run /bin/hang":
            channel.sendall(b"# stalling_for: -1\n")
            return
        if text == "run /bin/streams 3":
            for i in (1, 2, 3):
                channel.sendall(f"out {i}\n".encode())
                channel.sendall_stderr(f"err {i}\n".encode())
            status = 3
        else:
            channel.sendall_stderr(f"lab-init: unknown command {text}\n".encode())
            status = 1
        channel.send_exit_status(status)
        channel.shutdown_write()
        channel.close()


@dataclass
class Server:
    port: int
    host_key: paramiko.PKey
    client_key: paramiko.PKey
    sshd: FakeSshd

    def endpoint(self, host_key: paramiko.PKey | None = None) -> ssh.SshEndpoint:
        return ssh.SshEndpoint(
            ssh.LOOPBACK, self.port, host_key or self.host_key, self.client_key
        )


@pytest.fixture
def server() -> Iterator[Server]:
    """An SSH server on a free port of 127.0.0.1, stopped at the end."""
    host_key, client_key = ssh.new_key(), ssh.new_key()
    sshd = FakeSshd(client_key)
    listener = socket.socket()
    listener.bind((ssh.LOOPBACK, 0))
    listener.listen()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(host_key)
            transports.append(transport)
            try:
                transport.start_server(server=sshd)
            except (paramiko.SSHException, EOFError, OSError):
                # A client that refused the host key hangs up.
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield Server(listener.getsockname()[1], host_key, client_key, sshd)
    # shutdown() wakes the thread's accept(); close() alone would not.
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for transport in transports:
        transport.close()
    thread.join(timeout=5)


def test_connect_logs_in_when_the_host_key_is_the_labs(server: Server) -> None:
    client = ssh.connect(server.endpoint(), timeout=10)

    transport = client.get_transport()
    assert transport is not None and transport.is_authenticated()
    client.close()


def test_connect_refuses_a_host_key_other_than_the_labs(server: Server) -> None:
    stranger = ssh.new_key()

    with pytest.raises(ssh.HostKeyRejected) as caught:
        ssh.connect(server.endpoint(host_key=stranger), timeout=10)

    assert server.host_key.get_fingerprint().hex() in caught.value.message
    assert "refused" in caught.value.message


def test_connect_refuses_a_host_key_of_another_type(server: Server) -> None:
    """Known for the port: an ECDSA key. The server offers Ed25519: refused,
    not added."""
    ecdsa = paramiko.ECDSAKey.generate()

    with pytest.raises(ssh.HostKeyRejected, match="ssh-ed25519"):
        ssh.connect(server.endpoint(host_key=ecdsa), timeout=10)


def test_waiting_for_sshd_gives_up_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(ssh, "CONNECT_RETRY_SECONDS", 0.05)
    endpoint = ssh.SshEndpoint(
        ssh.LOOPBACK, ssh.free_port(), ssh.new_key(), ssh.new_key()
    )
    watched = []

    with pytest.raises(BootError, match="no SSH connection .* within 0.3 s"):
        ssh.connect_when_up(endpoint, 0.3, watch=lambda: watched.append(1))

    assert len(watched) >= 2


class ConsoleStandIn:
    """What SshTransport needs of a BootedGuest; the console is a pipe."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.warnings: list[str] = []
        self.crashed: str | None = None
        self.killed = False
        self.console_log = None

    @property
    def console_fd(self) -> int:
        return self.read_end

    def watch_console(self, what: str) -> None:
        ready = True
        while ready:
            import select

            ready = bool(select.select([self.read_end], [], [], 0)[0])
            if ready:
                text = os.read(self.read_end, 4096)
                crash = patterns.find_crash(text)
                if crash:
                    raise GuestError(f"{crash[0]} during {what}")
                self.warnings += patterns.find_warnings(text)

    def hung(self, what: str, timeout: float, output: str = "") -> GuestError:
        self.killed = True
        return GuestError(
            f"guest hang: no answer within {timeout:g} s during {what}", None, output
        )

    def kill(self) -> None:
        self.killed = True

    def console_tail(self, lines: int = 40) -> str:
        return ""

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


@pytest.fixture
def transport(server: Server) -> Iterator[tuple[ssh.SshTransport, ConsoleStandIn]]:
    console = ConsoleStandIn()
    client = ssh.connect(server.endpoint(), timeout=10)
    made = ssh.SshTransport(console, client, server.endpoint())  # type: ignore[arg-type]
    yield made, console
    made.close()
    console.close()


def test_command_keeps_streams_apart_with_exit_status(
    transport: tuple[ssh.SshTransport, ConsoleStandIn], server: Server
) -> None:
    made, _ = transport

    result = made.command("run", ("/bin/streams", "3"), timeout=10)

    assert isinstance(result, CommandResult)
    assert server.sshd.commands == ["run /bin/streams 3"]
    assert (result.rc, result.output, result.stderr) == (
        3,
        "out 1\nout 2\nout 3\n",
        "err 1\nerr 2\nerr 3\n",
    )
    assert result.transcript.endswith("--- stderr ---\nerr 1\nerr 2\nerr 3\n")


def test_a_command_that_never_ends_is_a_hang_with_its_output(
    transport: tuple[ssh.SshTransport, ConsoleStandIn],
) -> None:
    made, console = transport
    started = time.monotonic()

    with pytest.raises(GuestError, match="guest hang: no answer within 0.5 s") as err:
        made.command("run", ("/bin/hang",), timeout=0.5)

    assert time.monotonic() - started < 3
    assert "# stalling_for: -1" in err.value.tail
    assert console.killed


def test_a_panic_on_the_console_ends_the_command_at_once(
    transport: tuple[ssh.SshTransport, ConsoleStandIn],
) -> None:
    made, console = transport
    threading.Timer(
        0.2,
        os.write,
        (
            console.write_end,
            b"[ 5.1] Kernel panic - not syncing: sysrq triggered crash\n",
        ),
    ).start()
    started = time.monotonic()

    with pytest.raises(GuestError, match="kernel panic during command 'run /bin/hang'"):
        made.command("run", ("/bin/hang",), timeout=20)

    assert time.monotonic() - started < 3


def test_a_warning_on_the_console_is_the_commands(
    transport: tuple[ssh.SshTransport, ConsoleStandIn],
) -> None:
    made, console = transport
    os.write(
        console.write_end,
        b"[ 9.3] WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40\n",
    )

    result = made.command("run", ("/bin/streams", "3"), timeout=10)

    assert len(result.warnings) == 1 and "kernel/sched/core.c" in result.warnings[0]
    assert console.warnings == result.warnings


def test_each_command_goes_to_the_transcript_with_rc_and_both_streams(
    transport: tuple[ssh.SshTransport, ConsoleStandIn], tmp_path: Path
) -> None:
    made, _ = transport
    made.transcript = tmp_path / "ssh.log"

    made.command("run", ("/bin/streams", "3"), timeout=10)
    with pytest.raises(GuestError):
        made.command("run", ("/bin/hang",), timeout=0.3)

    lines = made.transcript.read_text().splitlines()
    assert lines[0] == "$ run /bin/streams 3"
    assert lines[1:4] == ["out 1", "out 2", "out 3"]
    assert lines[4:8] == ["--- stderr ---", "err 1", "err 2", "err 3"]
    assert lines[8].startswith("[rc=3, ")
    # A command that never ended is there too: the console says the rest.
    assert lines[9:] == ["$ run /bin/hang"]


def test_a_damaged_key_says_how_to_get_new_ones(tmp_path: Path) -> None:
    key = tmp_path / "keys-1" / "client_ed25519_key"
    key.parent.mkdir()
    key.write_text("not a key\n")

    with pytest.raises(ToolMissing, match="remove .*keys-1 and the next run makes new"):
        ssh.load_key(key)
