"""The machines the lab can build for and boot: one frozen record per arch.

Everything that differs between arches lives here as data (QEMU binary and
machine, CPU, console, cross compiler, kconfig fragments, kprobe argument
registers, the behaviour the arch's affinity path has), so no other module
needs an `if arch == ...`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AffinityRules:
    """What sched_setaffinity() does on an arch when a cpuset restricts it.

    Values are the facts the guest program reports: an errno name ("0" for
    success) and a CPU list, or "unchanged" for the affinity held before.
    """

    # Mask partly outside the cpuset ({0,1} with cpuset.cpus=0).
    partial_errno: str
    partial_affinity: str
    # Mask entirely outside the cpuset ({1} with cpuset.cpus=0).
    outside_errno: str
    outside_affinity: str
    # {0,1} passed with a cpusetsize of one byte: what the kernel reads
    # (the first byte of the first long: CPUs 0-7 little-endian, 24-31 on
    # a 32-bit big-endian arch) and what the call returns.
    one_byte_mask: str = "0-1"
    one_byte_errno: str = "0"
    note: str = ""


@dataclass(frozen=True)
class Arch:
    """One QEMU machine the lab builds a kernel for and boots."""

    name: str
    # Kernel build.
    kernel_arch: str
    cross_compile: str
    config_target: str
    fragments: tuple[str, ...]
    make_target: str
    image: str
    # Guest programs.
    guest_cc: str
    guest_cflags: tuple[str, ...]
    # QEMU.
    qemu: str
    machine: str
    cpu_tcg: str
    cpu_kvm: str | None
    smp: int
    memory_mb: int
    console: str
    qemu_extra: tuple[str, ...]
    # Debian packages that provide the tools above.
    packages: tuple[str, ...]
    # kprobe fetch-args of the hook's first two arguments at function entry,
    # and the fetch type of a pointer or a cpumask word.
    kprobe_args: tuple[str, str]
    word_type: str
    # Whether virtme-ng can boot this arch.
    vng: bool
    # Host machine (uname -m) on which KVM could run this guest at all.
    kvm_host: str | None
    affinity: AffinityRules
    setaffinity_entry: str = "__x64_sys_sched_setaffinity"
    cmdline: tuple[str, ...] = field(default=())
    # Why CPU 1 cannot be taken offline on this machine ("" if it can).
    no_cpu_hotplug: str = ""
    # Why a BPF LSM cannot run on this arch ("" if it can).
    no_bpf_lsm: str = ""
    # The arch of LAVA's qemu device type (job context "arch").
    lava_arch: str = ""
    # Why --lab-transport ssh cannot reach this arch's guest ("" if it can).
    no_ssh: str = ""
    # What the TCG CPU model needs for a hardware RNG (seeds the kernel's
    # RNG at boot; the SSH transport's sshd waits for it), "" for none.
    tcg_rng_flag: str = ""
    # QEMU's -accel value under TCG (threading options for this machine).
    tcg_accel: str = "tcg"

    @property
    def cc(self) -> str:
        """The C compiler the kernel is built with."""
        return f"{self.cross_compile}gcc"


X86_64 = Arch(
    name="x86_64",
    kernel_arch="x86",
    cross_compile="",
    config_target="tinyconfig",
    fragments=("base", "x86_64"),
    make_target="bzImage",
    image="arch/x86/boot/bzImage",
    guest_cc="gcc",
    guest_cflags=(),
    qemu="qemu-system-x86_64",
    machine="pc",
    cpu_tcg="qemu64",
    cpu_kvm="host",
    smp=2,
    memory_mb=256,
    console="ttyS0",
    qemu_extra=(),
    packages=("qemu-system-x86", "gcc"),
    kprobe_args=("%di", "%si"),
    word_type="x64",
    vng=True,
    kvm_host="x86_64",
    affinity=AffinityRules(
        partial_errno="0",
        partial_affinity="0",
        outside_errno="EINVAL",
        outside_affinity="unchanged",
        note="the generic syscall intersects the request with the cpuset",
    ),
    setaffinity_entry="__x64_sys_sched_setaffinity",
    # The PS/2 mouse probe prints late and asynchronously: no mouse port.
    cmdline=("i8042.noaux",),
    lava_arch="amd64",
    tcg_rng_flag=",+rdrand",
)

MIPS = Arch(
    name="mips",
    kernel_arch="mips",
    cross_compile="mips-linux-gnu-",
    config_target="malta_defconfig",
    fragments=("base", "mips"),
    make_target="vmlinux",
    image="vmlinux",
    guest_cc="mips-linux-gnu-gcc",
    guest_cflags=(),
    qemu="qemu-system-mips",
    machine="malta",
    cpu_tcg="34Kf",
    cpu_kvm=None,
    smp=2,
    memory_mb=256,
    console="ttyS0",
    qemu_extra=(),
    packages=("qemu-system-mips", "gcc-mips-linux-gnu"),
    kprobe_args=("%r4", "%r5"),
    word_type="x32",
    vng=False,
    kvm_host=None,
    affinity=AffinityRules(
        partial_errno="0",
        partial_affinity="0-1",
        outside_errno="0",
        outside_affinity="0-1",
        one_byte_mask="empty",
        one_byte_errno="EINVAL",
        note=(
            "MIPS_MT_FPAFF: mipsmt_sys_sched_setaffinity() applies the request, "
            "then resets the task to the whole cpuset when the request is not a "
            "subset of it, and returns 0; its sched_getaffinity() reports "
            "user_cpus_allowed | cpus_ptr, so it shows the request plus the cpuset "
            "(0-1) while Cpus_allowed_list and the CPUs run on stay 0"
        ),
    ),
    setaffinity_entry="mipsmt_sys_sched_setaffinity",
    no_cpu_hotplug=(
        "Malta's MT SMP (vsmp) has no cpu_disable: taking CPU 1 offline oopses "
        "in take_cpu_down (measured on 6.12)"
    ),
    no_bpf_lsm="MIPS has no BPF trampolines, which BPF LSM programs need",
    lava_arch="mips",
    no_ssh=(
        "the guest runs the host's Debian sshd, and Debian has no big-endian "
        "MIPS port since Debian 11 (no sshd for this guest); the MIPS kernel "
        "also has no network driver"
    ),
    # Multi-threaded TCG (one host thread per vCPU, QEMU's default) loses a
    # wakeup of the second VPE now and then: CPU 1 sleeps in `wait` while a
    # task waits for it ("rcu_sched kthread starved ... ->cpu=1", or the
    # console stops mid-line). Measured under load: 1 failure in 900 and 1
    # in 2000 cpuset+affinity rounds with MTTCG, 0 in 2000 with one TCG
    # thread (which was also faster: 133 s against 152 s).
    tcg_accel="tcg,thread=single",
)

ARCHES: dict[str, Arch] = {arch.name: arch for arch in (X86_64, MIPS)}


class UnknownArch(ValueError):
    """An arch name the lab has no machine for."""

    def __init__(self, name: str) -> None:
        known = ", ".join(sorted(ARCHES))
        super().__init__(f"unknown arch {name!r}; the lab knows: {known}")


def get_arch(name: str) -> Arch:
    """The machine record for an arch name, or UnknownArch."""
    try:
        return ARCHES[name]
    except KeyError:
        raise UnknownArch(name) from None
