"""Backoff delays grow, cap, jitter within bounds and reset; spread_s is deterministic per client id."""

from __future__ import annotations

import random

import pytest

from uplink.backoff import Backoff, spread_s


def test_full_jitter_delays_stay_below_a_base_that_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=1.0, max_s=8.0, multiplier=2.0, jitter="full", rng=random.Random(1))
    bases = []
    for _ in range(6):
        base = backoff.base_s()
        bases.append(base)
        delay = backoff.next_delay()
        assert 0.0 <= delay <= base
    assert bases == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_equal_jitter_keeps_at_least_half_the_base() -> None:
    backoff = Backoff(initial_s=2.0, max_s=16.0, jitter="equal", rng=random.Random(7))
    for _ in range(10):
        base = backoff.base_s()
        delay = backoff.next_delay()
        assert base / 2 <= delay <= base


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, rng=random.Random(3))
    for _ in range(4):
        backoff.next_delay()
    assert backoff.base_s() == 8.0
    backoff.reset()
    assert backoff.base_s() == 0.5
    assert backoff.attempts == 0
    assert backoff.next_delay() <= 0.5


def test_the_same_seed_gives_the_same_delays() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.next_delay() for _ in range(8)] == [b.next_delay() for _ in range(8)]


def test_thousands_of_failures_never_overflow_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, multiplier=10.0, rng=random.Random(0))
    for _ in range(5000):
        assert backoff.next_delay() <= 30.0
    assert backoff.base_s() == 30.0


def test_full_jitter_actually_spreads_the_delays() -> None:
    backoff = Backoff(initial_s=10.0, max_s=10.0, rng=random.Random(5))
    delays = [backoff.next_delay() for _ in range(200)]
    assert min(delays) < 2.5
    assert max(delays) > 7.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0.0},
        {"initial_s": 2.0, "max_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": "none"},
    ],
)
def test_nonsense_parameters_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_spread_is_deterministic_per_client_and_inside_the_window() -> None:
    first = spread_s("well-0042", 60.0)
    assert first == spread_s("well-0042", 60.0)
    assert 0.0 <= first < 60.0
    assert spread_s("well-0042", 0.0) == 0.0


def test_spread_distributes_a_fleet_across_the_window() -> None:
    window_s = 100.0
    slots = [spread_s(f"truck-{i}", window_s) for i in range(1000)]
    deciles = [0] * 10
    for s in slots:
        deciles[int(s // 10)] += 1
    # A fleet of 1000 must not bunch up: every tenth of the window gets a fair share.
    assert all(50 <= n <= 150 for n in deciles), deciles
