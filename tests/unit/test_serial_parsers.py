"""Regex and struct frame parsers: typed fields, scale/offset, per-field errors, whole-frame errors."""

from __future__ import annotations

import struct

import pytest

from drivers.serial.parsers import FieldResult, FieldSpec, ParseError, RegexParser, StructParser


def scale_parser() -> RegexParser:
    return RegexParser(
        r"(?P<status>ST|US),(?P<mode>GS|NT),\s*(?P<weight>[-+]?[\d.]+)\s*(?P<unit>kg|lb)",
        [FieldSpec("weight"), FieldSpec("unit", "str"), FieldSpec("stable", "str", group="status")],
    )


def test_a_regex_frame_becomes_typed_named_fields() -> None:
    out = scale_parser().parse(b"ST,GS,  +012.50kg")
    assert out == {"weight": FieldResult(12.5), "unit": FieldResult("kg"), "stable": FieldResult("ST")}


def test_a_frame_that_does_not_match_the_whole_pattern_is_a_parse_error_with_the_text() -> None:
    with pytest.raises(ParseError, match="no match"):
        scale_parser().parse(b"xxST,GS,+1.0kg")


def test_non_text_bytes_are_a_parse_error_not_a_crash() -> None:
    with pytest.raises(ParseError, match="ascii"):
        scale_parser().parse(b"ST,GS,\xff1.0kg")


def test_one_unconvertible_field_is_reported_alone_and_the_others_still_decode() -> None:
    p = RegexParser(r"T=(?P<t>\S+) P=(?P<p>\S+) ON=(?P<on>\S+) ID=(?P<id>\S+)",
                    [FieldSpec("t"), FieldSpec("p", "int", scale=0.1, offset=-1.0), FieldSpec("on", "bool"),
                     FieldSpec("id", "hex")])
    out = p.parse(b"T=--.- P=105 ON=yes ID=1F")
    assert out["t"].value is None and out["t"].error is not None and "not a float" in out["t"].error
    assert out["p"].value == pytest.approx(9.5)
    assert out["on"] == FieldResult(True)
    assert out["id"] == FieldResult(31)


def test_nan_and_infinity_in_text_are_field_errors() -> None:
    p = RegexParser(r"(?P<v>\S+)", [FieldSpec("v")])
    assert p.parse(b"nan")["v"].error is not None
    assert p.parse(b"inf")["v"].error is not None


def test_an_optional_group_that_did_not_match_yields_no_value_and_no_error() -> None:
    p = RegexParser(r"(?P<a>\d+)(,(?P<b>\d+))?", [FieldSpec("a", "int"), FieldSpec("b", "int")])
    assert p.parse(b"7") == {"a": FieldResult(7), "b": FieldResult(None)}


def test_a_regex_field_must_name_a_group_in_the_pattern() -> None:
    with pytest.raises(ValueError, match="no group named"):
        RegexParser(r"(?P<a>\d+)", [FieldSpec("b")])


def test_a_struct_template_decodes_scaled_fields_after_a_header_and_skips_underscore_fields() -> None:
    p = StructParser(">hHx4s?", [FieldSpec("temp_c", scale=0.1), FieldSpec("_reserved"),
                                 FieldSpec("tag", "str"), FieldSpec("alarm", "bool")], offset_bytes=2)
    frame = b"\xaa\x55" + struct.pack(">hHx4s?", -123, 7, b"AB\x00\x00", True) + b"\x99"
    out = p.parse(frame)
    assert out["temp_c"].value == pytest.approx(-12.3)
    assert out["tag"] == FieldResult("AB")
    assert out["alarm"] == FieldResult(True)
    assert "_reserved" not in out


def test_a_struct_frame_that_is_too_short_is_a_parse_error() -> None:
    p = StructParser("<I", [FieldSpec("n", "int")])
    with pytest.raises(ParseError, match="short frame: 3 of 4"):
        p.parse(b"abc")


def test_a_struct_template_needs_one_field_per_item() -> None:
    with pytest.raises(ValueError, match="unpacks 2 items"):
        StructParser("<HH", [FieldSpec("a")])
    with pytest.raises(ValueError, match="bad struct format"):
        StructParser("<Q?!", [FieldSpec("a")])


def test_a_non_finite_float_in_a_struct_is_a_field_error() -> None:
    p = StructParser("<f", [FieldSpec("x")])
    assert p.parse(struct.pack("<f", float("nan")))["x"].error == "x: not finite"
