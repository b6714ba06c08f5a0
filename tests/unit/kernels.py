"""KernelImage records for tests that need a built kernel's facts only."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lab.kbuild import KernelImage

STOCK_KERNEL = KernelImage(
    arch="x86_64",
    key="0" * 64,
    entry=Path("/nonexistent/entry"),
    image=Path("/nonexistent/entry/bzImage"),
    config=Path("/nonexistent/entry/config"),
    build_log=Path("/nonexistent/entry/build.log"),
    release="6.12.118",
    hook_expanded=False,
    test_lsm=False,
    source="/usr/src/linux-source-6.12.tar.xz + series none",
    build_seconds=412.0,
    cached=True,
)

EXPANDED_KERNEL = replace(
    STOCK_KERNEL,
    key="1" * 64,
    hook_expanded=True,
    test_lsm=True,
    source="/usr/src/linux-source-6.12.tar.xz + series patches",
)
