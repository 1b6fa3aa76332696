"""Unit tests of the parametric card generator and the simulated well's register model (no network)."""

from __future__ import annotations

import pytest

from drivers.modbus.card import parse_acquisition_time
from hil.a11_map import A11Map
from hil.cards import CONDITIONS, fill_coefficient, generate_card
from hil.wellsite import WellSim

T0_NS = 1_714_950_489 * 10**9


def test_the_same_seed_gives_identical_cards_and_another_seed_does_not():
    a = generate_card("well-007", 3, T0_NS, 1203)
    assert a == generate_card("well-007", 3, T0_NS, 1203)
    assert a.load_kn != generate_card("well-007", 4, T0_NS, 1203).load_kn
    assert a.load_kn != generate_card("well-007", 3, T0_NS + 10**9, 1203).load_kn


@pytest.mark.parametrize("condition", sorted(set(CONDITIONS) - {1232}))  # 1232: the load cell is dead
def test_cards_stay_in_the_physical_ranges_of_a_beam_pump(condition: int):
    for i in range(40):
        c = generate_card(f"well-{i:03d}", 1, T0_NS + i, condition, n_points=50 + 5 * i)
        assert len(c.position_m) == len(c.load_kn) == c.n_points
        assert all(5.0 <= v <= 60.0 for v in c.load_kn)
        if condition == 1302:
            assert c.spm == 0 and not any(c.position_m)
            continue
        assert 2.0 <= c.spm <= 6.0 and 1.5 <= c.stroke_m <= 5.0
        assert min(c.position_m) == 0.0 and max(c.position_m) <= c.stroke_m
        if c.current_a is not None:
            assert all(0.0 <= v <= 40.0 for v in c.current_a)
            assert c.power_kw is not None and len(c.power_kw) == c.n_points


def test_the_fill_feature_falls_from_normal_to_incomplete_fillage_to_pumped_off():
    def mean_fill(code: int) -> float:
        cards = [generate_card(f"well-{i:03d}", 9, T0_NS, code) for i in range(20)]
        return sum(fill_coefficient(c.position_m, c.load_kn) for c in cards) / len(cards)

    normal, incomplete, pumped_off = mean_fill(1202), mean_fill(1203), mean_fill(1206)
    assert normal > 0.9
    assert normal > incomplete > pumped_off
    assert pumped_off < 0.5


def test_gas_interference_unloads_gradually_and_fluid_pound_abruptly():
    def unload_travel(code: int) -> float:
        # share of the stroke over which the downstroke load falls from 75 % to 25 % of its range (the
        # middle half of the transfer: a smoothstep over w covers it in ~0.35 w)
        c = generate_card("well-001", 5, T0_NS, code, noise=0.0)
        top = max(range(c.n_points), key=lambda i: c.position_m[i])
        lo, hi = min(c.load_kn), max(c.load_kn)
        down = [(c.position_m[i], c.load_kn[i]) for i in range(top, c.n_points)]
        p75 = next(p for p, v in down if v < lo + 0.75 * (hi - lo))
        p25 = next(p for p, v in down if v < lo + 0.25 * (hi - lo))
        return (p75 - p25) / c.stroke_m

    assert unload_travel(1209) > 0.15  # whole transfer > 0.4 stroke
    assert unload_travel(1203) < 0.07  # whole transfer < 1/5 stroke
    assert unload_travel(1206) < 0.07


def test_unknown_conditions_and_point_counts_are_refused():
    with pytest.raises(ValueError):
        generate_card("w", 1, T0_NS, 9999)
    with pytest.raises(ValueError):
        generate_card("w", 1, T0_NS, 1202, n_points=300)


def test_a_simulated_well_publishes_a_card_atomically_and_zero_fills_unused_slots():
    m = A11Map()
    w = WellSim("well-001", 1, now_s=1_714_950_000.0, card_interval_s=60.0, n_points=120)
    assert w.image[m.n_points_pdu] == 120
    for start, _ in m.curve_pdus().values():
        assert all(v == 0 for v in w.image[start + 120:start + 250])
    before = w.image[m.time_pdu:m.time_pdu + 6]
    w.advance(1_714_950_059.0)
    assert w.image[m.time_pdu:m.time_pdu + 6] == before
    w.advance(1_714_950_061.0)
    after = w.image[m.time_pdu:m.time_pdu + 6]
    assert parse_acquisition_time(after) == 1_714_950_060 * 10**9
    card = w.cards()[-1]
    pos_start, _ = m.curve_pdus()["load_kn"]
    assert w.image[pos_start:pos_start + 120] == [round(v * 100) & 0xFFFF for v in card.load_kn]


def test_energy_counters_never_decrease_and_a_trigger_makes_a_new_card():
    w = WellSim("well-002", 1, now_s=1000.0, card_interval_s=3600.0, trigger_delay_s=2.0)
    last = w.value("active_energy")
    for t in range(1001, 1400, 7):
        w.advance(float(t))
        now = w.value("active_energy")
        assert isinstance(now, float) and isinstance(last, float) and now >= last
        last = now
    cards_before = len(w.cards())
    trigger = w.map.pdu("card_trigger")
    assert w.write(trigger, [1], 1400.0) is None
    w.advance(1401.0)
    assert len(w.cards()) == cards_before and w.value("card_trigger") == 1  # still acquiring
    w.advance(1402.0)
    assert len(w.cards()) == cards_before + 1 and w.value("card_trigger") == 0


def test_writes_outside_the_writable_registers_or_with_bad_values_are_refused():
    w = WellSim("well-003", 1, now_s=0.0, card_interval_s=60.0)
    assert w.write(w.map.pdu("spm"), [0], 1.0) == 2
    assert w.write(w.map.pdu("card_set_points"), [20], 1.0) == 3
    assert w.value("card_set_points") == 200
    assert w.write(w.map.pdu("start_stop"), [2], 1.0) is None
    w.advance(61.0)
    assert w.cards()[-1].condition == 1302
    assert w.value("run_status") == 0


def test_the_card_ring_keeps_only_the_newest_cards():
    w = WellSim("well-004", 1, now_s=0.0, card_interval_s=60.0)
    w.ring = type(w.ring)(w.ring, maxlen=3)
    first = w.ring[0]
    for t in range(1, 5):
        w.advance(60.0 * t + 1)
    assert len(w.ring) == 3 and first not in w.ring
