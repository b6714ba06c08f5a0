"""A booted guest driven over its console with pexpect.

The guest runs lab-init, which frames each command's output with markers
(see guest/lab-init.c). Every wait has an explicit timeout and looks for
the kernel's crash patterns at the same time, so a panic, an oops or a
hang ends the wait at once with the console tail.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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
    """What one console command gave back."""

    command: str
    rc: int
    output: str
    seconds: float
    warnings: list[str] = field(default_factory=list)


def command_output(raw: str, command_id: int) -> str:
    """What a command printed, from the console text up to its end marker.

    The kernel prints on the same console whenever it likes, even in the
    middle of a line of ours (after the begin marker, say): its lines are
    not the command's output and are taken out.
    """
    output = raw.split(f"@@LAB:BEGIN {command_id}@@", 1)[-1]
    return PRINTK_RE.sub("", output).removeprefix("\n")


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

    def poweroff(self) -> None:
        """Ask the guest to power off; kill QEMU if it does not end in time."""
        if self.child is None:
            return
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
        """Send one lab-init command and wait for its end marker."""
        if not self.alive:
            raise GuestError(
                f"guest is not running ({self.crashed or 'QEMU exited'})",
                self.console_log,
                tail_of(self.console_log),
            )
        assert self.child is not None
        command_id = self._take_id()
        text = " ".join((verb, *args))
        what = f"command {text!r}"
        line = f"{command_id} {text}"
        started = time.monotonic()
        deadline = started + (timeout or self.timeouts.command)
        begin, end = patterns.begin_of(command_id), patterns.end_of(command_id)
        self.child.sendline(line)
        # lab-init prints BEGIN as soon as it reads the line. Without it
        # for a while, the line is sent again: seen once on a loaded host,
        # a line never reached a MIPS guest. lab-init runs an id only once.
        got = b""
        for attempt in range(RESENDS + 1):
            last = attempt == RESENDS
            wait = deadline - time.monotonic()
            index = self._expect(
                [begin, end],
                wait if last else min(self._nudge, wait),
                what,
                GuestError,
                allow_timeout=not last,
            )
            got += self.child.before
            if index >= 0:
                break
            log.warning(
                "%s: no answer from lab-init in %.0f s; sending it again",
                what,
                self._nudge,
            )
            self.child.sendline(line)
        if index == 0:
            got += self.child.after
            self._expect([end], max(0.0, deadline - time.monotonic()), what, GuestError)
            got += self.child.before
        assert self.child.match is not None
        # Two ttys (the guest's and pexpect's pty) each turn \n into \r\n.
        raw = CRLF_RE.sub("\n", got.decode(errors="replace"))
        output = command_output(raw, command_id)
        result = CommandResult(
            command=text,
            rc=int(self.child.match.group("rc")),
            output=output,
            seconds=time.monotonic() - started,
            # All read since the last command: a WARNING may come between two.
            warnings=patterns.find_warnings(raw),
        )
        self.warnings.extend(result.warnings)
        return result

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
                f"cannot read {path} in the guest: {result.output.strip()}"
            )
        return result.output

    def write(self, path: str, text: str = "") -> None:
        result = self.command("write", path, *([text] if text else []))
        if result.rc != 0:
            raise GuestError(
                f"cannot write {text!r} to {path} in the guest: {result.output.strip()}"
            )

    def append(self, path: str, text: str) -> None:
        result = self.command("append", path, text)
        if result.rc != 0:
            raise GuestError(
                f"cannot append {text!r} to {path} in the guest: "
                f"{result.output.strip()}"
            )

    def mkdir(self, path: str) -> None:
        result = self.command("mkdir", path)
        if result.rc != 0 and "File exists" not in result.output:
            raise GuestError(
                f"cannot mkdir {path} in the guest: {result.output.strip()}"
            )

    def rmdir(self, path: str) -> None:
        self.command("rmdir", path)

    def mount(self, fstype: str, target: str, options: str = "") -> None:
        result = self.command("mount", fstype, target, *([options] if options else []))
        if result.rc != 0:
            why = result.output.strip()
            raise GuestError(f"cannot mount {fstype} on {target} in the guest: {why}")

    def umount(self, target: str) -> None:
        self.command("umount", target)

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
        allow_timeout: bool = False,
    ) -> int:
        """Wait for one of wanted; a crash, QEMU's exit or the timeout raise
        (a timeout returns -1 instead when allow_timeout)."""
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
            # With -no-reboot, a guest that resets (a triple fault) makes
            # QEMU exit 0: the kernel's fault. Any other status is QEMU's.
            if killed:
                how = f"QEMU was killed: {killed.group(0)}"
            elif status == 0:
                how = "the guest reset or powered off"
            else:
                how = "QEMU failed"
            raise error(
                f"QEMU exited (status {status}: {how}) during {what}",
                self.console_log,
                tail,
                kernel_fault=status == 0 and not killed,
            )
        if allow_timeout:
            return -1
        self.crashed = f"no answer within {timeout:.0f} s"
        self.kill()
        raise error(
            f"guest hang: no answer within {timeout:g} s during {what}",
            self.console_log,
            tail_of(self.console_log, 40),
            kernel_fault=True,
        )

    def _drain(self, seconds: float) -> None:
        """Read what the console still prints for a while (a crash trace)."""
        assert self.child is not None
        try:
            self.child.expect(pexpect.EOF, timeout=seconds)
        except (pexpect.TIMEOUT, OSError):
            pass
