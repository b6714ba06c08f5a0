"""What checks use inside a guest: cpusets, guest programs, and the two
witnesses of the task_setscheduler hook.

- TestLsm reads the test LSM's record of every hook call and sets its
  deny rule (securityfs, patches/*labtest*).
- KprobeWitness puts a kprobe event on security_task_setscheduler and
  reads the mask argument's first word from the trace. It fetches the
  mask only when the built tree's hook has that argument: on a stock
  kernel the register holds leftovers that can look like a mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lab.arches import Arch
from lab.console import BootedGuest, CommandResult
from lab.errors import GuestError
from lab.kbuild import KernelImage
from lab.ktap import KtapReport, parse_ktap

SECURITYFS = "/sys/kernel/security"
TRACEFS = "/sys/kernel/tracing"
CGROUP2 = "/sys/fs/cgroup"
CGROUP1_CPUSET = "/tmp/cpuset-v1"


class HookNotExpanded(AssertionError):
    """The kernel's task_setscheduler hook does not take the CPU mask."""


def require_expanded_hook(kernel: KernelImage) -> None:
    """Fail a mask check on a kernel whose hook cannot see a mask."""
    if not kernel.hook_expanded:
        raise HookNotExpanded(
            "hook not expanded: this kernel's security_task_setscheduler() takes no "
            f"CPU mask ({kernel.source}), so no LSM can see the requested mask"
        )


def require_attr_hook(kernel: KernelImage) -> None:
    """Fail a check of the follow-up on a hook that takes no sched_attr."""
    require_expanded_hook(kernel)
    if not kernel.hook_has_attr:
        raise HookNotExpanded(
            "hook not expanded: this kernel's security_task_setscheduler() takes "
            f"no sched_attr ({kernel.source})"
        )


@dataclass
class ProgramRun:
    """A guest program's run: its console result and its KTAP report."""

    result: CommandResult
    ktap: KtapReport

    @property
    def pid(self) -> int:
        return int(self.ktap.diagnostics["pid"])

    def fact(self, key: str) -> str:
        try:
            return self.ktap.diagnostics[key]
        except KeyError:
            raise AssertionError(
                f"the program did not report {key!r}:\n{self.result.transcript}"
            ) from None

    def assert_ok(self) -> None:
        """Every KTAP test of the program passed."""
        problems = self.ktap.problems()
        assert not problems, (
            "guest program reported:\n  "
            + "\n  ".join(problems)
            + ("\n--- output ---\n" + self.result.transcript)
        )


def run_program(
    guest: BootedGuest,
    program: str,
    *args: str,
    cgroup: str | None = None,
    reports: list[KtapReport] | None = None,
) -> ProgramRun:
    """Run a guest program and parse its KTAP; a harness failure raises.

    `program` may carry its arguments ("affinity --mask 0-1"): no argument
    of the lab's programs contains a space.
    """
    program, *inline = program.split()
    args = (*inline, *args)
    result = guest.run(program, *args, cgroup=cgroup)
    ktap = parse_ktap(result.output)
    if reports is not None:
        reports.append(ktap)
    if result.rc != 0:
        raise GuestError(
            f"guest program {program} {' '.join(args)} failed to run "
            f"(rc={result.rc}):\n{result.transcript}"
        )
    return ProgramRun(result, ktap)


