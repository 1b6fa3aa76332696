"""The queue as a state machine against a plain list model (Hypothesis), for memory and SQLite."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from store_forward.memory import MemoryQueue
from store_forward.model import Batch, NewRecord, Priority, Queue
from store_forward.policy import QueueBounds
from store_forward.sqlite import SqliteQueue


@dataclass
class Row:
    seq: int
    priority: Priority
    payload: bytes
    ts_ns: int
    attempts: int = 0
    holder: tuple[int, float] | None = None  # (lease_id, expires_s)


new_records = st.lists(
    st.builds(
        NewRecord,
        kind=st.sampled_from(["value", "card", "event"]),
        payload=st.binary(max_size=24),
        ts_ns=st.integers(min_value=-(2**40), max_value=2**62),
        priority=st.sampled_from(Priority),
    ),
    max_size=5,
)


def subsets(seqs: list[int]) -> st.SearchStrategy[list[int]]:
    return st.lists(st.sampled_from(seqs), unique=True) if seqs else st.just([])


class QueueMachine(RuleBasedStateMachine):
    """Model: a list of rows in seq order; leases, attempts and totals kept the naive way."""

    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        self.q: Queue = self.open_queue()
        self.rows: list[Row] = []
        self.next_seq = 1
        self.now_s = 0.0
        self.last_lease_now_s: float | None = None
        self.acked_total = 0
        self.rejected_total = 0
        self.appended_total = 0
        self.evicted_total = 0

    def open_queue(self) -> Queue:
        return MemoryQueue()

    def teardown(self) -> None:
        self.q.close()

    def row(self, seq: int) -> Row | None:
        return next((r for r in self.rows if r.seq == seq), None)

    @rule(records=new_records)
    def append(self, records: list[NewRecord]) -> None:
        seqs = self.q.append(records)
        assert seqs == list(range(self.next_seq, self.next_seq + len(records)))
        for seq, r in zip(seqs, records, strict=True):
            self.rows.append(Row(seq, r.priority, r.payload, r.ts_ns))
        self.next_seq += len(records)
        self.appended_total += len(records)

    @rule(dt_s=st.floats(min_value=0, max_value=15, allow_nan=False))
    def advance_time(self, dt_s: float) -> None:
        self.now_s += dt_s

    @rule(target=batches, max_items=st.integers(0, 6),
          max_bytes=st.none() | st.integers(0, 40), lease_s=st.sampled_from([0.5, 3.0, 10.0]))
    def lease(self, max_items: int, max_bytes: int | None, lease_s: float) -> Batch:
        now = self.now_s
        batch = self.q.lease(max_items, now, max_bytes=max_bytes, lease_s=lease_s)
        self.last_lease_now_s = now if self.last_lease_now_s is None else max(now, self.last_lease_now_s)
        free = sorted((r for r in self.rows if r.holder is None or r.holder[1] <= now),
                      key=lambda r: (r.priority, r.seq))
        expected: list[Row] = []
        total = 0
        for r in free[:max_items]:
            if max_bytes is not None and expected and total + len(r.payload) > max_bytes:
                break
            expected.append(r)
            total += len(r.payload)
        assert [r.seq for r in batch.records] == [r.seq for r in expected]
        for got, want in zip(batch.records, expected, strict=True):
            want.attempts += 1
            want.holder = (batch.lease_id, now + lease_s)
            assert (got.payload, got.priority, got.ts_ns, got.attempts) == (
                want.payload, want.priority, want.ts_ns, want.attempts)
        return batch

    @rule(batch=batches, data=st.data())
    def settle(self, batch: Batch, data: st.DataObject) -> None:
        seqs = list(batch.seqs)
        acked = data.draw(subsets(seqs), label="acked")
        rest = [s for s in seqs if s not in acked]
        rejected = data.draw(subsets(rest), label="rejected")
        self.q.settle(batch, acked, rejected)
        for seq in acked + rejected:
            r = self.row(seq)
            if r is not None:  # may be gone already, settled through another lease
                self.rows.remove(r)
                if seq in acked:
                    self.acked_total += 1
                else:
                    self.rejected_total += 1
        for seq in rest:
            r = self.row(seq)
            if r is not None and r.holder is not None and r.holder[0] == batch.lease_id:
                r.holder = None  # released; a newer lease's claim on it stays

    @rule(max_records=st.none() | st.integers(0, 8), max_bytes=st.none() | st.integers(0, 80),
          protect_alarms=st.booleans())
    def evict(self, max_records: int | None, max_bytes: int | None, protect_alarms: bool) -> None:
        bounds = QueueBounds(max_records=max_records, max_bytes=max_bytes,
                             protected=frozenset({Priority.ALARM}) if protect_alarms else frozenset())
        now = self.now_s
        n = self.q.evict(bounds, now)
        self.last_lease_now_s = now if self.last_lease_now_s is None else max(now, self.last_lease_now_s)
        depth, size = len(self.rows), sum(len(r.payload) for r in self.rows)
        victims = []
        for r in sorted(self.rows, key=lambda r: (-r.priority, r.seq)):
            if (max_records is None or depth <= max_records) and (max_bytes is None or size <= max_bytes):
                break
            if r.priority in bounds.protected or (r.holder is not None and r.holder[1] > now):
                continue
            victims.append(r)
            depth -= 1
            size -= len(r.payload)
        assert n == len(victims)
        for r in victims:
            self.rows.remove(r)
        self.evicted_total += n

    @invariant()
    def stats_match_the_model(self) -> None:
        s = self.q.stats()
        assert s.depth == len(self.rows)
        assert s.bytes == sum(len(r.payload) for r in self.rows)
        assert s.next_seq == self.next_seq
        assert s.oldest_ts_ns == (self.rows[0].ts_ns if self.rows else None)
        assert s.depth_by_priority == tuple(sum(1 for r in self.rows if r.priority == p) for p in Priority)
        assert (s.acked_total, s.rejected_total) == (self.acked_total, self.rejected_total)
        assert s.settled_total == self.acked_total + self.rejected_total
        assert s.appended_total == self.appended_total
        assert s.evicted_total == self.evicted_total
        last = self.last_lease_now_s
        expiries = [r.holder[1] for r in self.rows if r.holder is not None]
        assert s.leased == sum(1 for e in expiries if last is None or e > last)


class SqliteQueueMachine(QueueMachine):
    """Same model, plus restarts: a reopen forgets leases and attempts, and keeps seqs and totals."""

    def open_queue(self) -> Queue:
        if not hasattr(self, "tmp"):
            self.tmp = Path(tempfile.mkdtemp(prefix="queue-sm-"))
        # NORMAL: durability across power loss is not what this machine checks, and it keeps runs fast.
        return SqliteQueue(self.tmp / "q.db", synchronous="NORMAL")

    def teardown(self) -> None:
        self.q.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule()
    def reopen(self) -> None:
        generation = self.q.stats().generation
        self.q.close()
        self.q = self.open_queue()
        assert self.q.stats().generation == generation
        for r in self.rows:
            r.holder, r.attempts = None, 0
        self.last_lease_now_s = None


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
SqliteQueueMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestMemoryQueueAgainstAListModel = QueueMachine.TestCase
TestSqliteQueueAgainstAListModel = SqliteQueueMachine.TestCase
