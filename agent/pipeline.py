"""Readings -> records: report-by-exception, grouping per device, durable group-committed append.

Theory of operation: drivers call `emit` from the event loop for every reading and card; `emit` only
appends to an in-memory list (never blocks, never awaits). `run` wakes every `flush_interval_s`, turns
what is pending into records (one TelemetryRecord per device per flush, one CardRecord per card) and
awaits the queue's append, which returns only after the SQLite transaction committed. A record is
accepted only then. If the queue stalls, pending readings are bounded by `max_pending`; the oldest are
dropped and counted in `dropped_overflow` (reported, never silent). On cancellation `run` flushes what
is pending once more, so a clean SIGTERM loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from drivers.base import CardReading, Quality, Reading
from store_forward.model import NewRecord, Priority
from uplink.schema.records import CardRecord, PointValue, TelemetryRecord, encode_record

log = logging.getLogger(__name__)


class Appender(Protocol):
    async def append(self, records: Sequence[NewRecord]) -> list[int]: ...


@dataclass
class PipelineStats:
    readings_in: int = 0
    cards_in: int = 0
    suppressed_by_deadband: int = 0
    dropped_overflow: int = 0
    records_committed: int = 0
    cards_committed: int = 0
    values_committed: int = 0
    append_failures: int = 0


class ReportByException:
    """Decides whether a reading is worth reporting: quality change, or a move beyond the point's deadband."""

    def __init__(self, deadbands: Mapping[tuple[str, str], float]) -> None:
        self._deadbands = dict(deadbands)
        self._last: dict[tuple[str, str], tuple[object, Quality]] = {}

    def should_report(self, r: Reading) -> bool:
        key = (r.device, r.point)
        deadband = self._deadbands.get(key)
        if deadband is None:
            return True
        last = self._last.get(key)
        if last is not None:
            last_value, last_quality = last
            if last_quality == r.quality:
                if r.value == last_value:
                    return False
                if (
                    isinstance(r.value, (int, float))
                    and isinstance(last_value, (int, float))
                    and not isinstance(r.value, bool)
                    and abs(r.value - last_value) <= deadband
                ):
                    return False
        self._last[key] = (r.value, r.quality)
        return True


class Pipeline:
    def __init__(
        self,
        queue: Appender,
        *,
        deadbands: Mapping[tuple[str, str], float] | None = None,
        flush_interval_s: float = 0.05,
        max_pending: int = 100_000,
        on_commit: Callable[[], None] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._queue = queue
        self._rbe = ReportByException(deadbands or {})
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._on_commit = on_commit
        self._clock_ns = clock_ns
        self._pending: list[Reading | CardReading] = []
        self._wake = asyncio.Event()
        self.stats = PipelineStats()

    def emit(self, item: Reading | CardReading) -> None:
        """Accept one reading or card; never blocks."""
        if isinstance(item, CardReading):
            self.stats.cards_in += 1
        else:
            self.stats.readings_in += 1
            if not self._rbe.should_report(item):
                self.stats.suppressed_by_deadband += 1
                return
        self._pending.append(item)
        if len(self._pending) > self._max_pending:
            drop = len(self._pending) - self._max_pending
            del self._pending[:drop]
            self.stats.dropped_overflow += drop
            log.warning("pipeline: queue is not keeping up; dropped %d oldest readings", drop)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._flush_interval_s)
                await self.flush()
        finally:
            # Clean shutdown: commit what drivers already handed us. Shielded so cancellation
            # of the owner does not abandon the final append half-way.
            if self._pending:
                await asyncio.shield(self.flush())

    async def flush(self) -> None:
        if not self._pending:
            return
        items, self._pending = self._pending, []
        records, cards, values = self._build(items)
        try:
            await self._queue.append(records)
        except BaseException:
            # Not committed: put the readings back in front so nothing is lost, then re-raise.
            self._pending[:0] = items
            self.stats.append_failures += 1
            raise
        self.stats.records_committed += len(records)
        self.stats.cards_committed += cards
        self.stats.values_committed += values
        if self._on_commit is not None:
            self._on_commit()

    def _build(self, items: list[Reading | CardReading]) -> tuple[list[NewRecord], int, int]:
        by_device: dict[str, list[PointValue]] = {}
        clock_of: dict[str, str] = {}
        records: list[NewRecord] = []
        cards = values = 0
        now_ns = self._clock_ns()
        for item in items:
            if isinstance(item, CardReading):
                card = CardRecord(
                    device=item.device,
                    acquired_at_ns=item.acquired_at_ns,
                    ts_ns=item.ts_ns or now_ns,
                    n_points=item.n_points,
                    position_m=list(item.position_m),
                    load_kn=list(item.load_kn),
                    current_a=None if item.current_a is None else list(item.current_a),
                    power_kw=None if item.power_kw is None else list(item.power_kw),
                    scalars=dict(item.scalars),
                    quality=str(item.quality),
                    reason=item.reason,
                    clock=str(item.clock),
                )
                records.append(NewRecord("card", encode_record(card), card.ts_ns, Priority.CARD))
                cards += 1
                values += card.value_count
            else:
                by_device.setdefault(item.device, []).append(
                    PointValue(item.point, item.value, str(item.quality), item.ts_ns, item.reason)
                )
                clock_of[item.device] = str(item.clock)
        for device, pvs in by_device.items():
            rec = TelemetryRecord(device, pvs, clock_of[device])
            ts_ns = max(pv.ts_ns for pv in pvs)
            records.append(NewRecord("telemetry", encode_record(rec), ts_ns, Priority.TELEMETRY))
            values += len(pvs)
        return records, cards, values
