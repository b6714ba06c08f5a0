"""A stand-in for QEMU running lab-init, for the console unit tests.

It speaks lab-init's protocol on stdin/stdout: a few boot lines, the READY
marker, then "<id> <verb> [args]" in, framed output out. The boot mode
(argv[1]) and the program a `run` names decide what happens:

    boot modes: normal, boot-panic, boot-hang, boot-exit, ready-split
    programs:   /bin/ok, /bin/lost (its first line is lost),
                /bin/late (taken a second late), /bin/exit3, /bin/panic,
                /bin/oops, /bin/hang, /bin/sigkill, /bin/stuck-tx,
                /bin/split-end,
                /bin/quit, /bin/reset, /bin/warn, /bin/late-warn, /bin/trickle-panic,
                /bin/trickle-lockup
"""

from __future__ import annotations

import os
import signal
import sys
import time

RELEASE = "6.12.118"
MACHINE = "x86_64"

BOOT_LINES = [
    "[    0.000000] Linux version 6.12.118 (lab@kernel-lab) #1 SMP PREEMPT_DYNAMIC",
    "[    0.000000] Command line: console=ttyS0 panic=-1",
    "[    0.303000] Run /init as init process",
]

PANIC_LINES = [
    "[    5.101234] sysrq: Trigger a crash",
    "[    5.101456] Kernel panic - not syncing: sysrq triggered crash",
    "[    5.101601] CPU: 0 UID: 0 PID: 1 Comm: init Not tainted 6.12.118 #1",
    "[    5.101990] Call Trace:",
    "[    5.102200]  panic+0x33b/0x370",
    "[    5.103490] Rebooting in -1 seconds..",
]

OOPS_LINES = [
    "[    7.204512] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "[    7.205061] Oops: 0002 [#1] SMP",
    "[    7.205140] CPU: 1 UID: 0 PID: 57 Comm: affinity Not tainted 6.12.118 #1",
    "[    7.207020] Kernel panic - not syncing: Fatal exception",
]

WARN_LINES = [
    "[    9.310001] ------------[ cut here ]------------",
    "[    9.310002] WARNING: CPU: 1 PID: 57 at kernel/sched/core.c:1234 foo+0x12/0x40",
    "[    9.310110] Modules linked in:",
    "[    9.310400] RIP: 0010:foo+0x12/0x40",
    "[    9.310720] ---[ end trace 0000000000000000 ]---",
]

LOCKUP_LINE = (
    "[   48.120011] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [stall:60]"
)


def say(*lines: str) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def trickle(line: str) -> None:
    """Write a line a byte at a time, as a UART does under emulation."""
    for ch in line + "\n":
        sys.stdout.write(ch)
        sys.stdout.flush()
        time.sleep(0.002)


def hang() -> None:
    while True:
        time.sleep(60)


def run_program(program: str) -> int:
    """What a guest program prints; returns its rc (or never returns)."""
    name = program.rsplit("/", 1)[-1]
    if name == "ok":
        say("KTAP version 1", "1..1", "# pid: 57", "ok 1 affinity is 0")
        return 0
    if name == "exit3":
        say("affinity: bad argument --frob")
        return 3
    if name == "panic":
        say(*PANIC_LINES)
        sys.exit(0)  # panic=-1 with -no-reboot: QEMU exits
    if name == "oops":
        say(*OOPS_LINES)
        sys.exit(0)
    if name == "hang":
        say("# stalling_for: -1")
        hang()
    if name == "quit":
        sys.exit(7)
    if name == "late":
        say("KTAP version 1", "1..1", "ok 1 late but once")
        return 0
    if name == "lost":
        say("KTAP version 1", "1..1", "ok 1 taken the second time")
        return 0
    if name == "split-end":
        say("KTAP version 1", "1..1", "ok 1 done")
        return 3
    if name == "stuck-tx":
        # The serial port stops sending until the next interrupt: here,
        # until the host sends something.
        say("KTAP version 1", "1..1")
        sys.stdin.readline()
        say("ok 1 sent after the wake-up")
        return 0
    if name == "sigkill":
        # QEMU killed by a signal it cannot catch: no exit status.
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "reset":
        sys.exit(0)
    if name == "late-warn":
        say("KTAP version 1", "1..1", "ok 1 affinity is 0")
        return 0
    if name == "warn":
        say("KTAP version 1", "1..1", *WARN_LINES, "ok 1 affinity is 0")
        return 0
    if name == "trickle-panic":
        trickle(PANIC_LINES[1])
        say(*PANIC_LINES[2:])
        sys.exit(0)
    if name == "trickle-lockup":
        trickle(LOCKUP_LINE)
        say("[   48.120560] CPU: 0 UID: 0 PID: 60 Comm: stall Not tainted 6.12.118 #1")
        hang()
    say(f"lab-init: run {program}: No such file or directory")
    return 127


def serve(command_id: str, verb: str, args: list[str]) -> None:
    say(f"@@LAB:BEGIN {command_id}@@")
    if verb == "poweroff":
        say(f"@@LAB:END {command_id} rc=0@@", "[    2.413000] reboot: Power down")
        sys.exit(0)
    if verb in ("run", "runcg"):
        rc = run_program(args[0] if verb == "run" else args[1])
    elif verb == "cat":
        say("lockdown,capability,yama,smack,selinux,labtest,bpf")
        rc = 0
    else:
        say(f"lab-init: unknown command {verb}")
        rc = 1
    if verb == "run" and args[0].endswith("/split-end"):
        # A late kernel message lands inside the end marker.
        sys.stdout.write(f"@@LAB:END {command_id} rc=")
        say("[    2.079299] clocksource: Switched to clocksource tsc")
        say(f"{rc}@@")
    else:
        say(f"@@LAB:END {command_id} rc={rc}@@")
    if verb == "run" and args[0].endswith("/late-warn"):
        # The kernel prints when it likes: here just after the end marker.
        say(*WARN_LINES)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "normal"
    say(*BOOT_LINES)
    if mode == "boot-panic":
        say(*PANIC_LINES)
        sys.exit(0)
    if mode == "boot-hang":
        hang()
    if mode == "boot-exit":
        sys.exit(1)
    if mode == "ready-split":
        # The kernel's message lands in the middle of lab-init's line.
        major, minor = RELEASE.rsplit(".", 1)
        sys.stdout.write(f"@@LAB:READY {major}")
        say("[    2.330420] tsc: Refined TSC clocksource calibration: 2596.130 MHz")
        say(f".{minor} {MACHINE}@@")
    else:
        say(f"@@LAB:READY {RELEASE} {MACHINE}@@")

    last, dropped = 0, False
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        fields = line.split()
        if len(fields) < 2:
            continue
        if "/bin/lost" in line and not dropped:
            # The first copy of this line never reaches lab-init.
            dropped = True
            continue
        if int(fields[0]) <= last:
            say(f"@@LAB:SEEN {fields[0]}@@")
            continue
        last = int(fields[0])
        if "/bin/late" in line:
            # lab-init on a loaded guest: it takes the line a while later.
            time.sleep(1.0)
        serve(fields[0], fields[1], fields[2:])


if __name__ == "__main__":
    main()
