"""The lab's exceptions, one per phase of a run.

Each carries the log a person should open and the last lines of it, so a
failure explains itself where it is reported.
"""

from __future__ import annotations

import re
from pathlib import Path


class LabError(Exception):
    """A failure of one phase of the lab, with the log that shows it."""

    phase = "lab"

    def __init__(
        self,
        message: str,
        log: Path | None = None,
        tail: str = "",
        kernel_fault: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.log = log
        self.tail = tail
        # True when the kernel under test caused it (panic, oops, hang, a
        # guest that reset), False when the host or the lab did (a missing
        # tool, QEMU's own error, a tree that does not build).
        self.kernel_fault = kernel_fault

    def __str__(self) -> str:
        text = f"[{self.phase}] {self.message}"
        if self.log is not None:
            text += f"\n  log: {self.log}"
        if self.tail:
            lines = "\n".join("  | " + line for line in self.tail.splitlines())
            text += f"\n  last lines:\n{lines}"
        return text


class ToolMissing(LabError):
    """A host tool (QEMU, a cross compiler) is not installed."""

    phase = "setup"


class BuildError(LabError):
    """The kernel or the guest programs did not build."""

    phase = "build"


class BootError(LabError):
    """QEMU did not start, or the guest did not reach the lab's init."""

    phase = "boot"


class GuestError(LabError):
    """The guest crashed, hung or answered wrongly while running a check."""

    phase = "run"


class AccelUnavailable(LabError):
    """The accelerator asked for cannot run a guest on this host."""

    phase = "accel"


def tail_of(path: Path, lines: int = 30) -> str:
    """The last lines of a log, or an empty string when there is none."""
    try:
        # Bytes, not read_text(): universal newlines would turn \r\r\n into two.
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    # A console log has \r\r\n line ends (two ttys): one line each.
    text = re.sub(r"\r+\n", "\n", text)
    return "\n".join(text.splitlines()[-lines:])
