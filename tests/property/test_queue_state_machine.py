"""The queue as a state machine against a plain list model (Hypothesis), for memory and SQLite.

The model covers appends, leases on every lane (live window judged by the store clock), settles,
evictions (drop-oldest and thinning, count/byte/age bounds, alarms protected or not) with the gap
ranges they must record, gap settlement, and (SQLite) restarts."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from store_forward.memory import MemoryQueue
from store_forward.model import Batch, Gap, GapReason, Lane, NewRecord, Priority, Queue
from store_forward.policy import QueueBounds
from store_forward.sqlite import SqliteQueue


@dataclass
class Row:
    seq: int
    priority: Priority
    payload: bytes
    ts_ns: int
    enqueued_ns: int = 0
    attempts: int = 0
    holder: tuple[int, float] | None = None  # (lease_id, expires_s)


class Clock:
    """The store's wall clock; the machine moves it together with the monotonic lease clock."""

    def __init__(self) -> None:
        self.ns = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.ns


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
        self.clock = Clock()
        self.q: Queue = self.open_queue()
        self.rows: list[Row] = []
        self.next_seq = 1
        self.now_s = 0.0
        self.last_lease_now_s: float | None = None
        self.acked_total = 0
        self.rejected_total = 0
        self.appended_total = 0
        self.evicted_total = 0
        self.gaps: list[tuple[int, Priority | None, str, int, int, int]] = []  # id, prio, cause, lo, hi, n
        self.next_gap_id = 1

    def open_queue(self) -> Queue:
        return MemoryQueue(clock_ns=self.clock)

    def teardown(self) -> None:
        self.q.close()

    def row(self, seq: int) -> Row | None:
        return next((r for r in self.rows if r.seq == seq), None)

    @rule(records=new_records)
    def append(self, records: list[NewRecord]) -> None:
        seqs = self.q.append(records)
        assert seqs == list(range(self.next_seq, self.next_seq + len(records)))
        for seq, r in zip(seqs, records, strict=True):
            self.rows.append(Row(seq, r.priority, r.payload, r.ts_ns, self.clock.ns))
        self.next_seq += len(records)
        self.appended_total += len(records)

    @rule(dt_s=st.floats(min_value=0, max_value=15, allow_nan=False))
    def advance_time(self, dt_s: float) -> None:
        self.now_s += dt_s
        self.clock.ns += int(dt_s * 1e9)

    @rule(target=batches, max_items=st.integers(0, 6),
          max_bytes=st.none() | st.integers(0, 40), lease_s=st.sampled_from([0.5, 3.0, 10.0]),
          lane=st.sampled_from(Lane), window_s=st.sampled_from([0.0, 5.0, 20.0]))
    def lease(self, max_items: int, max_bytes: int | None, lease_s: float, lane: Lane,
              window_s: float) -> Batch:
        now = self.now_s
        batch = self.q.lease(max_items, now, max_bytes=max_bytes, lease_s=lease_s, lane=lane,
                             live_window_s=window_s)
        self.last_lease_now_s = now if self.last_lease_now_s is None else max(now, self.last_lease_now_s)
        cutoff_ns = self.clock.ns - int(window_s * 1e9)

        def in_lane(r: Row) -> bool:
            return lane is Lane.ANY or (r.enqueued_ns >= cutoff_ns) == (lane is Lane.LIVE)

        free = sorted((r for r in self.rows if (r.holder is None or r.holder[1] <= now) and in_lane(r)),
                      key=lambda r: (r.priority, r.seq))
        expected: list[Row] = []
        total = 0
        for r in free[:max_items]:
            if max_bytes is not None and expected and total + len(r.payload) > max_bytes:
                break
            expected.append(r)
            total += len(r.payload)
        assert [r.seq for r in batch.records] == [r.seq for r in expected]
        if expected:
            assert batch.historical == (lane is Lane.BACKLOG or (
                lane is Lane.ANY and any(r.enqueued_ns < cutoff_ns for r in expected)))
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
          max_age_s=st.none() | st.sampled_from([5.0, 30.0]), protect_alarms=st.booleans(),
          thin=st.frozensets(st.sampled_from(Priority)))
    def evict(self, max_records: int | None, max_bytes: int | None, max_age_s: float | None,
              protect_alarms: bool, thin: frozenset[Priority]) -> None:
        bounds = QueueBounds(max_records=max_records, max_bytes=max_bytes, max_age_s=max_age_s,
                             protected=frozenset({Priority.ALARM}) if protect_alarms else frozenset(),
                             thin=thin)
        now = self.now_s
        n = self.q.evict(bounds, now)
        self.last_lease_now_s = now if self.last_lease_now_s is None else max(now, self.last_lease_now_s)
        victims = self.model_victims(bounds, now)
        assert n == len(victims)
        by_key: dict[tuple[Priority, str], list[int]] = {}
        for r, cause in victims:
            self.rows.remove(r)
            by_key.setdefault((r.priority, cause), []).append(r.seq)
        for (prio, cause), seqs in sorted(by_key.items(), key=lambda kv: min(kv[1])):
            self.gaps.append((self.next_gap_id, prio, cause, min(seqs), max(seqs), len(seqs)))
            self.next_gap_id += 1
        self.evicted_total += n

    def model_victims(self, bounds: QueueBounds, now: float) -> list[tuple[Row, str]]:
        """The eviction policy, written out naively over the rows."""
        depth, size = len(self.rows), sum(len(r.payload) for r in self.rows)
        out: list[tuple[Row, str]] = []

        def broken() -> str | None:
            if bounds.max_records is not None and depth > bounds.max_records:
                return "max_records"
            if bounds.max_bytes is not None and size > bounds.max_bytes:
                return "max_bytes"
            return None

        def old(r: Row) -> bool:
            age_ns = self.clock.ns - r.enqueued_ns
            return bounds.max_age_s is not None and age_ns > int(bounds.max_age_s * 1e9)

        def on_wire(r: Row) -> bool:
            return r.holder is not None and r.holder[1] > now

        for p in sorted(Priority, reverse=True):
            if p in bounds.protected:
                continue
            lane = [r for r in self.rows if r.priority == p]
            if p in bounds.thin:
                keep = []
                for r in lane:
                    if old(r) and not on_wire(r):
                        out.append((r, "max_age"))
                        depth, size = depth - 1, size - len(r.payload)
                    else:
                        keep.append(r)
                while broken() is not None:
                    free = [r for r in keep if not on_wire(r)]
                    if not free:
                        break
                    for r in (free if len(free) == 1 else free[1::2]):
                        cause = broken()
                        if cause is None:
                            break
                        out.append((r, cause))
                        depth, size = depth - 1, size - len(r.payload)
                        keep.remove(r)
                continue
            for r in lane:
                cause = "max_age" if old(r) else broken()
                if cause is None:
                    break
                if on_wire(r):
                    continue
                out.append((r, cause))
                depth, size = depth - 1, size - len(r.payload)
        return out

    @rule(data=st.data())
    def settle_gap(self, data: st.DataObject) -> None:
        ids = [g[0] for g in self.gaps]
        gap_id = data.draw(st.sampled_from(ids) if ids else st.just(10**6), label="gap_id")
        self.q.settle_gap(gap_id)
        self.gaps = [g for g in self.gaps if g[0] != gap_id]

    @invariant()
    def gaps_match_the_model(self) -> None:
        got = self.q.pending_gaps(limit=10**6)
        generation = self.q.stats().generation
        assert [(g.gap_id, g.priority, g.detail, g.first_seq, g.last_seq, g.count) for g in got] == self.gaps
        assert all(isinstance(g, Gap) and g.reason is GapReason.EVICTED and g.generation == generation
                   for g in got)

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
        assert s.gaps_pending == len(self.gaps)
        last = self.last_lease_now_s
        expiries = [r.holder[1] for r in self.rows if r.holder is not None]
        assert s.leased == sum(1 for e in expiries if last is None or e > last)


class SqliteQueueMachine(QueueMachine):
    """Same model, plus restarts: a reopen forgets leases and attempts, and keeps seqs and totals."""

    def open_queue(self) -> Queue:
        if not hasattr(self, "tmp"):
            self.tmp = Path(tempfile.mkdtemp(prefix="queue-sm-"))
        # NORMAL: durability across power loss is not what this machine checks, and it keeps runs fast.
        return SqliteQueue(self.tmp / "q.db", synchronous="NORMAL", clock_ns=self.clock)

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
