"""The SSH transport: lab-init's commands over SSH, files over SFTP.

The guest runs the host's own sshd (Debian's /usr/sbin/sshd and the
libraries it links, packed in a cpio appended to the initramfs) on QEMU's
user-mode network; QEMU forwards a free port on 127.0.0.1 to it. The lab
generates one host key and one client key per cache (`ssh/keys-*`):
paramiko trusts exactly that host key for [127.0.0.1]:<port> and rejects
any other. Root's login shell in the guest is lab-init, so a command is
`lab-init -c "<verb> [args]"` with stdout, stderr and rc kept apart.

While a command runs, the console is watched as during a console
command: a panic or an oops ends it at once with the console tail.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab import patterns
from lab.arches import Arch
from lab.cache import LabCache
from lab.console import BootedGuest, CommandResult
from lab.errors import BootError, GuestError, LabError, ToolMissing
from lab.guest import INIT_PROGRAM, CpioWriter
from lab.progress import Progress

log = logging.getLogger(__name__)

TRANSPORTS = ("console", "ssh")
SSH_USER = "root"
LOOPBACK = "127.0.0.1"
SSHD = Path("/usr/sbin/sshd")
# Bump when the keys or the archive are made differently.
KEYS_NAME = "keys-1"
SSH_FORMAT = 2
# How often a connection is tried while sshd starts in the guest.
CONNECT_RETRY_SECONDS = 0.5
# How long one wait for the channel may block before the console is read.
POLL_SECONDS = 0.5
STATUS_POLL_SECONDS = 0.005

HOST_KEY = "ssh_host_ed25519_key"
CLIENT_KEY = "client_ed25519_key"
SSHD_CONFIG = f"""\
# The lab's sshd: root by key only, SFTP in-process, errors on the console.
Port 22
AddressFamily inet
ListenAddress 0.0.0.0
HostKey /etc/ssh/{HOST_KEY}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
PermitUserEnvironment no
AuthorizedKeysFile .ssh/authorized_keys
Subsystem sftp internal-sftp
LogLevel ERROR
"""
# Root's shell is lab-init: it runs `lab-init -c "<command>"` (one-shot mode).
PASSWD = f"""\
root:x:0:0:root:/root:/bin/{INIT_PROGRAM}
sshd:x:100:65534:sshd privilege separation:/run/sshd:/bin/false
"""
GROUP = "root:x:0:\nnogroup:x:65534:\n"
LDD_LINE_RE = re.compile(r"^\s*(?:\S+ => )?(?P<path>/\S+) \(0x[0-9a-f]+\)$")
ELF_MACHINES = {"x86_64": 62}


class HostKeyRejected(BootError):
    """The guest's sshd offered another host key than the lab's."""


# -- keys -------------------------------------------------------------------


@dataclass(frozen=True)
class SshKeys:
    """The lab's host key (sshd in every guest) and client key (root's)."""

    entry: Path

    @property
    def host_key_file(self) -> Path:
        return self.entry / HOST_KEY

    @property
    def client_key_file(self) -> Path:
        return self.entry / CLIENT_KEY

    def host_key(self) -> paramiko.PKey:
        """The public half of the host key: the one key a guest may offer."""
        public = self.host_key_file.with_name(HOST_KEY + ".pub")
        try:
            kind, data = public.read_text().split()[:2]
            return paramiko.PKey.from_type_string(kind, base64.b64decode(data))
        except (OSError, ValueError, paramiko.SSHException) as err:
            raise ToolMissing(
                f"cannot read the lab's SSH key {public}: {err}; "
                f"remove {public.parent} and the next run makes new keys"
            ) from err

    def client_key(self) -> paramiko.PKey:
        return load_key(self.client_key_file)


def new_private_key() -> bytes:
    """A fresh Ed25519 private key in OpenSSH's format (what sshd reads)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def new_key() -> paramiko.PKey:
    """A fresh Ed25519 key, kept nowhere (a stranger's key, for tests)."""
    return paramiko.Ed25519Key(file_obj=io.StringIO(new_private_key().decode()))


