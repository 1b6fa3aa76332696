"""Clock integrity: detect wall-clock steps against the monotonic clock; know whether the clock is synced.

Theory of operation. Field boxes often boot without a battery-backed RTC (wall clock in 1970) and get
time from NTP/GNSS/cellular later, sometimes much later. Readings carry UTC epoch ns, so the agent must
(1) flag readings stamped before the first time sync and (2) notice when the wall clock jumps, so readings
already stamped in the old time frame can be re-stamped (or flagged) instead of landing 55 years off.

Step detection: the monotonic clock never jumps, so `offset = wall - monotonic` is constant while the
wall clock runs freely, drifts slowly while NTP slews it (at most `max_slew_ppm`, 500 ppm for the kernel
PLL that ntpd/timesyncd/chrony use by default), and changes abruptly when the clock is stepped (settimeofday,
`date -s`, an NTP step). `check()` compares the offset with the one seen at the previous check; a change
larger than `step_threshold_s` plus the slew the elapsed time allows is a `ClockStep`. Every `stamp()`
checks first, so a step is noticed before the first reading of the new time frame is stamped, and all
stamps of the old frame are <= `ClockStep.before_wall_ns`.

Sync state latches to synced on the first of these observations (none needs root):
- a step from before 2020 (`min_plausible_ns`) to a plausible time: someone set the clock;
- `/run/systemd/timesync/synchronized` exists (systemd-timesyncd creates it after its first sync);
- adjtimex(2) in read-only mode (modes=0) does not return TIME_ERROR, i.e. the kernel's STA_UNSYNC bit
  is clear: ntpd, chrony and timesyncd all clear it once they discipline the clock. Under a seccomp
  filter that denies adjtimex this probe answers "don't know" (the unit file allows it; see systemd/);
- `mark_synced(reason)`: the composition root learned the time some other way (GNSS, the broker).
A clock that reads before 2020 is never called synced, whatever the probes say.

Suspend: CLOCK_MONOTONIC stops while the system sleeps, so waking up looks like a forward step. Field
boxes do not suspend; on hosts that do, pass a CLOCK_BOOTTIME reader as `monotonic_ns`.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from drivers.base import ClockState

log = logging.getLogger(__name__)

MIN_PLAUSIBLE_NS = 1_577_836_800 * 1_000_000_000  # 2020-01-01T00:00:00Z: earlier readings mean "never set"
TIMESYNC_FLAG_PATH = "/run/systemd/timesync/synchronized"
DEFAULT_MAX_SLEW_PPM = 500.0
TIME_ERROR = 5  # adjtimex(2) return value: the clock is not synchronized (STA_UNSYNC)
_TIMEX_BUFFER_BYTES = 512  # larger than struct timex on every ABI; with modes=0 the kernel only fills it

SyncProbe = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The wall clock jumped by `step_ns` relative to the monotonic clock (positive: forward)."""

    step_ns: int
    before_wall_ns: int  # last wall time seen in the old frame: every old-frame stamp is <= this
    after_wall_ns: int  # first wall time seen in the new frame
    monotonic_ns: int  # when the step was noticed
    brought_sync: bool = False  # the clock was set: from before 2020 (never set) to a plausible time

    @property
    def step_s(self) -> float:
        return self.step_ns / 1e9


def restamp(ts_ns: int, step: ClockStep) -> int:
    """A timestamp taken in the old frame, moved into the new frame of `step` (pure).

    Exact when the reading was stamped before the step (the monotonic clock bridged the jump). Apply it
    only to stamps known to predate the step: readings still buffered when the step was reported, or
    records appended before it. By value, `ts_ns <= step.before_wall_ns` identifies old-frame stamps
    for a forward step; after a backward step the two frames overlap and only ordering can tell.
    """
    return ts_ns + step.step_ns


def _iso(ts_ns: int) -> str:
    try:
        return datetime.fromtimestamp(ts_ns / 1e9, tz=UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ts_ns} ns"  # beyond what datetime can show: still worth logging


def timesyncd_synced(flag_path: str = TIMESYNC_FLAG_PATH) -> str | None:
    """A reason string if systemd-timesyncd has synchronized the clock since boot, else None."""
    if os.path.exists(flag_path):
        return f"systemd-timesyncd: {flag_path} exists"
    return None


