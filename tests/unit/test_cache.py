"""LabCache: one holder per key lock across processes; the memo file."""

from __future__ import annotations

import hashlib
import multiprocessing
from multiprocessing.synchronize import Event
from pathlib import Path

from lab.cache import LabCache, file_sha256


def take_lock(root: Path, name: str, got: Event) -> None:
    with LabCache(root).lock(name):
        got.set()


def test_second_process_waits_for_the_key_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    cache = LabCache(tmp_path)
    got = ctx.Event()

    with cache.lock("x86_64-0123456789abcdef"):
        other = ctx.Process(
            target=take_lock, args=(tmp_path, "x86_64-0123456789abcdef", got)
        )
        other.start()
        assert not got.wait(0.5), "another process took a lock that is held"

    assert got.wait(5.0), "the other process did not get the lock once it was free"
    other.join(5.0)
    assert other.exitcode == 0


def test_other_keys_are_not_blocked(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    cache = LabCache(tmp_path)
    got = ctx.Event()

    with cache.lock("x86_64-0123456789abcdef"):
        other = ctx.Process(
            target=take_lock, args=(tmp_path, "x86_64-fedcba9876543210", got)
        )
        other.start()
        assert got.wait(5.0)
    other.join(5.0)


def test_memo_round_trips_and_ignores_garbage(tmp_path: Path) -> None:
    cache = LabCache(tmp_path)
    assert cache.read_memo() == {}

    cache.write_memo({"kvm-probe:x": {"works": False, "reason": "hang"}})
    assert cache.read_memo() == {"kvm-probe:x": {"works": False, "reason": "hang"}}

    (tmp_path / "memo.json").write_text("{half a memo")
    assert cache.read_memo() == {}


def test_memo_file_hash_is_the_sha256_and_follows_changes(tmp_path: Path) -> None:
    cache = LabCache(tmp_path / "cache")
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"one")
    assert cache.memo_file_hash(tarball) == hashlib.sha256(b"one").hexdigest()

    tarball.write_bytes(b"two, longer")

    assert cache.memo_file_hash(tarball) == hashlib.sha256(b"two, longer").hexdigest()
    assert file_sha256(tarball) == hashlib.sha256(b"two, longer").hexdigest()


def test_remember_keeps_what_another_run_wrote_meanwhile(tmp_path: Path) -> None:
    mine, theirs = LabCache(tmp_path), LabCache(tmp_path)
    stale = mine.read_memo()

    theirs.remember("kvm-probe:x86_64", {"works": False, "reason": "hang"})
    mine.remember("sha256:/src.tar.xz", "abc")

    assert stale == {}
    assert mine.read_memo() == {
        "kvm-probe:x86_64": {"works": False, "reason": "hang"},
        "sha256:/src.tar.xz": "abc",
    }
