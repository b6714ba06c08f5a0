"""A booted guest driven over its console with pexpect.

The guest runs lab-init, which frames each command's output with markers
(see guest/lab-init.c). Every wait has an explicit timeout and looks for
the kernel's crash patterns at the same time, so a panic, an oops or a
hang ends the wait at once with the console tail.

Commands go through a transport: the console itself (ConsoleTransport,
the default) or SSH (lab/ssh.py). Whichever carries them, the console
stays the guest's: boot, power-off, and the source of panics and oopses.
"""

from __future__ import annotations

import logging
import re
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import pexpect

from lab import patterns
from lab.errors import BootError, GuestError, LabError, tail_of

log = logging.getLogger(__name__)

CRLF_RE = re.compile(r"\r+\n")
# A kernel message on the console: "[    1.519178] input: ...", to its end.
PRINTK_RE = re.compile(r"\[\s*\d+\.\d+\] [^\n]*\n?")
# How often a command line is sent again when lab-init does not take it.
RESENDS = 2
# How long to keep reading after a crash line, to get the whole trace.
CRASH_TRACE_SECONDS = 3.0


@dataclass(frozen=True)
class Timeouts:
    """Per-phase timeouts in seconds; scaled up under TCG by the caller."""

    boot: float = 120.0
    command: float = 60.0
    poweroff: float = 20.0


@dataclass
class CommandResult:
    """What one guest command gave back. Over the console, output has both
    streams (the console mixes them) and stderr is ""; over SSH they are
    apart."""

    command: str
    rc: int
    output: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def transcript(self) -> str:
        """Everything the command printed, for messages: stdout, then stderr."""
        if not self.stderr:
            return self.output
        return f"{self.output}--- stderr ---\n{self.stderr}"


class Transport(Protocol):
    """What carries lab-init's commands to a booted guest."""

    name: str

    def command(
        self, verb: str, args: tuple[str, ...], timeout: float
    ) -> CommandResult:
        """Run one lab-init command; a crash or a hang raises GuestError."""
        ...

    def put(self, local: Path, remote: str, timeout: float) -> None:
        """Copy a host file into the guest."""
        ...

    def get(self, remote: str, local: Path, timeout: float) -> None:
        """Copy a guest file to the host."""
        ...

    def close(self) -> None: ...


def signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number or 0).name
    except ValueError:
        return "unknown signal"


def command_output(raw: str, command_id: int) -> str:
    """What a command printed, from the console text up to its end marker.

    The kernel prints on the same console whenever it likes, even in the
    middle of a line of ours (after the begin marker, say): its lines are
    not the command's output and are taken out.
    """
    # Out first, so that a begin marker the kernel split is whole again.
    text = PRINTK_RE.sub("", raw)
    return text.split(f"@@LAB:BEGIN {command_id}@@", 1)[-1].removeprefix("\n")


