"""SqliteQueue.append in multi-row statements: every group size lands every field of every record once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from store_forward.model import NewRecord, Priority
from store_forward.sqlite import SqliteQueue


def records(n: int) -> list[NewRecord]:
    # Sizes, kinds, priorities and times all vary per record, so a row bound to a neighbour's
    # parameters (an off-by-one in the statement split) shows up as a field mismatch.
    return [NewRecord(f"k{i % 3}", bytes([i % 251]) * (i % 7), 1_000 + i, Priority(i % 5)) for i in range(n)]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 127, 128, 129, 144, 145, 300, 512, 513, 1000])
def test_an_append_of_any_size_stores_each_record_once_with_its_own_fields(tmp_path: Path, n: int) -> None:
    db = tmp_path / "queue.db"
    batch = records(n)
    with SqliteQueue(db, clock_ns=lambda: 42) as q:
        first = q.append([NewRecord("before", b"", 1)])
        seqs = q.append(batch)
        stats = q.stats()
    assert seqs == list(range(first[0] + 1, first[0] + 1 + n))
    assert stats.depth == n + 1
    assert stats.bytes == sum(len(r.payload) for r in batch)
    assert stats.depth_by_priority == tuple(
        sum(1 for r in batch if r.priority == p) + (p == Priority.TELEMETRY) for p in Priority)
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT seq, priority, kind, ts_ns, enqueued_ns, payload_size, payload"
                            " FROM records WHERE seq > ? ORDER BY seq", (first[0],)).fetchall()
    finally:
        conn.close()
    assert rows == [(s, int(r.priority), r.kind, r.ts_ns, 42, len(r.payload), r.payload)
                    for s, r in zip(seqs, batch, strict=True)]


def test_restore_keeps_each_records_own_enqueue_time_across_statement_boundaries(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    batch = records(145)
    stamps = [7_000 + 3 * i for i in range(145)]
    with SqliteQueue(db, clock_ns=lambda: 42) as q:
        seqs = q.restore(batch, stamps)
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT seq, enqueued_ns FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert rows == list(zip(seqs, stamps, strict=True))
