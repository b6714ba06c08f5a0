"""Progress of long phases (build, boot) on the user's terminal.

pytest captures output, so the plugin hands in a writer that suspends
capture; the command line writes to stderr. On a tty one line is updated
in place; in a log (CI) a line is written every so often.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _stderr_write(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


class Progress:
    """Reports phases and ticks of long work through a writer."""

    def __init__(
        self,
        write: Callable[[str], None] | None = _stderr_write,
        tty: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.write = write
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = (
            interval if interval is not None else (1.0 if self.tty else 30.0)
        )
        self._last_tick = 0.0
        self._open_line = False

    def _out(self, text: str) -> None:
        if self.write is not None:
            self.write(text)

    def _end_line(self) -> None:
        if self._open_line:
            self._out("\n")
            self._open_line = False

    def phase(self, message: str) -> None:
        """A new phase: one line, always shown."""
        log.info("%s", message)
        self._end_line()
        self._out(f"[lab] {message}\n")

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self._end_line()
        self._out(f"[lab] WARNING: {message}\n")

    def tick(self, message: str, elapsed: float) -> None:
        """Progress within a phase, shown at most once per interval."""
        now = time.monotonic()
        if now - self._last_tick < self.interval:
            return
        self._last_tick = now
        text = f"[lab] {message} ({elapsed:.0f} s)"
        if self.tty:
            self._out("\r\033[K" + text)
            self._open_line = True
        else:
            self._out(text + "\n")

    def done(self, message: str) -> None:
        log.info("%s", message)
        self._end_line()


def quiet() -> Progress:
    """Progress that shows nothing (unit tests)."""
    return Progress(write=None, tty=False, interval=0.0)