def generate_key(path: Path, comment: str) -> None:
    """An Ed25519 key pair in OpenSSH's format: path (0600) and path.pub."""
    path.touch(mode=0o600)
    path.write_bytes(new_private_key())
    key = load_key(path)
    path.with_name(path.name + ".pub").write_text(authorized_line(key, comment))


def load_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    except (OSError, paramiko.SSHException) as err:
        raise ToolMissing(
            f"cannot read the lab's SSH key {path}: {err}; "
            f"remove {path.parent} and the next run makes new keys"
        ) from err


def authorized_line(key: paramiko.PKey, comment: str = "kernel-lab") -> str:
    return f"{key.get_name()} {key.get_base64()} {comment}\n"


def lab_keys(cache: LabCache) -> SshKeys:
    """The lab's keys, generated once per cache and kept in an entry."""

    def fill(scratch: Path) -> dict[str, object]:
        generate_key(scratch / HOST_KEY, "kernel-lab guest host key")
        generate_key(scratch / CLIENT_KEY, "kernel-lab client")
        return {
            "host_key": SshKeys(scratch).host_key().fingerprint,
            "client_key": load_key(scratch / CLIENT_KEY).fingerprint,
        }

    return SshKeys(cache.entry("ssh", KEYS_NAME, fill))


# -- the guest's sshd --------------------------------------------------------


def parse_ldd(text: str) -> list[Path]:
    """The libraries (and the loader) ldd lists, vdso left out."""
    paths = []
    for line in text.splitlines():
        m = LDD_LINE_RE.match(line)
        if m:
            paths.append(Path(m["path"]))
    return paths


