"""Pipeline: report-by-exception, one record per device per flush, nothing lost on failure or stop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agent.pipeline import Pipeline, ReportByException
from drivers.base import CardReading, Quality, Reading
from store_forward.model import NewRecord, Priority
from uplink.schema.records import CardRecord, TelemetryRecord, decode_record


class Recorder:
    """Our own seam: an appender that records what was committed, or fails on demand."""

    def __init__(self) -> None:
        self.committed: list[NewRecord] = []
        self.fail_next = False

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk full")
        start = len(self.committed)
        self.committed.extend(records)
        return list(range(start + 1, start + 1 + len(records)))


def r(device: str, point: str, value: object, q: Quality = Quality.GOOD, ts: int = 1) -> Reading:
    return Reading(device, point, value, q, ts)  # type: ignore[arg-type]


def test_deadband_suppresses_small_moves_but_not_quality_changes() -> None:
    rbe = ReportByException({("w1", "p"): 0.5})
    assert rbe.should_report(r("w1", "p", 10.0))
    assert not rbe.should_report(r("w1", "p", 10.4))
    assert rbe.should_report(r("w1", "p", 10.6))
    assert rbe.should_report(r("w1", "p", 10.6, Quality.BAD))
    assert rbe.should_report(r("w1", "other", 1.0))
    assert rbe.should_report(r("w1", "other", 1.0))  # no deadband configured: every reading


async def test_readings_of_one_device_become_one_telemetry_record_per_flush() -> None:
    rec = Recorder()
    p = Pipeline(rec, clock_ns=lambda: 99)
    for i in range(5):
        p.emit(r("w1", f"p{i}", i, ts=10 + i))
    p.emit(r("w2", "p0", 7))
    await p.flush()
    assert len(rec.committed) == 2
    first = decode_record(rec.committed[0].payload)
    assert isinstance(first, TelemetryRecord) and first.device == "w1" and len(first.values) == 5
    assert rec.committed[0].ts_ns == 14 and rec.committed[0].priority == Priority.TELEMETRY
    assert p.stats.values_committed == 6


async def test_a_card_becomes_one_card_record_with_card_priority() -> None:
    rec = Recorder()
    p = Pipeline(rec)
    n = 200
    p.emit(
        CardReading(
            "w1",
            5,
            n,
            tuple([0.0] * n),
            tuple([1.0] * n),
            tuple([2.0] * n),
            tuple([3.0] * n),
            scalars={f"s{i}": i for i in range(29)},
            ts_ns=6,
        )
    )
    await p.flush()
    (new,) = rec.committed
    card = decode_record(new.payload)
    assert isinstance(card, CardRecord) and card.value_count == 829
    assert new.priority == Priority.CARD and new.kind == "card"


async def test_a_failed_append_keeps_the_readings_for_the_next_flush() -> None:
    rec = Recorder()
    p = Pipeline(rec)
    p.emit(r("w1", "a", 1))
    rec.fail_next = True
    with pytest.raises(OSError):
        await p.flush()
    p.emit(r("w1", "b", 2))
    await p.flush()
    (only,) = rec.committed
    record = decode_record(only.payload)
    assert isinstance(record, TelemetryRecord)
    assert [v.name for v in record.values] == ["a", "b"]


async def test_stopping_the_pipeline_flushes_what_is_pending() -> None:
    rec = Recorder()
    p = Pipeline(rec, flush_interval_s=3600)
    task = asyncio.create_task(p.run())
    await asyncio.sleep(0)
    p.emit(r("w1", "a", 1))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(rec.committed) == 1


def test_an_overflowing_backlog_drops_the_oldest_and_counts_them() -> None:
    p = Pipeline(Recorder(), max_pending=3)
    for i in range(5):
        p.emit(r("w1", f"p{i}", i))
    assert p.stats.dropped_overflow == 2
