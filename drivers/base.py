"""Value types every southbound driver emits, and the Driver protocol the agent runs.

A driver turns a field bus into `Reading`s (one point) and `CardReading`s (one atomic dynamometer
card). It calls `emit` for each; `emit` never blocks, so a driver never waits on the queue or uplink.
Timestamps are UTC epoch nanoseconds taken from an injected wall clock; deadlines use monotonic seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

Value = float | int | bool | str | None


class Quality(StrEnum):
    GOOD = "GOOD"
    UNCERTAIN = "UNCERTAIN"
    BAD = "BAD"


class ClockState(StrEnum):
    """How far the agent trusts its wall clock when it stamped a value."""

    SYNCED = "synced"
    UNSYNCED = "unsynced"  # taken before the first time sync (e.g. boot without RTC)


@dataclass(slots=True)
class Reading:
    """One point's value. Treat it as immutable: derive a changed copy with `dataclasses.replace`.

    Not `frozen=True` on purpose: a frozen dataclass's `__init__` sets each field through
    `object.__setattr__` (1.6 us per reading on the reference machine against 0.3 us), and a fleet
    creates one per scalar per poll (~2,300 a second for 833 wells), all on the event loop.
    """

    device: str
    point: str
    value: Value
    quality: Quality
    ts_ns: int  # agent time when the value was read, UTC epoch ns
    source_ts_ns: int | None = None  # device time, when the device supplies one
    reason: str | None = None  # why the quality is not GOOD ("timeout", "exception 02", ...)
    clock: ClockState = ClockState.SYNCED


@dataclass(frozen=True, slots=True)
class CardReading:
    """One dynamometer card captured atomically: scalars and four curves of n_points each.

    Curves that the device does not measure (no power meter) are None. `raw_registers` keeps the
    register image the card was decoded from, for replay and audit.
    """

    device: str
    acquired_at_ns: int  # the device's card acquisition time, UTC epoch ns
    n_points: int
    position_m: tuple[float, ...]
    load_kn: tuple[float, ...]
    current_a: tuple[float, ...] | None
    power_kw: tuple[float, ...] | None
    scalars: dict[str, Value] = field(default_factory=dict)
    quality: Quality = Quality.GOOD
    ts_ns: int = 0  # agent time when the capture finished
    reason: str | None = None
    clock: ClockState = ClockState.SYNCED
    raw_registers: dict[int, tuple[int, ...]] = field(default_factory=dict)  # start address -> words


Emit = Callable[[Reading | CardReading], None]


class Driver(Protocol):
    """A southbound bus. `run` acquires until cancelled; `write` sets a point and confirms by read-back."""

    name: str

    async def run(self, emit: Emit) -> None: ...

    async def write(self, point: str, value: Value) -> Reading: ...