class Cpuset:
    """A child cpuset with the given CPUs, in the v2 hierarchy or in a v1
    (legacy) cpuset hierarchy mounted for it.

    A v1 mount takes the cpuset controller away from cgroup v2 until the
    guest reboots; the caller retires the guest afterwards.
    """

    counter = 0

    def __init__(self, guest: BootedGuest, cpus: str, version: int = 2) -> None:
        Cpuset.counter += 1
        self.guest = guest
        self.cpus = cpus
        self.version = version
        root = CGROUP2 if version == 2 else CGROUP1_CPUSET
        self.path = f"{root}/lab{Cpuset.counter}"

    def __enter__(self) -> Cpuset:
        if self.version == 2:
            self.guest.write(f"{CGROUP2}/cgroup.subtree_control", "+cpuset")
            self.guest.mkdir(self.path)
            self.guest.write(f"{self.path}/cpuset.cpus", self.cpus)
            effective = self.guest.cat(f"{self.path}/cpuset.cpus.effective").strip()
        else:
            # The controller must leave the v2 hierarchy before v1 can have it.
            self.guest.command("write", f"{CGROUP2}/cgroup.subtree_control", "-cpuset")
            self.guest.mount("cgroup", CGROUP1_CPUSET, "cpuset")
            self.guest.mkdir(self.path)
            self.guest.write(f"{self.path}/cpuset.cpus", self.cpus)
            self.guest.write(f"{self.path}/cpuset.mems", "0")
            effective = self.guest.cat(f"{self.path}/cpuset.effective_cpus").strip()
        if effective != self.cpus:
            raise GuestError(
                f"cpuset {self.path}: asked for cpus {self.cpus}, "
                f"effective {effective!r}"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.guest.alive:
            self.guest.rmdir(self.path)


@dataclass(frozen=True)
class HookRecord:
    """One call of the hook as the test LSM recorded it."""

    seq: int
    caller: int
    target: int
    comm: str
    mask: str  # CPU list, "none" for NULL, "empty" for an empty mask
    ret: int
    # "none", or "policy:1,prio:99,..." with the sched_attr follow-up;
    # "" from a test LSM that does not record attributes.
    attr: str = ""

    @property
    def attrs(self) -> dict[str, int] | None:
        """The recorded sched_attr fields, None when the hook got none."""
        if self.attr in ("", "none"):
            return None
        fields = (kv.split(":", 1) for kv in self.attr.split(","))
        return {key: int(value, 0) for key, value in fields}


RECORD_RE = re.compile(
    r"seq=(?P<seq>\d+) caller=(?P<caller>-?\d+) target=(?P<target>-?\d+) "
    r"comm=(?P<comm>.*?) mask=(?P<mask>\S+)(?: attr=(?P<attr>\S+))? ret=(?P<ret>-?\d+)$"
)


def parse_records(text: str) -> list[HookRecord]:
    records = []
    for line in text.splitlines():
        m = RECORD_RE.match(line.strip())
        if m:
            records.append(
                HookRecord(
                    int(m["seq"]),
                    int(m["caller"]),
                    int(m["target"]),
                    m["comm"],
                    m["mask"],
                    int(m["ret"]),
                    m["attr"] or "",
                )
            )
    return records


class TestLsm:
    """The test LSM in the guest: its call log and its deny rule."""

    __test__ = False  # not a pytest test class
    log_path = f"{SECURITYFS}/labtest/log"
    rule_path = f"{SECURITYFS}/labtest/rule"

    def __init__(self, guest: BootedGuest, kernel: KernelImage) -> None:
        self.guest = guest
        self.kernel = kernel

    def require(self) -> TestLsm:
        """The test LSM must be in the kernel and enabled; else the check fails."""
        require_expanded_hook(self.kernel)
        lsms = self.guest.cat(f"{SECURITYFS}/lsm").strip()
        if "labtest" not in lsms.split(","):
            raise AssertionError(
                f"the test LSM is not enabled in this kernel (lsm: {lsms})"
            )
        return self

    def clear(self) -> None:
        """Empty the call log and drop the deny rule."""
        self.guest.write(self.log_path, "clear")
        self.allow_all()

    def allow_all(self) -> None:
        self.guest.write(self.rule_path, "clear")

    def deny_cpus(self, cpus: str) -> None:
        self.guest.write(self.rule_path, f"deny_cpus {cpus}")

    def require_attr(self) -> TestLsm:
        """The kernel's hook must also take the sched_attr (the follow-up)."""
        self.require()
        require_attr_hook(self.kernel)
        return self

    def deny_rt_above(self, priority: int) -> None:
        """Refuse SCHED_FIFO/SCHED_RR above a priority (the follow-up)."""
        self.guest.write(self.rule_path, f"deny_rt_above {priority}")

    def records(self, caller: int | None = None) -> list[HookRecord]:
        records = parse_records(self.guest.cat(self.log_path))
        return [r for r in records if caller is None or r.caller == caller]


@dataclass(frozen=True)
class KprobeHit:
    pid: int
    comm: str
    mask_ptr: int | None
    mask_word: int | None


KPROBE_LINE_RE = re.compile(
    r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[\d+\].*?\s(?P<event>\w+): "
    r"\((?P<where>[^)]*)\)(?P<args>.*)$"
)


def parse_kprobe_trace(text: str, event: str) -> list[KprobeHit]:
    hits = []
    for line in text.splitlines():
        m = KPROBE_LINE_RE.match(line)
        if not m or m["event"] != event:
            continue
        args = dict(kv.split("=", 1) for kv in m["args"].split() if "=" in kv)
        hits.append(
            KprobeHit(
                pid=int(m["pid"]),
                comm=m["comm"].strip(),
                mask_ptr=int(args["mask"], 16) if "mask" in args else None,
                mask_word=int(args["word"], 16) if "word" in args else None,
            )
        )
    return hits


class KprobeWitness:
    """A kprobe event on security_task_setscheduler, independent of the test LSM."""

    group = "kernel_lab"

    def __init__(
        self,
        guest: BootedGuest,
        arch: Arch,
        kernel: KernelImage,
        function: str = "security_task_setscheduler",
        event: str = "setsched",
    ) -> None:
        self.guest = guest
        self.arch = arch
        self.kernel = kernel
        self.function = function
        self.event = event

    def definition(self) -> str:
        """The kprobe_events line; the mask is fetched only if the hook has it."""
        task_reg, mask_reg = self.arch.kprobe_args
        word = self.arch.word_type
        args = [f"task={task_reg}:{word}"]
        if self.kernel.hook_expanded and self.function == "security_task_setscheduler":
            args += [f"mask={mask_reg}:{word}", f"word=+0({mask_reg}):{word}"]
        return f"p:{self.group}/{self.event} {self.function} {' '.join(args)}"

    def __enter__(self) -> KprobeWitness:
        # A global counter orders events of all CPUs; the default clock can
        # tick too coarsely (10 ms on MIPS) to tell two calls apart.
        self.guest.write(f"{TRACEFS}/trace_clock", "counter")
        self.guest.append(f"{TRACEFS}/kprobe_events", self.definition())
        self.guest.write(f"{TRACEFS}/trace", "")
        self.guest.write(f"{TRACEFS}/events/{self.group}/{self.event}/enable", "1")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.guest.alive:
            return
        self.guest.command(
            "write", f"{TRACEFS}/events/{self.group}/{self.event}/enable", "0"
        )
        self.guest.command(
            "append", f"{TRACEFS}/kprobe_events", f"-:{self.group}/{self.event}"
        )

    def hits(self, pid: int | None = None) -> list[KprobeHit]:
        hits = parse_kprobe_trace(self.guest.cat(f"{TRACEFS}/trace"), self.event)
        return [h for h in hits if pid is None or h.pid == pid]


def cpulist_to_word(cpus: str) -> int:
    """The first word of a cpumask holding these CPUs ("0-1" -> 0b11)."""
    word = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        for cpu in range(int(lo), int(hi or lo) + 1):
            word |= 1 << cpu
    return word


def check_untruncated_mask_in_cpuset(
    guest: BootedGuest,
    kernel: KernelImage,
    arch: Arch,
    reports: list[KtapReport] | None = None,
) -> None:
    """The main claim, as one scenario for every boot that makes it (the
    default boot, the SELinux boot): in a cpuset with cpus=0,
    sched_setaffinity({0,1}) follows the arch's rule, the task runs on {0}
    only, and the test LSM saw the cpuset join (no mask), then {0,1}."""
    lsm = TestLsm(guest, kernel).require()
    lsm.clear()
    rule = arch.affinity
    expect = (
        f"--expect-errno {rule.partial_errno} --expect-affinity {rule.partial_affinity}"
    )

    with Cpuset(guest, cpus="0") as cpuset:
        run = run_program(
            guest,
            f"affinity --mask 0-1 {expect} --expect-ran-on 0",
            cgroup=cpuset.path,
            reports=reports,
        )
    calls = lsm.records(caller=run.pid)

    run.assert_ok()
    assert run.fact("status_cpus_allowed") == "0"
    expected = [(run.pid, "none"), (run.pid, "0-1")]
    assert [(c.target, c.mask) for c in calls] == expected, calls
