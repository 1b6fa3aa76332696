"""Identical devices plan once: plans are memoized by the point definitions and the device limits."""

from __future__ import annotations

from drivers.modbus.config import ModbusPoint, a11_points
from drivers.modbus.planner import DeviceLimits, plan_reads


def test_equal_point_definitions_share_one_plan() -> None:
    first = plan_reads(a11_points())
    again = plan_reads(list(a11_points()))  # equal definitions, new objects
    assert again is first


def test_the_plan_follows_the_limits_and_the_sizes() -> None:
    base = plan_reads(a11_points())
    capped = plan_reads(a11_points(), limits=DeviceLimits(max_count={"holding": 20}))
    assert capped is not base
    assert max(b.count for b in capped) <= 20
    walled = plan_reads(a11_points(), limits=DeviceLimits(forbidden={"holding": ((330, 330),)}))
    assert walled != base
    assert plan_reads(a11_points(), max_gap=0) != base
    assert plan_reads(a11_points(), limits=DeviceLimits(max_count={"holding": 20})) is capped


def test_a_changed_point_gets_its_own_plan() -> None:
    points = list(a11_points())
    base = plan_reads(points)
    points[0] = ModbusPoint(name=points[0].name, address=40300, type="f64")  # now 4 registers wide
    changed = plan_reads(points)
    assert changed is not base
    assert changed[0].points[0].type == "f64"
