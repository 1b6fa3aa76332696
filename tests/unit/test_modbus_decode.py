"""Unit tests of the pure Modbus decoder/encoder, the card time codec and the config model."""

from __future__ import annotations

import math
import random
import struct

import msgspec
import pytest

from drivers.modbus.card import curve_value, encode_acquisition_time, parse_acquisition_time
from drivers.modbus.config import ModbusDevice, ModbusPoint, a11_card_spec, a11_device, modicon_to_pdu
from drivers.modbus.decode import decode, encode, shortest_f32


def pt(type: str = "u16", **kw: object) -> ModbusPoint:
    return ModbusPoint(name="p", address=40001, type=type, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("byte_order", "word_order", "words"),
    [
        ("big", "big", [0x4148, 0xF5C3]),  # ABCD
        ("big", "little", [0xF5C3, 0x4148]),  # CDAB, word swap
        ("little", "big", [0x4841, 0xC3F5]),  # BADC, byte swap
        ("little", "little", [0xC3F5, 0x4841]),  # DCBA
    ],
)
def test_f32_12_56_decodes_in_all_four_orders(byte_order: str, word_order: str, words: list[int]):
    p = pt("f32", byte_order=byte_order, word_order=word_order)
    assert decode(p, words) == 12.56
    assert encode(p, 12.56) == words


def test_signed_and_wide_integers_decode_from_their_registers():
    assert decode(pt("i16"), [0xFFFE]) == -2
    assert decode(pt("u32"), [0x0001, 0x0002]) == 65538
    assert decode(pt("i32", word_order="little"), [0xFFFF, 0xFFFF]) == -1
    assert decode(pt("u64"), [0xFFFF] * 4) == 2**64 - 1
    assert decode(pt("i64"), [0x8000, 0, 0, 0]) == -(2**63)
    assert decode(pt("f64"), encode(pt("f64"), 1e300)) == 1e300


def test_scale_and_offset_apply_as_raw_times_scale_plus_offset():
    p = pt("i16", scale=0.01, offset=-40.0)
    assert decode(p, [0x0BB8]) == pytest.approx(-10.0)  # 3000 * 0.01 - 40
    assert encode(p, -10.0) == [3000]


def test_strings_bits_and_bools_decode():
    s = ModbusPoint(name="s", address=40001, type="string", length=3)
    assert encode(s, "AB") == [0x4142, 0, 0]
    assert decode(s, [0x4142, 0x4300, 0]) == "ABC"
    b = ModbusPoint(name="b", address=40001, type="bits", bit=15)
    assert decode(b, [0x8000]) is True
    assert decode(b, [0x7FFF]) is False
    assert decode(ModbusPoint(name="c", address=1, type="bool"), [True]) is True


def test_encoding_a_value_that_does_not_fit_raises():
    with pytest.raises(ValueError):
        encode(pt("u16"), 70000)
    with pytest.raises(ValueError):
        encode(pt("i16", scale=0.01), 400.0)
    with pytest.raises(ValueError):
        decode(pt("u32"), [1])


def test_modicon_addresses_map_to_tables_and_zero_based_pdu_addresses():
    assert modicon_to_pdu(40300) == ("holding", 299)
    assert modicon_to_pdu(30001) == ("input", 0)
    assert modicon_to_pdu(10001) == ("discrete_input", 0)
    assert modicon_to_pdu(1) == ("coil", 0)
    assert modicon_to_pdu(465536) == ("holding", 65535)
    with pytest.raises(ValueError):
        modicon_to_pdu(20001)


def test_config_errors_name_the_offending_path():
    with pytest.raises(msgspec.ValidationError, match=r"\$\.points\[0\]"):
        msgspec.convert({"name": "d", "host": "h", "points": [{"name": "x", "address": 40001,
                                                                "type": "string"}]}, ModbusDevice)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"name": "d", "host": "h", "slave": 3}, ModbusDevice)


def test_a_device_config_round_trips_through_builtins():
    dev = a11_device("w1", "127.0.0.1", 1502, 7)
    again = msgspec.convert(msgspec.to_builtins(dev), ModbusDevice)
    assert again == dev
    assert again.card == a11_card_spec()


def test_acquisition_time_is_local_time_at_the_configured_offset():
    # 2024-05-06 07:08:09 at UTC+8 is 2024-05-05 23:08:09 UTC
    ns = parse_acquisition_time([2024, 5, 6, 7, 8, 9])
    assert ns == 1714950489 * 10**9
    assert parse_acquisition_time([0x2024, 0x05, 0x06, 0x07, 0x08, 0x09], encoding="bcd") == ns
    assert encode_acquisition_time(ns, encoding="bcd") == [0x2024, 5, 6, 7, 8, 9]
    assert parse_acquisition_time([2024, 5, 6, 7, 8, 9], utc_offset_h=0) == ns + 8 * 3600 * 10**9
    with pytest.raises(ValueError):
        parse_acquisition_time([0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        parse_acquisition_time([0x2024, 0x13, 1, 1, 1, 1], encoding="bcd")


def test_curve_words_are_signed_and_scaled_without_binary_noise():
    assert curve_value(1234, 0.01) == 12.34
    assert curve_value(0xFF1A, 0.01) == -2.30
    assert curve_value(1234, 0.001) == 1.234


def _shortest_by_formatting(raw: float) -> float:
    """The definition: the first of 6..9 significant digits whose decimal packs back to the same float32."""
    if raw == 0.0 or not math.isfinite(raw):
        return raw
    data = struct.pack(">f", raw)
    for digits in (6, 7, 8, 9):
        candidate = float(f"%.{digits}g" % raw)
        if struct.pack(">f", candidate) == data:
            return candidate
    return raw


def test_shortest_f32_is_the_shortest_decimal_of_the_same_float32_over_every_exponent():
    rng = random.Random(7)
    # random bit patterns reach every exponent (subnormals included); the rest are device-like values
    patterns = [rng.getrandbits(32) for _ in range(20_000)]
    raws = [struct.unpack(">f", struct.pack(">I", p))[0] for p in patterns]
    raws += [struct.unpack(">f", struct.pack(">f", round(rng.uniform(-500, 500), rng.randint(0, 5))))[0]
             for _ in range(20_000)]
    raws += [1.43, 0.1, 12.56, 99999.99, 1e-38, 3.4e38, -0.0]
    for raw in raws:
        raw = struct.unpack(">f", struct.pack(">f", raw))[0] if math.isfinite(raw) else raw
        got, want = shortest_f32(raw), _shortest_by_formatting(raw)
        assert got == want or (math.isnan(got) and math.isnan(want)), raw
        if math.isfinite(raw):
            assert struct.pack(">f", got) == struct.pack(">f", raw)
    assert shortest_f32(struct.unpack(">f", struct.pack(">f", 1.43))[0]) == 1.43
