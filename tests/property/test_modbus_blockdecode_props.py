"""The compiled block decoder gives exactly what the per-point decoder gives, for every type and order."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import Value
from drivers.modbus.blockdecode import BlockDecoder, block_decoder
from drivers.modbus.config import ModbusPoint
from drivers.modbus.decode import decode, encode
from drivers.modbus.planner import plan_reads

TYPES = ("u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "string", "bits")
ORDERS = ("big", "little")
BLOCK_START = 100
BLOCK_REGISTERS = 40


@st.composite
def points(draw: st.DrawFn) -> ModbusPoint:
    t = draw(st.sampled_from(TYPES))
    kw: dict[str, object] = {}
    if t == "string":
        kw["length"] = draw(st.integers(1, 4))
    if t == "bits":
        kw["bit"] = draw(st.integers(0, 15))
    if t not in ("string", "bits"):
        kw["byte_order"] = draw(st.sampled_from(ORDERS))
        kw["word_order"] = draw(st.sampled_from(ORDERS))
        kw["scale"] = draw(st.sampled_from((1.0, 0.1, 0.01, -2.5, 1e-3)))
        kw["offset"] = draw(st.sampled_from((0.0, -40.0, 0.5)))
    width = {"u16": 1, "i16": 1, "bits": 1, "u32": 2, "i32": 2, "f32": 2, "u64": 4, "i64": 4, "f64": 4}.get(
        t, kw.get("length", 1))
    assert isinstance(width, int)
    start = draw(st.integers(BLOCK_START, BLOCK_START + BLOCK_REGISTERS - width))
    name = f"p{draw(st.integers(0, 10**9))}"
    return ModbusPoint(name=name, table="holding", pdu_address=start, type=t, **kw)  # type: ignore[arg-type]


def same(a: Value, b: Value) -> bool:
    """Identical values: same type, NaN equal to NaN, and the sign of zero counted."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def per_point(p: ModbusPoint, words: list[int]) -> tuple[Value, str | None]:
    lo = p.pdu_address - BLOCK_START  # type: ignore[operator]
    try:
        return decode(p, words[lo:lo + p.register_count()]), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, str(exc)


def check(pts: list[ModbusPoint], words: list[int]) -> None:
    values, errors = BlockDecoder(BLOCK_START, BLOCK_REGISTERS, pts)(words)
    failed = {k: str(exc) for k, exc in errors}
    assert len(values) == len(pts)
    for k, p in enumerate(pts):
        want, error = per_point(p, words)
        assert failed.get(k) == error, p
        assert same(values[k], want), (p, values[k], want)


@settings(max_examples=400, deadline=None)
@given(st.lists(points(), min_size=1, max_size=12),
       st.lists(st.integers(0, 0xFFFF), min_size=BLOCK_REGISTERS, max_size=BLOCK_REGISTERS))
def test_the_block_decoder_agrees_with_the_per_point_decoder_on_any_registers(
        pts: list[ModbusPoint], words: list[int]) -> None:
    check(pts, words)


@settings(max_examples=200, deadline=None)
@given(st.lists(points(), min_size=1, max_size=8),
       st.lists(st.integers(0, 0xFFFF), min_size=BLOCK_REGISTERS, max_size=BLOCK_REGISTERS),
       st.integers(0, BLOCK_REGISTERS - 1), st.sampled_from((-1, 0x10000, 1 << 40)))
def test_a_register_outside_16_bits_fails_the_points_it_belongs_to_as_the_per_point_decoder_does(
        pts: list[ModbusPoint], words: list[int], at: int, bad: int) -> None:
    words[at] = bad
    check(pts, words)


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False), st.sampled_from(ORDERS), st.sampled_from(ORDERS),
       st.sampled_from((1.0, 0.1, 10.0)), st.sampled_from((0.0, -40.0)))
def test_float32_values_keep_their_shortest_decimal_in_every_order(
        value: float, byte_order: str, word_order: str, scale: float, offset: float) -> None:
    neighbour = ModbusPoint(name="n", table="holding", pdu_address=BLOCK_START, type="u16")
    p = ModbusPoint(name="f", table="holding", pdu_address=BLOCK_START + 3, type="f32",
                    byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    words = [7, 0, 0, *encode(p, value)] + [0] * (BLOCK_REGISTERS - 5)
    scaled = ModbusPoint(name="s", table="holding", pdu_address=BLOCK_START + 3, type="f32",
                         byte_order=byte_order, word_order=word_order, scale=scale,  # type: ignore[arg-type]
                         offset=offset)
    check([neighbour, p, scaled], words)


def test_nan_infinity_and_negative_zero_come_through_as_they_do_point_by_point() -> None:
    p = ModbusPoint(name="f", table="holding", pdu_address=BLOCK_START, type="f32")
    d = ModbusPoint(name="d", table="holding", pdu_address=BLOCK_START + 2, type="f64", scale=1.0)
    for f32_words, f64_words in (([0x7FC0, 0], [0x7FF8, 0, 0, 0]), ([0x7F80, 0], [0xFFF0, 0, 0, 0]),
                                 ([0x8000, 0], [0x8000, 0, 0, 0])):
        check([p, d], f32_words + f64_words + [0] * (BLOCK_REGISTERS - 6))


def test_the_a11_scalar_blocks_decode_as_point_by_point() -> None:
    from drivers.modbus.config import a11_points

    pts = a11_points()
    for block in plan_reads(pts):
        words = [(k * 7919 + 13) & 0xFFFF for k in range(block.count)]
        values, errors = block_decoder(block.start, block.count, block.points)(words)
        assert errors == []
        for p, v in zip(block.points, values, strict=True):
            lo = p.location()[1] - block.start
            assert same(v, decode(p, words[lo:lo + p.register_count()])), p
