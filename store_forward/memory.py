"""The `Queue` contract in memory: same ordering, leases and accounting as SQLite, no durability.

For tests, benchmarks and deployments that choose RAM over flash wear. Records live in one dict per
priority; dicts keep insertion order and seqs are appended in increasing order, so each dict is already
in drain order and deletes are O(1).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from store_forward.leases import LeaseBook, choose, split_settlement
from store_forward.model import (
    DEFAULT_LIVE_WINDOW_S,
    PRIORITY_COUNT,
    Batch,
    Gap,
    GapReason,
    Lane,
    NewRecord,
    Priority,
    QueueStats,
    StoreClosed,
    StoredRecord,
    validate_lease_args,
    validate_new_records,
)
from store_forward.policy import (
    CAUSE_DISK_FULL,
    Candidate,
    QueueBounds,
    live_cutoff_ns,
    plan_eviction,
    spans_of,
)


class MemoryQueue:
    """Volatile queue with the same contract as `SqliteQueue`; a new instance is a new generation."""

    def __init__(self, *, clock_ns: Callable[[], int] = time.time_ns, generation: str | None = None) -> None:
        self._clock_ns = clock_ns
        self.generation = generation if generation is not None else secrets.token_hex(8)
        self._lanes: list[dict[int, StoredRecord]] = [{} for _ in range(PRIORITY_COUNT)]
        self._where: dict[int, int] = {}  # seq -> priority, to delete by seq
        self._book = LeaseBook()
        self._next_seq = 1
        self._bytes = 0
        self._appended_total = 0
        self._appended_bytes_total = 0
        self._acked_total = 0
        self._rejected_total = 0
        self._evicted_total = 0
        self._gaps: dict[int, Gap] = {}
        self._next_gap_id = 1
        self._closed = False

    def append(self, records: Sequence[NewRecord], *,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        self._check_open()
        validate_new_records(records)
        if before_commit is not None:
            before_commit()  # nothing below can fail: this is the memory queue's "commit point"
        enqueued_ns = self._clock_ns()
        seqs: list[int] = []
        for r in records:
            seq = self._next_seq
            self._next_seq += 1
            self._lanes[r.priority][seq] = StoredRecord(
                self.generation, seq, r.kind, r.payload, r.ts_ns, r.priority, enqueued_ns, 0)
            self._where[seq] = r.priority
            self._bytes += len(r.payload)
            self._appended_bytes_total += len(r.payload)
            seqs.append(seq)
        self._appended_total += len(seqs)
        return seqs

    def _drain_order(self, lane: Lane, cutoff_ns: int) -> Iterator[tuple[int, int]]:
        for records in self._lanes:
            for seq, rec in records.items():
                if lane is Lane.ANY or (rec.enqueued_ns >= cutoff_ns) == (lane is Lane.LIVE):
                    yield seq, len(rec.payload)

    def lease(self, max_items: int, now_s: float, *, max_bytes: int | None = None,
              lease_s: float = 60.0, lane: Lane = Lane.ANY,
              live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> Batch:
        self._check_open()
        validate_lease_args(max_items, max_bytes, lease_s, lane, live_window_s)
        self._book.observe(now_s)
        cutoff_ns = live_cutoff_ns(self._clock_ns(), live_window_s)
        seqs = choose(self._drain_order(lane, cutoff_ns), self._book, now_s, max_items, max_bytes)
        if not seqs:
            return Batch(0, (), self.generation, now_s, lane is Lane.BACKLOG)
        lease_id, expires_s = self._book.grant(seqs, now_s, lease_s)
        out = []
        for seq in seqs:
            rec = self._lanes[self._where[seq]][seq]
            out.append(StoredRecord(rec.generation, seq, rec.kind, rec.payload, rec.ts_ns, rec.priority,
                                    rec.enqueued_ns, self._book.attempts(seq)))
        historical = lane is Lane.BACKLOG or (
            lane is Lane.ANY and any(r.enqueued_ns < cutoff_ns for r in out))
        return Batch(lease_id, tuple(out), self.generation, expires_s, historical)

    def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None:
        self._check_open()
        acked_l, rejected_l, released = split_settlement(batch, self.generation, acked, rejected)
        self._acked_total += self._delete(acked_l)
        self._rejected_total += self._delete(rejected_l)
        self._book.forget(acked_l)
        self._book.forget(rejected_l)
        self._book.release(batch.lease_id, released)

    def _delete(self, seqs: list[int]) -> int:
        # A seq may already be gone (settled through an older, expired lease): count only real deletes.
        n = 0
        for seq in seqs:
            prio = self._where.pop(seq, None)
            if prio is None:
                continue
            rec = self._lanes[prio].pop(seq)
            self._bytes -= len(rec.payload)
            n += 1
        return n

    def stats(self) -> QueueStats:
        self._check_open()
        heads = [next(iter(lane.values())) for lane in self._lanes if lane]
        oldest = min(heads, key=lambda r: r.seq).ts_ns if heads else None
        return QueueStats(
            generation=self.generation,
            depth=len(self._where),
            bytes=self._bytes,
            oldest_ts_ns=oldest,
            next_seq=self._next_seq,
            leased=self._book.held_count(),
            appended_total=self._appended_total,
            settled_total=self._acked_total + self._rejected_total,
            acked_total=self._acked_total,
            rejected_total=self._rejected_total,
            depth_by_priority=tuple(len(lane) for lane in self._lanes),
            appended_bytes_total=self._appended_bytes_total,
            evicted_total=self._evicted_total,
            gaps_pending=len(self._gaps),
        )

    def evict(self, bounds: QueueBounds, now_s: float, *, free_bytes: int = 0) -> int:
        self._check_open()
        self._book.observe(now_s)
        book = self._book
        lanes = (
            (Candidate(seq, r.priority, len(r.payload), r.enqueued_ns, not book.is_free(seq, now_s))
             for seq, r in self._lanes[p].items())
            for p in bounds.eviction_order()
        )
        # Memory has no disk floor of its own: min_free_disk_bytes is a SQLite concern.
        now_ns = self._clock_ns()
        victims = plan_eviction(lanes, depth=len(self._where), size_bytes=self._bytes, now_ns=now_ns,
                                bounds=bounds, deficit_bytes=free_bytes, deficit_cause=CAUSE_DISK_FULL)
        seqs = [v.seq for v in victims]
        n = self._delete(seqs)
        self._book.forget(seqs)
        self._evicted_total += n
        for span in spans_of(victims):
            self._add_gap(span.first_seq, span.last_seq, span.priority, GapReason.EVICTED, span.cause,
                          span.count, now_ns)
        return n

    def _add_gap(self, first_seq: int, last_seq: int, priority: Priority | None, reason: GapReason,
                 detail: str, count: int, now_ns: int, generation: str | None = None) -> None:
        gap_id = self._next_gap_id
        self._next_gap_id += 1
        self._gaps[gap_id] = Gap(gap_id, generation or self.generation, first_seq, last_seq, priority,
                                 reason, detail, count, now_ns)

    def pending_gaps(self, limit: int = 100) -> list[Gap]:
        self._check_open()
        return list(self._gaps.values())[:limit]

    def settle_gap(self, gap_id: int) -> None:
        self._check_open()
        self._gaps.pop(gap_id, None)

    def checkpoint(self) -> None:
        self._check_open()

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("queue is closed")


__all__ = ["MemoryQueue", "Priority"]
