"""Console patterns, in one place for every arch and launcher.

The lab's own markers frame what lab-init prints; the kernel's patterns
tell a crash from a clean run. Each has a name (used in failure messages)
and is a bytes regex for pexpect.
"""

from __future__ import annotations

import re

# "<release> <machine>" between the markers; the serial port may put a
# kernel message in the middle of it (console.py takes it out).
READY = rb"@@LAB:READY (?P<body>[^@]*)@@"
END = rb"@@LAB:END (?P<id>\d+) rc=(?P<rc>\d+)@@"
# lab-init's word that the guest's sshd ended (the SSH transport).
SSHD_EXIT_RE = re.compile(r"@@LAB:SSHD-EXIT status=(?P<status>\d+)@@")


# A kernel message the serial port put in the middle of one of our lines:
# the kernel prints when it likes, even between two characters of a marker
# ("@@LAB:END 20 rc=[    2.079299] clocksource: Switched to clocksource
# tsc" and then "0@@" on the next line, seen 2 s after an x86_64 boot).
_PRINTK = rb"(?:\[\s*\d+\.\d+\][^\n]*\n)?"


def _spliced(literal: bytes) -> bytes:
    """literal as a regex that also matches it with a kernel message
    between any two of its characters."""
    return _PRINTK.join(re.escape(literal[i : i + 1]) for i in range(len(literal)))


def end_of(command_id: int) -> bytes:
    head = _spliced(b"@@LAB:END " + str(command_id).encode() + b" rc=")
    return head + _PRINTK + rb"(?P<rc>\d+)" + _PRINTK + _spliced(b"@@")


def begin_of(command_id: int) -> bytes:
    return _spliced(b"@@LAB:BEGIN " + str(command_id).encode() + b"@@")


# Kernel states that end the guest's usefulness: the check fails, the next
# one boots afresh. When several match, the earliest in the text wins. Each
# matches a whole line only, up to its end (which two ttys turn into
# \r\r\n), so that a line the serial port delivers in pieces is not cut
# short and a longer name of the same line ("watchdog: BUG: soft lockup")
# wins over a shorter one ("BUG:").
EOL = rb"[^\r\n]*(?=\r*\n)"
CRASHES: dict[str, bytes] = {
    "kernel panic": rb"Kernel panic - not syncing:(?! Attempted to kill init!)" + EOL,
    "init died": rb"Attempted to kill init!" + EOL,
    "oops": rb"(?:Oops\b|BUG: |general protection fault|Unable to handle kernel )"
    + EOL,
    "soft lockup": rb"watchdog: BUG: soft lockup" + EOL,
    "rcu stall": rb"rcu: INFO: rcu_[a-z]+ (?:self-)?detected stalls" + EOL,
}

# Reported against the check that caused it, but the guest goes on.
WARNING = rb"WARNING: CPU: \d+ PID: \d+ at " + EOL

CRASH_RES = {name: re.compile(pat) for name, pat in CRASHES.items()}

# QEMU's own line when a signal ends it: the host's doing, not the guest's.
QEMU_KILLED_RE = re.compile(
    r"terminating on signal \d+(?: from pid \d+(?: \([^)]*\))?)?"
)
WARNING_RE = re.compile(WARNING)


def find_crash(text: bytes | str) -> tuple[str, str] | None:
    """The first crash in console text: (kind, the matching line)."""
    data = text.encode() if isinstance(text, str) else text
    found: list[tuple[int, str, str]] = []
    for name, regex in CRASH_RES.items():
        m = regex.search(data)
        if m:
            found.append((m.start(), name, m.group(0).decode(errors="replace")))
    if not found:
        return None
    _, name, line = min(found)
    return name, line


def find_warnings(text: bytes | str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [m.group(0).decode(errors="replace") for m in WARNING_RE.finditer(data)]
