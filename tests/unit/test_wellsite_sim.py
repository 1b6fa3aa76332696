"""Unit tests of the simulator's working conditions, field artefacts, strict map and fleet mode."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.modbus.wire import Request
from hil.a11_map import A11Map, vendor_variant_map
from hil.cards import Artefacts, card_features, generate_card, well_profile
from hil.wellsite import WellSim

T0_NS = 1_714_950_489 * 10**9


def mean_feature(code: int, name: str, *, per_weight: bool = False) -> float:
    values = []
    for i in range(15):
        c = generate_card(f"well-{i:03d}", 4, T0_NS, code)
        v = getattr(card_features(c.position_m, c.load_kn), name)
        values.append(v / well_profile(f"well-{i:03d}", 4).rod_weight_kn if per_weight else v)
    return statistics.mean(values)


@pytest.mark.parametrize(("code", "feature", "direction"), [
    (1203, "fill", "lower"),
    (1204, "fill", "lower"),
    (1206, "fill", "lower"),
    (1208, "load_range_kn", "lower"),
    (1212, "upstroke_loss", "higher"),
    (1213, "downstroke_mean_kn", "higher"),
    (1219, "min_load_kn", "lower"),
    (1222, "max_load_kn", "lower"),
    (1223, "corr", "higher"),
    (1223, "area_kn_m", "lower"),
    (1232, "load_range_kn", "lower"),
])
def test_each_condition_moves_its_feature_away_from_normal(code, feature, direction):
    normal, labelled = mean_feature(1202, feature), mean_feature(code, feature)
    assert generate_card("w", 1, T0_NS, code).condition == code
    assert (labelled < normal) if direction == "lower" else (labelled > normal), (normal, labelled)


def test_fillage_falls_from_incomplete_to_insufficient_supply_to_pumped_off():
    assert mean_feature(1203, "fill") > mean_feature(1204, "fill") > mean_feature(1206, "fill")


def test_rod_parted_and_tagging_are_judged_against_the_rod_weight():
    assert mean_feature(1222, "max_load_kn", per_weight=True) < 0.8  # below the buoyant rod weight
    tagged, normal = (mean_feature(c, "min_load_kn", per_weight=True) for c in (1219, 1202))
    assert tagged < normal
    assert mean_feature(1223, "corr") > 0.95


def test_artefact_counters_match_the_configured_rates():
    rates = Artefacts(noise=0.02, duplicate_rate=0.02, reverse_rate=0.01, gap_rate=0.005, frozen_rate=0.1)
    totals = {"duplicated": 0, "reversed": 0, "gap": 0, "frozen": 0}
    cards = 400
    for i in range(cards):
        c = generate_card(f"well-{i % 20:03d}", 2, T0_NS + i * 10**9, 1202, artefacts=rates)
        for kind, count in c.artefacts:
            totals[kind] += count
    samples = cards * 199  # every sample but the first may be hit
    assert totals["duplicated"] / samples == pytest.approx(0.02, rel=0.15)
    assert totals["reversed"] / samples == pytest.approx(0.01, rel=0.2)
    assert totals["gap"] / samples == pytest.approx(0.005, rel=0.3)
    assert totals["frozen"] / cards == pytest.approx(0.1, abs=0.04)


def test_a_frozen_sensor_repeats_one_load_and_a_clean_card_has_no_artefacts():
    frozen = generate_card("w", 1, T0_NS, 1202, artefacts=Artefacts(frozen_rate=1.0))
    assert len(set(frozen.load_kn)) == 1 and dict(frozen.artefacts)["frozen"] == 1
    assert generate_card("w", 1, T0_NS, 1202).artefacts == ()


def test_a_strict_well_refuses_reads_of_unmapped_registers_with_exception_02():
    loose = WellSim("w", 1, now_s=0.0, card_interval_s=60.0)
    strict = WellSim("w", 1, now_s=0.0, card_interval_s=60.0, strict=True)
    gap = Request(3, 299, 20)  # 40300..40319 includes the unmapped 40308..40316
    assert loose.handle(gap, 1.0)[0] == 3
    assert strict.handle(gap, 1.0) == bytes((0x83, 2))
    assert strict.handle(Request(3, 299, 8), 1.0)[0] == 3  # the four pressures alone are fine
    assert strict.handle(Request(3, 1000, 125), 1.0)[0] == 3  # curve blocks are mapped whole


def test_a_vendor_variant_serves_millimetres_and_its_extra_registers():
    w = WellSim("w", 1, now_s=0.0, card_interval_s=60.0, amap=vendor_variant_map())
    d = WellSim("w", 1, now_s=0.0, card_interval_s=60.0, amap=A11Map())
    assert w.image[1000:1200] == [10 * x for x in d.image[1000:1200]]
    assert w.handle(Request(3, 47001 - 40001 + 1, 23), 1.0)[:2] == bytes((3, 46))


FLEET_DAY = """
from hil.wellsite import WellSim
t0 = 1_714_950_000.0
wells = [WellSim(f"well-{i:03d}", 1, now_s=t0, card_interval_s=1800.0) for i in range(833)]
for w in wells:
    w.advance(t0 + 86_400.0)
assert all(len(w.ring) >= 48 for w in wells), "48 cards per simulated day at 30 min"
w = wells[7]
rec = w.ring[10]
assert w.card_for(rec).ts_ns == rec.ts_ns  # skipped cards are records that regenerate on demand
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the forking test runner's peak
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


def test_a_fleet_of_833_wells_simulates_a_day_of_cards_within_200_mb():
    # in a child process, so its peak RSS is the fleet's and not the test runner's
    done = subprocess.run([sys.executable, "-c", FLEET_DAY], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) < 200 * 2**20
