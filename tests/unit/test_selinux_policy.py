"""lab/selinux.py without building: the kernel's config and headers read,
the boot's LSM order, the cache key, the archive, the console checks.

The archive is read back with the system's cpio, listing only (-t) or to
stdout: nothing is extracted on the host.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from kernels import EXPANDED_KERNEL

from lab import selinux
from lab.arches import X86_64
from lab.cache import LabCache
from lab.errors import BuildError, ToolMissing
from lab.kbuild import KernelSource
from lab.progress import Progress

CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_CC_VERSION_TEXT="gcc (Debian 12.2.0-14) 12.2.0"
CONFIG_TMPFS=y
CONFIG_EXT4_FS=m
CONFIG_NR_CPUS=8
CONFIG_PHYSICAL_START=0x1000000
# CONFIG_XFS_FS is not set
CONFIG_SECURITY_SELINUX=y
CONFIG_LSM="lockdown,yama,smack,selinux,labtest,bpf"
"""

SECURITY_H = """\
#define POLICYDB_VERSION_BASE		     15
#define POLICYDB_VERSION_GLBLUB		     32
#define POLICYDB_VERSION_COMP_FTRANS	     33 /* compressed filename transitions */

/* Range of policy versions we understand*/
#define POLICYDB_VERSION_MIN POLICYDB_VERSION_BASE
#define POLICYDB_VERSION_MAX POLICYDB_VERSION_COMP_FTRANS
"""

# As the kernel prints them through kauditd when no audit daemon runs.
AVC_LINE = (
    "[    3.141592] audit: type=1400 audit(1796407756.460:3): avc:  denied  "
    '{ setsched } for  pid=71 comm="affinity" scontext=user_u:base_r:base_t '
    "tcontext=user_u:base_r:base_t tclass=process permissive=1"
)
LOAD_LINE = (
    "[    2.462897] audit: type=1403 audit(1796407756.460:2): auid=4294967295 "
    "ses=4294967295 lsm=selinux res=1"
)


def test_config_value_reads_strings_numbers_and_unset_symbols() -> None:
    assert selinux.config_value(CONFIG, "CONFIG_LSM") == (
        "lockdown,yama,smack,selinux,labtest,bpf"
    )
    assert selinux.config_value(CONFIG, "CONFIG_NR_CPUS") == "8"
    assert selinux.config_value(CONFIG, "CONFIG_XFS_FS") is None
    assert selinux.config_value(CONFIG, "CONFIG_NOWHERE") is None


def test_autoconf_header_defines_what_kconfig_would() -> None:
    header = selinux.autoconf_header(CONFIG).splitlines()

    assert "#define CONFIG_TMPFS 1" in header
    assert "#define CONFIG_EXT4_FS_MODULE 1" in header
    assert "#define CONFIG_NR_CPUS 8" in header
    assert "#define CONFIG_PHYSICAL_START 0x1000000" in header
    assert '#define CONFIG_LSM "lockdown,yama,smack,selinux,labtest,bpf"' in header
    assert not [line for line in header if "XFS" in line]


def test_kernel_policy_max_follows_the_named_version() -> None:
    assert selinux.kernel_policy_max(SECURITY_H) == 33


def test_kernel_policy_max_takes_a_plain_number() -> None:
    assert selinux.kernel_policy_max("#define POLICYDB_VERSION_MAX 31\n") == 31


def test_kernel_policy_max_without_the_define_is_a_build_error() -> None:
    with pytest.raises(BuildError, match="POLICYDB_VERSION_MAX"):
        selinux.kernel_policy_max("#define POLICYDB_VERSION_BASE 15\n")


def test_checkpolicy_max_reads_its_version_line() -> None:
    assert selinux.checkpolicy_max("33 (compatibility range 33-15)\n") == 33


def test_checkpolicy_max_refuses_an_unknown_answer() -> None:
    with pytest.raises(ToolMissing, match="checkpolicy -V"):
        selinux.checkpolicy_max("checkpolicy: unknown option\n")


def test_unknown_policycap_is_read_from_checkpolicys_error() -> None:
    stderr = (
        "policy.conf:2223:ERROR 'invalid policy capability name "
        "userspace_initial_context' at token ';' on line 2223:\n"
        "checkpolicy:  error(s) encountered while parsing configuration\n"
    )

    assert selinux.unknown_policycap(stderr) == "userspace_initial_context"
    assert selinux.unknown_policycap("ERROR 'syntax error' at token") is None


