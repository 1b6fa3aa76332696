"""write_atomic: whole old or whole new file, no temp left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from store_forward.atomic import write_atomic


def test_write_atomic_creates_and_replaces_a_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    write_atomic(target, b"two" * 100_000, mode=0o600)
    assert target.read_bytes() == b"two" * 100_000
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    (tmp_path / "blocker").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "blocker", b"new")  # rename over a directory fails after the temp write
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["blocker", "state.json"]
