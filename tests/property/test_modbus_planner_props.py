"""Hypothesis properties of the Modbus planner and decoder."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.config import ModbusPoint
from drivers.modbus.decode import decode, encode
from drivers.modbus.planner import DeviceLimits, learn_illegal_address, plan_reads

WIDTH = {"u16": 1, "i16": 1, "u32": 2, "f32": 2, "i64": 4, "f64": 4}


@st.composite
def point_sets(draw: st.DrawFn, max_points: int = 60) -> list[ModbusPoint]:
    n = draw(st.integers(1, max_points))
    addr = draw(st.integers(0, 500))
    pts = []
    for i in range(n):
        t = draw(st.sampled_from(sorted(WIDTH)))
        pts.append(ModbusPoint(name=f"p{i}", table="holding", pdu_address=addr, type=t))  # type: ignore[arg-type]
        addr += WIDTH[t] + draw(st.integers(0, 80))
        if addr > 65000:
            break
    return pts


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.integers(1, 125), st.integers(0, 60))
def test_every_point_is_covered_exactly_once_and_no_block_exceeds_the_limit(pts, limit, max_gap):
    limit = max(limit, 4)  # the widest point must fit
    blocks = plan_reads(pts, max_registers=limit, max_gap=max_gap)
    names = [p.name for b in blocks for p in b.points]
    assert sorted(names) == sorted(p.name for p in pts)
    for b in blocks:
        assert 1 <= b.count <= limit
        for p in b.points:
            s = b.slice_of(p)
            assert s.start >= 0 and s.stop <= b.count
        assert all(hi - lo <= max_gap for lo, hi in b.gaps())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 600), st.integers(0, 1000), st.integers(1, 125))
def test_a_contiguous_map_of_single_registers_needs_the_minimum_number_of_reads(n, start, limit):
    pts = [ModbusPoint(name=f"r{i}", table="holding", pdu_address=start + i) for i in range(n)]
    assert len(plan_reads(pts, max_registers=limit, max_gap=0)) == math.ceil(n / limit)


@settings(max_examples=60, deadline=None)
@given(point_sets(max_points=25), st.data())
def test_learning_from_failures_converges_to_reads_that_avoid_the_bad_registers(pts, data):
    # a device where some gap registers are unmapped: learning must reach a plan that never touches them
    mapped = {a for p in pts for a in range(p.location()[1], p.location()[1] + p.register_count())}
    lo = min(mapped)
    hi = max(mapped)
    unmapped = {a for a in range(lo, hi + 1) if a not in mapped and data.draw(st.booleans())}
    limits = DeviceLimits()
    for _ in range(200):
        blocks = plan_reads(pts, limits=limits)
        bad = [b for b in blocks if any(b.start <= a < b.end for a in unmapped)]
        if not bad:
            break
        learned = learn_illegal_address(bad[0], limits)
        assert learned is not None  # a block of valid points only fails because of its gaps
        limits = learned
    else:
        raise AssertionError("learning did not converge")
    assert sorted(p.name for b in blocks for p in b.points) == sorted(p.name for p in pts)


int_types = st.sampled_from(["u16", "i16", "u32", "i32", "u64", "i64"])
orders = st.sampled_from(["big", "little"])


@settings(max_examples=300, deadline=None)
@given(int_types, orders, orders, st.data())
def test_integers_round_trip_exactly(t, bo, wo, data):
    bits = {"u16": 16, "i16": 16, "u32": 32, "i32": 32, "u64": 64, "i64": 64}[t]
    lo, hi = (0, 2**bits - 1) if t.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    v = data.draw(st.integers(lo, hi))
    p = ModbusPoint(name="p", address=40001, type=t, byte_order=bo, word_order=wo)
    assert decode(p, encode(p, v)) == v


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["u16", "i16", "u32", "i32", "f32", "f64"]), orders, orders,
       st.sampled_from([1.0, 0.1, 0.01, 0.001, 2.5]), st.floats(-50, 50), st.floats(-1000, 1000))
def test_scaled_values_round_trip_within_one_scale_step(t, bo, wo, scale, offset, value):
    p = ModbusPoint(name="p", address=40001, type=t, byte_order=bo, word_order=wo, scale=scale, offset=offset)
    try:
        words = encode(p, value)
    except ValueError:
        return  # out of the type's range after scaling: refusing is correct
    got = decode(p, words)
    assert isinstance(got, (int, float))
    magnitude = max(1.0, abs(value), abs(offset))
    # integers: rounding to the nearest raw step; floats: f32 keeps ~7 significant digits of the raw value
    tol = scale / 2 + 1e-9 * magnitude if t not in ("f32", "f64") else 1e-6 * magnitude
    assert abs(got - value) <= tol
