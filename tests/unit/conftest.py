"""Shared fixtures of the unit tests: golden console logs, a quiet Progress."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lab.progress import Progress, quiet

DATA = Path(__file__).parent / "data"


@pytest.fixture
def golden() -> Callable[[str], str]:
    """Reads a console log under tests/unit/data by name: golden("panic")."""

    def read(name: str) -> str:
        return (DATA / f"{name}.log").read_text()

    return read


@pytest.fixture
def progress() -> Progress:
    return quiet()