def kernel_synced() -> str | None:
    """A reason string if the kernel says its clock is disciplined (adjtimex, read-only), else None.

    None also when adjtimex is unavailable (non-Linux, seccomp-denied): "don't know" is not "synced".
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        adjtimex = libc.adjtimex
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(_TIMEX_BUFFER_BYTES)  # zeroed: modes=0 reads, never sets
    state = adjtimex(buf)
    if state < 0 or state == TIME_ERROR:
        return None
    return f"kernel: adjtimex reports the clock synchronized (state {state})"


def system_time_synced() -> str | None:
    """The default sync probe: systemd-timesyncd's flag file, then the kernel's STA_UNSYNC bit."""
    return timesyncd_synced() or kernel_synced()


class ClockMonitor:
    """Watches the wall clock against the monotonic clock; stamps readings with their clock state.

    Not thread-safe: call it from the event loop (it is cheap: two clock reads, and until the first
    sync a rate-limited stat + syscall).
    """

    def __init__(
        self,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        step_threshold_s: float = 2.0,
        *,
        sync_probe: SyncProbe | None = system_time_synced,
        probe_interval_s: float = 5.0,
        max_slew_ppm: float = DEFAULT_MAX_SLEW_PPM,
        min_plausible_ns: int = MIN_PLAUSIBLE_NS,
        on_step: Callable[[ClockStep], None] | None = None,
        history: int = 32,
    ) -> None:
        if step_threshold_s <= 0:
            raise ValueError("step_threshold_s must be > 0")
        if max_slew_ppm < 0 or probe_interval_s < 0:
            raise ValueError("max_slew_ppm and probe_interval_s must be >= 0")
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        self.step_threshold_ns = int(step_threshold_s * 1e9)
        self._sync_probe = sync_probe
        self._probe_interval_ns = int(probe_interval_s * 1e9)
        self._max_slew_ppm = max_slew_ppm
        self.min_plausible_ns = min_plausible_ns
        self._on_step = on_step
        self.steps: collections.deque[ClockStep] = collections.deque(maxlen=history)  # most recent last
        self._sync_reason: str | None = None
        self._last_wall_ns = wall_ns()
        self._last_mono_ns = monotonic_ns()
        self._offset_ns = self._last_wall_ns - self._last_mono_ns
        self._next_probe_ns = self._last_mono_ns
        self._probe(self._last_mono_ns)

    @property
    def synced(self) -> bool:
        """True once an external time sync was observed (latched; see the module docstring)."""
        return self._sync_reason is not None

    @property
    def sync_reason(self) -> str | None:
        """How the sync was observed, for logs and the status message; None while unsynced."""
        return self._sync_reason

    def mark_synced(self, reason: str) -> None:
        """Record a time sync learned outside this monitor (GNSS fix, broker time)."""
        if self._sync_reason is None:
            self._sync_reason = reason
            log.info("wall clock synchronized: %s", reason)

    def state(self, wall_ns: int) -> ClockState:
        """How far a stamp of wall_ns can be trusted right now."""
        if self.synced and wall_ns >= self.min_plausible_ns:
            return ClockState.SYNCED
        return ClockState.UNSYNCED

    def check(self) -> ClockStep | None:
        """Read both clocks; return the step since the previous check, if the wall clock stepped."""
        wall_ns = self._wall_ns()
        mono_ns = self._monotonic_ns()
        offset_ns = wall_ns - mono_ns
        jump_ns = offset_ns - self._offset_ns
        elapsed_ns = max(0, mono_ns - self._last_mono_ns)
        allowed_ns = self.step_threshold_ns + int(elapsed_ns * self._max_slew_ppm / 1e6)
        step: ClockStep | None = None
        if abs(jump_ns) > allowed_ns:
            brought_sync = self._last_wall_ns < self.min_plausible_ns <= wall_ns
            step = ClockStep(
                step_ns=jump_ns,
                before_wall_ns=self._last_wall_ns,
                after_wall_ns=wall_ns,
                monotonic_ns=mono_ns,
                brought_sync=brought_sync,
            )
            log.warning("wall clock stepped by %+.3f s (%s -> %s)",
                        step.step_s, _iso(self._last_wall_ns), _iso(wall_ns))
            if brought_sync and not self.synced:
                self.mark_synced(f"clock stepped from {_iso(self._last_wall_ns)} to {_iso(wall_ns)}")
            self.steps.append(step)
        # Slew is judged per check interval: the reference follows the clock, so slow NTP slewing never
        # accumulates into a false step.
        self._offset_ns = offset_ns
        self._last_wall_ns = wall_ns
        self._last_mono_ns = mono_ns
        self._probe(mono_ns)
        if step is not None and self._on_step is not None:
            self._on_step(step)
        return step

    def stamp(self) -> tuple[int, ClockState]:
        """(ts_ns, clock state) for a reading taken now; a pending step is detected (and reported) first."""
        self.check()
        return self._last_wall_ns, self.state(self._last_wall_ns)

    def _probe(self, mono_ns: int) -> None:
        if self._sync_probe is None or self.synced or mono_ns < self._next_probe_ns:
            return
        if self._last_wall_ns < self.min_plausible_ns:
            return  # whatever a daemon claims, a clock before 2020 was never set; the step will tell
        self._next_probe_ns = mono_ns + self._probe_interval_ns
        reason = self._sync_probe()
        if reason is not None:
            self.mark_synced(reason)
