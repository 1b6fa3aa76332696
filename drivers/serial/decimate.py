"""Pure per-signal decimation: fast signals (CAN at 10 ms) reported at a slower interval, last value wins.

Theory of operation. Each key (a signal) has a report interval, or None to pass every value through.
Report ticks lie on a grid `start_s + k * interval_s` (monotonic seconds), so reports of one interval
stay in phase with each other. A value offered between two ticks replaces the pending one; at the tick
the pending value (the last value before the report) is released exactly once. Intervals are half
open: a value offered exactly at a tick belongs to the next report. A signal that sent
nothing since the previous tick releases nothing: decimation never invents samples. Released items are
the offered objects unchanged, so a reading keeps the timestamp of the CAN frame it came from.

`offer` may be called late (the caller was busy past a tick): the stale pending value is released
first, then the new one becomes pending, so the output is the same as if `due` had been called on time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Slot(Generic[T]):
    interval_s: float
    item: T | None = None
    tick_s: float = math.inf  # report time of the pending item


class Decimator(Generic[T]):
    """Keyed last-value decimator with grid-aligned report ticks."""

    def __init__(self, *, start_s: float, default_interval_s: float | None = None,
                 intervals_s: Mapping[str, float | None] | None = None) -> None:
        for key, value in {"default": default_interval_s, **(intervals_s or {})}.items():
            if value is not None and value <= 0:
                raise ValueError(f"report interval of {key} must be > 0")
        self.start_s = start_s
        self.default_interval_s = default_interval_s
        self.intervals_s = dict(intervals_s or {})
        self._slots: dict[str, _Slot[T]] = {}
        self._ready: list[T] = []

    def interval_of(self, key: str) -> float | None:
        return self.intervals_s.get(key, self.default_interval_s)

    def _next_tick(self, interval_s: float, now_s: float) -> float:
        k = math.floor((now_s - self.start_s) / interval_s) + 1
        return self.start_s + k * interval_s

    def offer(self, key: str, item: T, now_s: float) -> T | None:
        """Take a new value; returns it back at once if `key` is not decimated, else None."""
        slot = self._slots.get(key)
        if slot is None:
            interval = self.interval_of(key)
            if interval is None:
                return item
            slot = self._slots[key] = _Slot(interval)
        if slot.item is not None and now_s >= slot.tick_s:
            self._ready.append(slot.item)
            slot.item = None
        if slot.item is None:
            slot.tick_s = self._next_tick(slot.interval_s, now_s)
        slot.item = item
        return None

    def due(self, now_s: float) -> list[T]:
        """Items whose report tick is at or before `now_s`, in tick order."""
        ripe = sorted((s for s in self._slots.values() if s.item is not None and s.tick_s <= now_s),
                      key=lambda s: s.tick_s)
        out, self._ready = self._ready, []
        for s in ripe:
            assert s.item is not None
            out.append(s.item)
            s.item = None
            s.tick_s = math.inf
        return out

    def next_deadline(self) -> float | None:
        """Monotonic time of the earliest pending report, None when nothing is pending."""
        if self._ready:
            return -math.inf
        ticks = [s.tick_s for s in self._slots.values() if s.item is not None]
        return min(ticks) if ticks else None
