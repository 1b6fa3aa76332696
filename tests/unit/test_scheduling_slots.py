"""Staggered phases fall on coarse slots, spread over the whole stagger window."""

from __future__ import annotations

import math

from drivers.scheduling import MAX_STAGGER_WINDOW_S, STAGGER_SLOT_S, Schedule, stagger_phase_s


def _is_multiple(x: float, step: float) -> bool:
    return math.isclose(x / step, round(x / step), abs_tol=1e-9)


def test_a_fleet_of_phases_falls_on_every_slot_of_the_window_and_on_nothing_else() -> None:
    phases = {stagger_phase_s(k, 10.0) for k in range(833)}
    slots = int(MAX_STAGGER_WINDOW_S / STAGGER_SLOT_S)
    assert len(phases) == slots  # spread over the whole window, not bunched
    assert all(0.0 <= p < MAX_STAGGER_WINDOW_S and _is_multiple(p, STAGGER_SLOT_S) for p in phases)


def test_slots_share_the_fleet_evenly() -> None:
    counts: dict[float, int] = {}
    for k in range(833):
        p = stagger_phase_s(k, 10.0)
        counts[p] = counts.get(p, 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 3  # the golden-ratio sequence is even


def test_a_short_interval_spreads_over_the_interval_in_whole_slots() -> None:
    phases = {stagger_phase_s(k, 1.0) for k in range(100)}
    assert len(phases) == int(1.0 / STAGGER_SLOT_S)
    assert max(phases) < 1.0


def test_an_interval_shorter_than_a_slot_gives_every_job_the_same_phase() -> None:
    assert {stagger_phase_s(k, STAGGER_SLOT_S / 2) for k in range(10)} == {0.0}


def test_a_zero_slot_keeps_the_unrounded_golden_ratio_phases() -> None:
    phases = [stagger_phase_s(k, 10.0, slot_s=0) for k in range(50)]
    assert len(set(phases)) == 50
    assert not all(_is_multiple(p, STAGGER_SLOT_S) for p in phases)


def test_schedules_started_together_wake_together_when_they_share_a_slot() -> None:
    a = Schedule([("g", 10.0)], now_s=7.0, first_slot=0)
    same = [k for k in range(1, 200) if stagger_phase_s(k, 10.0) == stagger_phase_s(0, 10.0)]
    assert same  # another slot index lands in slot 0
    c = Schedule([("g", 10.0)], now_s=7.0, first_slot=same[0])
    assert a.next_deadline() == c.next_deadline()
