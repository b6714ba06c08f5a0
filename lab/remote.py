"""QEMU on another machine over SSH: `--lab-host user@host[:port]`.

RemoteHost logs in with paramiko (only to a host whose key is already
known), copies the files a QEMU command names into a temporary directory
there and starts QEMU on a pty. pexpect reads that SSH channel like a local
console (ChannelSpawn), so BootedGuest drives the guest unchanged. Closing
the host kills every QEMU it started and removes the directory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import select
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from pexpect import EOF, TIMEOUT
from pexpect.spawnbase import SpawnBase

from lab import qemu
from lab.arches import Arch
from lab.console import BootedGuest, Timeouts
from lab.errors import LabError, ToolMissing, tail_of
from lab.progress import Progress

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0
# QEMU options whose value is a file on the host that runs QEMU.
FILE_OPTIONS = ("-kernel", "-initrd", "-dtb", "-bios")
# What mktemp -d gives on the remote host; only such a directory is removed.
REMOTE_DIR_RE = re.compile(r"^/[^\s'\"]*/kernel-lab\.[A-Za-z0-9]{8}$")
ADDRESS_RE = re.compile(r"^(?P<user>[^@\s:]+)@(?P<host>[^@\s:]+)(?::(?P<port>\d+))?$")
# Written before QEMU starts: it runs as "sh -c ..." under the login shell,
# which turns a death by signal N into exit status 128+N, as shells do.
SIGNAL_EXIT_BASE = 128
STOP_SCRIPT = """
for i in 1 2 3 4 5 6 7 8 9 10; do [ -s "$1" ] && break; sleep 0.2; done
pid=$(cat "$1" 2>/dev/null) || exit 0
kill -TERM "$pid" 2>/dev/null || exit 0
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
	kill -0 "$pid" 2>/dev/null || exit 0
	sleep 0.2
done
kill -KILL "$pid" 2>/dev/null
exit 0
"""
IDENTITY_SCRIPT = """
uname -r
grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'
"$1" --version 2>/dev/null | head -n1
grep '^kvm' /proc/modules | cut -d' ' -f1 | sort | paste -sd, -
"""


class RemoteHostError(LabError):
    """The --lab-host cannot be reached, logged in to or used."""

    phase = "remote"


class ConnectionLost(RemoteHostError):
    """The SSH connection to the --lab-host dropped while QEMU ran there."""


@dataclass(frozen=True)
class HostAddress:
    """user@host[:port] of the machine that runs QEMU."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> HostAddress:
        """Raises ValueError with what is wrong in the text."""
        match = ADDRESS_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"--lab-host {text!r}: expected user@host or user@host:port"
            )
        port = int(match.group("port") or 22)
        if not 0 < port < 65536:
            raise ValueError(f"--lab-host {text!r}: port {port} is out of range")
        return cls(match.group("user"), match.group("host"), port)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names the host (a port other than 22 in brackets)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def lab_host_args(
    address: HostAddress | None, key_file: Path | None, known_hosts: Path | None
) -> list[str]:
    """The pytest options that name this --lab-host (for a nested run)."""
    if address is None:
        return []
    args = [f"--lab-host={address}"]
    if key_file is not None:
        args.append(f"--lab-host-key={key_file}")
    if known_hosts is not None:
        args.append(f"--lab-host-known-hosts={known_hosts}")
    return args


def check_key_file(path: Path) -> None:
    """Raises RemoteHostError unless path is a readable private key without
    a passphrase, saying what is wrong with it."""
    if path.is_dir():
        raise RemoteHostError(
            f"--lab-host-key {path} is a directory, not a private key file"
        )
    if not path.exists():
        raise RemoteHostError(f"--lab-host-key {path}: no such file")
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as err:
        raise RemoteHostError(
            f"cannot read the --lab-host-key {path}: {err.strerror or err}"
        ) from err
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            kind.from_private_key(io.StringIO(text))
        except paramiko.PasswordRequiredException as err:
            raise RemoteHostError(
                f"--lab-host-key {path} is encrypted with a passphrase, which "
                "the lab cannot ask for: use a key without one, or load it "
                f"into ssh-agent (ssh-add {path}) and leave out --lab-host-key "
                "(the lab then uses the agent's keys)"
            ) from err
        except (paramiko.SSHException, ValueError, TypeError):
            continue
        return
    hint = " (that is the public key)" if path.suffix == ".pub" else ""
    raise RemoteHostError(
        f"--lab-host-key {path} is not a private key (OpenSSH or PEM: "
        f"Ed25519, ECDSA or RSA){hint}"
    )


