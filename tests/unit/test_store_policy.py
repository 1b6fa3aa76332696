"""Eviction planning, disk-floor arithmetic and the backlog budget (pure)."""

from __future__ import annotations

import pytest

from store_forward.model import Priority
from store_forward.policy import (
    BacklogBudget,
    Candidate,
    LanePolicy,
    QueueBounds,
    Victim,
    disk_deficit_bytes,
    plan_eviction,
    spans_of,
)

T, B = Priority.TELEMETRY, Priority.BULK


def lane(priority: Priority, seqs: list[int], size: int = 10,
         leased: frozenset[int] = frozenset()) -> list[Candidate]:
    return [Candidate(s, priority, size, s, s in leased) for s in seqs]


def plan(bounds: QueueBounds, lanes: dict[Priority, list[Candidate]], deficit: int = 0) -> list[Victim]:
    rows = [c for cs in lanes.values() for c in cs]
    return plan_eviction((lanes.get(p, []) for p in bounds.eviction_order()), depth=len(rows),
                         size_bytes=sum(c.size_bytes for c in rows), now_ns=10**12, bounds=bounds,
                         deficit_bytes=deficit)


def test_a_disk_floor_deficit_counts_the_stores_own_free_pages_as_free() -> None:
    b = QueueBounds(min_free_disk_bytes=1000)
    assert disk_deficit_bytes(b, fs_free_bytes=300, db_free_bytes=200) == 500
    assert disk_deficit_bytes(b, fs_free_bytes=300, db_free_bytes=900) == 0
    assert disk_deficit_bytes(QueueBounds(), fs_free_bytes=0, db_free_bytes=0) == 0


def test_a_disk_floor_deficit_evicts_the_least_important_oldest_bytes_first() -> None:
    lanes = {B: lane(B, [5, 6]), T: lane(T, [1, 2, 3])}
    victims = plan(QueueBounds(min_free_disk_bytes=1), lanes, deficit=25)
    assert [(v.seq, v.cause) for v in victims] == [(5, "disk_floor"), (6, "disk_floor"), (1, "disk_floor")]


def test_thinning_skips_leased_records_and_keeps_the_oldest_free_one() -> None:
    bounds = QueueBounds(max_records=4, thin=frozenset({T}))
    victims = plan(bounds, {T: lane(T, [1, 2, 3, 4, 5, 6], leased=frozenset({2}))})
    assert [v.seq for v in victims] == [3, 5]  # free records 1,3,4,5,6: every other one after the first


def test_spans_group_one_evictions_victims_by_priority_and_cause() -> None:
    victims = [Victim(3, T, 1, "max_bytes"), Victim(1, B, 1, "max_bytes"), Victim(7, T, 1, "max_bytes"),
               Victim(2, B, 1, "max_age")]
    assert [(s.priority, s.cause, s.first_seq, s.last_seq, s.count) for s in spans_of(victims)] == [
        (B, "max_bytes", 1, 1, 1), (B, "max_age", 2, 2, 1), (T, "max_bytes", 3, 7, 2)]


def test_bounds_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        QueueBounds(min_free_disk_bytes=-1)
    with pytest.raises(TypeError):
        QueueBounds(thin=frozenset({3}))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LanePolicy(backlog_bytes_per_s=0)


def test_the_backlog_budget_waits_for_a_whole_batch_and_refills_at_its_rate() -> None:
    budget = BacklogBudget(LanePolicy(backlog_bytes_per_s=1000.0, backlog_burst_bytes=4000))
    assert budget.ready(0.0, max_bytes=4000)
    budget.spend(4500, 0.0)  # one oversized batch: a debt of 500 B
    assert not budget.ready(0.0, max_bytes=4000)
    assert budget.wait_s(0.0, max_bytes=4000) == pytest.approx(4.5)
    assert budget.ready(2.0, max_bytes=1000) and not budget.ready(2.0, max_bytes=4000)
    assert budget.allowance(100.0) == 4000  # never more than the burst


def test_an_unlimited_backlog_budget_never_waits() -> None:
    budget = BacklogBudget(LanePolicy())
    budget.spend(10**9, 0.0)
    assert budget.allowance(0.0) is None and budget.wait_s(0.0) == 0.0 and budget.ready(0.0, None)
