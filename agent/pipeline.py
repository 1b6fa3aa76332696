"""Readings -> records: report-by-exception, grouping per device, durable group-committed append.

Theory of operation: drivers call `emit` from the event loop for every reading and card; `emit` only
appends to an in-memory list (never blocks, never awaits). `run` wakes every `flush_interval_s`, turns
what is pending into records (one TelemetryRecord per device per flush, one CardRecord per card) and
awaits the queue's append, which returns only after the SQLite transaction committed. A record is
accepted only then. If the queue stalls, pending readings are bounded by `max_pending`; the oldest are
dropped and counted in `dropped_overflow` (reported, never silent). On cancellation `run` flushes what
is pending once more, so a clean SIGTERM loses nothing. A cancel that lands while an append is with the
store's writer does not abandon it: the flush waits for that append's outcome (committed: done; refused:
the readings go back to pending) before it gives in, so nothing is stored twice under new seqs.

Store errors: a `StoreFull` (disk full and nothing evictable) or `StoreIOError` append stored nothing;
the readings go back in front of the pending list (still bounded by `max_pending`, oldest dropped and
counted) and the next flush waits a back-off (doubling from FULL_BACKOFF_MIN_S to FULL_BACKOFF_MAX_S),
so the agent keeps acquiring through a full disk and stores again once the forwarder made room. Any
other store error (`StoreCorrupt`: damage found at runtime, `StoreBusy`, `StoreClosed`) propagates: the
agent stops with a non-zero exit and the service manager restarts it, and start-up salvages.

Clock integrity (agent.clock): with a `clock` (ClockState oracle), a reading stamped while the wall clock
was never synchronized is flagged `unsynced`. When the clock steps (`clock_stepped`), readings still
pending were stamped in the old time frame: they are re-stamped into the new one (exact, the monotonic
clock bridged the step) and one `clock` event record tells the cloud about the step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from agent.clock import ClockStep, restamp
from drivers.base import CardReading, ClockState, Quality, Reading
from store_forward.model import NewRecord, Priority, StoreFull, StoreIOError
from uplink.schema.records import CardRecord, EventRecord, PointValue, TelemetryRecord, encode_record

log = logging.getLogger(__name__)

_GOOD, _BAD = Quality.GOOD, Quality.BAD  # Quality.X is a class attribute lookup: 4x a global's cost

FULL_BACKOFF_MIN_S = 0.5
FULL_BACKOFF_MAX_S = 30.0


class Appender(Protocol):
    async def append(self, records: Sequence[NewRecord]) -> list[int]: ...


class ClockOracle(Protocol):
    """What the pipeline needs from agent.clock.ClockMonitor."""

    def state(self, wall_ns: int) -> ClockState: ...


@dataclass
class DeviceStats:
    good: int = 0
    uncertain: int = 0
    bad: int = 0
    last_good_monotonic_s: float | None = None


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
    store_full: int = 0  # flushes refused by a full store (retried after a back-off)
    restamped: int = 0
    devices: dict[str, DeviceStats] = field(default_factory=dict)


class ReportByException:
    """Decides whether a reading is worth reporting: quality change, or a move beyond the point's deadband."""

    def __init__(self, deadbands: Mapping[tuple[str, str], float]) -> None:
        self._deadbands = dict(deadbands)
        self.active = bool(self._deadbands)  # without deadbands every reading is reported
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
        clock: ClockOracle | None = None,
        progress: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self._clock = clock
        self._progress = progress
        self._monotonic = monotonic
        self._events: list[EventRecord] = []
        self._rbe = ReportByException(deadbands or {})
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._on_commit = on_commit
        self._clock_ns = clock_ns
        self._pending: list[Reading | CardReading] = []
        self._wake = asyncio.Event()
        self.stats = PipelineStats()

    def reconfigure(
        self, *, deadbands: Mapping[tuple[str, str], float], flush_interval_s: float, max_pending: int
    ) -> None:
        """A committed config changed the pipeline settings: takes effect from the next flush."""
        self._rbe = ReportByException(deadbands)
        self._flush_interval_s = flush_interval_s
        self._max_pending = max_pending

    def clock_stepped(self, step: ClockStep) -> None:
        """The wall clock stepped: move pending old-frame stamps into the new frame, record the event."""
        moved: list[Reading | CardReading] = []
        n = 0
        for item in self._pending:
            # Everything pending was stamped before the step was noticed: the monotonic clock bridges it.
            if isinstance(item, Reading) or item.ts_ns:
                moved.append(replace(item, ts_ns=restamp(item.ts_ns, step)))
                n += 1
            else:
                moved.append(item)
        self._pending = moved
        self.stats.restamped += n
        self._events.append(
            EventRecord(
                source="agent",
                code="clock.step",
                severity="warning",
                ts_ns=step.after_wall_ns,
                message=f"wall clock stepped by {step.step_s:+.3f} s; {n} buffered reading(s) re-stamped",
            )
        )
        self._wake.set()

    def emit(self, item: Reading | CardReading) -> None:
        """Accept one reading or card; never blocks."""
        clock = self._clock
        if clock is not None and item.clock == ClockState.SYNCED and item.ts_ns:
            # Drivers stamp from the wall clock; only the clock monitor knows whether it was ever set.
            item = (
                item
                if clock.state(item.ts_ns) == ClockState.SYNCED
                else replace(item, clock=ClockState.UNSYNCED)
            )
        if isinstance(item, CardReading):
            self.stats.cards_in += 1
        else:
            # inline per-device counting: this runs for every scalar of every poll
            stats = self.stats
            stats.readings_in += 1
            d = stats.devices.get(item.device)
            if d is None:
                d = stats.devices[item.device] = DeviceStats()
            quality = item.quality
            if quality == _GOOD:
                d.good += 1
                d.last_good_monotonic_s = self._monotonic()
            elif quality == _BAD:
                d.bad += 1
            else:
                d.uncertain += 1
            if self._rbe.active and not self._rbe.should_report(item):
                stats.suppressed_by_deadband += 1
                return
        pending = self._pending
        pending.append(item)
        if len(pending) > self._max_pending:
            self._bound_pending()

    def _bound_pending(self) -> None:
        if len(self._pending) > self._max_pending:
            drop = len(self._pending) - self._max_pending
            del self._pending[:drop]
            self.stats.dropped_overflow += drop
            log.warning("pipeline: queue is not keeping up; dropped %d oldest readings", drop)

    async def run(self) -> None:
        backoff_s = 0.0
        try:
            while True:
                if self._progress is not None:
                    self._progress()  # alive: a stuck append (disk) stops these marks
                self._wake.clear()
                if backoff_s:
                    await asyncio.sleep(backoff_s)  # a wake (clock step) must not cut a back-off short
                else:
                    try:
                        async with asyncio.timeout(self._flush_interval_s):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                try:
                    await self.flush()
                except (StoreFull, StoreIOError) as exc:
                    backoff_s = min(FULL_BACKOFF_MAX_S, max(FULL_BACKOFF_MIN_S, backoff_s * 2))
                    log.warning(
                        "pipeline: the store refused %d reading(s) (%s); keeping them, retry in %.1f s",
                        len(self._pending),
                        exc,
                        backoff_s,
                    )
                    continue
                backoff_s = 0.0
        finally:
            # Clean shutdown: commit what drivers already handed us. `flush` is cancel-safe (it learns
            # the outcome of an append it started before giving in to a cancel), so a second cancel
            # here can neither duplicate nor silently drop what it was storing.
            if self._pending or self._events:
                try:
                    await self.flush()
                except (StoreFull, StoreIOError) as exc:
                    self.stats.dropped_overflow += len(self._pending)
                    log.error("pipeline: %d reading(s) not stored at stop: %s", len(self._pending), exc)

    async def flush(self) -> None:
        if not self._pending and not self._events:
            return
        items, self._pending = self._pending, []
        events, self._events = self._events, []
        records, cards, values = self._build(items)
        records[:0] = [NewRecord("event", encode_record(e), e.ts_ns, Priority.EVENT) for e in events]
        append = asyncio.get_running_loop().create_task(self._append(records), name="pipeline-append")
        cancelled = await _await_outcome(append)
        exc = append.exception()
        if exc is not None:
            # The queue refused: nothing of the transaction was stored. Put the readings back in front
            # so nothing is lost, then re-raise (StoreFull/StoreIOError: the caller backs off; any other
            # store error stops the agent).
            self._pending[:0] = items
            self._events[:0] = events
            self.stats.append_failures += 1
            if isinstance(exc, StoreFull):
                self.stats.store_full += 1
            self._bound_pending()
        else:
            self.stats.records_committed += len(records)
            self.stats.cards_committed += cards
            self.stats.values_committed += values
            if self._on_commit is not None:
                self._on_commit()
        if cancelled:
            raise asyncio.CancelledError  # honoured now that the append's outcome is accounted for
        if exc is not None:
            raise exc

    async def _append(self, records: list[NewRecord]) -> None:
        await self._queue.append(records)

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


async def _await_outcome(task: asyncio.Task[None]) -> bool:
    """Wait until `task` is done, even through cancellation; True if the waiter was cancelled meanwhile.

    Why: once submitted, an append cannot be withdrawn; the writer thread may still commit it after our
    await was cancelled (store_forward.facade, "Cancellation"). Treating a cancel as "not stored" and
    flushing the readings again would store them twice under new seqs. So the append runs as its own
    task, owned by the flush that awaits it to the end here, and a cancel is honoured only once the
    outcome is known. The writer thread answers every job (a closed queue answers StoreClosed), so this
    ends. `task` itself is never cancelled: only its waiter is.
    """
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])  # cancelling this wait leaves the task running
        except asyncio.CancelledError:
            cancelled = True
    return cancelled