def test_drop_policycap_removes_only_that_capability() -> None:
    conf = (
        "policycap open_perms;\npolicycap ioctl_skip_cloexec;\n"
        "policycap ioctl_skip_cloexec_more;\ntype base_t;\n"
    )

    assert selinux.drop_policycap(conf, "ioctl_skip_cloexec") == (
        "policycap open_perms;\npolicycap ioctl_skip_cloexec_more;\ntype base_t;\n"
    )


@pytest.mark.parametrize(
    ("config_lsm", "order"),
    [
        (
            "lockdown,yama,smack,selinux,labtest,bpf",
            "lockdown,yama,selinux,labtest,bpf",
        ),
        ("apparmor,labtest", "selinux,labtest"),
        ("selinux,labtest", "selinux,labtest"),
        ("", "selinux"),
    ],
)
def test_lsm_order_gives_selinux_the_exclusive_slot(
    config_lsm: str, order: str
) -> None:
    assert selinux.lsm_order(config_lsm) == order


def test_boot_cmdline_is_the_kernels_order_with_selinux_permissive() -> None:
    assert selinux.boot_cmdline(CONFIG) == (
        "lsm=lockdown,yama,selinux,labtest,bpf",
        "enforcing=0",
    )


def test_policy_key_is_stable_and_changes_with_each_input() -> None:
    tools = ["gcc (Debian 12.2.0-14) 12.2.0", "33 (compatibility range 33-15)"]
    key = selinux.policy_key("k" * 64, tools)

    assert key == selinux.policy_key("k" * 64, list(tools))
    assert len(key) == 16
    assert selinux.policy_key("j" * 64, tools) != key
    assert selinux.policy_key("k" * 64, [tools[0], "34 (compat 34-15)"]) != key
    assert selinux.policy_key("k" * 64, ["gcc 13", tools[1]]) != key


def test_policy_archive_holds_the_policy_at_its_guest_path() -> None:
    archive = selinux.policy_archive(b"\x8c\xff\x7c\xf9policy")

    listing = subprocess.run(
        ["cpio", "--quiet", "-t"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    content = subprocess.run(
        ["cpio", "--quiet", "-i", "--to-stdout", "etc/selinux/lab-policy"],
        input=archive,
        capture_output=True,
        check=True,
    ).stdout

    assert listing.split() == ["etc", "etc/selinux", "etc/selinux/lab-policy"]
    assert content == b"\x8c\xff\x7c\xf9policy"
    assert selinux.GUEST_POLICY == "/etc/selinux/lab-policy"


def test_avc_denials_finds_denials_among_console_lines() -> None:
    console = f"@@LAB:BEGIN 7@@\r\n{AVC_LINE}\r\n{LOAD_LINE}\r\n@@LAB:END 7 rc=0@@\n"

    assert selinux.avc_denials(console) == [AVC_LINE]
    assert selinux.avc_denials(LOAD_LINE + "\navc:  granted  { setsched }\n") == []


def test_policy_load_audited_needs_a_successful_selinux_load() -> None:
    assert selinux.policy_load_audited(f"boot\n{LOAD_LINE}\n")
    assert not selinux.policy_load_audited(LOAD_LINE.replace("res=1", "res=0"))
    assert not selinux.policy_load_audited("SELinux:  Initializing.\n")


def test_build_policy_refuses_a_kernel_without_selinux(
    tmp_path: Path, progress: Progress
) -> None:
    config = tmp_path / "config"
    config.write_text(CONFIG.replace("CONFIG_SECURITY_SELINUX=y\n", ""))
    kernel = replace(EXPANDED_KERNEL, config=config)
    source = KernelSource(tmp_path / "linux.tar.xz", None)

    with pytest.raises(BuildError, match="without SELinux"):
        selinux.build_policy(
            X86_64, kernel, source, LabCache(tmp_path / "cache"), progress
        )


def test_build_policy_names_the_package_of_a_missing_checkpolicy(
    tmp_path: Path, progress: Progress, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    config.write_text(CONFIG)
    kernel = replace(EXPANDED_KERNEL, config=config)
    source = KernelSource(tmp_path / "linux.tar.xz", None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    with pytest.raises(ToolMissing, match="apt-get install checkpolicy"):
        selinux.build_policy(
            X86_64, kernel, source, LabCache(tmp_path / "cache"), progress
        )
