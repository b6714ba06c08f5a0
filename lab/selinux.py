"""A permissive dummy SELinux policy for a lab kernel, packed as an extra initrd.

The kernel source's scripts/selinux/mdp ("make dummy policy") writes a policy
with one type allowed everything in the kernel's own class map; it is built
with the host compiler against the kernel's .config, compiled with
checkpolicy, and a gzip cpio holding it is appended to the guest's initramfs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab.arches import Arch
from lab.cache import LabCache
from lab.checks import ProgramRun, run_program
from lab.console import BootedGuest
from lab.errors import BuildError, ToolMissing
from lab.guest import CpioWriter
from lab.kbuild import KernelImage, KernelSource, compiler_version
from lab.progress import Progress
from lab.session import BootVariant, LabRun

log = logging.getLogger(__name__)

# Bump when the way the policy or the archive is made changes.
SELINUX_FORMAT = 1
CHECKPOLICY = "checkpolicy"
HOST_CC = "gcc"
# What mdp is compiled from, and its include flags (scripts/selinux/mdp/Makefile).
MDP_PATHS = ("scripts/selinux/mdp", "security/selinux/include", "include")
MDP_CFLAGS = (
    "-O2",
    "-I",
    "include/uapi",
    "-I",
    "include",
    "-I",
    "security/selinux/include",
)
SECURITY_H = "security/selinux/include/security.h"
# Where the policy lands in the guest.
GUEST_POLICY = "/etc/selinux/lab-policy"
# LSMs that, like SELinux, want the exclusive slot: only the first one
# named in lsm= gets it, so they leave the order for SELinux to have it.
OTHER_EXCLUSIVE_LSMS = ("smack", "apparmor")
# A checkpolicy older than the kernel does not know its newest policy
# capabilities; at most this many are left out before giving up.
MAX_DROPPED_CAPS = 8

CONFIG_LINE_RE = re.compile(r"^(CONFIG_\w+)=(.*)$")
VERSION_DEFINE_RE = re.compile(r"^#define\s+POLICYDB_VERSION_(\w+)\s+(\w+)", re.M)
CHECKPOLICY_V_RE = re.compile(r"^(\d+)\s")
UNKNOWN_CAP_RE = re.compile(r"invalid policy capability name (\w+)")
# What permissive mode logs for an access enforcing mode would refuse.
AVC_DENIED_RE = re.compile(r"^.*\bavc:\s+denied\b.*$", re.M)
# The audit record of a policy load (AUDIT_MAC_POLICY_LOAD, type 1403).
POLICY_LOAD_RE = re.compile(r"\btype=1403\b.*\blsm=selinux res=1\b")


@dataclass(frozen=True)
class SelinuxPolicy:
    """A dummy policy built for one kernel, and the archive that carries it."""

    arch: str
    entry: Path
    policy: Path
    archive: Path
    version: int
    dropped_caps: tuple[str, ...]


# -- pure parts ------------------------------------------------------------


def config_value(config: str, symbol: str) -> str | None:
    """A symbol's value in a .config, quotes removed; None when unset."""
    for line in config.splitlines():
        m = CONFIG_LINE_RE.match(line.strip())
        if m and m[1] == symbol:
            return m[2].strip('"')
    return None


def autoconf_header(config: str) -> str:
    """include/generated/autoconf.h for a .config, as kconfig writes it."""
    lines = ["/* Written by kernel-lab from the kernel's .config. */"]
    for line in config.splitlines():
        m = CONFIG_LINE_RE.match(line.strip())
        if not m:
            continue
        symbol, value = m[1], m[2]
        if value == "y":
            lines.append(f"#define {symbol} 1")
        elif value == "m":
            lines.append(f"#define {symbol}_MODULE 1")
        elif value != "n":
            lines.append(f"#define {symbol} {value}")
    return "\n".join(lines) + "\n"


def kernel_policy_max(security_h: str) -> int:
    """POLICYDB_VERSION_MAX of the kernel, from its selinux/include/security.h."""
    defines = dict(VERSION_DEFINE_RE.findall(security_h))
    value = defines.get("MAX")
    # MAX names another version (POLICYDB_VERSION_COMP_FTRANS) or is a number.
    while value is not None and not value.isdigit():
        value = defines.get(value.removeprefix("POLICYDB_VERSION_"))
    if value is None:
        raise BuildError("no POLICYDB_VERSION_MAX in the kernel's security.h")
    return int(value)


def checkpolicy_max(version_output: str) -> int:
    """The newest policy version checkpolicy writes, from `checkpolicy -V`."""
    m = CHECKPOLICY_V_RE.match(version_output.strip())
    if not m:
        raise ToolMissing(f"cannot read checkpolicy -V: {version_output.strip()!r}")
    return int(m[1])


