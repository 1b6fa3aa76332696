"""The Queue contract, one suite over every implementation (SQLite on a temp file, memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from store_forward.memory import MemoryQueue
from store_forward.model import Batch, GapReason, Lane, NewRecord, Priority, Queue, StoreClosed
from store_forward.policy import QueueBounds
from store_forward.sqlite import SqliteQueue


class FakeClock:
    """The store's wall clock (UTC ns), moved only by the test."""

    def __init__(self) -> None:
        self.ns = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


class Harness:
    """Opens (and reopens) one implementation; `reopen` is a process restart for that implementation."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "queue.db"
        self.clock = FakeClock()
        self.q: Queue = self._open()

    def _open(self) -> Queue:
        if self.kind == "sqlite":
            return SqliteQueue(self.path, clock_ns=self.clock)
        return MemoryQueue(clock_ns=self.clock)

    def reopen(self) -> Queue:
        self.q.close()
        self.q = self._open()
        return self.q


@pytest.fixture(params=["sqlite", "memory"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path)
    yield h
    h.q.close()


def rec(tag: str, priority: Priority = Priority.TELEMETRY, ts_ns: int = 1) -> NewRecord:
    return NewRecord(kind="t", payload=tag.encode(), ts_ns=ts_ns, priority=priority)


def tags(batch: Batch) -> list[str]:
    return [r.payload.decode() for r in batch.records]


def test_appends_get_consecutive_increasing_seqs(harness: Harness) -> None:
    q = harness.q
    assert q.append([rec("a"), rec("b")]) == [1, 2]
    assert q.append([rec("c")]) == [3]
    assert q.append([]) == []
    assert q.stats().next_seq == 4


def test_a_stored_record_carries_everything_that_was_appended(harness: Harness) -> None:
    q = harness.q
    new = NewRecord(kind="card", payload=bytes(range(256)) * 3, ts_ns=-5, priority=Priority.CARD)
    (seq,) = q.append([new])
    batch = q.lease(10, now_s=0.0)
    (got,) = batch.records
    assert (got.seq, got.kind, got.payload) == (seq, "card", new.payload)
    assert (got.ts_ns, got.priority) == (-5, Priority.CARD)
    assert got.generation == batch.generation == q.stats().generation
    assert got.enqueued_ns == harness.clock.ns
    assert got.attempts == 1


def test_records_drain_oldest_first_within_a_priority(harness: Harness) -> None:
    q = harness.q
    q.append([rec(str(i)) for i in range(5)])
    q.append([rec(str(i)) for i in range(5, 8)])
    assert tags(q.lease(3, now_s=0.0)) == ["0", "1", "2"]
    assert tags(q.lease(10, now_s=0.0)) == ["3", "4", "5", "6", "7"]


def test_a_lower_priority_value_drains_first_even_when_appended_later(harness: Harness) -> None:
    q = harness.q
    q.append([rec("bulk", Priority.BULK), rec("tel1"), rec("card", Priority.CARD)])
    q.append([rec("tel2"), rec("alarm", Priority.ALARM), rec("event", Priority.EVENT)])
    assert tags(q.lease(10, now_s=0.0)) == ["alarm", "event", "card", "tel1", "tel2", "bulk"]


def test_a_leased_record_is_not_leased_again_while_its_lease_runs(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a"), rec("b"), rec("c")])
    first = q.lease(2, now_s=0.0, lease_s=10.0)
    second = q.lease(10, now_s=9.9, lease_s=10.0)
    assert tags(first) == ["a", "b"]
    assert tags(second) == ["c"]
    assert first.lease_id != second.lease_id
    assert q.lease(10, now_s=9.9).records == ()
    assert q.stats().leased == 3


def test_an_expired_lease_redelivers_its_records_and_counts_the_attempt(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a"), rec("b")])
    first = q.lease(10, now_s=0.0, lease_s=5.0)
    assert first.expires_s == 5.0
    again = q.lease(10, now_s=5.0, lease_s=5.0)
    assert tags(again) == ["a", "b"]
    assert [r.attempts for r in again.records] == [2, 2]
    assert again.lease_id != first.lease_id


def test_an_empty_queue_leases_an_empty_batch_that_settles_as_a_no_op(harness: Harness) -> None:
    q = harness.q
    batch = q.lease(10, now_s=0.0)
    assert batch.records == () and batch.lease_id == 0
    q.settle(batch, [])
    q.append([rec("a")])
    assert q.lease(0, now_s=0.0).records == ()
    assert tags(q.lease(1, now_s=0.0)) == ["a"]


def test_settle_deletes_acked_records_for_good(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a"), rec("b"), rec("c")])
    batch = q.lease(10, now_s=0.0, lease_s=1.0)
    q.settle(batch, acked=[batch.records[0].seq, batch.records[2].seq])
    s = q.stats()
    assert (s.depth, s.acked_total, s.rejected_total, s.settled_total) == (1, 2, 0, 2)
    assert tags(q.lease(10, now_s=100.0)) == ["b"]


def test_rejected_records_are_deleted_and_counted_apart_from_acked_ones(harness: Harness) -> None:
    q = harness.q
    seqs = q.append([rec("a"), rec("b"), rec("c")])
    batch = q.lease(10, now_s=0.0)
    q.settle(batch, acked=[seqs[0]], rejected=[seqs[1]])
    s = q.stats()
    assert (s.depth, s.acked_total, s.rejected_total, s.settled_total) == (1, 1, 1, 2)
    assert tags(q.lease(10, now_s=0.0)) == ["c"]


def test_records_neither_acked_nor_rejected_are_released_for_the_next_lease_at_once(harness: Harness) -> None:
    q = harness.q
    seqs = q.append([rec("a"), rec("b"), rec("c")])
    batch = q.lease(10, now_s=0.0, lease_s=60.0)
    q.settle(batch, acked=[seqs[1]])
    assert q.stats().leased == 0
    again = q.lease(10, now_s=1.0)
    assert tags(again) == ["a", "c"]
    assert [r.attempts for r in again.records] == [2, 2]


def test_settling_a_seq_outside_the_batch_is_refused_and_changes_nothing(harness: Harness) -> None:
    q = harness.q
    seqs = q.append([rec("a"), rec("b")])
    batch = q.lease(1, now_s=0.0)
    with pytest.raises(ValueError, match="not in lease"):
        q.settle(batch, acked=[seqs[0], seqs[1]])
    with pytest.raises(ValueError, match="both acked and rejected"):
        q.settle(batch, acked=[seqs[0]], rejected=[seqs[0]])
    s = q.stats()
    assert (s.depth, s.settled_total, s.leased) == (2, 0, 1)


def test_a_late_settle_of_an_expired_lease_does_not_free_what_a_newer_lease_holds(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a"), rec("b")])
    old = q.lease(10, now_s=0.0, lease_s=1.0)
    new = q.lease(10, now_s=2.0, lease_s=60.0)
    assert tags(new) == ["a", "b"]
    q.settle(old, acked=[])  # releases nothing: "a" and "b" now belong to the newer lease
    assert q.lease(10, now_s=3.0).records == ()
    assert q.stats().leased == 2


def test_an_ack_through_an_expired_lease_deletes_once_and_the_newer_ack_is_harmless(harness: Harness) -> None:
    q = harness.q
    (seq,) = q.append([rec("a")])
    old = q.lease(10, now_s=0.0, lease_s=1.0)
    new = q.lease(10, now_s=2.0, lease_s=60.0)
    q.settle(old, acked=[seq])  # the broker did ack the first send: the record is delivered
    q.settle(new, acked=[seq])
    s = q.stats()
    assert (s.depth, s.acked_total, s.leased) == (0, 1, 0)


def test_max_bytes_bounds_a_batch_without_reordering_or_starving_a_big_record(harness: Harness) -> None:
    q = harness.q
    q.append([NewRecord("t", b"x" * 100, 1), NewRecord("t", b"y" * 30, 2), NewRecord("t", b"z" * 10, 3)])
    big = q.lease(10, now_s=0.0, max_bytes=50)
    assert [len(r.payload) for r in big.records] == [100]  # alone above the bound, still delivered
    rest = q.lease(10, now_s=0.0, max_bytes=35)
    assert [len(r.payload) for r in rest.records] == [30]  # stops before "z" instead of skipping ahead
    assert rest.payload_bytes == 30


def test_stats_track_depth_bytes_oldest_and_totals(harness: Harness) -> None:
    q = harness.q
    empty = q.stats()
    assert (empty.depth, empty.bytes, empty.oldest_ts_ns, empty.next_seq, empty.leased) == (0, 0, None, 1, 0)
    q.append([rec("aa", Priority.BULK, ts_ns=50), rec("b", Priority.ALARM, ts_ns=70)])
    q.append([rec("ccc", ts_ns=10)])
    s = q.stats()
    assert (s.depth, s.bytes, s.next_seq, s.appended_total, s.appended_bytes_total) == (3, 6, 4, 3, 6)
    assert s.oldest_ts_ns == 50  # the record waiting longest (lowest seq), not the smallest timestamp
    assert s.depth_by_priority == (1, 0, 0, 1, 1)
    batch = q.lease(1, now_s=0.0)
    assert q.stats().leased == 1
    q.settle(batch, acked=[batch.records[0].seq])
    s = q.stats()
    assert (s.depth, s.bytes, s.leased, s.settled_total, s.depth_by_priority) == (2, 5, 0, 1, (0, 0, 0, 1, 1))


def test_identity_pairs_are_never_reused_across_a_reopen(harness: Harness) -> None:
    q = harness.q
    before = {(q.stats().generation, s) for s in q.append([rec("a"), rec("b"), rec("c")])}
    batch = q.lease(10, now_s=0.0)
    q.settle(batch, acked=batch.seqs)  # the highest seqs are gone before the restart
    q = harness.reopen()
    after = {(q.stats().generation, s) for s in q.append([rec("d"), rec("e")])}
    assert not before & after


def test_malformed_records_are_refused_before_anything_is_stored(harness: Harness) -> None:
    q = harness.q
    with pytest.raises(TypeError):
        q.append([rec("ok"), NewRecord("t", "not bytes", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.append([NewRecord("", b"x", 1)])
    with pytest.raises(TypeError):
        q.append([NewRecord("t", b"x", 1, priority=7)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.lease(-1, now_s=0.0)
    assert q.stats().depth == 0 and q.stats().next_seq == 1


def test_a_closed_queue_refuses_work(harness: Harness) -> None:
    q = harness.q
    q.close()
    with pytest.raises(StoreClosed):
        q.append([rec("a")])
    with pytest.raises(StoreClosed):
        q.lease(1, now_s=0.0)


def test_eviction_drops_the_least_important_oldest_records_first_and_spares_alarms(harness: Harness) -> None:
    q = harness.q
    q.append([rec("alarm1", Priority.ALARM), rec("bulk1", Priority.BULK), rec("tel1"),
              rec("bulk2", Priority.BULK), rec("alarm2", Priority.ALARM), rec("tel2")])
    assert q.evict(QueueBounds(max_records=3), now_s=0.0) == 3
    assert tags(q.lease(10, now_s=0.0)) == ["alarm1", "alarm2", "tel2"]
    s = q.stats()
    assert (s.depth, s.evicted_total, s.settled_total) == (3, 3, 0)
    # Protected lanes are never evicted, even when they alone break the bound.
    assert q.evict(QueueBounds(max_records=0), now_s=100.0) == 1
    assert q.stats().depth_by_priority == (2, 0, 0, 0, 0)


def test_eviction_by_bytes_stops_as_soon_as_the_queue_fits(harness: Harness) -> None:
    q = harness.q
    q.append([NewRecord("t", b"a" * 40, 1), NewRecord("t", b"b" * 40, 2), NewRecord("t", b"c" * 40, 3)])
    assert q.evict(QueueBounds(max_bytes=80), now_s=0.0) == 1
    assert q.stats().bytes == 80
    assert q.evict(QueueBounds(max_bytes=80), now_s=0.0) == 0


def test_eviction_spares_records_on_the_wire_until_their_lease_expires(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a"), rec("b"), rec("c")])
    q.lease(1, now_s=0.0, lease_s=10.0)
    assert q.evict(QueueBounds(max_records=1), now_s=1.0) == 2
    assert q.stats().depth == 1
    assert tags(q.lease(10, now_s=11.0)) == ["a"]


def test_eviction_by_age_removes_only_records_older_than_the_bound(harness: Harness) -> None:
    q = harness.q
    q.append([rec("old", Priority.EVENT)])
    harness.clock.ns += 120 * 10**9
    q.append([rec("new", Priority.BULK)])
    harness.clock.ns += 30 * 10**9
    assert q.evict(QueueBounds(max_age_s=60.0), now_s=0.0) == 1
    assert tags(q.lease(10, now_s=0.0)) == ["new"]


def test_the_live_lane_serves_only_recent_records_and_the_backlog_the_older_ones_as_historical(
        harness: Harness) -> None:
    q = harness.q
    q.append([rec("old1"), rec("old-alarm", Priority.ALARM)])
    harness.clock.advance(120)
    q.append([rec("new1"), rec("new2", Priority.EVENT)])
    live = q.lease(10, now_s=0.0, lane=Lane.LIVE, live_window_s=60.0)
    assert tags(live) == ["new2", "new1"]  # priority order within the lane
    assert live.historical is False
    backlog = q.lease(10, now_s=0.0, lane=Lane.BACKLOG, live_window_s=60.0)
    assert tags(backlog) == ["old-alarm", "old1"]
    assert backlog.historical is True
    assert q.lease(10, now_s=0.0, lane=Lane.LIVE, live_window_s=60.0).records == ()


def test_a_record_ages_from_the_live_lane_into_the_backlog(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a")])
    assert tags(q.lease(10, now_s=0.0, lane=Lane.LIVE, live_window_s=30.0, lease_s=1.0)) == ["a"]
    harness.clock.advance(31)
    assert q.lease(10, now_s=2.0, lane=Lane.LIVE, live_window_s=30.0).records == ()
    again = q.lease(10, now_s=2.0, lane=Lane.BACKLOG, live_window_s=30.0)
    assert tags(again) == ["a"] and again.historical


def test_a_mixed_lease_is_historical_when_any_record_is_older_than_the_live_window(harness: Harness) -> None:
    q = harness.q
    q.append([rec("old")])
    harness.clock.advance(100)
    q.append([rec("new")])
    assert q.lease(1, now_s=0.0, lane=Lane.ANY, live_window_s=60.0).historical is True
    assert q.lease(1, now_s=0.0, lane=Lane.ANY, live_window_s=60.0).historical is False


def test_every_eviction_is_recorded_as_a_gap_per_priority_and_cause_until_settled(harness: Harness) -> None:
    q = harness.q
    gen = q.stats().generation
    s = q.append([rec("b1", Priority.BULK), rec("t1"), rec("b2", Priority.BULK), rec("t2"), rec("t3")])
    assert q.pending_gaps() == []
    assert q.evict(QueueBounds(max_records=2), now_s=0.0) == 3
    gaps = q.pending_gaps()
    got = [(g.generation, g.priority, g.first_seq, g.last_seq, g.count, g.reason, g.detail) for g in gaps]
    assert got == [
        (gen, Priority.BULK, s[0], s[2], 2, GapReason.EVICTED, "max_records"),
        (gen, Priority.TELEMETRY, s[1], s[1], 1, GapReason.EVICTED, "max_records"),
    ]
    assert q.stats().gaps_pending == 2
    q.settle_gap(gaps[0].gap_id)
    q.settle_gap(gaps[0].gap_id)  # idempotent
    assert [g.gap_id for g in q.pending_gaps()] == [gaps[1].gap_id]
    q = harness.reopen()
    if harness.kind == "sqlite":  # durable: survives a restart
        assert [g.gap_id for g in q.pending_gaps()] == [gaps[1].gap_id]


def test_age_eviction_is_recorded_with_its_own_cause(harness: Harness) -> None:
    q = harness.q
    q.append([rec("old")])
    harness.clock.advance(100)
    q.append([rec("new")])
    assert q.evict(QueueBounds(max_age_s=50.0), now_s=0.0) == 1
    (gap,) = q.pending_gaps()
    assert (gap.detail, gap.count, gap.first_seq) == ("max_age", 1, 1)


def test_thinning_drops_every_other_record_of_the_class_and_keeps_the_oldest(harness: Harness) -> None:
    q = harness.q
    seqs = q.append([rec(f"t{i}") for i in range(8)])
    bounds = QueueBounds(max_records=5, thin=frozenset({Priority.TELEMETRY}))
    assert q.evict(bounds, now_s=0.0) == 3
    assert tags(q.lease(10, now_s=0.0)) == ["t0", "t2", "t4", "t6", "t7"]
    (gap,) = q.pending_gaps()
    assert (gap.first_seq, gap.last_seq, gap.count) == (seqs[1], seqs[5], 3)


def test_thinning_passes_again_over_a_lane_that_is_still_too_big(harness: Harness) -> None:
    q = harness.q
    q.append([rec(f"t{i}") for i in range(8)])
    assert q.evict(QueueBounds(max_records=2, thin=frozenset({Priority.TELEMETRY})), now_s=0.0) == 6
    assert tags(q.lease(10, now_s=0.0)) == ["t0", "t4"]


def test_alarms_are_evicted_only_when_configured(harness: Harness) -> None:
    q = harness.q
    q.append([rec("a1", Priority.ALARM), rec("a2", Priority.ALARM)])
    assert q.evict(QueueBounds(max_records=1), now_s=0.0) == 0
    assert q.evict(QueueBounds(max_records=1, protected=frozenset()), now_s=0.0) == 1
    assert tags(q.lease(10, now_s=0.0)) == ["a2"]


def test_a_full_disk_eviction_frees_the_requested_bytes_by_policy(harness: Harness) -> None:
    q = harness.q
    q.append([NewRecord("t", b"x" * 100, 1, Priority.BULK) for _ in range(5)])
    q.append([NewRecord("t", b"a" * 100, 1, Priority.ALARM)])
    assert q.evict(QueueBounds(), now_s=0.0, free_bytes=250) == 3
    assert {g.detail for g in q.pending_gaps()} == {"disk_full"}
    assert q.evict(QueueBounds(), now_s=0.0, free_bytes=10_000) == 2  # alarms stay protected
    assert q.stats().depth_by_priority == (1, 0, 0, 0, 0)