class BootedGuest:
    """A QEMU process (plain or under vng) whose console runs lab-init."""

    def __init__(
        self,
        argv: list[str],
        console_log: Path,
        program_dir: str,
        timeouts: Timeouts,
        env: dict[str, str] | None = None,
        startup: list[str] | None = None,
        more_program_dirs: list[str] | None = None,
    ) -> None:
        self.argv = argv
        self.console_log = console_log
        self.program_dir = program_dir
        # Host paths the guest also sees (vng's 9p root): searched by name.
        self.more_program_dirs = more_program_dirs or []
        self.timeouts = timeouts
        self.env = env
        # Lines to type before lab-init answers (vng starts a shell first).
        self.startup = startup or []
        self.child: pexpect.spawn | None = None
        self.release = ""
        self.machine = ""
        self.boot_seconds = 0.0
        self.crashed: str | None = None
        # Kernel WARNINGs seen in command output, in order.
        self.warnings: list[str] = []
        self._next_id = 1
        self._log_file: BinaryIO | None = None
        self.transport: Transport = ConsoleTransport(self)

    # -- lifecycle -----------------------------------------------------

    def boot(self) -> float:
        """Start QEMU and wait for lab-init; returns the boot time."""
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.console_log.open("ab")
        log.info("boot: %s", shlex.join(self.argv))
        started = time.monotonic()
        self.child = self._spawn()
        self.child.logfile_read = self._log_file
        for line in self.startup:
            self.child.sendline(line)

        index = self._expect([patterns.READY], self.timeouts.boot, "boot", BootError)
        assert index == 0 and self.child.match is not None
        self.release, self.machine = self._ready_fields(self.child.match.group("body"))
        self._handshake()
        self.boot_seconds = time.monotonic() - started
        log.info("boot: %s up in %.1f s", self.release, self.boot_seconds)
        return self.boot_seconds

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.isalive() and self.crashed is None

    def use_transport(self, transport: Transport) -> None:
        """Send the commands through transport from now on (SSH after boot)."""
        self.transport = transport

    def poweroff(self) -> None:
        """Ask the guest to power off; kill QEMU if it does not end in time."""
        if self.child is None:
            return
        # Power-off is the console's, whatever carried the commands.
        self.transport.close()
        if self.alive:
            try:
                self.child.sendline(f"{self._take_id()} poweroff")
                self.child.expect(pexpect.EOF, timeout=self.timeouts.poweroff)
                # QEMU closed the console: it is exiting; reap it, do not kill.
                self.child.wait()
            except (pexpect.TIMEOUT, OSError):
                log.warning(
                    "power off: guest did not stop in %.0f s; killing QEMU",
                    self.timeouts.poweroff,
                )
        self.kill()

    def kill(self) -> None:
        """End QEMU now and close the console log."""
        self.transport.close()
        if self.child is not None:
            if self.child.isalive():
                self.child.close(force=True)
            else:
                self.child.close()
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()

    @property
    def exit_status(self) -> int | None:
        if self.child is None or self.child.isalive():
            return None
        return (
            self.child.exitstatus
            if self.child.exitstatus is not None
            else self.child.signalstatus
        )

    # -- commands ------------------------------------------------------

    def program(self, name: str) -> str:
        for directory in self.more_program_dirs:
            if (Path(directory) / name).exists():
                return f"{directory}/{name}"
        return f"{self.program_dir}/{name}"

    def command(
        self, verb: str, *args: str, timeout: float | None = None
    ) -> CommandResult:
        """Run one lab-init command through the transport, wait for its end."""
        self._require_alive()
        return self.transport.command(verb, args, timeout or self.timeouts.command)

    def put(self, local: Path, remote: str, timeout: float | None = None) -> None:
        """Copy a host file into the guest (SSH transport only)."""
        self._require_alive()
        self.transport.put(local, remote, timeout or self.timeouts.command)

    def get(self, remote: str, local: Path, timeout: float | None = None) -> None:
        """Copy a guest file to the host (SSH transport only)."""
        self._require_alive()
        self.transport.get(remote, local, timeout or self.timeouts.command)

    def run(
        self,
        program: str,
        *args: str,
        cgroup: str | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run a guest program (by name), optionally inside a cgroup."""
        if cgroup:
            return self.command(
                "runcg", cgroup, self.program(program), *args, timeout=timeout
            )
        return self.command("run", self.program(program), *args, timeout=timeout)

    def cat(self, path: str) -> str:
        result = self.command("cat", path)
        if result.rc != 0:
            raise GuestError(
                f"cannot read {path} in the guest: {result.transcript.strip()}"
            )
        return result.output

    def write(self, path: str, text: str = "") -> None:
        result = self.command("write", path, *([text] if text else []))
        if result.rc != 0:
            raise GuestError(
                f"cannot write {text!r} to {path} in the guest: "
                f"{result.transcript.strip()}"
            )

    def append(self, path: str, text: str) -> None:
        result = self.command("append", path, text)
        if result.rc != 0:
            raise GuestError(
                f"cannot append {text!r} to {path} in the guest: "
                f"{result.transcript.strip()}"
            )

    def mkdir(self, path: str) -> None:
        result = self.command("mkdir", path)
        if result.rc != 0 and "File exists" not in result.transcript:
            raise GuestError(
                f"cannot mkdir {path} in the guest: {result.transcript.strip()}"
            )

    def rmdir(self, path: str) -> None:
        self.command("rmdir", path)

    def mount(self, fstype: str, target: str, options: str = "") -> None:
        result = self.command("mount", fstype, target, *([options] if options else []))
        if result.rc != 0:
            why = result.transcript.strip()
            raise GuestError(f"cannot mount {fstype} on {target} in the guest: {why}")

    def umount(self, target: str) -> None:
        self.command("umount", target)

    # -- the console while another transport carries a command ------------

    @property
    def console_fd(self) -> int:
        """The console's file descriptor, to wait on it with select()."""
        assert self.child is not None
        return int(self.child.child_fd)

    def watch_console(self, what: str) -> None:
        """Take in what the console has printed, without waiting.

        A crash or QEMU's exit raises GuestError as it would during a
        console command; a kernel WARNING is recorded for the check.
        """
        assert self.child is not None
        while True:
            index = self._expect([patterns.WARNING], 0, what, GuestError, hang=False)
            if index < 0:
                break
            self.warnings.append(self.child.after.decode(errors="replace"))
        # Nothing more to match in the complete lines read so far: keep
        # only a line that is still arriving, so the buffer does not grow.
        buffer = self.child.buffer
        self.child.buffer = buffer[buffer.rfind(b"\n") + 1 :]

    def console_tail(self, lines: int = 40) -> str:
        return tail_of(self.console_log, lines)

    def hung(
        self,
        what: str,
        timeout: float,
        output: str = "",
        error: type[LabError] = GuestError,
    ) -> LabError:
        """Give up on a guest that did not answer in time: kill QEMU and
        return the error to raise, with the console tail and (from a
        transport that has it) what the command printed so far."""
        self.crashed = f"no answer within {timeout:.0f} s"
        self.kill()
        tail = tail_of(self.console_log, 40)
        if output:
            tail += f"\n--- the command's output so far ---\n{output.rstrip()}"
        return error(
            f"guest hang: no answer within {timeout:g} s during {what}",
            self.console_log,
            tail,
            kernel_fault=True,
        )

    # -- internals -----------------------------------------------------

    def _spawn(self) -> pexpect.spawn:
        """Start QEMU here, its console on a pty (lab/remote.py starts it
        on another host)."""
        try:
            child = pexpect.spawn(
                self.argv[0], self.argv[1:], env=self.env, echo=False, timeout=None
            )
        except pexpect.ExceptionPexpect as err:
            raise BootError(f"could not start {self.argv[0]}: {err}") from err
        # pexpect sleeps 50 ms before every send (for programs that turn echo
        # off late) and 100 ms after closing the pty; lab-init needs neither,
        # and one check sends it ten commands or more.
        child.delaybeforesend = None
        child.ptyproc.delayafterclose = 0.0
        return child

    def _require_alive(self) -> None:
        if not self.alive:
            raise GuestError(
                f"guest is not running ({self.crashed or 'QEMU exited'})",
                self.console_log,
                tail_of(self.console_log),
            )

    def _handshake(self, tries: int = 3) -> None:
        """Make sure lab-init reads what we send before the first check.

        Seen once on a loaded host: the first line sent right after READY
        never reached a MIPS guest, which then waited for ever. A no-op
        command is sent until one is answered; a late answer to an earlier
        try is harmless (each waits for its own id).
        """
        assert self.child is not None
        wait = max(5.0, self.timeouts.command / 6)
        for _ in range(tries):
            command_id = self._take_id()
            self.child.sendline(f"{command_id} write /dev/null")
            index = self.child.expect(
                [patterns.end_of(command_id), pexpect.EOF, pexpect.TIMEOUT],
                timeout=wait,
            )
            if index == 0:
                return
            if index == 1:
                break
            log.warning("boot: lab-init did not answer in %.0f s; sending again", wait)
        self._expect([patterns.end_of(self._next_id - 1)], wait, "boot", BootError)

    def _ready_fields(self, body: bytes) -> tuple[str, str]:
        """Release and machine from READY's body. Seen on a loaded host:
        "@@LAB:READY 6.12[    2.33] tsc: Refined TSC ...\n.118 x86_64@@"."""
        text = CRLF_RE.sub("\n", body.decode(errors="replace"))
        fields = PRINTK_RE.sub("", text).split()
        if len(fields) != 2:
            raise BootError(
                f"lab-init's ready line is garbled: {text!r}",
                self.console_log,
                tail_of(self.console_log),
            )
        return fields[0], fields[1]

    def _take_id(self) -> int:
        command_id = self._next_id
        self._next_id += 1
        return command_id

    @property
    def _nudge(self) -> float:
        """How long to wait for lab-init to take a line before sending it
        again (it answers in milliseconds when all is well)."""
        return max(5.0, self.timeouts.command / 6)

    def _expect(
        self,
        wanted: list[bytes],
        timeout: float,
        what: str,
        error: type[LabError],
        hang: bool = True,
    ) -> int:
        """Wait for one of wanted; a crash, QEMU's exit or the timeout raise.

        With hang=False the timeout is no hang: it returns -1."""
        assert self.child is not None
        crash_names = list(patterns.CRASHES)
        pattern_list = [
            *wanted,
            *patterns.CRASHES.values(),
            pexpect.EOF,
            pexpect.TIMEOUT,
        ]
        index = self.child.expect(pattern_list, timeout=timeout)
        if index < len(wanted):
            return index

        if index < len(wanted) + len(crash_names):
            kind = crash_names[index - len(wanted)]
            line = self.child.after.decode(errors="replace").strip()
            self._drain(CRASH_TRACE_SECONDS)
            self.crashed = f"{kind}: {line}"
            self.kill()
            raise error(
                f"{kind} during {what}: {line}",
                self.console_log,
                tail_of(self.console_log, 40),
                kernel_fault=True,
            )
        if index == len(pattern_list) - 2:
            self.child.close()
            status = self.exit_status
            self.crashed = f"QEMU exited with status {status}"
            self.kill()
            tail = tail_of(self.console_log, 40)
            # QEMU says so when a signal ends it (exit status 0 all the same).
            killed = patterns.QEMU_KILLED_RE.search(tail)
            # A signal QEMU could not catch (SIGKILL): no status, a signal.
            signalled = self.child.exitstatus is None and status is not None
            # With -no-reboot, a guest that resets (a triple fault) makes
            # QEMU exit 0: the kernel's fault. Any other status is QEMU's.
            if killed:
                how = f"status {status}: QEMU was killed: {killed.group(0)}"
            elif signalled:
                how = f"killed by signal {status} ({signal_name(status)})"
            elif status == 0:
                how = f"status {status}: the guest reset or powered off"
            else:
                how = f"status {status}: QEMU failed"
            raise error(
                f"QEMU exited ({how}) during {what}",
                self.console_log,
                tail,
                kernel_fault=status == 0 and not killed,
            )
        if not hang:
            return -1
        raise self.hung(what, timeout, error=error)

    def _drain(self, seconds: float) -> None:
        """Read what the console still prints for a while (a crash trace)."""
        assert self.child is not None
        try:
            self.child.expect(pexpect.EOF, timeout=seconds)
        except (pexpect.TIMEOUT, OSError):
            pass


class ConsoleTransport:
    """lab-init's commands over the serial console, framed by its markers.

    The console carries text lines only: no file copies, and a command's
    stdout and stderr arrive mixed (CommandResult.stderr stays "").
    """

    name = "console"

    def __init__(self, guest: BootedGuest) -> None:
        self.guest = guest

    def command(
        self, verb: str, args: tuple[str, ...], timeout: float
    ) -> CommandResult:
        guest = self.guest
        child = guest.child
        assert child is not None
        command_id = guest._take_id()
        text = " ".join((verb, *args))
        what = f"command {text!r}"
        line = f"{command_id} {text}"
        started = time.monotonic()
        deadline = started + timeout
        begin, end = patterns.begin_of(command_id), patterns.end_of(command_id)
        child.sendline(line)
        # Each quiet spell of the resend interval gets a nudge. Before
        # BEGIN, the line is sent again (up to RESENDS times): lab-init
        # prints BEGIN as soon as it reads a line, runs an id only once, and
        # a line once never reached a MIPS guest on a loaded host. After
        # BEGIN, an empty line (lab-init skips it): input wakes a serial
        # port that stopped sending mid-command (seen on MIPS Malta).
        got = b""
        begun, resent = False, 0
        while True:
            left = deadline - time.monotonic()
            index = guest._expect(
                [end] if begun else [end, begin],
                min(guest._nudge, max(0.0, left)),
                what,
                GuestError,
                hang=left <= guest._nudge,
            )
            got += child.before
            if index == 0:
                break
            if index == 1:
                got += child.after
                begun = True
            elif begun:
                log.info(
                    "%s: nothing for %.0f s; waking the console", what, guest._nudge
                )
                child.sendline("")
            elif resent < RESENDS:
                log.warning(
                    "%s: no answer from lab-init in %.0f s; sending it again",
                    what,
                    guest._nudge,
                )
                child.sendline(line)
                resent += 1
        assert child.match is not None
        # Two ttys (the guest's and pexpect's pty) each turn \n into \r\n.
        raw = CRLF_RE.sub("\n", got.decode(errors="replace"))
        # The end marker itself may hold a kernel message the port put in it.
        marker = CRLF_RE.sub("\n", child.after.decode(errors="replace"))
        result = CommandResult(
            command=text,
            rc=int(child.match.group("rc")),
            output=command_output(raw, command_id),
            seconds=time.monotonic() - started,
            # All read since the last command: a WARNING may come between two.
            warnings=patterns.find_warnings(raw + marker),
        )
        guest.warnings.extend(result.warnings)
        return result

    def put(self, local: Path, remote: str, timeout: float) -> None:
        raise self._no_files(f"copy {local} into the guest")

    def get(self, remote: str, local: Path, timeout: float) -> None:
        raise self._no_files(f"copy {remote} out of the guest")

    def close(self) -> None:
        pass

    def _no_files(self, what: str) -> GuestError:
        return GuestError(
            f"cannot {what}: the console transport carries text lines only; "
            "file copies need --lab-transport ssh"
        )