def unknown_policycap(stderr: str) -> str | None:
    """The policy capability checkpolicy refused as unknown, if that was it."""
    m = UNKNOWN_CAP_RE.search(stderr)
    return m[1] if m else None


def drop_policycap(conf: str, name: str) -> str:
    """policy.conf without the `policycap name;` line."""
    return re.sub(rf"^policycap {re.escape(name)};\n", "", conf, flags=re.M)


def lsm_order(config_lsm: str) -> str:
    """The kernel's LSM order (CONFIG_LSM) with SELinux in the exclusive slot."""
    names = [n for n in config_lsm.split(",") if n and n not in OTHER_EXCLUSIVE_LSMS]
    if "selinux" not in names:
        names.insert(0, "selinux")
    return ",".join(names)


def boot_cmdline(config: str) -> tuple[str, ...]:
    """Kernel command line words for a boot with SELinux, permissive."""
    return (f"lsm={lsm_order(config_value(config, 'CONFIG_LSM') or '')}", "enforcing=0")


def avc_denials(console: str) -> list[str]:
    """The console lines that log an AVC denial."""
    return [line.strip() for line in AVC_DENIED_RE.findall(console)]


def policy_load_audited(console: str) -> bool:
    """Whether the console shows the audit record of a successful policy load:
    then SELinux's audit messages reach it, and so would AVC denials."""
    return POLICY_LOAD_RE.search(console) is not None


def policy_key(kernel_key: str, tools: list[str]) -> str:
    """The content key of a policy: the kernel build (source, config) and tools."""
    digest = hashlib.sha256(f"{SELINUX_FORMAT} {kernel_key}\0".encode())
    for tool in tools:
        digest.update(tool.encode() + b"\0")
    return digest.hexdigest()[:16]


def policy_archive(policy: bytes) -> bytes:
    """A newc cpio with the binary policy at GUEST_POLICY."""
    cpio = CpioWriter()
    parts = GUEST_POLICY.strip("/").split("/")
    for depth in range(1, len(parts)):
        cpio.directory("/".join(parts[:depth]))
    cpio.file("/".join(parts), policy, 0o644)
    return cpio.finish()


# -- building ----------------------------------------------------------------


def build_policy(
    arch: Arch,
    kernel: KernelImage,
    source: KernelSource,
    cache: LabCache,
    progress: Progress,
) -> SelinuxPolicy:
    """The dummy policy for kernel, built from source: cached or built now."""
    config = kernel.config.read_text()
    if config_value(config, "CONFIG_SECURITY_SELINUX") != "y":
        raise BuildError(
            f"kernel {kernel.entry} is built without SELinux "
            "(CONFIG_SECURITY_SELINUX is not y)",
            kernel.config,
        )
    tools = _tool_versions()
    name = f"{arch.name}-{policy_key(kernel.key, tools)}"
    entry = cache.entry(
        "selinux",
        name,
        lambda scratch: _fill(arch, kernel, source, progress, tools, scratch),
    )
    manifest = json.loads((entry / "manifest.json").read_text())
    return SelinuxPolicy(
        arch.name,
        entry,
        entry / "policy.bin",
        entry / "selinux.cpio.gz",
        int(manifest["policy_version"]),
        tuple(manifest["dropped_policycaps"]),
    )


def boot_initrd(
    arch: Arch,
    kernel: KernelImage,
    source: KernelSource,
    initramfs: Path,
    cache: LabCache,
    progress: Progress,
) -> Path:
    """The guest bundle's initramfs followed by the policy's archive.

    The kernel unpacks concatenated archives one after the other, so the
    bundle file is left as it is; the pair is written once per content.
    """
    policy = build_policy(arch, kernel, source, cache, progress)
    return cache.joined_initrd(initramfs, policy.archive)


