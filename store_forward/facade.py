"""The event loop's door to a `Queue`: one writer thread owns the queue, and concurrent appends share commits.

Theory of operation. `start()` launches one thread, which builds the queue with `queue_factory` (so a
SQLite connection is created, used and closed on that thread only) and then serves jobs from a FIFO in
order. Coroutines submit jobs and await an asyncio future that the thread resolves via
`call_soon_threadsafe`; the loop never touches the disk.

Group commit. When the writer takes an append job it also takes every append queued behind it, up to
`max_batch_records` records, and commits them all in ONE transaction (one fsync), then resolves each
caller with its own seqs. So appends issued while a commit is running are merged into the next commit.
A caller's records are never split across transactions (a single append larger than the bound is
committed alone). If the previous commit merged several callers (i.e. appends are arriving
concurrently), the writer also lingers up to `max_batch_delay_s` for more before committing; a lone
append is committed at once. A non-append job ends the gathering, so a lease or settle waits for at
most one commit. If the merged transaction fails, every caller in it gets the error and none of its
records is stored.

Pipelined acknowledgements. Waking a group's callers costs the loop a burst of Python work (one task
step per caller, plus whatever the callers do next, typically building their next records), and the
loop shares the GIL with the writer. Delivered right after COMMIT, that burst collides with the
writer's own Python work on the next group (gathering it, building its rows), and the two serialize.
So when the next group is already waiting, the writer holds the committed group's results back and
delivers them from the next transaction's `before_commit` hook, i.e. while that COMMIT's fsync runs
without the GIL. The results are delivered at once instead whenever the writer would otherwise block
(nothing queued, lingering for more, a non-append job, an eviction run, close) and whenever the next
commit fails, so no caller waits on an idle writer. Only results of transactions that have committed
are ever delivered: the hold back delays an acknowledgement by at most one group's insert time, it
never makes one early.

Cancellation. Cancelling an awaiting `append` does not withdraw its records: they may still be
committed (and later forwarded); only the seqs are lost to the caller. At-least-once tolerates that.

Housekeeping. When no job arrived for `idle_checkpoint_s`, the writer calls `queue.checkpoint()` (for
SQLite a PASSIVE WAL checkpoint), keeping checkpoint I/O off the append path.

Bounds. With `bounds`, the writer applies the eviction policy after a commit at most every
`evict_interval_s` (so the queue may overshoot a bound by that interval's appends) and whenever it is
idle. When a commit fails with `StoreFull` (the disk is full), the writer checkpoints, evicts by policy
enough payload to hold the failed group (cause "disk_full", recorded as gaps like any eviction) and
retries the commit once; if nothing could be evicted (e.g. only protected alarms are stored) every
caller gets `StoreFull` and nothing of the group is stored. Without `bounds` nothing is ever evicted.

Lanes. `lease_next` is what the forwarder calls: live records first (enqueued within
`lanes.live_window_s`), and only when no live record is free, the backlog oldest-first within the
`BacklogBudget` (a byte-rate token bucket); backlog batches come back with `historical=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue as thread_queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from store_forward.model import (
    DEFAULT_LIVE_WINDOW_S,
    Batch,
    Gap,
    Lane,
    NewRecord,
    Queue,
    QueueStats,
    StoreClosed,
    StoreError,
    StoreFull,
    validate_new_records,
)
from store_forward.policy import BacklogBudget, LanePolicy, QueueBounds

# Head room asked of a disk-full eviction beyond the failed group's own payload, so the retry does not
# fail again on the index and WAL pages around it.
DISK_FULL_HEADROOM_BYTES = 64 * 1024

log = logging.getLogger(__name__)


_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


@dataclass(slots=True)
class _Job:
    op: str  # "append" | "call" | "stop"
    future: asyncio.Future[Any]
    records: Sequence[NewRecord] = ()
    call: Callable[[Queue], Any] | None = field(default=None)


class AsyncQueue:
    """Async facade over a `Queue` built and owned by one writer thread (see the module docstring)."""

    def __init__(self, queue_factory: Callable[[], Queue], *, max_batch_records: int = 512,
                 max_batch_delay_s: float = 0.005, idle_checkpoint_s: float = 1.0,
                 thread_name: str = "store-writer", bounds: QueueBounds | None = None,
                 evict_interval_s: float = 1.0, lanes: LanePolicy | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if max_batch_records < 1:
            raise ValueError("max_batch_records must be >= 1")
        if max_batch_delay_s < 0:
            raise ValueError("max_batch_delay_s must be >= 0")
        if idle_checkpoint_s <= 0:
            raise ValueError("idle_checkpoint_s must be > 0")
        if evict_interval_s < 0:
            raise ValueError("evict_interval_s must be >= 0")
        self._bounds = bounds
        self._evict_interval_s = evict_interval_s
        self._last_evict_s: float | None = None
        self._monotonic = monotonic
        self.lanes = lanes if lanes is not None else LanePolicy()
        self.backlog_budget = BacklogBudget(self.lanes)
        self._factory = queue_factory
        self._max_batch_records = max_batch_records
        self._max_batch_delay_s = max_batch_delay_s
        self._idle_checkpoint_s = idle_checkpoint_s
        self._thread_name = thread_name
        self._jobs: thread_queue.SimpleQueue[_Job] = thread_queue.SimpleQueue()
        # Results of the last committed group not delivered yet (writer thread only; see the module
        # docstring, "Pipelined acknowledgements").
        self._held: list[_Outcome] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self.commits = 0  # transactions that appended records; with `appends`, shows the group-commit ratio
        self.appends = 0  # append calls served
        self.evicted = 0  # records this facade's policy runs evicted (also counted in stats().evicted_total)
        self.full_recoveries = 0  # commits that hit StoreFull and succeeded after a disk-full eviction

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the queue on the writer thread; raises what the factory raised (e.g. `StoreCorrupt`)."""
        if self._thread is not None:
            raise RuntimeError("AsyncQueue already started")
        self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = self._loop.create_future()
        # Daemon: if the owner never calls close(), interpreter exit must not hang; an abrupt stop mid
        # commit is the same as a crash, which the store survives by design.
        self._thread = threading.Thread(target=self._serve, args=(opened,), name=self._thread_name,
                                        daemon=True)
        self._thread.start()
        try:
            await opened
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        self._accepting = True

    async def close(self) -> None:
        """Finish the jobs already submitted, close the queue and join the writer thread."""
        if self._thread is None or self._loop is None:
            return
        if self._accepting:
            self._accepting = False
            stopped: asyncio.Future[None] = self._loop.create_future()
            self._jobs.put(_Job("stop", stopped))
            try:
                await stopped
            finally:
                await asyncio.to_thread(self._thread.join)
                self._thread = None

    async def __aenter__(self) -> AsyncQueue:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the Queue contract, async -------------------------------------------------------------------

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        """Store records; returns their seqs once the transaction that holds them committed."""
        # Validate here, not in the shared transaction, so one caller's bad record fails only that caller.
        validate_new_records(records)
        if not records:
            return []
        seqs: list[int] = await self._submit(_Job("append", self._new_future(), records=tuple(records)))
        return seqs

    async def lease(self, max_items: int, now_s: float, *, max_bytes: int | None = None,
                    lease_s: float = 60.0, lane: Lane = Lane.ANY,
                    live_window_s: float = DEFAULT_LIVE_WINDOW_S) -> Batch:
        batch: Batch = await self._call(
            lambda q: q.lease(max_items, now_s, max_bytes=max_bytes, lease_s=lease_s, lane=lane,
                              live_window_s=live_window_s))
        return batch

    async def lease_next(self, max_items: int, now_s: float, *, max_bytes: int | None = None,
                         lease_s: float = 60.0) -> Batch:
        """Live first, then backlog within budget: the forwarder's one lease call.

        Returns an empty batch when nothing live is free and the backlog is empty or out of budget;
        `backlog_budget.wait_s(now_s, max_bytes)` says how long until the backlog may go again."""
        window_s = self.lanes.live_window_s
        budget = self.backlog_budget
        allowance = budget.allowance(now_s)
        if not budget.ready(now_s, max_bytes):
            backlog_max: int | None = 0  # wait for a whole batch's worth of budget
        elif allowance is None:
            backlog_max = max_bytes
        else:
            backlog_max = allowance if max_bytes is None else min(max_bytes, allowance)

        def live_then_backlog(q: Queue) -> Batch:
            batch = q.lease(max_items, now_s, max_bytes=max_bytes, lease_s=lease_s, lane=Lane.LIVE,
                            live_window_s=window_s)
            if batch.records or backlog_max == 0:
                return batch
            return q.lease(max_items, now_s, max_bytes=backlog_max, lease_s=lease_s, lane=Lane.BACKLOG,
                           live_window_s=window_s)

        batch: Batch = await self._call(live_then_backlog)
        if batch.historical and batch.records:
            self.backlog_budget.spend(batch.payload_bytes, now_s)
        return batch

    async def pending_gaps(self, limit: int = 100) -> list[Gap]:
        gaps: list[Gap] = await self._call(lambda q: q.pending_gaps(limit))
        return gaps

    async def settle_gap(self, gap_id: int) -> None:
        await self._call(lambda q: q.settle_gap(gap_id))

    async def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None:
        acked_t, rejected_t = tuple(acked), tuple(rejected)  # materialize on the loop, not the thread
        await self._call(lambda q: q.settle(batch, acked_t, rejected_t))

    async def evict(self, bounds: QueueBounds, now_s: float, *, free_bytes: int = 0) -> int:
        evicted: int = await self._call(lambda q: q.evict(bounds, now_s, free_bytes=free_bytes))
        return evicted

    async def stats(self) -> QueueStats:
        stats: QueueStats = await self._call(lambda q: q.stats())
        return stats

    # -- loop side helpers ---------------------------------------------------------------------------

    def _new_future(self) -> asyncio.Future[Any]:
        if not self._accepting or self._loop is None:
            raise StoreClosed("AsyncQueue is not started or already closed")
        return self._loop.create_future()

    async def _call(self, fn: Callable[[Queue], Any]) -> Any:
        return await self._submit(_Job("call", self._new_future(), call=fn))

    async def _submit(self, job: _Job) -> Any:
        self._jobs.put(job)
        return await job.future

    # -- writer thread -------------------------------------------------------------------------------

    def _serve(self, opened: asyncio.Future[None]) -> None:
        try:
            q = self._factory()
        except Exception as e:  # noqa: BLE001 -- re-raised by start() in the caller's coroutine
            self._resolve(opened, None, e)
            return
        self._resolve(opened, None, None)
        dirty = False
        last_group_callers = 1
        pending: _Job | None = None
        while True:
            if pending is not None:
                job, pending = pending, None
            else:
                try:
                    job = self._jobs.get_nowait()
                except thread_queue.Empty:
                    self._deliver_held()  # about to wait: nobody may wait on an idle writer
                    try:
                        job = self._jobs.get(timeout=self._idle_checkpoint_s)
                    except thread_queue.Empty:
                        if dirty:
                            dirty = False
                            self._apply_bounds(q, force=True)
                            self._idle_checkpoint(q)
                        continue
            if job.op != "append":
                self._deliver_held()
            if job.op == "stop":
                self._stop(q, job)
                return
            dirty = True
            if job.op == "append":
                group, pending = self._gather(job, last_group_callers > 1)
                last_group_callers = len(group)
                self._commit(q, group)
                self._apply_bounds(q, force=False)
            else:
                assert job.call is not None
                try:
                    result = job.call(q)
                except Exception as e:  # noqa: BLE001 -- re-raised in the awaiting caller's coroutine
                    self._resolve(job.future, None, e)
                else:
                    self._resolve(job.future, result, None)

    def _gather(self, first: _Job, linger: bool) -> tuple[list[_Job], _Job | None]:
        """The append jobs to commit together with `first`, and the job that ended the gathering."""
        group = [first]
        n = len(first.records)
        deadline = time.monotonic() + (self._max_batch_delay_s if linger else 0.0)
        while n < self._max_batch_records:
            try:
                nxt = self._jobs.get_nowait()
            except thread_queue.Empty:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return group, None
                # Lingering for callers that may be among those whose results are held: deliver first.
                self._deliver_held()
                try:
                    nxt = self._jobs.get(timeout=remaining_s)
                except thread_queue.Empty:
                    return group, None
            if nxt.op != "append" or n + len(nxt.records) > self._max_batch_records:
                return group, nxt
            group.append(nxt)
            n += len(nxt.records)
        return group, None

    def _commit(self, q: Queue, group: list[_Job]) -> None:
        records = [r for job in group for r in job.records]
        try:
            try:
                seqs = q.append(records, before_commit=self._deliver_held)
            except StoreFull:
                self._deliver_held()  # making room takes a while; the earlier group has committed
                if not self._make_room(q, sum(len(r.payload) for r in records)):
                    raise
                seqs = q.append(records)  # once: a second StoreFull goes to the callers
                self.full_recoveries += 1
        except Exception as e:  # noqa: BLE001 -- re-raised in every caller of the failed transaction
            self._held.extend((job.future, None, e) for job in group)
            self._deliver_held()
            return
        self.commits += 1
        self.appends += len(group)
        i = 0
        for job in group:
            self._held.append((job.future, seqs[i:i + len(job.records)], None))
            i += len(job.records)
        # Delivered by the next commit's before_commit hook, or as soon as the writer would wait.

    def _deliver_held(self) -> None:
        """Wake the callers whose results are held: one wake-up of the loop for all of them."""
        if self._held:
            outcomes, self._held = self._held, []
            self._resolve_all(outcomes)

    def _make_room(self, q: Queue, payload_bytes: int) -> bool:
        """After StoreFull: evict by policy enough for the failed group; True if anything was freed."""
        if self._bounds is None:
            return False
        self._idle_checkpoint(q)  # a checkpointed WAL restarts from its beginning instead of growing
        try:
            n = q.evict(self._bounds, self._monotonic(), free_bytes=payload_bytes + DISK_FULL_HEADROOM_BYTES)
        except StoreError as e:
            log.warning("store: disk full and the eviction to make room failed: %s", e)
            return False
        self.evicted += n
        if n:
            log.warning("store: disk full; evicted %d record(s) by policy to store %d payload bytes",
                        n, payload_bytes)
            self._idle_checkpoint(q)  # move the freed pages into the database file for reuse
        return n > 0

    def _apply_bounds(self, q: Queue, *, force: bool) -> None:
        if self._bounds is None or self._bounds.unbounded:
            return
        now_s = self._monotonic()
        last = self._last_evict_s
        if not force and last is not None and now_s - last < self._evict_interval_s:
            return
        self._last_evict_s = now_s
        self._deliver_held()
        try:
            n = q.evict(self._bounds, now_s)
        except StoreError as e:
            # The commits before this already succeeded; the next append reports a persistent problem.
            log.warning("store: eviction by policy failed, will retry: %s", e)
            return
        if n:
            self.evicted += n
            log.info("store: evicted %d record(s) by policy (recorded as gaps)", n)

    def _idle_checkpoint(self, q: Queue) -> None:
        try:
            q.checkpoint()
        except StoreError as e:
            # A housekeeping hint failed; the next write reports a persistent problem to its caller.
            log.warning("store: idle checkpoint failed: %s", e)

    def _stop(self, q: Queue, job: _Job) -> None:
        try:
            q.close()
        except Exception as e:  # noqa: BLE001 -- re-raised by close() in the caller's coroutine
            self._resolve(job.future, None, e)
        else:
            self._resolve(job.future, None, None)
        # Jobs that raced with close() (submitted after the stop job) must not wait forever.
        while True:
            try:
                late = self._jobs.get_nowait()
            except thread_queue.Empty:
                return
            self._resolve(late.future, None, StoreClosed("AsyncQueue closed"))

    def _resolve_all(self, outcomes: list[_Outcome]) -> None:
        assert self._loop is not None

        def apply() -> None:
            for fut, result, exc in outcomes:
                if fut.done():  # the awaiting caller was cancelled
                    continue
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)

        # RuntimeError: the loop is already closed, so nobody can be awaiting these futures any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(apply)

    def _resolve(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        assert self._loop is not None

        def apply() -> None:
            if fut.done():  # the awaiting caller was cancelled
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        # RuntimeError: the loop is already closed, so nobody can be awaiting this future any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(apply)
