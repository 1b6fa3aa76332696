"""AsyncQueue: one writer thread, group commit, and errors delivered to the right callers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest

from store_forward.facade import AsyncQueue
from store_forward.memory import MemoryQueue
from store_forward.model import (
    Batch,
    Gap,
    Lane,
    NewRecord,
    Priority,
    Queue,
    QueueStats,
    StoreClosed,
    StoreCorrupt,
    StoreFull,
)
from store_forward.policy import LanePolicy, QueueBounds
from store_forward.sqlite import SqliteQueue


class GatedQueue:
    """A real queue behind a gate at our own seam: appends can be held open to create a 'running commit'."""

    def __init__(self, inner: Queue) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.groups: list[int] = []
        self.threads: set[str] = set()
        self.checkpointed = threading.Event()

    def append(self, records: Sequence[NewRecord], *,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.groups.append(len(records))
        self.entered.set()
        assert self.release.wait(10)
        return self.inner.append(records, before_commit=before_commit)

    def lease(self, max_items: int, now_s: float, *, max_bytes: int | None = None,
              lease_s: float = 60.0, lane: Lane = Lane.ANY, live_window_s: float = 60.0) -> Batch:
        self.threads.add(threading.current_thread().name)
        return self.inner.lease(max_items, now_s, max_bytes=max_bytes, lease_s=lease_s, lane=lane,
                                live_window_s=live_window_s)

    def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None:
        self.inner.settle(batch, acked, rejected)

    def stats(self) -> QueueStats:
        return self.inner.stats()

    def evict(self, bounds: QueueBounds, now_s: float, *, free_bytes: int = 0) -> int:
        self.threads.add(threading.current_thread().name)
        return self.inner.evict(bounds, now_s, free_bytes=free_bytes)

    def pending_gaps(self, limit: int = 100) -> list[Gap]:
        return self.inner.pending_gaps(limit)

    def settle_gap(self, gap_id: int) -> None:
        self.inner.settle_gap(gap_id)

    def checkpoint(self) -> None:
        self.inner.checkpoint()
        self.checkpointed.set()

    def close(self) -> None:
        self.inner.close()


def rec(tag: str, priority: Priority = Priority.TELEMETRY) -> NewRecord:
    return NewRecord("t", tag.encode(), 1, priority)


async def hold_first_commit(aq: AsyncQueue, gate: GatedQueue) -> asyncio.Task[list[int]]:
    """Start one append and return once the writer is inside its commit (and stays there)."""
    gate.release.clear()
    first = asyncio.create_task(aq.append([rec("first")]), name="append-first")
    assert await asyncio.to_thread(gate.entered.wait, 10)
    return first


async def test_appends_issued_while_a_commit_runs_share_the_next_transaction(tmp_path: Path) -> None:
    gate = GatedQueue(MemoryQueue())

    def factory() -> Queue:
        gate.inner = SqliteQueue(tmp_path / "q.db")  # built on the writer thread, which owns the connection
        return gate

    async with AsyncQueue(factory) as aq:
        first = await hold_first_commit(aq, gate)
        rest = [asyncio.create_task(aq.append([rec(f"r{i}")]), name=f"append-{i}") for i in range(49)]
        await asyncio.sleep(0)  # each task submits its job on its first step
        gate.release.set()
        results = await asyncio.gather(first, *rest)
        assert gate.groups == [1, 49]
        assert (aq.commits, aq.appends) == (2, 50)
        # Every caller got back exactly the seq that holds its own record.
        batch = await aq.lease(100, now_s=0.0)
        by_seq = {r.seq: r.payload.decode() for r in batch.records}
        assert [by_seq[seqs[0]] for seqs in results] == ["first"] + [f"r{i}" for i in range(49)]


async def test_a_group_commit_respects_its_size_bound_and_never_splits_a_caller() -> None:
    gate = GatedQueue(MemoryQueue())
    async with AsyncQueue(lambda: gate, max_batch_records=10) as aq:
        first = await hold_first_commit(aq, gate)
        jobs = [aq.append([rec(f"a{i}.{j}") for j in range(3)]) for i in range(7)]
        jobs.append(aq.append([rec(f"big{j}") for j in range(25)]))
        tasks = [asyncio.create_task(j, name=f"append-{n}") for n, j in enumerate(jobs)]
        await asyncio.sleep(0)
        gate.release.set()
        results = await asyncio.gather(first, *tasks)
    assert gate.groups == [1, 9, 9, 3, 25]  # 3+3+3 | 3+3+3 | 3 | the oversized caller alone
    assert [len(r) for r in results] == [1] + [3] * 7 + [25]
    assert results[-1] == list(range(results[-1][0], results[-1][0] + 25))  # one caller, contiguous seqs


async def test_a_failed_transaction_fails_every_caller_in_it_and_stores_none_of_them(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    def open_small_disk() -> Queue:
        q = SqliteQueue(path)
        assert q._conn is not None
        pages = q._conn.execute("PRAGMA page_count").fetchone()[0]
        q._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # a nearly full disk
        return GatedQueue(q)

    async with AsyncQueue(open_small_disk) as aq:
        first = asyncio.create_task(aq.append([rec("small")]), name="append-small")
        assert await first == [1]
        big = NewRecord("t", b"x" * 200_000, 1)
        tasks = [asyncio.create_task(aq.append([big]), name=f"append-big-{i}") for i in range(3)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, StoreFull) for o in outcomes)
        stats = await aq.stats()
        assert (stats.depth, stats.next_seq) == (1, 2)
        assert await aq.append([rec("after")]) == [2]


async def test_a_malformed_record_fails_only_its_own_caller() -> None:
    async with AsyncQueue(MemoryQueue) as aq:
        good = asyncio.create_task(aq.append([rec("good")]), name="append-good")
        with pytest.raises(TypeError):
            await aq.append([NewRecord("t", "text", 1)])  # type: ignore[arg-type]
        assert await good == [1]
        assert (await aq.stats()).depth == 1


async def test_every_queue_call_runs_on_the_one_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    built: list[GatedQueue] = []

    def factory() -> Queue:
        # SQLite connections refuse use from another thread, so building the store here proves ownership.
        built.append(GatedQueue(SqliteQueue(path)))
        return built[0]

    async with AsyncQueue(factory, thread_name="store-writer-test") as aq:
        seqs = await aq.append([rec("a"), rec("b", Priority.ALARM)])
        batch = await aq.lease(10, now_s=0.0)
        assert [r.payload for r in batch.records] == [b"b", b"a"]
        await aq.settle(batch, acked=[seqs[1]], rejected=[seqs[0]])
        await aq.append([rec("c", Priority.BULK), rec("d", Priority.BULK)])
        assert await aq.evict(QueueBounds(max_records=1), now_s=0.0) == 1
        stats = await aq.stats()
        assert (stats.depth, stats.acked_total, stats.rejected_total, stats.evicted_total) == (1, 1, 1, 1)
    assert built[0].threads == {"store-writer-test"}


async def test_start_raises_the_stores_typed_error_for_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"garbage" * 1000)
    aq = AsyncQueue(lambda: SqliteQueue(path))
    with pytest.raises(StoreCorrupt):
        await aq.start()
    with pytest.raises(StoreClosed):
        await aq.append([rec("a")])


async def test_close_finishes_submitted_work_then_refuses_new_work(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    aq = AsyncQueue(lambda: SqliteQueue(path))
    await aq.start()
    pending = [asyncio.create_task(aq.append([rec(str(i))]), name=f"append-{i}") for i in range(20)]
    await asyncio.sleep(0)
    await aq.close()
    assert sorted(s for seqs in await asyncio.gather(*pending) for s in seqs) == list(range(1, 21))
    with pytest.raises(StoreClosed):
        await aq.append([rec("late")])
    with SqliteQueue(path) as q:
        assert q.stats().depth == 20


async def test_an_idle_writer_checkpoints_the_store() -> None:
    gate = GatedQueue(MemoryQueue())
    async with AsyncQueue(lambda: gate, idle_checkpoint_s=0.01) as aq:
        await aq.append([rec("a")])
        assert await asyncio.to_thread(gate.checkpointed.wait, 10)


class Clock:
    def __init__(self) -> None:
        self.ns = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.ns


async def test_lease_next_serves_live_records_first_and_then_the_backlog_as_historical() -> None:
    clock = Clock()
    async with AsyncQueue(lambda: MemoryQueue(clock_ns=clock), lanes=LanePolicy(live_window_s=60.0)) as aq:
        await aq.append([rec("old1"), rec("old2")])
        clock.ns += 3600 * 10**9  # an hour offline
        await aq.append([rec("live1")])
        first = await aq.lease_next(10, now_s=0.0)
        assert [r.payload for r in first.records] == [b"live1"] and not first.historical
        second = await aq.lease_next(10, now_s=0.0)
        assert [r.payload for r in second.records] == [b"old1", b"old2"] and second.historical
        await aq.append([rec("live2")])
        third = await aq.lease_next(10, now_s=0.0)  # new live data overtakes whatever backlog is left
        assert [r.payload for r in third.records] == [b"live2"]


async def test_the_backlog_drains_within_its_byte_rate_budget_while_live_records_are_not_held_back() -> None:
    clock = Clock()
    lanes = LanePolicy(live_window_s=10.0, backlog_bytes_per_s=100.0, backlog_burst_bytes=100)
    async with AsyncQueue(lambda: MemoryQueue(clock_ns=clock), lanes=lanes) as aq:
        await aq.append([NewRecord("t", bytes([i]) * 40, i) for i in range(10)])  # 400 B of backlog
        clock.ns += 60 * 10**9
        got = await aq.lease_next(100, now_s=0.0)
        assert got.historical and got.payload_bytes == 80  # two 40 B records fit the 100 B burst
        assert (await aq.lease_next(100, now_s=0.0)).records == ()  # budget spent: wait
        assert aq.backlog_budget.wait_s(0.0) > 0
        await aq.append([rec("live")])
        assert [r.payload for r in (await aq.lease_next(100, now_s=0.0)).records] == [b"live"]
        later = await aq.lease_next(100, now_s=1.0)  # one second refills 100 B
        assert later.historical and later.payload_bytes == 80


async def test_configured_bounds_are_applied_after_commits_and_recorded_as_gaps() -> None:
    bounds = QueueBounds(max_records=5)
    async with AsyncQueue(MemoryQueue, bounds=bounds, evict_interval_s=0.0) as aq:
        for i in range(4):
            await aq.append([rec(f"{i}.{j}", Priority.BULK) for j in range(3)])
        stats = await aq.stats()
        gaps = await aq.pending_gaps()
        assert stats.depth == 5 and stats.evicted_total == 7 == aq.evicted
        assert sum(g.count for g in gaps) == 7 and {g.detail for g in gaps} == {"max_records"}
        batch = await aq.lease(10, now_s=0.0)
        assert [r.payload for r in batch.records] == [b"2.1", b"2.2", b"3.0", b"3.1", b"3.2"]
        for g in gaps:
            await aq.settle_gap(g.gap_id)
        assert await aq.pending_gaps() == []


async def test_a_full_store_evicts_by_policy_and_retries_the_commit_once(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    def open_capped() -> Queue:
        q = SqliteQueue(path)
        assert q._conn is not None
        q.append([NewRecord("t", b"x" * 3000, 1, Priority.BULK) for _ in range(60)])
        pages = q._conn.execute("PRAGMA page_count").fetchone()[0]
        q._conn.execute(f"PRAGMA max_page_count = {pages + 4}")  # full: the next big append fails
        return q

    async with AsyncQueue(open_capped, bounds=QueueBounds()) as aq:
        seqs = await aq.append([NewRecord("t", b"a" * 3000, 1, Priority.ALARM) for _ in range(20)])
        assert len(seqs) == 20 and aq.full_recoveries == 1
        stats = await aq.stats()
        assert stats.depth_by_priority[Priority.ALARM] == 20 and stats.evicted_total > 0
        assert {g.detail for g in await aq.pending_gaps()} == {"disk_full"}
        # Only alarms left (protected): the next overflow is refused cleanly.
        await aq.evict(QueueBounds(), now_s=0.0, free_bytes=10**9)
        with pytest.raises(StoreFull):
            await aq.append([NewRecord("t", b"b" * 3000, 1, Priority.ALARM) for _ in range(200)])
        assert (await aq.stats()).depth_by_priority[Priority.ALARM] == 20
