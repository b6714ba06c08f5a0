"""--lab-host: QEMU on another machine over SSH, against a real sshd.

The "remote host" is Debian's sshd, started here on 127.0.0.1 and a free
port with a throwaway host key and a throwaway client key, and stopped at
the end. The lab logs in with paramiko, copies the kernel and initramfs
into a temporary directory there and drives the guest over the SSH
channel. Since that host is this machine, the tests can look at its
processes and files to see that nothing is left behind.

The transport does not depend on the arch: its tests run with the x86_64
checks (and, as tests of the lab itself, not in a bisect step).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from lab.arches import ARCHES, Arch, get_arch
from lab.checks import check_untruncated_mask_in_cpuset
from lab.cli import main
from lab.console import BootedGuest
from lab.errors import GuestError, ToolMissing, tail_of
from lab.kbuild import KernelImage
from lab.ktap import KtapReport
from lab.progress import quiet
from lab.remote import HostAddress, RemoteGuest, RemoteHost, RemoteHostError
from lab.session import LabRun

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
START_TIMEOUT = 10.0

pytestmark = [
    pytest.mark.remote,
    pytest.mark.selftest,
    pytest.mark.x86_64,
    pytest.mark.arches("x86_64"),
]


@dataclass
class LocalSshd:
    """An sshd of the test's own on 127.0.0.1:port, for root (or the user)."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    address: HostAddress
    client_key: Path
    known_hosts: Path
    host_key: Path

    @property
    def log(self) -> Path:
        return self.workdir / "sshd.log"

    def accepted_logins(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path


def public_key(path: Path) -> str:
    """'type base64' of a key pair's public half."""
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def start_sshd(workdir: Path) -> LocalSshd:
    host_key = keygen(workdir / "host_key", "kernel-lab test host")
    client_key = keygen(workdir / "client_key", "kernel-lab test client")
    (workdir / "authorized_keys").write_text(public_key(client_key) + "\n")
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # The test's files live under pytest's tmp dir, not a home of 0700.
        "StrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {public_key(host_key)}\n")
    if os.geteuid() == 0:
        # sshd run as root chroots its unprivileged half here; Debian's
        # service makes it at start (RuntimeDirectory=sshd): so do we.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    log = (workdir / "sshd.log").open("wb")
    process = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    sshd = LocalSshd(
        workdir=workdir,
        port=port,
        process=process,
        address=HostAddress(getpass.getuser(), "127.0.0.1", port),
        client_key=client_key,
        known_hosts=known_hosts,
        host_key=host_key,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while "Server listening" not in sshd.log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_sshd(sshd)
            pytest.fail(f"sshd did not start on 127.0.0.1:{port}:\n{tail_of(sshd.log)}")
        time.sleep(0.05)
    return sshd


def children_of(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.append(int(status.parent.name))
    return found


def stop_sshd(sshd: LocalSshd) -> None:
    """Stop sshd once its sessions have ended: a session process left
    without its parent would stay a zombie of this machine's init."""
    deadline = time.monotonic() + 5.0
    while children_of(sshd.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    sshd.process.terminate()
    try:
        sshd.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        sshd.process.kill()
        sshd.process.wait()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSshd]:
    """Debian's sshd on 127.0.0.1:<free port>, stopped after the module."""
    if not SSHD.exists():
        pytest.skip(f"{SSHD} is missing: apt-get install openssh-server (setup.sh)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


def remote_lab_run(lab_run: LabRun, sshd: LocalSshd, name: str) -> LabRun:
    """A run like the session's, its QEMU on the test's sshd. Commands go
    over the console: the SSH transport does not reach a lab host's guest."""
    options = replace(
        lab_run.options,
        transport="console",
        lab_host=sshd.address,
        lab_host_key=sshd.client_key,
        lab_host_known_hosts=sshd.known_hosts,
        results=lab_run.results.dir / "remote" / name,
        run_label="",
    )
    return LabRun(options, lab_run.progress)


@pytest.fixture
def remote_run(
    request: pytest.FixtureRequest, lab_run: LabRun, sshd: LocalSshd
) -> Iterator[LabRun]:
    run = remote_lab_run(lab_run, sshd, request.node.name)
    yield run
    run.close()


def processes_in(directory: str) -> list[int]:
    """Processes of this machine (the "remote" one) started from files in
    directory: the remote QEMU and the shell that reports its status."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if directory.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_until_gone(directory: str, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def remote_host(run: LabRun) -> RemoteHost:
    host = run.qemu_host
    assert isinstance(host, RemoteHost)
    return host


def outcome(reports: list[KtapReport]) -> list[tuple[str, bool, str]]:
    return [(r.name, r.ok, r.directive) for report in reports for r in report.results]


def test_remote_boot_gives_the_untruncated_mask_check_the_local_result(
    remote_run: LabRun,
    lab_arch: str,
    guest: BootedGuest,
    kernel: KernelImage,
    arch: Arch,
    ktap_reports: list[KtapReport],
) -> None:
    """The check on a guest whose QEMU runs on the SSH host, from the
    files copied there, passes with the same KTAP results as on the
    session's own guest."""
    remote = remote_run.guest(lab_arch)
    host = remote_host(remote_run)
    workdir = host.remote_dir
    assert isinstance(remote, RemoteGuest) and workdir is not None
    qemu = [
        pid
        for pid in processes_in(workdir)
        if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")
    ]
    assert len(qemu) == 1, f"QEMU processes running from {workdir}: {qemu}"
    argv = Path(f"/proc/{qemu[0]}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-kernel") + 1].startswith(workdir.encode())

    session_reports: list[KtapReport] = []
    check_untruncated_mask_in_cpuset(guest, kernel, arch, session_reports)
    check_untruncated_mask_in_cpuset(remote, kernel, arch, ktap_reports)

    assert remote.release == guest.release == kernel.release
    assert outcome(ktap_reports) == outcome(session_reports)
    assert outcome(ktap_reports), "the check reported no KTAP result"
    qemu_cmd = remote_run.results.arch_dir(arch) / "qemu.cmd"
    assert qemu_cmd.read_text().startswith(f"# run on {host.address}")


@pytest.mark.parametrize("interrupted", [False, True], ids=["poweroff", "ctrl-c"])
def test_remote_qemu_and_its_directory_are_gone_after_the_run(
    lab_run: LabRun, sshd: LocalSshd, lab_arch: str, interrupted: bool
) -> None:
    """Closing the run (as at the session's end, or after Ctrl-C, which
    kills instead of powering off) ends QEMU there and removes the run's
    temporary directory."""
    run = remote_lab_run(lab_run, sshd, f"gone-{interrupted}")
    try:
        run.guest(lab_arch)
        workdir = remote_host(run).remote_dir
        assert workdir is not None and Path(workdir).is_dir()
        assert processes_in(workdir), f"no QEMU running from {workdir}"
    finally:
        run.close(kill=interrupted)

    assert wait_until_gone(workdir, seconds=0.5) == []
    assert not Path(workdir).exists()


def test_remote_qemu_ends_when_the_connection_drops(
    lab_run: LabRun, sshd: LocalSshd, lab_arch: str
) -> None:
    """If the lab dies without cleaning up (its SSH connection just
    closes), sshd hangs up QEMU's pty and QEMU ends."""
    run = remote_lab_run(lab_run, sshd, "dropped")
    try:
        run.guest(lab_arch)
        host = remote_host(run)
        workdir = host.remote_dir
        assert workdir is not None and processes_in(workdir)

        transport = host.client.get_transport()
        assert transport is not None
        transport.close()
        left = wait_until_gone(workdir)
    finally:
        run.close(kill=True)
    # Nobody was left to remove it.
    assert Path(workdir).is_dir()
    shutil.rmtree(workdir)
    assert left == [], f"still running after the connection dropped: {left}"


def test_lost_connection_is_reported_as_lost_and_the_directory_named(
    lab_run: LabRun,
    sshd: LocalSshd,
    lab_arch: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sshd session of the run killed (the connection drops): the next
    command says the SSH connection was lost, not that QEMU exited, and
    closing the run names the directory left there."""
    before = set(children_of(sshd.process.pid))
    run = remote_lab_run(lab_run, sshd, "lost")
    try:
        booted = run.guest(lab_arch)
        workdir = remote_host(run).remote_dir
        assert workdir is not None and processes_in(workdir)
        sessions = set(children_of(sshd.process.pid)) - before
        assert sessions, "no sshd session process for the run's connection"
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)

        with pytest.raises(RemoteHostError) as caught:
            booted.command("write", "/dev/null")
    finally:
        with caplog.at_level(logging.WARNING, logger="lab.remote"):
            run.close(kill=True)
    left = wait_until_gone(workdir)

    assert caught.value.message == (
        f"lost the SSH connection to {sshd.address} (QEMU there ends with it)"
    )
    assert any(
        f"{workdir} was left on that host" in record.getMessage()
        for record in caplog.records
    ), [record.getMessage() for record in caplog.records]
    assert Path(workdir).is_dir()
    shutil.rmtree(workdir)
    assert left == [], f"still running after the connection was lost: {left}"


def test_killed_remote_qemu_is_reported_as_qemu_exit(
    remote_run: LabRun, lab_arch: str
) -> None:
    """QEMU killed there (SIGKILL) fails the next command with "QEMU
    exited" and its signal, as a local QEMU would; the next guest boots."""
    booted = remote_run.guest(lab_arch)
    host = remote_host(remote_run)
    status, _, err = host.run(
        ["sh", "-c", 'kill -KILL "$(cat "$1")"', "sh", booted.child.pid_file]
    )
    assert status == 0, err

    with pytest.raises(GuestError) as caught:
        booted.command("write", "/dev/null")

    assert "QEMU exited" in caught.value.message
    assert not booted.alive
    assert booted.exit_status == 9
    fresh = remote_run.guest(lab_arch)
    assert fresh is not booted and fresh.alive
    assert fresh.command("write", "/dev/null").rc == 0


def test_unknown_host_key_is_refused(sshd: LocalSshd, tmp_path: Path) -> None:
    """A host whose key is not in known_hosts is not logged in to: the
    error names the file and the key's fingerprint."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    logins = sshd.accepted_logins()
    host_fp = subprocess.run(
        [SSH_KEYGEN, "-l", "-f", str(sshd.host_key)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]

    with pytest.raises(RemoteHostError) as caught:
        RemoteHost.connect(sshd.address, sshd.client_key, empty, quiet())

    message = caught.value.message
    assert "unknown host key" in message
    assert f"[127.0.0.1]:{sshd.port} is not in {empty}" in message
    assert host_fp in message
    assert sshd.accepted_logins() == logins


def test_changed_host_key_is_refused(sshd: LocalSshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key", "another host")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {public_key(other)}\n")

    with pytest.raises(RemoteHostError, match="does not match the one in"):
        RemoteHost.connect(sshd.address, sshd.client_key, known, quiet())


def test_unauthorized_client_key_is_refused(sshd: LocalSshd, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger", "not authorized")

    with pytest.raises(RemoteHostError, match="refused the login"):
        RemoteHost.connect(sshd.address, stranger, sshd.known_hosts, quiet())


def test_unreachable_host_is_reported(sshd: LocalSshd) -> None:
    closed = HostAddress(sshd.address.user, "127.0.0.1", free_port())

    with pytest.raises(RemoteHostError, match="cannot reach"):
        RemoteHost.connect(closed, sshd.client_key, sshd.known_hosts, quiet())


def test_qemu_missing_there_names_the_package(sshd: LocalSshd, lab_arch: str) -> None:
    host = RemoteHost.connect(sshd.address, sshd.client_key, sshd.known_hosts, quiet())
    arch = replace(get_arch(lab_arch), qemu="qemu-system-nonesuch")
    try:
        with pytest.raises(ToolMissing) as caught:
            host.require_qemu(arch)
    finally:
        host.close()

    assert caught.value.message == (
        f"qemu-system-nonesuch not found on {sshd.address}; install it there: "
        f"apt-get install {arch.packages[0]}"
    )


def test_lab_doctor_describes_the_lab_host(
    sshd: LocalSshd, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        [
            "doctor",
            f"--lab-host={sshd.address}",
            f"--lab-host-key={sshd.client_key}",
            f"--lab-host-known-hosts={sshd.known_hosts}",
        ]
    )

    out = capsys.readouterr().out
    assert f"lab host {sshd.address}: {os.uname().machine}" in out
    for arch in ARCHES.values():
        there = "present" if shutil.which(arch.qemu) else "MISSING"
        assert re.search(rf"^  {re.escape(arch.qemu)} +{there}", out, re.M), out
