"""Pure frame parsers for generic serial devices: regex named groups and struct templates -> typed fields.

A parser turns one frame into `{field name: FieldResult}`. A frame that does not fit the template at
all (no regex match, too short for the struct, undecodable text) raises `ParseError`, whose message is
the reason a BAD reading carries; a frame that fits but has one unconvertible field (a group matched
"--.-" where a float was expected) yields that field as an error and the others as values, so one
bad field does not blank the whole record.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

FieldType = Literal["float", "int", "hex", "bool", "str"]
Scalar = float | int | bool | str

_TRUE = frozenset({"1", "true", "on", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "off", "no", "n", "f"})


class ParseError(ValueError):
    """The frame does not fit the template; str(error) is a short reason for a BAD reading."""


@dataclass(frozen=True, slots=True)
class FieldResult:
    """A parsed field: `value`, or `error` (a reason) when the text could not be converted."""

    value: Scalar | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How to turn one captured text/number into a value: type, then value * scale + offset."""

    name: str
    type: FieldType = "float"
    scale: float = 1.0
    offset: float = 0.0
    group: str | None = None  # regex group name; defaults to `name`


def _scaled(raw: float | int, spec: FieldSpec) -> float | int:
    if spec.scale == 1.0 and spec.offset == 0.0:
        return raw
    return raw * spec.scale + spec.offset


def convert_text(text: str, spec: FieldSpec) -> FieldResult:
    """Convert one captured string by the field's type; errors become FieldResult.error."""
    t = text.strip()
    try:
        if spec.type == "str":
            return FieldResult(text)
        if spec.type == "bool":
            low = t.lower()
            if low in _TRUE:
                return FieldResult(True)
            if low in _FALSE:
                return FieldResult(False)
            return FieldResult(None, f"{spec.name}: not a bool: {t[:20]!r}")
        if spec.type == "int":
            return FieldResult(_scaled(int(t, 10), spec))
        if spec.type == "hex":
            return FieldResult(_scaled(int(t, 16), spec))
        value = float(t)
    except ValueError:
        article = "an" if spec.type == "int" else "a"
        return FieldResult(None, f"{spec.name}: not {article} {spec.type}: {t[:20]!r}")
    if not math.isfinite(value):
        return FieldResult(None, f"{spec.name}: not finite: {t[:20]!r}")
    return FieldResult(_scaled(value, spec))


class RegexParser:
    """Decode a text frame with a regular expression; each field reads one named group.

    The pattern must match the whole frame (`re.fullmatch`), so a line with a garbage prefix is
    rejected rather than half-read. A group that did not participate in the match yields the field
    with value None and no error (optional fields).
    """

    def __init__(self, pattern: str, fields: Sequence[FieldSpec], *, encoding: str = "ascii") -> None:
        self.regex = re.compile(pattern)
        self.fields = tuple(fields)
        self.encoding = encoding
        for f in self.fields:
            group = f.group or f.name
            if group not in self.regex.groupindex:
                raise ValueError(f"field {f.name}: pattern has no group named {group!r}")

    def parse(self, frame: bytes) -> dict[str, FieldResult]:
        try:
            text = frame.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise ParseError(f"not {self.encoding} text at byte {exc.start}") from None
        m = self.regex.fullmatch(text)
        if m is None:
            raise ParseError(f"no match: {text[:40]!r}")
        out: dict[str, FieldResult] = {}
        for f in self.fields:
            captured = m.group(f.group or f.name)
            out[f.name] = FieldResult(None) if captured is None else convert_text(captured, f)
        return out


class StructParser:
    """Decode a binary frame with a `struct` format; one field per unpacked item, `_`-names skipped.

    `offset_bytes` skips a header; bytes after the struct (a checksum, padding) are allowed. Strings
    (`s`) decode as ASCII with trailing NULs stripped; numbers get `value * scale + offset`.
    """

    def __init__(self, fmt: str, fields: Sequence[FieldSpec], *, offset_bytes: int = 0) -> None:
        try:
            self.struct = struct.Struct(fmt)
        except struct.error as exc:
            raise ValueError(f"bad struct format {fmt!r}: {exc}") from None
        self.fields = tuple(fields)
        self.offset_bytes = offset_bytes
        if offset_bytes < 0:
            raise ValueError("offset_bytes must be >= 0")
        items = len(self.struct.unpack(bytes(self.struct.size)))
        if items != len(self.fields):
            raise ValueError(f"format {fmt!r} unpacks {items} items but {len(self.fields)} fields are named")

    @property
    def min_frame_bytes(self) -> int:
        return self.offset_bytes + self.struct.size

    def parse(self, frame: bytes) -> dict[str, FieldResult]:
        if len(frame) < self.min_frame_bytes:
            raise ParseError(f"short frame: {len(frame)} of {self.min_frame_bytes} bytes")
        items = self.struct.unpack_from(frame, self.offset_bytes)
        out: dict[str, FieldResult] = {}
        for spec, raw in zip(self.fields, items, strict=True):
            if spec.name.startswith("_"):
                continue
            if isinstance(raw, bytes):
                out[spec.name] = FieldResult(raw.rstrip(b"\x00").decode("ascii", "replace"))
            elif isinstance(raw, bool):
                out[spec.name] = FieldResult(raw)
            elif isinstance(raw, float) and not math.isfinite(raw):
                out[spec.name] = FieldResult(None, f"{spec.name}: not finite")
            else:
                out[spec.name] = FieldResult(_scaled(raw, spec))
        return out