def fingerprint(key: paramiko.PKey) -> str:
    """SHA256:... as ssh-keygen -l prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy that keeps the refused key, for the error message."""

    def __init__(self) -> None:
        self.refused: paramiko.PKey | None = None

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        self.refused = key
        super().missing_host_key(client, hostname, key)


def remote_argv(argv: list[str], upload: Callable[[Path], str]) -> list[str]:
    """The QEMU command with each file it names replaced by upload(file)."""
    out: list[str] = []
    for index, arg in enumerate(argv):
        if index > 0 and argv[index - 1] in FILE_OPTIONS:
            out.append(upload(Path(arg)))
            continue
        if arg.startswith("/") and Path(arg).is_file():
            raise RemoteHostError(
                f"QEMU argument {arg!r} names a file of this host that the lab "
                f"does not know to copy (it copies {', '.join(FILE_OPTIONS)})"
            )
        out.append(arg)
    return out


def exit_codes(status: int) -> tuple[int | None, int | None]:
    """(exitstatus, signalstatus) as pexpect has them, from the remote exit
    status: 128+N is a death by signal N, -1 is none reported."""
    if status < 0:
        return None, None
    if status > SIGNAL_EXIT_BASE:
        return None, status - SIGNAL_EXIT_BASE
    return status, None


class ChannelSpawn(SpawnBase):
    """A pexpect spawn over the SSH channel of a remote QEMU's console."""

    def __init__(
        self,
        channel: paramiko.Channel,
        pid_file: str,
        stop: Callable[[str], None],
        host_name: str = "the lab host",
    ) -> None:
        super().__init__(timeout=None, maxread=65536)
        self.channel = channel
        self.host_name = host_name
        # Where the guest's console is logged, for the error of a lost
        # connection (RemoteGuest sets it).
        self.console_log: Path | None = None
        # On the remote host: QEMU's pid, for stop() to kill it.
        self.pid_file = pid_file
        self._stop = stop
        self.child_fd = channel.fileno()
        self.closed = False
        self.name = f"<remote QEMU, channel {channel.get_id()}>"
        # Nothing to wait for before a send: lab-init reads a pty of QEMU's.
        self.delaybeforesend = None

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> Any:
        if self.closed:
            raise ValueError("I/O operation on a closed console")
        if timeout == -1:
            timeout = self.timeout
        if not self.channel.recv_ready() and not self.channel.eof_received:
            ready, _, _ = select.select([self.channel], [], [], timeout)
            if not ready:
                raise TIMEOUT("Timeout exceeded.")
        data = self.channel.recv(size)
        if not data:
            self.flag_eof = True
            if self.connection_lost():
                raise ConnectionLost(
                    f"lost the SSH connection to {self.host_name} (QEMU there "
                    "ends with it)",
                    self.console_log,
                    tail_of(self.console_log) if self.console_log else "",
                )
            raise EOF("End of file: the remote QEMU closed its console.")
        text = self._decoder.decode(data, final=False)
        self._log(text, "read")
        return text

    def send(self, s: Any) -> int:
        data = self._encoder.encode(self._coerce_send_string(s), final=False)
        self._log(data, "send")
        try:
            self.channel.sendall(data)
        except (EOFError, OSError, paramiko.SSHException) as err:
            # The connection went down before a read noticed it.
            log.info("remote: sending to QEMU failed: %r", err)
            raise ConnectionLost(
                f"lost the SSH connection to {self.host_name} (QEMU there "
                "ends with it)",
                self.console_log,
                tail_of(self.console_log) if self.console_log else "",
            ) from err
        return len(data)

    def sendline(self, s: Any = "") -> int:
        return self.send(self._coerce_send_string(s) + self.linesep)

    def connection_lost(self) -> bool:
        """Did the channel close without an exit status, its connection gone?
        (sshd always reports the status of a command that ended; paramiko
        leaves -1 when none came, and closing sets its status_event too.)"""
        if not self.channel.closed or self.channel.exit_status != -1:
            return False
        # paramiko closes the channels just before it marks the transport
        # inactive: give it a moment.
        transport = self.channel.get_transport()
        deadline = time.monotonic() + 1.0
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not transport.is_active()

    def isalive(self) -> bool:
        return not self.closed and not self._exited()

    def wait(self) -> int | None:
        """Block until the remote QEMU has exited; its exit status."""
        self._exited(wait=None)
        return self.exitstatus

    def terminate(self, force: bool = False) -> bool:
        self.close(force)
        return True

    def close(self, force: bool = True) -> None:
        """Close the console; a QEMU still running there is killed first."""
        if self.closed:
            return
        grace = 5.0 if self.channel.eof_received else 0.0
        if not self._exited(wait=grace):
            self._stop(self.pid_file)
            self._exited(wait=10.0)
        self.channel.close()
        self.closed = True

    def _exited(self, wait: float | None = 0.0) -> bool:
        """Has QEMU exited (its status now in exitstatus/signalstatus)?"""
        deadline = None if wait is None else time.monotonic() + wait
        while not self.channel.exit_status_ready():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        self.status = self.channel.recv_exit_status()
        self.exitstatus, self.signalstatus = exit_codes(self.status)
        self.terminated = True
        return True


