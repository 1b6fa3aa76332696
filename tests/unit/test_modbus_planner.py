"""Unit tests of the pure Modbus read planner and the shared poll schedule."""

from __future__ import annotations

import pytest

from drivers.modbus.config import ModbusPoint, a11_points
from drivers.modbus.planner import DeviceLimits, ReadBlock, learn_illegal_address, plan_reads, plan_spans
from drivers.scheduling import Schedule


def hr(name: str, pdu: int, type: str = "u16", **kw: object) -> ModbusPoint:
    return ModbusPoint(name=name, table="holding", pdu_address=pdu, type=type, **kw)  # type: ignore[arg-type]


def covered(blocks: tuple[ReadBlock, ...]) -> list[str]:
    return sorted(p.name for b in blocks for p in b.points)


def test_the_default_a11_scalars_need_two_reads():
    blocks = plan_reads(a11_points())
    assert [(b.start, b.count) for b in blocks] == [(299, 106), (980, 14)]
    assert covered(blocks) == sorted(p.name for p in a11_points())


def test_a_gap_wider_than_max_gap_splits_the_read():
    pts = [hr("a", 0), hr("b", 10)]
    assert len(plan_reads(pts, max_gap=9)) == 1
    assert len(plan_reads(pts, max_gap=8)) == 2


def test_a_multi_register_value_is_never_split_across_reads():
    pts = [hr(f"p{i}", 2 * i, "f32") for i in range(100)]  # 200 contiguous registers
    blocks = plan_reads(pts, max_registers=125)
    assert len(blocks) == 2
    assert all(b.count <= 125 and b.count % 2 == 0 for b in blocks)


def test_the_fewest_reads_prefer_splitting_at_the_widest_gap():
    # three points; any two fit one read, all three do not: split where the gap is wider
    spans = [(0, 50), (52, 50), (110, 10)]
    plan = plan_spans(spans, max_count=110, max_gap=50)
    assert len(plan) == 2
    assert plan[0][:2] == (0, 102)


def test_tables_are_planned_separately_and_bits_allow_2000_per_read():
    coils = [ModbusPoint(name=f"c{i}", address=1 + i, type="bool") for i in range(2500)]
    regs = [ModbusPoint(name="r", address=40001)]
    blocks = plan_reads([*coils, *regs])
    assert blocks[0].table == "holding"
    assert sorted(b.count for b in blocks[1:]) == [500, 2000]
    assert {b.table for b in blocks[1:]} == {"coil"}


def test_a_learned_forbidden_gap_is_not_read_again():
    pts = [hr("a", 0), hr("b", 5)]
    (block,) = plan_reads(pts)
    limits = learn_illegal_address(block, DeviceLimits())
    assert limits is not None
    assert limits.forbidden["holding"] == ((1, 5),)
    assert [(b.start, b.count) for b in plan_reads(pts, limits=limits)] == [(0, 1), (5, 1)]


def test_a_gap_free_block_that_fails_is_halved_and_a_single_point_is_its_own_fault():
    pts = [hr(f"p{i}", i) for i in range(4)]
    (block,) = plan_reads(pts)
    limits = learn_illegal_address(block, DeviceLimits())
    assert limits is not None
    halves = plan_reads(pts, limits=limits)
    assert [(b.start, b.count) for b in halves] == [(0, 2), (2, 2)]
    single = plan_reads([hr("x", 7)])[0]
    assert learn_illegal_address(single, DeviceLimits()) is None


def test_a_span_longer_than_one_read_is_rejected():
    with pytest.raises(ValueError):
        plan_spans([(0, 126)], max_count=125, max_gap=0)


def test_overlapping_points_share_one_read():
    pts = [hr("word", 10, "u32"), hr("low", 11), ModbusPoint(name="flag", table="holding", pdu_address=10,
                                                             type="bits", bit=3)]
    (block,) = plan_reads(pts)
    assert (block.start, block.count) == (10, 2)
    assert block.gaps() == []


def test_schedule_staggers_first_deadlines_and_skips_missed_slots():
    s = Schedule([("fast", 1.0), ("slow", 10.0)], now_s=100.0, first_slot=1)
    first = s.next_deadline()
    assert 100.0 <= first < 101.0
    assert s.pop_due(first) in (["fast"], ["slow"], ["fast", "slow"])
    # fall 5.5 s behind: each job fires once, then resumes on its own grid
    due = s.pop_due(first + 15.5)
    assert "fast" in due
    assert s.next_deadline() > first + 15.5


def test_postponing_a_schedule_keeps_jobs_away_until_the_quarantine_ends():
    s = Schedule([("g", 1.0)], now_s=0.0)
    s.postpone_all(30.0)
    assert s.next_deadline() >= 30.0
    assert s.pop_due(29.9) == []
