"""agent.clock: wall-clock steps against the monotonic clock, sync state, re-stamping (fake clocks)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.clock import (
    MIN_PLAUSIBLE_NS,
    ClockMonitor,
    ClockStep,
    kernel_synced,
    restamp,
    timesyncd_synced,
)
from drivers.base import ClockState

S = 1_000_000_000
BOOT_1970_NS = 12 * S  # an RTC-less box wakes up at 1970-01-01T00:00:12Z
REAL_NOW_NS = int(datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC).timestamp()) * S


class FakeClocks:
    """A wall and a monotonic clock that move only when told; the wall clock can slew and step."""

    def __init__(self, wall_ns: int, mono_ns: int = 7 * S) -> None:
        self.wall = wall_ns
        self.mono = mono_ns

    def wall_ns(self) -> int:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def advance(self, seconds: float, *, slew_ppm: float = 0.0) -> None:
        """Let time pass; with slew_ppm, the wall clock runs that much fast (NTP slewing it)."""
        self.mono += int(seconds * S)
        self.wall += int(seconds * S * (1 + slew_ppm / 1e6))

    def step(self, seconds: float) -> None:
        self.wall += int(seconds * S)


def monitor(clocks: FakeClocks, **kwargs: object) -> ClockMonitor:
    kwargs.setdefault("sync_probe", None)  # the host's real sync state must not leak into the tests
    return ClockMonitor(clocks.wall_ns, clocks.monotonic_ns, **kwargs)  # type: ignore[arg-type]


def test_a_box_booted_in_1970_stamps_its_readings_unsynced() -> None:
    clocks = FakeClocks(BOOT_1970_NS)
    mon = monitor(clocks)
    clocks.advance(3)
    ts_ns, state = mon.stamp()
    assert ts_ns == BOOT_1970_NS + 3 * S
    assert state is ClockState.UNSYNCED
    assert not mon.synced


def test_a_later_ten_year_step_from_1970_is_reported_with_its_size_and_marks_the_clock_synced() -> None:
    clocks = FakeClocks(BOOT_1970_NS)
    mon = monitor(clocks)
    clocks.advance(60)
    assert mon.check() is None
    clocks.advance(1)
    target_ns = REAL_NOW_NS
    jump_ns = target_ns - clocks.wall
    clocks.wall = target_ns  # timesyncd / `date -s` sets the clock
    step = mon.check()
    assert step is not None
    assert step.step_ns == jump_ns
    assert step.step_s > 10 * 365 * 24 * 3600
    assert step.brought_sync
    assert step.after_wall_ns == target_ns
    assert step.before_wall_ns == BOOT_1970_NS + 60 * S
    assert mon.synced and "1970-01-01" in (mon.sync_reason or "")
    assert mon.stamp() == (target_ns, ClockState.SYNCED)
    assert list(mon.steps) == [step]


def test_readings_buffered_before_the_step_are_restamped_to_when_they_were_really_taken() -> None:
    clocks = FakeClocks(BOOT_1970_NS)
    mon = monitor(clocks)
    clocks.advance(5)
    early_ts_ns, early_state = mon.stamp()
    clocks.advance(95)
    clocks.wall = REAL_NOW_NS  # the clock is set 100 s after boot
    later_ts_ns, _ = mon.stamp()
    step = mon.steps[-1]
    assert early_state is ClockState.UNSYNCED
    assert early_ts_ns <= step.before_wall_ns < step.after_wall_ns
    # The reading was taken 95 s before the set; in the new frame it lands exactly 95 s before.
    assert restamp(early_ts_ns, step) == later_ts_ns - 95 * S


def test_restamp_moves_a_timestamp_by_the_step_in_either_direction() -> None:
    forward = ClockStep(step_ns=3 * S, before_wall_ns=0, after_wall_ns=0, monotonic_ns=0)
    backward = ClockStep(step_ns=-7 * S, before_wall_ns=0, after_wall_ns=0, monotonic_ns=0)
    assert restamp(REAL_NOW_NS, forward) == REAL_NOW_NS + 3 * S
    assert restamp(REAL_NOW_NS, backward) == REAL_NOW_NS - 7 * S
    assert forward.step_s == 3.0


@pytest.mark.parametrize("check_every_s", [0.1, 1.0, 60.0, 3600.0, 7200.0])
def test_small_ntp_slews_are_not_reported_as_steps(check_every_s: float) -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    mon = monitor(clocks)
    total_s = 0.0
    while total_s < 4 * 3600:
        clocks.advance(check_every_s, slew_ppm=500)  # the kernel PLL's maximum rate
        total_s += check_every_s
        assert mon.check() is None
    # In four hours the slew moved the clock by 7.2 s in all: more than the threshold, never at once.
    assert clocks.wall - REAL_NOW_NS - int(total_s * S) > 7 * S
    assert not mon.steps


def test_a_jump_just_under_the_threshold_is_not_a_step_and_one_just_over_is() -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    mon = monitor(clocks, step_threshold_s=2.0, max_slew_ppm=0.0)
    clocks.advance(1)
    clocks.step(1.999)
    assert mon.check() is None
    clocks.advance(1)
    clocks.step(2.001)
    step = mon.check()
    assert step is not None and step.step_ns == int(2.001 * S)


def test_a_backward_step_is_reported_with_a_negative_size_and_the_clock_stays_synced() -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    mon = monitor(clocks)
    mon.mark_synced("test: GNSS fix")
    clocks.advance(10)
    clocks.step(-3600)
    step = mon.check()
    assert step is not None
    assert step.step_ns == -3600 * S
    assert not step.brought_sync
    assert mon.stamp()[1] is ClockState.SYNCED


def test_every_step_is_reported_once_to_on_step_even_when_a_stamp_noticed_it() -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    seen: list[ClockStep] = []
    mon = monitor(clocks, on_step=seen.append)
    clocks.advance(1)
    clocks.step(30)
    mon.stamp()
    assert mon.check() is None
    clocks.advance(1)
    clocks.step(-30)
    stepped = mon.check()
    assert [s.step_ns for s in seen] == [30 * S, -30 * S]
    assert seen[-1] is stepped


def test_a_clock_set_back_before_2020_after_a_sync_stamps_readings_unsynced() -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    mon = monitor(clocks)
    mon.mark_synced("test")
    clocks.advance(1)
    clocks.wall = BOOT_1970_NS  # RTC reset by a brown-out, say
    assert mon.stamp() == (BOOT_1970_NS, ClockState.UNSYNCED)


def test_a_sync_probe_marks_the_clock_synced_once_it_says_so() -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    answer: list[str | None] = [None]
    calls: list[int] = []

    def probe() -> str | None:
        calls.append(clocks.mono)
        return answer[0]

    mon = monitor(clocks, sync_probe=probe, probe_interval_s=5.0)
    assert mon.stamp()[1] is ClockState.UNSYNCED
    answer[0] = "chrony: synchronized"
    clocks.advance(1)
    assert mon.stamp()[1] is ClockState.UNSYNCED  # probed at most every 5 s
    clocks.advance(5)
    assert mon.stamp()[1] is ClockState.SYNCED
    assert mon.sync_reason == "chrony: synchronized"
    clocks.advance(60)
    mon.check()
    assert len(calls) == 2  # latched: no more probing once synced


def test_a_sync_probe_is_not_believed_while_the_clock_reads_before_2020() -> None:
    clocks = FakeClocks(BOOT_1970_NS)
    mon = monitor(clocks, sync_probe=lambda: "confused daemon", probe_interval_s=0.0)
    clocks.advance(10)
    assert mon.stamp()[1] is ClockState.UNSYNCED
    assert not mon.synced


def test_the_timesyncd_flag_file_is_a_sync_signal(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    clocks = FakeClocks(REAL_NOW_NS)
    mon = monitor(clocks, sync_probe=lambda: timesyncd_synced(str(flag)), probe_interval_s=0.0)
    assert not mon.synced
    flag.touch()
    clocks.advance(1)
    assert mon.stamp()[1] is ClockState.SYNCED
    assert str(flag) in (mon.sync_reason or "")


def test_the_kernel_probe_answers_without_root_privileges_or_says_it_does_not_know() -> None:
    answer = kernel_synced()
    assert answer is None or answer.startswith("kernel: adjtimex")


def test_the_plausibility_floor_is_the_start_of_2020() -> None:
    assert datetime.fromtimestamp(MIN_PLAUSIBLE_NS / S, tz=UTC) == datetime(2020, 1, 1, tzinfo=UTC)


def test_nonsense_thresholds_are_refused() -> None:
    clocks = FakeClocks(REAL_NOW_NS)
    with pytest.raises(ValueError, match="step_threshold_s"):
        monitor(clocks, step_threshold_s=0)
