"""Pipeline cancelled while its append waits on the store's writer thread (real AsyncQueue + SqliteQueue).

The gate sits at our own seam, the facade's queue factory: a SqliteQueue whose `append` tells the test it
was entered and then waits until the test opens the gate (standing for a slow fsync on flash). So the
cancel lands exactly while the append job is in the writer's hands, without sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from agent.pipeline import Pipeline
from drivers.base import Quality, Reading
from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord, StoreIOError
from store_forward.sqlite import SqliteQueue

GATE_TIMEOUT_S = 10.0


class GatedSqliteQueue(SqliteQueue):
    """A real SqliteQueue whose appends wait at a gate (the writer thread blocks there, as on slow flash)."""

    def __init__(self, path: Path, entered: threading.Event, gate: threading.Event,
                 fail_first: bool = False) -> None:
        super().__init__(path)
        self.entered = entered
        self.gate = gate
        self.fail_first = fail_first
        self.appends = 0

    def append(self, records: Sequence[NewRecord], *,
               before_commit: Callable[[], None] | None = None) -> list[int]:
        self.appends += 1
        self.entered.set()
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise AssertionError("the test never opened the gate")
        if self.fail_first and self.appends == 1:
            raise StoreIOError("injected: the first append failed")
        return super().append(records, before_commit=before_commit)


def reading(value: float) -> Reading:
    return Reading("well-1", "pressure", value, Quality.GOOD, time.time_ns())


async def _cancel_during_append(tmp_path: Path, *, fail_first: bool) -> tuple[list[bytes], Pipeline]:
    entered, gate = threading.Event(), threading.Event()
    q = AsyncQueue(lambda: GatedSqliteQueue(tmp_path / "queue.db", entered, gate, fail_first))
    await q.start()
    try:
        pipeline = Pipeline(q, flush_interval_s=0.01)
        task = asyncio.create_task(pipeline.run(), name="pipeline-under-test")
        pipeline.emit(reading(12.5))
        assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S), "the pipeline never appended"
        task.cancel()  # what Agent._shutdown does on SIGTERM, while the writer holds the append
        await asyncio.sleep(0)  # let the cancel be delivered before the writer answers
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        batch = await q.lease(100, time.monotonic())
        return [r.payload for r in batch.records], pipeline
    finally:
        gate.set()
        await q.close()


async def test_a_cancel_while_the_writer_holds_the_append_stores_the_readings_exactly_once(
    tmp_path: Path,
) -> None:
    payloads, pipeline = await _cancel_during_append(tmp_path, fail_first=False)
    assert len(payloads) == 1
    assert pipeline.stats.records_committed == 1
    assert pipeline.stats.append_failures == 0


async def test_a_cancel_while_a_failing_append_is_held_keeps_the_readings_for_the_final_flush(
    tmp_path: Path,
) -> None:
    payloads, pipeline = await _cancel_during_append(tmp_path, fail_first=True)
    assert len(payloads) == 1  # the refused append stored nothing; the stop flush stored it once
    assert pipeline.stats.append_failures == 1
    assert pipeline.stats.records_committed == 1


async def test_a_second_cancel_during_the_final_flush_still_stores_each_reading_once(tmp_path: Path) -> None:
    entered, gate = threading.Event(), threading.Event()
    q = AsyncQueue(lambda: GatedSqliteQueue(tmp_path / "queue.db", entered, gate))
    await q.start()
    try:
        # A long flush interval: the only flush is the one run() makes at stop.
        pipeline = Pipeline(q, flush_interval_s=10.0)
        task = asyncio.create_task(pipeline.run(), name="pipeline-under-test")
        await asyncio.sleep(0)  # run() is now waiting for its flush interval
        pipeline.emit(reading(1.0))
        task.cancel()
        assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S), "the stop flush never appended"
        task.cancel()  # an impatient owner cancels again while the stop flush is with the writer
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        batch = await q.lease(100, time.monotonic())
        assert len(batch.records) == 1
        assert pipeline.stats.records_committed == 1
    finally:
        gate.set()
        await q.close()
