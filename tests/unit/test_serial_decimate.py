"""Per-signal decimation (domain item 23): each report carries the last value before it, nothing invented."""

from __future__ import annotations

import pytest

from drivers.serial.decimate import Decimator


def test_a_10_ms_signal_reported_every_second_carries_the_last_value_before_each_report() -> None:
    d: Decimator[tuple[str, float]] = Decimator(start_s=100.0, default_interval_s=1.0)
    reports: list[tuple[str, float]] = []
    for k in range(1, 301):  # 3 s of a 10 ms signal whose value is its own send time
        now = 100.0 + k / 100
        assert d.offer("EngineSpeed", ("EngineSpeed", now), now) is None
        reports += d.due(now)
    # Ticks at 101, 102 and 103; a sample sent exactly at a tick belongs to the next report.
    assert [v for _, v in reports] == [100.99, 101.99, 102.99]


def test_signals_with_different_intervals_report_on_their_own_grids() -> None:
    d: Decimator[str] = Decimator(start_s=0.0, default_interval_s=1.0, intervals_s={"soc": 5.0})
    out: list[str] = []
    for k in range(1, 101):
        now = k / 10
        d.offer("speed", f"speed@{k}", now)
        d.offer("soc", f"soc@{k}", now)
        out += d.due(now)
    assert [x for x in out if x.startswith("soc")] == ["soc@49", "soc@99"]
    assert len([x for x in out if x.startswith("speed")]) == 10


def test_a_signal_that_sent_nothing_since_the_last_report_reports_nothing() -> None:
    d: Decimator[int] = Decimator(start_s=0.0, default_interval_s=1.0)
    d.offer("x", 1, 0.5)
    assert d.due(1.0) == [1]
    assert d.due(2.0) == []
    assert d.next_deadline() is None


def test_undecimated_keys_pass_straight_through() -> None:
    d: Decimator[int] = Decimator(start_s=0.0, default_interval_s=1.0, intervals_s={"link": None})
    assert d.offer("link", 7, 0.3) == 7
    assert Decimator[int](start_s=0.0).offer("anything", 3, 0.0) == 3


def test_a_late_offer_releases_the_stale_value_first_so_output_matches_an_on_time_caller() -> None:
    d: Decimator[str] = Decimator(start_s=0.0, default_interval_s=1.0)
    d.offer("x", "a", 0.2)
    d.offer("x", "b", 1.7)  # the caller never asked for the tick at 1.0
    assert d.next_deadline() == float("-inf")
    assert d.due(1.7) == ["a"]
    assert d.due(2.0) == ["b"]


def test_report_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Decimator(start_s=0.0, default_interval_s=0.0)
    with pytest.raises(ValueError):
        Decimator(start_s=0.0, intervals_s={"x": -1.0})
