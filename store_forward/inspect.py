"""Read-only views of a queue file for operators: `edge-agent buffer stats|peek|export|gaps --db F`.

Everything here opens the database read-only and takes no writer lock, so it is safe beside a running
agent (WAL readers see the last committed state and never block the writer). Leases are the writer's
memory and are not visible. Returned values are JSON-ready dicts. Payloads are shown as UTF-8 text
when they decode as such, else base64 (`payload_encoding` says which), so an export is lossless.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import sqlite_utils

from store_forward.model import DEFAULT_LIVE_WINDOW_S, Gap, Priority, StoredRecord
from store_forward.sqlite import open_readonly


def stats(path: str | os.PathLike[str], *, audit: bool = False,
          live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> dict[str, Any]:
    """Queue totals from the counters row (O(1)); with audit, also recount rows and run quick_check and
    split the records into the live lane and the backlog (O(n))."""
    with open_readonly(path) as store:
        snap = store.snapshot()
        db = sqlite_utils.Database(store.conn)
        out: dict[str, Any] = {
            "path": snap.path,
            "generation": snap.generation,
            "schema_version": snap.schema_version,
            "created_ns": snap.created_ns,
            "depth": snap.depth,
            "bytes": snap.bytes,
            "oldest_ts_ns": snap.oldest_ts_ns,
            "next_seq": snap.next_seq,
            "appended_total": snap.appended_total,
            "appended_bytes_total": snap.appended_bytes_total,
            "acked_total": snap.acked_total,
            "rejected_total": snap.rejected_total,
            "evicted_total": snap.evicted_total,
            "by_priority": {
                p.name: {"depth": snap.depth_by_priority[p], "bytes": snap.bytes_by_priority[p]}
                for p in Priority
            },
            "file": {
                "page_size": snap.page_size,
                "page_count": snap.page_count,
                "freelist_count": snap.freelist_count,
                "db_size_bytes": snap.page_size * snap.page_count,
                "wal_size_bytes": snap.wal_size_bytes,
            },
            "tables": sorted(db.table_names()),
            "gaps_pending": len(store.gaps(limit=1_000_000)),
        }
        if audit:
            depth, size = store.recount()
            out["audit"] = {
                "quick_check": store.quick_check(),
                "counters_match_rows": depth == snap.depth_by_priority and size == snap.bytes_by_priority,
                "rows_by_priority": {p.name: {"depth": depth[p], "bytes": size[p]} for p in Priority},
            }
            live, backlog = store.lanes(time.time_ns(), live_window_s)
            out["lanes"] = {"live_window_s": live_window_s, "live": live, "backlog": backlog}
        return out


def record_to_json(rec: StoredRecord) -> dict[str, Any]:
    try:
        payload, encoding = rec.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(rec.payload).decode("ascii"), "base64"
    return {
        "generation": rec.generation,
        "seq": rec.seq,
        "kind": rec.kind,
        "priority": rec.priority.name,
        "ts_ns": rec.ts_ns,
        "enqueued_ns": rec.enqueued_ns,
        "payload_size": len(rec.payload),
        "payload_encoding": encoding,
        "payload": payload,
    }


def peek(path: str | os.PathLike[str], *, limit: int = 10,
         priority: Priority | None = None) -> list[dict[str, Any]]:
    """The next `limit` records in drain order (priority, then seq), as the forwarder would lease them."""
    with open_readonly(path) as store:
        return [record_to_json(r) for r in store.records(limit=limit, priority=priority)]


def iter_records(path: str | os.PathLike[str]) -> Iterator[StoredRecord]:
    with open_readonly(path) as store:
        yield from store.records()


def export(path: str | os.PathLike[str], output: str | os.PathLike[str] = "-") -> int:
    """Write every stored record as one JSON object per line to output ("-": stdout); returns the count."""
    with contextlib.ExitStack() as stack:
        out: TextIO
        if os.fspath(output) == "-":
            out = sys.stdout
        else:
            out = stack.enter_context(open(output, "w", encoding="utf-8"))
        n = 0
        for rec in iter_records(path):
            out.write(json.dumps(record_to_json(rec), separators=(",", ":")) + "\n")
            n += 1
        out.flush()
        return n


def gap_to_json(gap: Gap) -> dict[str, Any]:
    return {
        "gap_id": gap.gap_id,
        "generation": gap.generation,
        "first_seq": gap.first_seq,
        "last_seq": gap.last_seq,
        "priority": None if gap.priority is None else gap.priority.name,
        "reason": gap.reason.value,
        "detail": gap.detail,
        "count": gap.count,
        "recorded_ns": gap.recorded_ns,
    }


def gaps(path: str | os.PathLike[str], *, limit: int = 1000) -> list[dict[str, Any]]:
    """Gaps not yet announced upstream: what eviction dropped ("evicted") or damage lost ("lost")."""
    with open_readonly(path) as store:
        return [gap_to_json(g) for g in store.gaps(limit=limit)]
