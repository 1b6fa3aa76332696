"""agent.watchdog: the health verdict behind the systemd watchdog (pure policy, fake clock)."""

from __future__ import annotations

import pytest

from agent.watchdog import LoopWatchdog, Progress, WatchdogPolicy


class FakeClock:
    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class NullSink:
    def watchdog(self) -> bool:
        return False

    def status(self, text: str) -> bool:
        return False


def policy(clock: FakeClock, **critical: Progress) -> WatchdogPolicy:
    return WatchdogPolicy(max_lag_s=10, stall_after_s=30, heartbeat_stale_s=11, critical=critical,
                          now_s=clock.now_s)


def run_beats(p: WatchdogPolicy, clock: FakeClock, seconds: int, *, lag_s: float = 0.01) -> None:
    for _ in range(seconds):
        expected = clock.now_s + 1
        clock.now_s += 1 + lag_s
        p.beat(expected_s=expected, now_s=clock.now_s)


def test_an_agent_whose_loop_keeps_time_and_whose_tasks_progress_is_healthy() -> None:
    clock = FakeClock()
    forwarder = Progress(clock)
    p = policy(clock, forwarder=forwarder)
    for _ in range(100):
        run_beats(p, clock, 1)
        forwarder.mark()
        assert p.health(clock.now_s) == (True, "healthy")


def test_a_loop_that_lagged_more_than_the_limit_is_unhealthy_even_after_it_recovered() -> None:
    clock = FakeClock()
    p = policy(clock)
    run_beats(p, clock, 3)
    run_beats(p, clock, 1, lag_s=12.5)  # something blocked the loop for 12.5 s
    run_beats(p, clock, 3)
    ok, reason = p.health(clock.now_s)
    assert not ok
    assert "event loop lagged 12.5 s" in reason


def test_a_lag_under_the_limit_is_tolerated() -> None:
    clock = FakeClock()
    p = policy(clock)
    run_beats(p, clock, 1, lag_s=9.0)
    assert p.health(clock.now_s)[0]


def test_a_silent_heartbeat_is_unhealthy() -> None:
    clock = FakeClock()
    p = policy(clock)
    run_beats(p, clock, 2)
    clock.now_s += 11.5  # asked from elsewhere while the loop never ran the heartbeat
    ok, reason = p.health(clock.now_s)
    assert not ok and "heartbeat silent for 11.5 s" in reason


def test_a_critical_task_without_recent_progress_is_named_as_stalled() -> None:
    clock = FakeClock()
    pipeline, forwarder = Progress(clock), Progress(clock)
    p = policy(clock, pipeline=pipeline, forwarder=forwarder)
    for _ in range(31):
        run_beats(p, clock, 1)
        pipeline.mark()
    ok, reason = p.health(clock.now_s)
    assert not ok
    assert "critical task forwarder made no progress for 31.3 s" in reason
    assert "pipeline" not in reason


def test_the_verdict_latches_so_systemd_gets_to_restart_the_agent() -> None:
    clock = FakeClock()
    forwarder = Progress(clock)
    p = policy(clock, forwarder=forwarder)
    run_beats(p, clock, 31)
    first = p.health(clock.now_s)
    forwarder.mark()
    run_beats(p, clock, 5)
    assert p.health(clock.now_s) == first
    assert not first[0]
    assert p.failed == first[1]


def test_watchdog_defaults_scale_with_the_systemd_interval() -> None:
    wd = LoopWatchdog(NullSink(), interval_s=30, monotonic=FakeClock())
    assert wd.ping_period_s == 15
    assert wd.tick_s == 1.0
    assert wd.policy.max_lag_s == 10
    assert wd.policy.stall_after_s == 30
    short = LoopWatchdog(NullSink(), interval_s=0.4, monotonic=FakeClock())
    assert short.ping_period_s == pytest.approx(0.2)
    assert short.tick_s == pytest.approx(0.05)


def test_a_watchdog_without_a_systemd_interval_still_judges_health() -> None:
    clock = FakeClock()
    wd = LoopWatchdog(NullSink(), interval_s=None, monotonic=clock, critical={"x": lambda: 0.0})
    assert wd.interval_s is None
    ok, reason = wd.health(clock.now_s)
    assert not ok and "critical task x" in reason


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopWatchdog(NullSink(), interval_s=0, monotonic=FakeClock())
    with pytest.raises(ValueError):
        WatchdogPolicy(max_lag_s=0, stall_after_s=1, heartbeat_stale_s=1, critical={}, now_s=0)
