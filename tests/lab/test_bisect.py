"""`git bisect run lab bisect` on a real history: the default 6.12 source
with the series as commits, then a harmless commit, one that drops the mask
on the generic affinity path, and another harmless one. The bisect must
name the breaking commit.

The history is made once per content and kept in the lab cache, with fixed
dates so that its commit ids, and so the kernels built for them, repeat
from run to run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.cache import LabCache
from lab.kbuild import DEFAULT_SERIES, DEFAULT_TARBALL, LAB_ROOT
from lab.remote import lab_host_args
from lab.session import LabRun

pytestmark = [pytest.mark.bisect, pytest.mark.arches("x86_64")]

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Kernel Lab",
    "GIT_AUTHOR_EMAIL": "kernel-lab@localhost",
    "GIT_COMMITTER_NAME": "Kernel Lab",
    "GIT_COMMITTER_EMAIL": "kernel-lab@localhost",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}
SYSCALLS = "kernel/sched/syscalls.c"
HISTORY = "lab-history"
LATER_COMMITS = [
    (
        "sched: say why sched_setaffinity() checks ownership first",
        SYSCALLS,
        "\tif (!check_same_owner(p)) {\n",
        "\t/* Only the owner, or CAP_SYS_NICE, may change the affinity. */\n"
        "\tif (!check_same_owner(p)) {\n",
    ),
    (
        "sched: do not hand the affinity mask to the LSM",
        SYSCALLS,
        "\tretval = security_task_setscheduler(p, in_mask",
        "\tretval = security_task_setscheduler(p, NULL",
    ),
    (
        "sched: say that __sched_setaffinity() intersects with the cpuset",
        SYSCALLS,
        "\tcpuset_cpus_allowed(p, cpus_allowed);\n\tcpumask_and(new_mask,",
        "\t/* The request is cut down to the cpuset here. */\n"
        "\tcpuset_cpus_allowed(p, cpus_allowed);\n\tcpumask_and(new_mask,",
    ),
]


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def make_history(cache: LabCache) -> tuple[Path, str, str, str]:
    """The repository, its good commit (series applied), the breaking
    commit and the bad tip. The caller holds the fixture's lock."""
    patches = (DEFAULT_SERIES / "series").read_text().split()
    digest = hashlib.sha256()
    for name in patches:
        digest.update((DEFAULT_SERIES / name).read_bytes())
    for subject, path, old, new in LATER_COMMITS:
        digest.update(f"{subject}{path}{old}{new}".encode())
    repo = cache.root / "bisect-fixture" / f"linux-6.12-{digest.hexdigest()[:12]}"
    if not (repo / ".git" / "lab-fixture-done").exists():
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        untar = ["tar", "-xf", str(DEFAULT_TARBALL), "-C", str(repo)]
        subprocess.run([*untar, "--strip-components=1"], check=True)
        git(repo, "init", "-q", "-b", HISTORY)
        # Debian's tarball ignores everything at its top level: force.
        git(repo, "add", "-f", "-A")
        git(repo, "commit", "-q", "-m", "Linux 6.12 (Debian linux-source-6.12)")
        git(repo, "am", "-q", *(str(DEFAULT_SERIES / p) for p in patches))
        for subject, path, old, new in LATER_COMMITS:
            text = (repo / path).read_text()
            assert text.count(old) == 1, f"{subject}: anchor not found once"
            (repo / path).write_text(text.replace(old, new))
            git(repo, "commit", "-q", "-a", "-m", subject)
        (repo / ".git" / "lab-fixture-done").write_text("ok\n")
    # A run interrupted mid-bisect leaves the repository bisecting.
    git(repo, "bisect", "reset", HISTORY)
    count = str(len(LATER_COMMITS) + 1)
    log = git(repo, "log", "--format=%H %s", "-n", count, HISTORY).splitlines()
    tip, breaking, good = log[0].split()[0], log[1].split()[0], log[-1].split()[0]
    assert "do not hand the affinity mask" in log[1]
    return repo, good, breaking, tip


def test_git_bisect_run_names_the_commit_that_drops_the_mask(
    lab_run: LabRun, lab_arch: str, tmp_path: Path
) -> None:
    # One bisect at a time moves the shared repository's HEAD.
    with lab_run.cache.lock("bisect-fixture", lab_run.progress):
        repo, good, breaking, tip = make_history(lab_run.cache)
        git(repo, "bisect", "start", tip, good)
        try:
            step = [sys.executable, "-m", "lab.cli", "bisect", "--arch", lab_arch]
            step += ["--lab-cache", str(lab_run.cache.root)]
            step += ["--lab-results", str(tmp_path / "results")]
            # Each step boots where this session does (--lab-host or here).
            options = lab_run.options
            step += lab_host_args(
                options.lab_host, options.lab_host_key, options.lab_host_known_hosts
            )
            started = time.monotonic()
            done = subprocess.run(
                ["git", "bisect", "run", *step],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=3600,
                # The lab under test, whatever else the environment has installed.
                env={**os.environ, "PYTHONPATH": str(LAB_ROOT)},
            )
            seconds = time.monotonic() - started
            bisect_log = git(repo, "bisect", "log")
        finally:
            git(repo, "bisect", "reset", HISTORY)

    steps = (done.stdout + done.stderr).count("lab bisect: pytest")
    head = f"# {steps} steps in {seconds:.0f} s\n"
    log = "\n".join((head, done.stdout, done.stderr, bisect_log))
    (lab_run.results.arch_dir(lab_arch) / "bisect.log").write_text(log)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"^([0-9a-f]{40}) is the first bad commit", done.stdout, re.M)
    assert found, done.stdout[-3000:]
    assert found.group(1) == breaking, f"bisect named {found.group(1)}, not {breaking}"
