"""Ping the systemd watchdog only while the event loop is responsive and every critical task makes progress.

Theory of operation. systemd restarts a `WatchdogSec=` service that has not sent WATCHDOG=1 for that
long. A naive pinger proves only that *something* still runs; ours proves the agent is healthy:

- The heartbeat is a coroutine on the agent's own event loop. If the loop is blocked (sync I/O, a
  deadlock in a C call), the coroutine cannot run and the pings stop by themselves.
- Every tick it measures scheduling lag: how late it woke after `asyncio.sleep(tick_s)`. A loop that
  lagged more than `max_lag_s` is unhealthy even if it has recovered since (a loop that blocks for 20 s
  out of every 25 would otherwise keep pinging between blocks).
- Every critical task (forwarder, pipeline, each driver's scheduler, ...) exposes a callable returning
  the monotonic time of its last progress ("I am alive and not stuck", not "I did work": a task waiting
  for a link that is down must still mark progress while it waits). One older than `stall_after_s` is
  stalled.

The verdict latches: from the first unhealthy verdict on, the watchdog sends STATUS= with the reason once
and withholds WATCHDOG=1 for good, so systemd restarts the agent within `WatchdogSec` (a restart loses
nothing committed; the queue is durable). Resuming after a withheld ping would let a flapping agent
survive forever on every other ping.

`WatchdogPolicy` is the decision logic, pure (time passed in); `LoopWatchdog` is the async loop around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0  # judge health on this scale when the unit has no WatchdogSec=
MAX_TICK_S = 1.0


class WatchdogSink(Protocol):
    """What the watchdog needs from `agent.sdnotify.Notifier`."""

    def watchdog(self) -> bool: ...

    def status(self, text: str) -> bool: ...


class Progress:
    """Last-progress time of one critical task: `mark()` it in the task's loop, pass it as critical."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._last_s = monotonic()  # a task that never marks is stalled stall_after_s after creation

    def mark(self) -> None:
        self._last_s = self._monotonic()

    def __call__(self) -> float:
        return self._last_s


class WatchdogPolicy:
    """Judges health from loop lag and critical-task progress (pure: time is passed in)."""

    def __init__(
        self,
        *,
        max_lag_s: float,
        stall_after_s: float,
        heartbeat_stale_s: float,
        critical: Mapping[str, Callable[[], float]],
        now_s: float,
    ) -> None:
        if max_lag_s <= 0 or stall_after_s <= 0 or heartbeat_stale_s <= 0:
            raise ValueError("max_lag_s, stall_after_s and heartbeat_stale_s must be > 0")
        self.max_lag_s = max_lag_s
        self.stall_after_s = stall_after_s
        self.heartbeat_stale_s = heartbeat_stale_s
        self._critical = dict(critical)
        self._last_beat_s = now_s
        self._worst_lag_s = 0.0
        self._failure: str | None = None  # latched reason of the first unhealthy verdict

    def beat(self, *, expected_s: float, now_s: float) -> None:
        """The heartbeat ran at now_s; it was due at expected_s (the difference is scheduling lag)."""
        self._last_beat_s = now_s
        self._worst_lag_s = max(self._worst_lag_s, now_s - expected_s)

    @property
    def failed(self) -> str | None:
        """The reason the agent was judged unhealthy, or None while it is healthy."""
        return self._failure

    def health(self, now_s: float) -> tuple[bool, str]:
        """(ok, reason): ok only if the loop kept up and every critical task progressed recently."""
        if self._failure is None:
            self._failure = self._first_problem(now_s)
        if self._failure is not None:
            return False, self._failure
        return True, "healthy"

    def _first_problem(self, now_s: float) -> str | None:
        if self._worst_lag_s > self.max_lag_s:
            return f"event loop lagged {self._worst_lag_s:.1f} s (limit {self.max_lag_s:g} s)"
        silent_s = now_s - self._last_beat_s
        if silent_s > self.heartbeat_stale_s:
            return f"event loop heartbeat silent for {silent_s:.1f} s (limit {self.heartbeat_stale_s:g} s)"
        for name, last_progress in self._critical.items():
            idle_s = now_s - last_progress()
            if idle_s > self.stall_after_s:
                return (f"critical task {name} made no progress for {idle_s:.1f} s "
                        f"(limit {self.stall_after_s:g} s)")
        return None


class LoopWatchdog:
    """Sends WATCHDOG=1 every `interval_s / 2` while healthy; on the first failure, STATUS= and silence.

    `interval_s` is the systemd watchdog interval (`Notifier.watchdog_interval_s()`); None means the unit
    has no watchdog: health is still judged (and reported by STATUS=) but no pings are sent.
    Defaults scale with the interval: `max_lag_s` a third of it, `stall_after_s` all of it.
    """

    def __init__(
        self,
        notifier: WatchdogSink,
        *,
        interval_s: float | None,
        monotonic: Callable[[], float] = time.monotonic,
        critical: Mapping[str, Callable[[], float]] | None = None,
        max_lag_s: float | None = None,
        stall_after_s: float | None = None,
    ) -> None:
        if interval_s is not None and interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        scale_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        self.interval_s = interval_s
        self.ping_period_s = scale_s / 2
        # Several beats per ping period, so lag is measured finely and a ping is sent close to its slot.
        self.tick_s = min(MAX_TICK_S, self.ping_period_s / 4)
        self._notifier = notifier
        self._monotonic = monotonic
        lag_s = scale_s / 3 if max_lag_s is None else max_lag_s
        self.policy = WatchdogPolicy(
            max_lag_s=lag_s,
            stall_after_s=scale_s if stall_after_s is None else stall_after_s,
            heartbeat_stale_s=lag_s + self.tick_s,
            critical=critical or {},
            now_s=monotonic(),
        )
        self.pings_sent = 0

    def health(self, now_s: float) -> tuple[bool, str]:
        return self.policy.health(now_s)

    async def run(self) -> None:
        """Heartbeat and ping until cancelled (run it as a named task in the agent's TaskGroup)."""
        start_s = self._monotonic()
        # The loop only starts being judged now, however long the agent took to build its parts.
        self.policy.beat(expected_s=start_s, now_s=start_s)
        next_ping_s = start_s  # first ping right away: the watchdog counts from startup
        reported = False
        while True:
            now_s = self._monotonic()
            if now_s >= next_ping_s:
                ok, reason = self.policy.health(now_s)
                if ok:
                    if self.interval_s is not None and self._notifier.watchdog():
                        self.pings_sent += 1
                elif not reported:
                    reported = True
                    log.error("unhealthy, withholding the systemd watchdog so the agent restarts: %s", reason)
                    self._notifier.status(f"unhealthy: {reason}; watchdog withheld, awaiting restart")
                # Slots stay on the grid; after a long lag, the next slot is the next one in the future.
                while next_ping_s <= now_s:
                    next_ping_s += self.ping_period_s
            expected_s = self._monotonic() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self.policy.beat(expected_s=expected_s, now_s=self._monotonic())
