"""Damaged stores at start-up: quarantined (never deleted), readable rows salvaged into a new generation,
the loss recorded as a gap and reported; foreign files left alone."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from store_forward.facade import AsyncQueue
from store_forward.model import GapReason, NewRecord, Priority, StoreForeign
from store_forward.policy import QueueBounds
from store_forward.salvage import StoreOpener, open_store, quarantine
from store_forward.sqlite import PAGE_SIZE, SqliteQueue


def fill(db: Path, n: int = 600, size: int = 900) -> list[bytes]:
    """A store with n records of distinct payloads (and one pending gap); returns the stored payloads."""
    payloads = [i.to_bytes(4, "big") + os.urandom(size) for i in range(n + 2)]
    with SqliteQueue(db) as q:
        q.append([NewRecord("t", p, i, Priority.BULK if i < 2 else Priority.TELEMETRY)
                  for i, p in enumerate(payloads)])
        assert q.evict(QueueBounds(max_records=n), now_s=0.0) == 2  # the two BULK records: one gap
    return payloads[2:]


def damage(db: Path, how: str) -> None:
    if how == "truncate":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 2 // PAGE_SIZE * PAGE_SIZE + 100)  # torn mid-page
    elif how == "flip":
        with open(db, "r+b") as f:
            for page in (20, 70, 110):  # flipped bytes in b-tree page headers and cell pointers
                f.seek(page * PAGE_SIZE)
                flipped = bytes(b ^ 0xFF for b in f.read(16))
                f.seek(page * PAGE_SIZE)
                f.write(flipped)
    elif how == "zero-header":
        with open(db, "r+b") as f:
            f.write(b"\0" * 100)


def quarantined(db: Path) -> list[Path]:
    return sorted(p for p in db.parent.iterdir()
                  if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


@pytest.mark.parametrize("how", ["truncate", "flip", "zero-header"])
def test_a_damaged_store_is_moved_aside_and_its_readable_rows_salvaged_into_a_new_generation(
        tmp_path: Path, how: str) -> None:
    db = tmp_path / "queue.db"
    payloads = fill(db)
    with SqliteQueue(db) as q:
        old_generation = q.stats().generation
    damage(db, how)
    damaged_bytes = db.read_bytes()

    opened = open_store(db)
    report = opened.salvage
    q = opened.queue
    try:
        assert report is not None
        (moved,) = quarantined(db)
        assert moved.read_bytes() == damaged_bytes  # kept as it was found, never deleted
        assert str(moved) == report.quarantined_path and report.path == str(db)
        assert report.new_generation == q.stats().generation != old_generation
        if how != "zero-header":
            assert report.old_generation == old_generation
        got = [r.payload for r in q.lease(10_000, now_s=0.0).records]
        # Salvaged rows are intact originals, in the old order, under new consecutive seqs.
        assert got == [p for p in payloads if p in set(got)]
        assert report.rows_salvaged == len(got) and q.stats().next_seq == len(got) + 1
        if how == "flip":
            assert 0 < len(got) < len(payloads)
        if report.rows_lost is not None:
            assert report.rows_lost == len(payloads) - len(got)
        lost = [g for g in q.pending_gaps() if g.reason is GapReason.LOST]
        assert len(lost) == 1
        assert lost[0].generation == report.old_generation or lost[0].generation == "unknown"
        assert lost[0].count == (report.rows_lost or 0)
        assert report.as_event()["event"] == "store_salvaged"
    finally:
        q.close()
    # The new store is a normal, healthy store: it reopens without another salvage.
    again = open_store(db)
    assert again.salvage is None
    again.queue.close()


def test_gaps_the_damaged_store_had_not_announced_are_carried_over(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    fill(db)
    damage(db, "flip")
    opened = open_store(db)
    try:
        evicted = [g for g in opened.queue.pending_gaps() if g.reason is GapReason.EVICTED]
        assert [(g.priority, g.count, g.detail) for g in evicted] == [(Priority.BULK, 2, "max_records")]
        assert opened.salvage is not None and opened.salvage.gaps_carried == 1
    finally:
        opened.queue.close()


def test_a_crash_with_commits_only_in_the_wal_loses_nothing_and_quarantines_nothing(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    q = SqliteQueue(db, wal_checkpoint_bytes=1 << 40)
    q.append([NewRecord("t", b"in-the-wal-%d" % i, i) for i in range(50)])
    # The process dies with its commits only in the WAL: copy the file pair as it is on disk now.
    crash = tmp_path / "crash.db"
    crash.write_bytes(db.read_bytes())
    (tmp_path / "crash.db-wal").write_bytes((tmp_path / "queue.db-wal").read_bytes())
    q.close()
    opened = open_store(crash)
    try:
        assert opened.salvage is None and quarantined(crash) == []
        assert [r.payload for r in opened.queue.lease(100, now_s=0.0).records] == [
            b"in-the-wal-%d" % i for i in range(50)]
    finally:
        opened.queue.close()


def test_quarantine_moves_the_database_with_its_wal_and_shm_under_one_timestamped_name(
        tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    for suffix, body in (("", b"db"), ("-wal", b"wal"), ("-shm", b"shm")):
        Path(str(db) + suffix).write_bytes(body)
    moved = quarantine(db, now_ns=1_700_000_000_123_456_789)
    assert moved == str(db) + ".corrupt-20231114T221320.123456Z"
    assert [Path(moved + sfx).read_bytes() for sfx in ("", "-wal", "-shm")] == [b"db", b"wal", b"shm"]
    assert not db.exists()
    db.write_bytes(b"again")
    second = quarantine(db, now_ns=1_700_000_000_123_456_789)  # same instant: a new name, nothing overwritten
    assert second != moved and Path(second).read_bytes() == b"again" and Path(moved).read_bytes() == b"db"


def test_a_foreign_database_is_refused_and_left_in_place(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE precious (x)")
    conn.close()
    with pytest.raises(StoreForeign):
        open_store(db)
    assert quarantined(db) == [] and db.exists()


async def test_the_async_facade_opens_through_the_salvaging_opener_and_exposes_the_report(
        tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    payloads = fill(db)
    damage(db, "flip")
    opener = StoreOpener(db)
    async with AsyncQueue(opener) as aq:
        assert opener.salvage is not None
        stats = await aq.stats()
        assert stats.generation == opener.salvage.new_generation
        assert 0 < stats.depth < len(payloads)
        assert await aq.append([NewRecord("t", b"after", 1)]) == [stats.next_seq]
