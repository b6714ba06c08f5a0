"""The test tree itself: a plain `pytest` (the README's command) must collect."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_module_names_are_unique_across_test_directories() -> None:
    """tests/unit and tests/lab are not packages: pytest imports their
    modules by basename, and two test_x.py stop collection."""
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))

    assert [name for name, count in names.items() if count > 1] == []
