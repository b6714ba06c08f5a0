"""`lab bisect`: one `git bisect run` step.

Builds the tree as it is checked out (plus the lab's test LSM where it
fits), runs the selected checks and turns the run into git bisect's exit
codes: 0 good, 1 bad (a check failed, the kernel crashed or hung, or the
hook is not expanded), 125 skip (the tree does not build, or the lab could
not run: a missing tool, QEMU's own failure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GOOD, BAD, SKIP = 0, 1, 125
# git bisect run stops at an exit status above 127: for the user's mistakes
# (an unknown arch, a selection that matches no check), which would
# otherwise skip every commit.
ABORT = 128
# Phases where a failure says nothing about the commit under test.
LAB_PHASES = {"build", "setup", "accel", "remote"}


def verdict(pytest_status: int, summary: dict[str, Any] | None) -> tuple[int, str]:
    """git bisect's exit code for a run, and why."""
    if pytest_status == 2:
        return ABORT, "interrupted, or pytest could not start"
    if pytest_status == 4:
        return ABORT, "usage error in the pytest arguments"
    if pytest_status == 5:
        return ABORT, "the selection matches no check (-m/-k)"
    if pytest_status == 3:
        return SKIP, "pytest failed itself (internal error)"
    if summary is None or not summary.get("checks"):
        return SKIP, "no check ran"

    checks = summary["checks"]
    for check in checks:
        if check["outcome"] == "error" and check.get("phase") in LAB_PHASES:
            return SKIP, f"{check['phase']} failed: {check['message']}"
    for check in checks:
        if check["outcome"] == "error" and not check.get("kernel_fault"):
            return SKIP, f"the lab could not run {check['name']}: {check['message']}"
    bad = [c for c in checks if c["outcome"] in ("failed", "error")]
    if bad:
        names = ", ".join(c["name"] for c in bad)
        return BAD, f"{len(bad)} check(s) failed: {names}"
    if all(c["outcome"] == "skipped" for c in checks):
        return SKIP, "every check was skipped"
    return GOOD, f"{len(checks)} check(s) passed"


def read_summary(results_root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((results_root / "latest" / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
