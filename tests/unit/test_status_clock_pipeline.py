"""Status payloads and the pipeline's clock integrity: unsynced flags, re-stamping on a step, the event."""

from __future__ import annotations

from collections.abc import Sequence

from agent.clock import ClockStep
from agent.pipeline import Pipeline
from agent.status import death, will_for
from drivers.base import ClockState, Quality, Reading
from store_forward.model import NewRecord
from uplink.schema.commands import decode_status
from uplink.schema.records import EventRecord, TelemetryRecord, decode_record


class Recorder:
    def __init__(self) -> None:
        self.committed: list[NewRecord] = []

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        self.committed.extend(records)
        return list(range(len(records)))


class Oracle:
    def __init__(self, synced: bool) -> None:
        self.synced = synced

    def state(self, wall_ns: int) -> ClockState:
        return ClockState.SYNCED if self.synced else ClockState.UNSYNCED


def test_the_will_is_a_retained_qos1_offline_status() -> None:
    will = will_for("w1", "fg/v1/w1/status", use_properties=True, wall_ns=lambda: 5)
    assert will.retain and will.qos == 1 and will.properties.content_type
    status = decode_status(will.payload)
    assert (status.state, status.agent, status.reason, status.ts_ns) == (
        "offline",
        "w1",
        "connection lost",
        5,
    )
    assert decode_status(death("w1", reason="stopped", config_version="3", wall_ns=9)).config_version == "3"


async def test_readings_stamped_before_the_first_sync_are_flagged_unsynced() -> None:
    rec, oracle = Recorder(), Oracle(synced=False)
    p = Pipeline(rec, clock=oracle)
    p.emit(Reading("d", "p", 1.0, Quality.GOOD, 100))
    oracle.synced = True
    p.emit(Reading("e", "p", 2.0, Quality.GOOD, 200))
    await p.flush()
    clocks = {
        r.device: r.clock
        for r in map(decode_record, (n.payload for n in rec.committed))
        if isinstance(r, TelemetryRecord)
    }
    assert clocks == {"d": "unsynced", "e": "synced"}


async def test_a_clock_step_restamps_pending_readings_and_records_an_event() -> None:
    rec = Recorder()
    p = Pipeline(rec, clock=Oracle(synced=True))
    p.emit(Reading("d", "p", 1.0, Quality.GOOD, 1_000))
    p.clock_stepped(
        ClockStep(step_ns=10**12, before_wall_ns=1_000, after_wall_ns=10**12 + 1_500, monotonic_ns=7)
    )
    await p.flush()
    records = [decode_record(n.payload) for n in rec.committed]
    event = next(r for r in records if isinstance(r, EventRecord))
    tele = next(r for r in records if isinstance(r, TelemetryRecord))
    assert event.code == "clock.step" and "1 buffered reading" in event.message
    assert tele.values[0].ts_ns == 1_000 + 10**12
    assert p.stats.restamped == 1
