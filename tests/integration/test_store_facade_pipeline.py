"""AsyncQueue pipelines acknowledgements: a group is answered during the next commit, never before its own."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord, Queue, StoreFull
from store_forward.sqlite import SqliteQueue


class HeldCommitQueue:
    """A real SqliteQueue with holds at our own seam: before any group starts (`entered`/`go`), and for
    the groups passed to `hold`, inside the transaction right before COMMIT, where the fsync would run
    (`reached[i]` is set there; the commit waits for `release[i]`)."""

    def __init__(self, inner: SqliteQueue) -> None:
        self.inner = inner
        self.entered, self.go = threading.Event(), threading.Event()
        self.go.set()
        self.reached: dict[int, threading.Event] = {}
        self.release: dict[int, threading.Event] = {}
        self.groups: list[int] = []

    def hold(self, *group_indexes: int) -> None:
        for i in group_indexes:
            self.reached[i], self.release[i] = threading.Event(), threading.Event()

    def append(self, records: Sequence[NewRecord], *,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        index = len(self.groups)
        self.groups.append(len(records))
        self.entered.set()
        assert self.go.wait(10)

        def hold_before_commit() -> None:
            if before_commit is not None:
                before_commit()
            if index in self.reached:
                self.reached[index].set()
                assert self.release[index].wait(10)

        return self.inner.append(records, before_commit=hold_before_commit)

    def __getattr__(self, name: str) -> object:  # lease, settle, stats, checkpoint, close, ...
        return getattr(self.inner, name)


def rec(tag: str) -> NewRecord:
    return NewRecord("t", tag.encode(), 1)


def committed_payloads(path: Path) -> set[bytes]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT payload FROM records")}
    finally:
        conn.close()


async def test_a_committed_group_is_answered_while_the_next_commit_runs_and_that_one_only_after_it(
        tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    held: list[HeldCommitQueue] = []

    def factory() -> Queue:
        held.append(HeldCommitQueue(SqliteQueue(path)))
        return held[0]  # type: ignore[return-value]  # a Queue by delegation

    async with AsyncQueue(factory) as aq:
        hq = held[0]
        hq.hold(0, 1)
        hq.go.clear()
        tasks = [asyncio.create_task(aq.append([rec(f"a{i}")]), name=f"append-a{i}") for i in range(3)]
        assert await asyncio.to_thread(hq.entered.wait, 10)  # group 1 is in the writer, before its insert
        tasks += [asyncio.create_task(aq.append([rec(f"b{i}")]), name=f"append-b{i}") for i in range(3)]
        await asyncio.sleep(0)  # the rest is queued behind it: group 2
        hq.go.set()
        assert await asyncio.to_thread(hq.reached[0].wait, 10)
        assert not any(t.done() for t in tasks)  # group 1 is written but not committed: nobody answered
        hq.release[0].set()
        assert await asyncio.to_thread(hq.reached[1].wait, 10)  # group 2 is at its COMMIT, and held there
        n1, n2 = hq.groups
        group1, group2 = tasks[:n1], tasks[n1:n1 + n2]  # jobs are served in submission order
        answers = [await asyncio.wait_for(t, 10) for t in group1]
        on_disk = await asyncio.to_thread(committed_payloads, path)
        assert answers == [[i + 1] for i in range(n1)]
        assert {t.get_name().removeprefix("append-").encode() for t in group1} <= on_disk
        assert not any(t.done() for t in group2)
        assert not {t.get_name().removeprefix("append-").encode() for t in group2} & on_disk
        hq.release[1].set()
        results = await asyncio.gather(*tasks)
    assert (n1 + n2, sorted(s for seqs in results for s in seqs)) == (6, list(range(1, 7)))


async def test_a_failing_next_commit_fails_only_its_own_callers_not_the_held_group_before_it(
        tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    held: list[HeldCommitQueue] = []

    def open_small_disk() -> Queue:
        q = SqliteQueue(path)
        assert q._conn is not None
        pages = q._conn.execute("PRAGMA page_count").fetchone()[0]
        q._conn.execute(f"PRAGMA max_page_count = {pages + 4}")  # room for small records only
        held.append(HeldCommitQueue(q))
        return held[0]  # type: ignore[return-value]  # a Queue by delegation

    async with AsyncQueue(open_small_disk, max_batch_records=2) as aq:
        hq = held[0]
        hq.go.clear()
        first = asyncio.create_task(aq.append([rec("s0")]), name="append-s0")
        assert await asyncio.to_thread(hq.entered.wait, 10)
        small = [asyncio.create_task(aq.append([rec(f"s{i}")]), name=f"append-s{i}") for i in (1, 2)]
        big = asyncio.create_task(aq.append([NewRecord("t", b"x" * 200_000, 1)]), name="append-big")
        await asyncio.sleep(0)  # all three are queued behind s0: groups [s0], [s1, s2], [big]
        hq.go.set()
        outcomes = await asyncio.gather(first, *small, big, return_exceptions=True)
        assert hq.groups == [1, 2, 1]
        assert outcomes[:3] == [[1], [2], [3]]
        assert isinstance(outcomes[3], StoreFull)
        assert (await aq.stats()).depth == 3