class RemoteGuest(BootedGuest):
    """A BootedGuest whose QEMU runs on a RemoteHost; argv has its paths."""

    def __init__(
        self,
        host: RemoteHost,
        argv: list[str],
        console_log: Path,
        program_dir: str,
        timeouts: Timeouts,
    ) -> None:
        super().__init__(argv, console_log, program_dir, timeouts)
        self.host = host

    def _spawn(self) -> ChannelSpawn:
        console = self.host.start_qemu(self.argv)
        console.console_log = self.console_log
        return console

    def _require_alive(self) -> None:
        # A connection lost between two commands: not "QEMU exited".
        if isinstance(self.child, ChannelSpawn) and self.child.connection_lost():
            raise ConnectionLost(
                f"lost the SSH connection to {self.host.name} (QEMU there "
                "ends with it)",
                self.console_log,
                tail_of(self.console_log),
            )
        super()._require_alive()


class RemoteHost:
    """A machine that runs QEMU for the lab, reached over SSH."""

    def __init__(
        self,
        address: HostAddress,
        client: paramiko.SSHClient,
        progress: Progress,
    ) -> None:
        self.address = address
        self.name = str(address)
        self.client = client
        self.progress = progress
        self.remote_dir: str | None = None
        self._sftp: paramiko.SFTPClient | None = None
        # Content name -> remote path, for files already copied this run.
        self._uploaded: dict[str, str] = {}
        self._digests: dict[tuple[Path, int, int], str] = {}
        self._consoles: list[ChannelSpawn] = []
        self._qemu_found: set[str] = set()
        self._machine: str | None = None
        self._started = 0

    # -- connecting ----------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: HostAddress,
        key_file: Path | None,
        known_hosts: Path | None,
        progress: Progress,
    ) -> RemoteHost:
        """Log in; refuses a host whose key is not in known_hosts."""
        known = (known_hosts or Path("~/.ssh/known_hosts")).expanduser()
        if not known.exists():
            raise RemoteHostError(
                f"cannot check the host key of {address}: {known} does not "
                "exist (give the file with --lab-host-known-hosts)"
            )
        if known.is_dir():
            raise RemoteHostError(
                f"--lab-host-known-hosts {known} is a directory, not a known_hosts file"
            )
        if key_file is not None:
            check_key_file(key_file.expanduser())

        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(known))
        except OSError as err:
            raise RemoteHostError(
                f"cannot read the known_hosts file {known}: {err.strerror or err}"
            ) from err
        policy = _RejectUnknown()
        client.set_missing_host_key_policy(policy)
        started = time.monotonic()
        progress.phase(f"remote: connecting to {address}")
        try:
            client.connect(
                address.host,
                port=address.port,
                username=address.user,
                key_filename=str(key_file.expanduser()) if key_file else None,
                # With a key given, that key only: no agent, no ~/.ssh/id_*.
                look_for_keys=key_file is None,
                allow_agent=key_file is None,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
            )
        except paramiko.BadHostKeyException as err:
            client.close()
            raise RemoteHostError(
                f"the host key of {address} does not match the one in {known}: "
                f"it offered {err.key.get_name()} {fingerprint(err.key)}, "
                f"{known} has {fingerprint(err.expected_key)}. If the host was "
                "reinstalled, check the new key and replace the line "
                f"(ssh-keygen -R '{address.known_hosts_name}' -f {known})"
            ) from err
        except paramiko.AuthenticationException as err:
            client.close()
            which = f"key {key_file}" if key_file else "the agent and ~/.ssh keys"
            raise RemoteHostError(
                f"{address} refused the login as {address.user} with {which}: {err}"
            ) from err
        except paramiko.SSHException as err:
            transport = client.get_transport()
            no_banner = transport is not None and not transport.remote_version
            client.close()
            if policy.refused is None and no_banner:
                raise RemoteHostError(
                    f"no SSH server answered on {address.host} port "
                    f"{address.port}: it took the TCP connection but sent no "
                    f"SSH banner in {CONNECT_TIMEOUT:.0f} s (is that the SSH "
                    "port?)"
                ) from err
            if "No authentication methods available" in str(err):
                raise RemoteHostError(
                    f"SSH to {address} failed: no key to log in with: give "
                    "--lab-host-key or load a key into ssh-agent "
                    f"(the lab also tries ~/.ssh/id_*): {err}"
                ) from err
            if policy.refused is not None:
                key = policy.refused
                raise RemoteHostError(
                    f"unknown host key: {address.known_hosts_name} is not in "
                    f"{known} (it offered {key.get_name()} {fingerprint(key)}). "
                    "Check that fingerprint on the host (ssh-keygen -lf "
                    "/etc/ssh/ssh_host_*_key.pub) and add its public key line "
                    f"to {known}; the lab never accepts a host key by itself"
                ) from err
            raise RemoteHostError(f"SSH to {address} failed: {err}") from err
        except OSError as err:
            client.close()
            raise RemoteHostError(f"cannot reach {address}: {err}") from err

        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        progress.phase(
            f"remote: logged in to {address} in {time.monotonic() - started:.1f} s"
        )
        return cls(address, client, progress)

    # -- commands --------------------------------------------------------

    def run(
        self, argv: list[str], timeout: float = COMMAND_TIMEOUT
    ) -> tuple[int, str, str]:
        """Run a command there; (exit status, stdout, stderr)."""
        command = shlex.join(argv)
        log.debug("remote %s: %s", self.name, command)
        try:
            _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            status = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError) as error:
            raise RemoteHostError(
                f"running {command!r} on {self.name} failed: {error}"
            ) from error
        return status, out, err

    def machine(self) -> str:
        if self._machine is None:
            status, out, err = self.run(["uname", "-m"])
            if status != 0:
                raise RemoteHostError(f"uname -m on {self.name} failed: {err.strip()}")
            self._machine = out.strip()
        return self._machine

    def require_qemu(self, arch: Arch) -> None:
        if arch.qemu in self._qemu_found:
            return
        status, _, _ = self.run(["sh", "-c", 'command -v "$1"', "sh", arch.qemu])
        if status != 0:
            raise ToolMissing(
                f"{arch.qemu} not found on {self.name}; install it there: "
                f"apt-get install {arch.packages[0]}"
            )
        self._qemu_found.add(arch.qemu)

    def kvm_precondition(self, arch: Arch) -> str | None:
        """Why KVM cannot work for this arch on that host, or None."""
        machine = self.machine()
        if arch.kvm_host is None or machine != arch.kvm_host:
            return f"a {arch.name} guest cannot use KVM on a {machine} host"
        status, _, err = self.run(["sh", "-c", ": <> /dev/kvm"])
        if status != 0:
            why = err.strip().splitlines()[-1] if err.strip() else "no /dev/kvm"
            return f"/dev/kvm on {self.name} cannot be opened: {why}"
        return None

    def identity(self, arch: Arch) -> str:
        """What decides whether KVM works there (the probe's cache key): the
        user and host (not the port: a way in, not a machine), its kernel,
        CPU, QEMU and KVM modules."""
        status, out, err = self.run(["sh", "-c", IDENTITY_SCRIPT, "sh", arch.qemu])
        if status != 0:
            raise RemoteHostError(
                f"cannot describe {self.name} for the KVM probe: {err.strip()}"
            )
        who = f"remote {self.address.user}@{self.address.host}"
        return "|".join((who, arch.name, self.machine(), *out.splitlines()))

    def probe_kvm(self, arch: Arch, image: Path, initramfs: Path) -> tuple[bool, str]:
        return qemu.probe_kvm(arch, image, initramfs, host=self)

    # -- files and QEMU ------------------------------------------------------

    def guest(
        self, argv: list[str], console_log: Path, program_dir: str, timeouts: Timeouts
    ) -> RemoteGuest:
        """A guest booted there: the files argv names are copied first."""
        return RemoteGuest(
            self, remote_argv(argv, self.upload), console_log, program_dir, timeouts
        )

    def workdir(self) -> str:
        """This run's directory on the remote host, made on first use."""
        if self.remote_dir is None:
            script = 'mktemp -d "${TMPDIR:-/tmp}/kernel-lab.XXXXXXXX"'
            status, out, err = self.run(["sh", "-c", script])
            path = out.strip()
            if status != 0 or not REMOTE_DIR_RE.match(path):
                raise RemoteHostError(
                    f"cannot make a temporary directory on {self.name}: "
                    f"{err.strip() or path!r}"
                )
            self.remote_dir = path
            log.info("remote %s: working in %s", self.name, path)
        return self.remote_dir

    def _digest(self, local: Path) -> str:
        stat = local.stat()
        key = (local.resolve(), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            sha = hashlib.sha256()
            with local.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            self._digests[key] = sha.hexdigest()
        return self._digests[key]

    def upload(self, local: Path) -> str:
        """Copy a file into the run's directory there (once per content)."""
        if not local.is_file():
            raise RemoteHostError(f"cannot copy {local} to {self.name}: no such file")
        name = f"{self._digest(local)[:16]}-{local.name}"
        if name in self._uploaded:
            return self._uploaded[name]

        remote = f"{self.workdir()}/{name}"
        size = local.stat().st_size
        started = time.monotonic()
        try:
            if self._sftp is None:
                self._sftp = self.client.open_sftp()
            self._sftp.put(str(local), remote + ".part")
            self._sftp.posix_rename(remote + ".part", remote)
        except (paramiko.SSHException, OSError) as err:
            raise RemoteHostError(
                f"copying {local} to {self.name}:{remote} failed: {err}"
            ) from err
        self.progress.phase(
            f"remote: copied {local.name} ({size / 1e6:.1f} MB) to {self.name} "
            f"in {time.monotonic() - started:.1f} s"
        )
        self._uploaded[name] = remote
        return remote

    def start_qemu(self, argv: list[str]) -> ChannelSpawn:
        """Start QEMU there on a pty; its console is the returned spawn."""
        self._started += 1
        pid_file = f"{self.workdir()}/qemu.{self._started}.pid"
        # The pid file lets close() kill this QEMU; exec keeps the pid. The
        # outer shell stays, to report a death by signal as 128+N; its own
        # stderr goes nowhere (it would add "Aborted <command>" to the
        # console), QEMU's to the pty.
        inner = 'echo $$ > "$1" && shift && exec "$@"'
        command = (
            f"cd {shlex.quote(self.workdir())} && exec 3>&2 2>/dev/null && "
            f"sh -c {shlex.quote(inner)} sh {shlex.quote(pid_file)} "
            f"{shlex.join(argv)} 2>&3 3>&-; exit $?"
        )
        log.info("remote %s: %s", self.name, command)
        try:
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise RemoteHostError(f"the SSH connection to {self.name} is closed")
            channel = transport.open_session()
            channel.get_pty(term="dumb", width=250, height=50)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError) as err:
            raise RemoteHostError(f"cannot start QEMU on {self.name}: {err}") from err
        console = ChannelSpawn(channel, pid_file, self.stop_qemu, self.name)
        self._consoles.append(console)
        return console

    def stop_qemu(self, pid_file: str) -> None:
        """Kill the QEMU of a pid file there: TERM, then KILL after 3 s."""
        log.info("remote %s: stopping the QEMU of %s", self.name, pid_file)
        try:
            self.run(["sh", "-c", STOP_SCRIPT, "sh", pid_file])
        except RemoteHostError as err:
            log.warning("remote %s: could not stop QEMU: %s", self.name, err.message)

    def close(self) -> None:
        """Kill what still runs there, remove the run's directory, log out."""
        for console in self._consoles:
            try:
                console.close(force=True)
            except (paramiko.SSHException, OSError) as err:
                log.warning("remote %s: closing a console: %s", self.name, err)
        self._consoles.clear()
        transport = self.client.get_transport()
        if self.remote_dir is not None and (
            transport is None or not transport.is_active()
        ):
            log.warning(
                "remote %s: the SSH connection is gone, so %s was left on that "
                "host; remove it by hand (rm -rf %s)",
                self.name,
                self.remote_dir,
                self.remote_dir,
            )
            self.remote_dir = None
        if self.remote_dir is not None and REMOTE_DIR_RE.match(self.remote_dir):
            try:
                status, _, stderr = self.run(["rm", "-rf", "--", self.remote_dir])
                if status != 0:
                    log.warning(
                        "remote %s: rm -rf %s: %s", self.name, self.remote_dir, stderr
                    )
            except RemoteHostError as error:
                log.warning("remote %s: %s", self.name, error.message)
            self.remote_dir = None
        self._uploaded.clear()
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self.client.close()