def sshd_files(sshd: Path = SSHD) -> list[Path]:
    """sshd and every shared library it loads, at the paths it finds them."""
    if not sshd.is_file():
        raise ToolMissing(
            f"{sshd} not found: the SSH transport runs the host's sshd in the "
            "guest; install it: apt-get install openssh-server (see setup.sh)"
        )
    proc = subprocess.run(["ldd", str(sshd)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolMissing(f"ldd {sshd} failed: {proc.stderr.strip()}")
    return [sshd, *parse_ldd(proc.stdout)]


def require_host_binaries(arch: Arch, sshd: Path = SSHD) -> None:
    """The host's sshd must be a binary of the guest's arch."""
    if arch.no_ssh:
        raise ToolMissing(f"no SSH transport for {arch.name}: {arch.no_ssh}")
    header = sshd.read_bytes()[:20] if sshd.is_file() else b""
    machine = int.from_bytes(header[18:20], "little") if len(header) == 20 else None
    if header[:4] != b"\x7fELF" or machine != ELF_MACHINES.get(arch.name):
        raise ToolMissing(
            f"{sshd} is not an {arch.name} program: the SSH transport runs the "
            f"host's sshd in the {arch.name} guest"
        )


def ssh_archive(files: list[Path], keys: SshKeys) -> bytes:
    """A newc cpio with sshd, its libraries, its config, the host key and
    root's authorized key, laid out as sshd expects them."""
    cpio = CpioWriter()
    made: set[str] = set()

    def parents(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in made:
                made.add(directory)
                cpio.directory(directory)

    def add(path: str, data: bytes, mode: int) -> None:
        parents(path)
        cpio.file(path, data, mode)

    for path in files:
        add(str(path).lstrip("/"), path.resolve().read_bytes(), 0o755)
    add("etc/ssh/sshd_config", SSHD_CONFIG.encode(), 0o644)
    add(f"etc/ssh/{HOST_KEY}", keys.host_key_file.read_bytes(), 0o600)
    add("etc/passwd", PASSWD.encode(), 0o644)
    add("etc/group", GROUP.encode(), 0o644)
    # sshd's StrictModes: root's home and .ssh owned by root, not writable
    # by others; the privilege separation directory likewise.
    for directory, mode in (("root", 0o700), ("root/.ssh", 0o700)):
        made.add(directory)
        cpio.directory(directory, mode)
    cpio.file(
        "root/.ssh/authorized_keys", authorized_line(keys.client_key()).encode(), 0o600
    )
    for directory in ("run", "run/sshd", "var", "var/empty"):
        if directory not in made:
            made.add(directory)
            cpio.directory(directory)
    return cpio.finish()


def build_ssh_archive(arch: Arch, cache: LabCache, progress: Progress) -> Path:
    """The cpio of the guest's sshd for arch, cached by content. Not
    compressed: the guest would spend longer inflating it than QEMU
    takes to load it."""
    require_host_binaries(arch)
    keys = lab_keys(cache)
    files = sshd_files()
    digest = hashlib.sha256(f"{SSH_FORMAT} {arch.name}\0".encode())
    digest.update(SSHD_CONFIG.encode() + PASSWD.encode() + GROUP.encode())
    digest.update(keys.host_key().get_base64().encode())
    digest.update(keys.client_key().get_base64().encode())
    for path in files:
        digest.update(f"{path} {cache.memo_file_hash(path.resolve())}\0".encode())
    name = f"{arch.name}-{digest.hexdigest()[:16]}"

    def fill(scratch: Path) -> dict[str, object]:
        progress.phase(f"pack {arch.name}: sshd and its libraries for the guest")
        (scratch / "ssh.cpio").write_bytes(ssh_archive(files, keys))
        return {
            "arch": arch.name,
            "files": [str(p) for p in files],
            "host_key": keys.host_key().fingerprint,
        }

    return cache.entry("ssh", name, fill) / "ssh.cpio"


def boot_initrd(arch: Arch, initrd: Path, cache: LabCache, progress: Progress) -> Path:
    """initrd followed by the sshd archive (the kernel unpacks both)."""
    return cache.joined_initrd(initrd, build_ssh_archive(arch, cache, progress))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for QEMU's forward to the guest's sshd.

    QEMU binds it itself; should another process take it in between,
    QEMU exits with "Could not set up host forwarding rule" (a BootError).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- connections --------------------------------------------------------------


@dataclass(frozen=True)
class SshEndpoint:
    """Where an sshd listens and the keys to trust it and log in with."""

    host: str
    port: int
    host_key: paramiko.PKey
    client_key: paramiko.PKey
    user: str = SSH_USER

    @property
    def known_host(self) -> str:
        """The name OpenSSH and paramiko give the host in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def connect(endpoint: SshEndpoint, timeout: float) -> paramiko.SSHClient:
    """One SSH connection that trusts only endpoint.host_key.

    Any other host key is refused (HostKeyRejected), never accepted: the
    client knows that one key and rejects what it does not know.
    """
    sock = open_banner(endpoint, timeout)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.get_host_keys().add(
        endpoint.known_host, endpoint.host_key.get_name(), endpoint.host_key
    )
    try:
        client.connect(
            endpoint.host,
            endpoint.port,
            sock=sock,
            username=endpoint.user,
            pkey=endpoint.client_key,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
    except paramiko.BadHostKeyException as err:
        client.close()
        raise HostKeyRejected(
            f"{endpoint.known_host} offered host key {err.key.get_fingerprint().hex()}"
            f" ({err.key.get_name()}), not the lab's "
            f"{endpoint.host_key.get_fingerprint().hex()}: refused"
        ) from err
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


def open_banner(endpoint: SshEndpoint, timeout: float) -> socket.socket:
    """A TCP connection whose peer has sent an SSH banner (peeked, left for
    paramiko to read). QEMU accepts on the forwarded port before the
    guest's sshd listens, then drops the connection: ConnectionError."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout)
    try:
        sock.settimeout(timeout)
        start = sock.recv(4, socket.MSG_PEEK)
        if start != b"SSH-":
            raise ConnectionError(
                f"{endpoint.known_host} closed the connection before an SSH banner"
                if not start
                else f"{endpoint.known_host} sent {start!r}, not an SSH banner"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def connect_when_up(
    endpoint: SshEndpoint,
    timeout: float,
    watch: Callable[[], None] = lambda: None,
) -> paramiko.SSHClient:
    """Connect, trying again while sshd starts; watch() is called between
    tries (the guest's console: a crash there ends the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        watch()
        left = deadline - time.monotonic()
        try:
            return connect(endpoint, max(1.0, min(left, 10.0)))
        except HostKeyRejected:
            raise
        except paramiko.AuthenticationException as err:
            raise BootError(
                f"sshd at {endpoint.known_host} refused the lab's client key: {err}"
            ) from err
        except (OSError, paramiko.SSHException, EOFError) as err:
            if time.monotonic() + CONNECT_RETRY_SECONDS > deadline:
                raise BootError(
                    f"no SSH connection to {endpoint.known_host} within "
                    f"{timeout:g} s: {type(err).__name__}: {err}"
                ) from err
            log.debug("ssh: %s not up yet: %s", endpoint.known_host, err)
            time.sleep(CONNECT_RETRY_SECONDS)


# -- the transport ------------------------------------------------------------


class SshTransport:
    """lab-init's commands over SSH and file copies over SFTP, for a guest
    whose console stays watched for crashes."""

    name = "ssh"

    def __init__(
        self,
        guest: BootedGuest,
        client: paramiko.SSHClient,
        endpoint: SshEndpoint,
        transcript: Path | None = None,
    ) -> None:
        self.guest = guest
        self.client = client
        self.endpoint = endpoint
        # Every command with its rc and both streams (the console no longer
        # shows them): ssh.log beside console.log.
        self.transcript = transcript
        self._sftp: paramiko.SFTPClient | None = None

    def command(
        self, verb: str, args: tuple[str, ...], timeout: float
    ) -> CommandResult:
        text = " ".join((verb, *args))
        what = f"command {text!r} (ssh)"
        started = time.monotonic()
        warnings_before = len(self.guest.warnings)
        self.guest.watch_console(what)
        # Written first: a command that crashes the guest is in it too.
        self._record(f"$ {text}\n")
        try:
            channel = self._transport(what).open_session(timeout=timeout)
            channel.exec_command(text)
        except (OSError, paramiko.SSHException, EOFError) as err:
            raise self._lost(what, err) from err
        stdout, stderr, rc = self._wait(channel, what, timeout, started)
        self.guest.watch_console(what)
        result = CommandResult(
            command=text,
            rc=rc,
            output=stdout.decode(errors="replace"),
            seconds=time.monotonic() - started,
            warnings=self.guest.warnings[warnings_before:],
            stderr=stderr.decode(errors="replace"),
        )
        said = result.transcript
        if said and not said.endswith("\n"):
            said += "\n"
        self._record(f"{said}[rc={rc}, {result.seconds:.2f} s]\n")
        return result

    def put(self, local: Path, remote: str, timeout: float) -> None:
        what = f"copying {local} to the guest's {remote} (sftp)"
        self._sftp_call(what, timeout, lambda sftp: sftp.put(str(local), remote))
        self._record(f"sftp put {local} {remote}\n")

    def get(self, remote: str, local: Path, timeout: float) -> None:
        what = f"copying the guest's {remote} to {local} (sftp)"
        self._sftp_call(what, timeout, lambda sftp: sftp.get(remote, str(local)))
        self._record(f"sftp get {remote} {local}\n")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self.client.close()

    # -- internals ---------------------------------------------------------

    def _record(self, text: str) -> None:
        if self.transcript is not None:
            with self.transcript.open("a") as f:
                f.write(text)

    def _transport(self, what: str) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise self._lost(what, EOFError("the SSH connection is closed"))
        return transport

    def _wait(
        self, channel: paramiko.Channel, what: str, timeout: float, started: float
    ) -> tuple[bytes, bytes, int]:
        """Read both streams until the command exits, with the console
        watched all along; a hang is the channel's timeout."""
        stdout, stderr = bytearray(), bytearray()
        deadline = started + timeout
        with contextlib.closing(channel):
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    output = stdout.decode(errors="replace")
                    if stderr:
                        output += "--- stderr ---\n" + stderr.decode(errors="replace")
                    raise self.guest.hung(what, timeout, output)
                # After EOF the channel's fd stays readable: wait on the
                # console alone for the exit status then.
                fds = [self.guest.console_fd]
                if not channel.eof_received:
                    fds.append(channel.fileno())
                # (The status comes within milliseconds of the EOF.)
                wait = POLL_SECONDS if len(fds) == 2 else STATUS_POLL_SECONDS
                ready, _, _ = select.select(fds, [], [], min(left, wait))
                if self.guest.console_fd in ready:
                    self.guest.watch_console(what)
                # Data comes before the EOF, the status before the close:
                # once they are seen, what is read next is the rest of both
                # streams.
                ended = channel.eof_received or channel.closed
                closed = channel.closed
                has_status = channel.status_event.is_set()
                while channel.recv_ready():
                    stdout += channel.recv(65536)
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(65536)
                if ended and has_status:
                    return bytes(stdout), bytes(stderr), channel.recv_exit_status()
                if closed:
                    raise self._lost(
                        what, EOFError("channel closed without an exit status")
                    )
                if not self._transport_alive():
                    raise self._lost(what, EOFError("the SSH connection dropped"))

    def _transport_alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def _sftp_call(
        self,
        what: str,
        timeout: float,
        call: Callable[[paramiko.SFTPClient], object],
    ) -> None:
        self.guest.watch_console(what)
        try:
            if self._sftp is None:
                self._sftp = paramiko.SFTPClient.from_transport(self._transport(what))
                if self._sftp is None:
                    raise paramiko.SSHException("the SFTP subsystem did not start")
            channel = self._sftp.get_channel()
            assert channel is not None
            channel.settimeout(timeout)
            call(self._sftp)
        except OSError as err:
            # A timeout or a dropped connection: first see whether the
            # kernel crashed (that error is the better one).
            self.guest.watch_console(what)
            if isinstance(err, socket.timeout):
                raise self.guest.hung(what, timeout) from err
            raise GuestError(f"{what} failed: {err}") from err
        except (paramiko.SSHException, EOFError) as err:
            raise self._lost(what, err) from err
        self.guest.watch_console(what)

    def _lost(self, what: str, err: BaseException) -> LabError:
        """The SSH connection failed while QEMU runs: the console says
        why if the kernel crashed; else the guest is unusable all the same."""
        self.guest.watch_console(what)
        self.guest.crashed = f"SSH connection lost: {err}"
        self.guest.kill()
        return GuestError(
            f"SSH connection lost during {what}: {type(err).__name__}: {err}",
            self.guest.console_log,
            self.guest.console_tail(),
        )


def attach(guest: BootedGuest, endpoint: SshEndpoint, timeout: float) -> SshTransport:
    """Connect to a booted guest's sshd and send its commands over SSH."""
    started = time.monotonic()

    def watch() -> None:
        guest.watch_console("ssh connection")
        tail = guest.console_tail()
        ended = patterns.SSHD_EXIT_RE.search(tail)
        if ended:
            raise BootError(
                f"the guest's sshd exited with status {ended['status']} before "
                f"{endpoint.known_host} answered (its errors are on the console)",
                guest.console_log,
                tail,
            )

    try:
        client = connect_when_up(endpoint, timeout, watch=watch)
    except BootError as err:
        err.log = err.log or guest.console_log
        err.tail = err.tail or guest.console_tail()
        raise
    except GuestError as err:
        # The console showed a crash while sshd was awaited: a boot failure.
        raise BootError(err.message, err.log, err.tail, err.kernel_fault) from err
    log_name = guest.console_log.name.replace("console", "ssh", 1)
    transport = SshTransport(
        guest, client, endpoint, guest.console_log.with_name(log_name)
    )
    guest.use_transport(transport)
    log.info(
        "boot: ssh to %s up in %.1f s", endpoint.known_host, time.monotonic() - started
    )
    return transport