def _fill(
    arch: Arch,
    kernel: KernelImage,
    source: KernelSource,
    progress: Progress,
    tools: list[str],
    scratch: Path,
) -> dict[str, object]:
    """Build the policy into scratch; returns the entry's manifest."""
    progress.phase(f"pack {arch.name}: dummy SELinux policy for {kernel.release}")
    started = time.monotonic()
    tree = scratch / "tree"
    _copy_mdp_sources(source, tree)
    generated = tree / "include" / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    (generated / "autoconf.h").write_text(autoconf_header(kernel.config.read_text()))

    mdp = scratch / "mdp"
    _run(
        [HOST_CC, *MDP_CFLAGS, "-o", str(mdp), "scripts/selinux/mdp/mdp.c"],
        "mdp (make dummy policy) did not build",
        cwd=tree,
    )
    conf = scratch / "policy.conf"
    _run(
        [str(mdp), str(conf), str(scratch / "file_contexts")],
        "mdp did not write a policy",
    )
    version = min(
        kernel_policy_max((tree / SECURITY_H).read_text()),
        checkpolicy_max(tools[1]),
    )
    dropped = _compile_policy(conf, scratch / "policy.bin", version)
    if dropped:
        progress.warn(
            f"pack {arch.name}: {CHECKPOLICY} does not know the kernel's policy "
            f"capabilities {', '.join(dropped)}; the policy leaves them out "
            "(the kernel keeps their older behaviour)"
        )
    with gzip.GzipFile(scratch / "selinux.cpio.gz", "wb", mtime=0) as f:
        f.write(policy_archive((scratch / "policy.bin").read_bytes()))

    shutil.rmtree(tree)
    mdp.unlink()
    log.info("pack %s: SELinux policy in %.1f s", arch.name, time.monotonic() - started)
    return {
        "arch": arch.name,
        "kernel_key": kernel.key,
        "source": source.describe(),
        "tools": tools,
        "policy_version": version,
        "dropped_policycaps": dropped,
        "guest_path": GUEST_POLICY,
    }


def _copy_mdp_sources(source: KernelSource, tree: Path) -> None:
    """Only what mdp is built from; the class map is the unpatched source's
    (no patch of the lab's series touches security/selinux/include)."""
    tree.mkdir()
    if source.is_tarball:
        # Without matching slashes, "*" is the tarball's top directory only.
        patterns = [f"*/{path}" for path in MDP_PATHS]
        _run(
            [
                "tar",
                "-xf",
                str(source.path),
                "-C",
                str(tree),
                "--strip-components=1",
                "--wildcards",
                "--no-wildcards-match-slash",
                *patterns,
            ],
            f"could not unpack mdp's sources from {source.path}",
        )
        return
    for path in MDP_PATHS:
        shutil.copytree(source.path / path, tree / path, symlinks=True)


def _compile_policy(conf: Path, out: Path, version: int) -> list[str]:
    """checkpolicy conf into out; returns the capabilities it had to leave out."""
    dropped: list[str] = []
    argv = [CHECKPOLICY, "-c", str(version), "-o", str(out), str(conf)]
    while True:
        log.info("pack: %s", shlex.join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 0:
            return dropped
        output = proc.stderr + proc.stdout
        cap = unknown_policycap(output)
        if cap is None or cap in dropped or len(dropped) >= MAX_DROPPED_CAPS:
            raise BuildError(
                f"checkpolicy did not compile the dummy policy (exit "
                f"{proc.returncode})",
                conf,
                output[-3000:],
            )
        dropped.append(cap)
        conf.write_text(drop_policycap(conf.read_text(), cap))


def _tool_versions() -> list[str]:
    """The host compiler mdp is built with, and checkpolicy's -V."""
    if shutil.which(CHECKPOLICY) is None:
        raise ToolMissing(
            f"{CHECKPOLICY} not found: the SELinux policy needs it; "
            "install it: apt-get install checkpolicy"
        )
    proc = subprocess.run([CHECKPOLICY, "-V"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolMissing(f"{CHECKPOLICY} -V failed: {proc.stderr.strip()}")
    # Its -V is the bare version line ("33 (compatibility range 33-15)").
    return [compiler_version(HOST_CC), proc.stdout.strip()]


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    log.info("pack: %s", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise BuildError(
            f"{what} (exit {proc.returncode})",
            None,
            (proc.stderr or proc.stdout)[-3000:],
        )


# -- the SELinux boot --------------------------------------------------------

SELINUXFS = "/sys/fs/selinux"


def _variant_initrd(run: LabRun, arch: Arch, kernel: KernelImage, base: Path) -> Path:
    return boot_initrd(arch, kernel, run.source, base, run.cache, run.progress)


def _variant_cmdline(kernel: KernelImage) -> tuple[str, ...]:
    return boot_cmdline(kernel.config.read_text())


def _variant_setup(guest: BootedGuest) -> ProgramRun:
    """Mount selinuxfs, let kauditd print every record (audit marks must not
    be rate-limited away), and load the dummy policy."""
    guest.mount("selinuxfs", SELINUXFS)
    guest.write("/proc/sys/kernel/printk_ratelimit", "0")
    load = run_program(guest, "selinux_load", GUEST_POLICY)
    load.assert_ok()
    return load


# SELinux in place of Smack (both want the exclusive slot), permissive, the
# dummy policy loaded: one boot per arch shared by the SELinux checks.
BOOT = BootVariant("selinux", _variant_initrd, _variant_cmdline, _variant_setup)
