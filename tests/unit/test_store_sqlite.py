"""SqliteQueue specifics: durability settings, persisted identity, typed open errors, checkpoints, inspect."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from store_forward import inspect as store_inspect
from store_forward.model import NewRecord, Priority, StoreBusy, StoreCorrupt, StoreFull
from store_forward.policy import QueueBounds
from store_forward.sqlite import PAGE_SIZE, SqliteQueue


def rec(payload: bytes = b"x", priority: Priority = Priority.TELEMETRY, ts_ns: int = 1) -> NewRecord:
    return NewRecord("t", payload, ts_ns, priority)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_a_new_store_uses_wal_flash_sized_pages_full_sync_and_no_automatic_checkpoint(db: Path) -> None:
    with SqliteQueue(db) as q:
        conn = q._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 4096
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    with SqliteQueue(db, synchronous="NORMAL") as q:
        assert q._conn is not None
        assert q._conn.execute("PRAGMA synchronous").fetchone()[0] == 1


def test_an_append_is_visible_to_another_connection_as_soon_as_it_returns(db: Path) -> None:
    with SqliteQueue(db) as q:
        seqs = q.append([rec(b"a"), rec(b"b")])
        other = raw(db)
        try:
            rows = other.execute("SELECT seq, payload FROM records ORDER BY seq").fetchall()
        finally:
            other.close()
        assert rows == [(seqs[0], b"a"), (seqs[1], b"b")]


def test_the_generation_is_created_once_and_kept_across_reopens(db: Path) -> None:
    with SqliteQueue(db) as q:
        generation = q.stats().generation
        q.append([rec()])
    with SqliteQueue(db) as q:
        assert q.stats().generation == generation
        assert q.lease(1, now_s=0.0).records[0].generation == generation
    with SqliteQueue(db.with_name("other.db")) as other:
        assert other.stats().generation != generation


def test_seqs_are_never_reused_after_the_highest_rows_are_deleted_and_the_store_reopens(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec() for _ in range(5)])
        batch = q.lease(10, now_s=0.0)
        q.settle(batch, acked=batch.seqs)
        assert q.stats().depth == 0
    with SqliteQueue(db) as q:
        assert q.append([rec()]) == [6]
        assert q.stats().next_seq == 7


def test_counters_and_totals_survive_a_reopen(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec(b"aaa", Priority.ALARM), rec(b"bb"), rec(b"c", Priority.BULK)])
        batch = q.lease(2, now_s=0.0)
        q.settle(batch, acked=[batch.seqs[0]], rejected=[batch.seqs[1]])
        q.append([rec(b"dd", Priority.BULK)])
        assert q.evict(QueueBounds(max_records=1), now_s=0.0) == 1
        before = q.stats()
    with SqliteQueue(db) as q:
        after = q.stats()
    wear = ("written_bytes", "written_source", "write_amplification", "written_bytes_per_hour")
    assert {k: v for k, v in asdict(after).items() if k not in wear} == {
        k: v for k, v in asdict(before).items() if k not in wear}  # wear is measured per opening
    assert (after.depth, after.bytes, after.acked_total, after.rejected_total) == (1, 2, 1, 1)  # "dd" left
    assert (after.evicted_total, after.next_seq) == (1, 5)


def test_leases_are_forgotten_on_reopen_so_every_unsettled_record_is_leased_again(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec(b"a"), rec(b"b")])
        q.lease(10, now_s=0.0, lease_s=3600.0)
        assert q.lease(10, now_s=1.0).records == ()
    with SqliteQueue(db) as q:
        again = q.lease(10, now_s=1.0)
        assert [r.payload for r in again.records] == [b"a", b"b"]
        assert [r.attempts for r in again.records] == [1, 1]


def test_a_second_writer_on_the_same_file_is_refused_until_the_first_closes(db: Path) -> None:
    first = SqliteQueue(db)
    with pytest.raises(StoreBusy, match="another process"):
        SqliteQueue(db)
    first.append([rec()])  # the refused open did not disturb the owner's locks
    first.close()
    with SqliteQueue(db) as second:
        assert second.stats().depth == 1


def test_a_file_that_is_not_a_database_raises_store_corrupt(db: Path) -> None:
    db.write_bytes(b"this is not an sqlite database, just some bytes " * 200)
    with pytest.raises(StoreCorrupt):
        SqliteQueue(db)


def test_a_foreign_sqlite_database_is_refused_untouched(db: Path) -> None:
    conn = raw(db)
    conn.execute("CREATE TABLE precious (x)")
    conn.close()
    with pytest.raises(StoreCorrupt, match="not a fieldgate queue"):
        SqliteQueue(db)
    conn = raw(db)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["precious"]
    conn.close()


def test_a_store_from_a_newer_schema_is_refused(db: Path) -> None:
    SqliteQueue(db).close()
    conn = raw(db)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreCorrupt, match="newer"):
        SqliteQueue(db)


def test_a_high_water_mark_below_the_stored_seqs_is_refused_as_corrupt(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec(), rec()])
    conn = raw(db)
    conn.execute("UPDATE counters SET next_seq = 2")
    conn.close()
    with pytest.raises(StoreCorrupt, match="high-water mark"):
        SqliteQueue(db)


def test_a_truncated_database_raises_store_corrupt(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec(os.urandom(3000)) for _ in range(200)])
    size = db.stat().st_size
    assert size > 20 * PAGE_SIZE
    with open(db, "r+b") as f:
        f.truncate(4 * PAGE_SIZE)
    with pytest.raises(StoreCorrupt):
        q = SqliteQueue(db, integrity="quick")
        q.lease(1000, now_s=0.0)  # reached only if the open-time check missed the damage


def test_a_damaged_record_page_is_found_by_the_optional_integrity_check(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec(os.urandom(1000)) for _ in range(100)])
    with open(db, "r+b") as f:
        f.seek(10 * PAGE_SIZE)
        f.write(b"\xff" * PAGE_SIZE)
    with pytest.raises(StoreCorrupt):
        SqliteQueue(db, integrity="quick")


def test_a_failed_append_stores_nothing_and_hands_out_no_seq(db: Path) -> None:
    with SqliteQueue(db) as q:
        q.append([rec(b"first")])
        assert q._conn is not None
        pages = q._conn.execute("PRAGMA page_count").fetchone()[0]
        q._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is "full" now
        with pytest.raises(StoreFull):
            q.append([rec(os.urandom(50_000))])
        s = q.stats()
        assert (s.depth, s.next_seq, s.appended_total) == (1, 2, 1)
        q._conn.execute("PRAGMA max_page_count = 1000000")
        assert q.append([rec(b"second")]) == [2]


def test_checkpoints_keep_the_wal_small_under_a_stream_of_commits(tmp_path: Path) -> None:
    def wal_size_after_commits(name: str, wal_checkpoint_bytes: int) -> int:
        path = tmp_path / name
        with SqliteQueue(path, synchronous="NORMAL", wal_checkpoint_bytes=wal_checkpoint_bytes) as q:
            for i in range(150):
                q.append([rec(bytes([i % 256]) * 8000)])
            return os.path.getsize(str(path) + "-wal")

    assert wal_size_after_commits("checkpointed.db", 64 * 1024) < 512 * 1024
    assert wal_size_after_commits("unchecked.db", 1 << 40) > 1024 * 1024  # no checkpoint: the WAL grows


def test_an_idle_checkpoint_moves_committed_pages_into_the_database_file(db: Path) -> None:
    with SqliteQueue(db, wal_checkpoint_bytes=1 << 40) as q:
        q.append([rec(os.urandom(4000)) for _ in range(50)])
        size_before = db.stat().st_size
        q.checkpoint()
        assert db.stat().st_size > size_before + 50 * 4000


def test_inspection_reads_a_store_while_the_writer_has_it_open(db: Path, tmp_path: Path) -> None:
    binary = bytes(range(256))
    with SqliteQueue(db) as q:
        q.append([rec(b'{"v": 1}', Priority.ALARM, ts_ns=7), rec(binary, ts_ns=8), rec(b"zz", Priority.BULK)])
        stats = store_inspect.stats(db, audit=True)
        assert stats["depth"] == 3 and stats["next_seq"] == 4
        assert stats["by_priority"]["ALARM"] == {"depth": 1, "bytes": 8}
        assert stats["audit"]["counters_match_rows"] is True
        assert stats["audit"]["quick_check"] == ["ok"]
        peeked = store_inspect.peek(db, limit=2)
        assert [(p["seq"], p["priority"], p["payload"]) for p in peeked] == [
            (1, "ALARM", '{"v": 1}'),
            (2, "TELEMETRY", base64.b64encode(binary).decode()),
        ]
        out = tmp_path / "export.jsonl"
        assert store_inspect.export(db, out) == 3
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert base64.b64decode(lines[1]["payload"]) == binary
        assert lines[1]["payload_encoding"] == "base64"
        q.append([rec()])  # the reader left the writer free to go on
        assert q.stats().depth == 4


def test_inspecting_a_foreign_database_raises_store_corrupt(db: Path) -> None:
    conn = raw(db)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreCorrupt):
        store_inspect.stats(db)


def test_a_schema_1_store_is_migrated_to_gaps_on_open_keeping_its_records(db: Path) -> None:
    with SqliteQueue(db) as q:
        generation = q.stats().generation
        q.append([rec(b"a"), rec(b"b")])
    conn = raw(db)
    conn.execute("DROP TABLE gaps")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    assert store_inspect.gaps(db) == []  # inspection copes with the old schema
    with SqliteQueue(db) as q:
        assert q.schema_version == 2 and q.stats().generation == generation
        assert q.evict(QueueBounds(max_records=1), now_s=0.0) == 1
        assert [g.count for g in q.pending_gaps()] == [1]


def test_inspection_shows_gaps_and_the_live_backlog_split(db: Path) -> None:
    now = [10**18]
    with SqliteQueue(db, clock_ns=lambda: now[0]) as q:
        q.append([rec(b"old", Priority.BULK), rec(b"old2", Priority.BULK)])
        assert q.evict(QueueBounds(max_records=1), now_s=0.0) == 1
    (gap,) = store_inspect.gaps(db)
    got = (gap["priority"], gap["reason"], gap["detail"], gap["count"])
    assert got == ("BULK", "evicted", "max_records", 1)
    stats = store_inspect.stats(db, audit=True)
    assert stats["gaps_pending"] == 1
    assert stats["lanes"]["backlog"] == 1 and stats["lanes"]["live"] == 0  # enqueued "long ago"


def test_stats_report_flash_wear_since_the_store_opened(db: Path) -> None:
    with SqliteQueue(db) as q:
        assert q.stats().write_amplification is None  # nothing appended yet
        q.append([rec(os.urandom(256)) for _ in range(400)])
        s = q.stats()
        assert s.written_source in ("proc", "files") and s.written_bytes > 0
        assert s.write_amplification is not None and s.write_amplification > 0.5
