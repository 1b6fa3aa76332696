"""Registers <-> values for every Modbus point type, byte and word order, scale and offset (pure).

`decode(point, words)` turns the point's registers (16-bit unsigned ints, or bools for bit tables) into
a value; `encode(point, value)` is its inverse, used for writes and by the simulator.

Order model: the registers of a multi-register value are first put in big-endian word order
(`word_order = "little"` reverses them), then each register's two bytes are put in big-endian byte
order (`byte_order = "little"` swaps them), and the resulting byte string is read big-endian.
So big/big is the Modbus standard ABCD, big/little CDAB ("word swap"), little/big BADC
("byte swap") and little/little DCBA.

Scaling: value = raw * scale + offset. Integer types with scale 1 and offset 0 decode to int;
any other scaling yields float. encode rounds (half away from zero) to the nearest raw integer and
raises ValueError when the raw value does not fit the type.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

from drivers.base import Value
from drivers.modbus.config import ModbusPoint
from drivers.modbus.memo import IdentityMemo

_STRUCT = {"u16": "H", "i16": "h", "u32": "I", "i32": "i", "u64": "Q", "i64": "q", "f32": "f", "f64": "d"}
_INT_RANGE = {
    "u16": (0, 0xFFFF), "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFF_FFFF), "i32": (-0x8000_0000, 0x7FFF_FFFF),
    "u64": (0, 0xFFFF_FFFF_FFFF_FFFF), "i64": (-0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF),
}


def _bytes_to_words(data: bytes, byte_order: str, word_order: str) -> list[int]:
    words = []
    for i in range(0, len(data), 2):
        a, b = data[i], data[i + 1]
        words.append((a << 8) | b if byte_order == "big" else (b << 8) | a)
    return words if word_order == "big" else list(reversed(words))


def decode(point: ModbusPoint, words: Sequence[int] | Sequence[bool]) -> Value:
    """The point's value from exactly `point.register_count()` registers (or bits)."""
    n = point.register_count()
    if len(words) != n:
        raise ValueError(f"{point.name}: expected {n} registers, got {len(words)}")
    return decoder(point)(words)


Decoder = Callable[[Sequence[int] | Sequence[bool]], Value]
_DECODERS: IdentityMemo[Decoder] = IdentityMemo(4096)


def decoder(point: ModbusPoint) -> Decoder:
    """A function from the point's registers (exactly `register_count()` of them) to its value.

    Built once per point object and kept: a fleet decodes the same few dozen points millions of
    times, and the generic path (orders, widths, scaling decided per call) costs several times more.
    """
    return _DECODERS.get(point, (), _build_decoder, point)


def _build_decoder(point: ModbusPoint) -> Decoder:
    t = point.type
    if t == "bool":
        return lambda words: bool(words[0])
    if t == "bits":
        bit = point.bit
        assert bit is not None
        return lambda words: bool((int(words[0]) >> bit) & 1)
    n = point.register_count()
    # words in big-endian word order, each word's bytes in the point's byte order; read big-endian
    pack = struct.Struct(("<" if point.byte_order == "little" else ">") + "H" * n).pack
    reverse = point.word_order == "little"
    name = point.name

    def to_bytes(words: Sequence[int] | Sequence[bool]) -> bytes:
        try:
            return pack(*(reversed(words) if reverse else words))
        except struct.error:
            bad = next((w for w in words if not 0 <= w <= 0xFFFF), words)
            raise ValueError(f"{name}: register value {bad} is not a 16-bit unsigned word") from None

    if t == "string":
        return lambda words: to_bytes(words).split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    unpack = struct.Struct(">" + _STRUCT[t]).unpack
    scale, offset = point.scale, point.offset
    if t == "f32":
        def f32(words: Sequence[int] | Sequence[bool]) -> Value:
            return shortest_f32(unpack(to_bytes(words))[0]) * scale + offset
        return f32
    if t == "f64":
        return lambda words: unpack(to_bytes(words))[0] * scale + offset
    if scale == 1.0 and offset == 0.0:
        return lambda words: unpack(to_bytes(words))[0]  # integers stay exact
    return lambda words: unpack(to_bytes(words))[0] * scale + offset


_F32 = struct.Struct(">f")
_SHORT_DIGITS = (6, 7, 8)  # then 9, which always round-trips a float32


def shortest_f32(raw: float) -> float:
    """The shortest decimal (6 to 9 significant digits) that is the same float32 as `raw`.

    A float32 widened to float64 prints as 1.4299999475479126; the shortest decimal that packs back
    to the same 4 bytes (1.43) is the value the device meant, and encodes back identically. `raw`
    must be a float32 value (unpacked from 4 bytes); non-finite values and zeros are returned as they
    are. Candidates come from `round(raw, decimals)` (correctly rounded, like "%.Ng" formatting, but
    without a string round trip: a quarter cheaper, and this runs for every f32 point of every poll).
    """
    if raw == 0.0 or not math.isfinite(raw):
        return raw
    pack = _F32.pack
    data = pack(raw)  # exact: a finite float32 survives float64 and back
    exponent = math.floor(math.log10(abs(raw)))
    for digits in _SHORT_DIGITS:
        candidate = round(raw, digits - 1 - exponent)
        if pack(candidate) == data:
            return candidate
    candidate = float(f"{raw:.9g}")
    return candidate if pack(candidate) == data else raw


def _raw_integer(point: ModbusPoint, value: float | int) -> int:
    if isinstance(value, int) and point.scale == 1.0 and point.offset == 0.0:
        raw = value  # exact: 64-bit integers do not survive a trip through float
    else:
        raw_f = (value - point.offset) / point.scale
        if not math.isfinite(raw_f):
            raise ValueError(f"{point.name}: {value!r} is not finite")
        raw = math.floor(abs(raw_f) + 0.5) * (1 if raw_f >= 0 else -1)
    lo, hi = _INT_RANGE[point.type]
    if not lo <= raw <= hi:
        raise ValueError(f"{point.name}: {value!r} gives raw {raw}, outside {point.type} range {lo}..{hi}")
    return raw


def encode(point: ModbusPoint, value: Value) -> list[int]:
    """The registers that decode to `value` (within one scale step). Bool points give [0] or [1]."""
    t = point.type
    if value is None:
        raise ValueError(f"{point.name}: cannot encode None")
    if t in ("bool", "bits"):
        if not isinstance(value, (bool, int)):
            raise ValueError(f"{point.name}: {t} needs a bool, got {value!r}")
        # A lone bit of a register cannot be written without the other 15: callers that write
        # `bits` points read-modify-write the whole register (see driver.write).
        if t == "bits":
            assert point.bit is not None
            return [int(bool(value)) << point.bit]
        return [int(bool(value))]
    if t == "string":
        if not isinstance(value, str):
            raise ValueError(f"{point.name}: string needs a str, got {value!r}")
        data = value.encode("utf-8")
        size = point.register_count() * 2
        if len(data) > size:
            raise ValueError(f"{point.name}: {len(data)} bytes do not fit {size}")
        return _bytes_to_words(data.ljust(size, b"\x00"), point.byte_order, point.word_order)
    if isinstance(value, str):
        raise ValueError(f"{point.name}: {t} needs a number, got {value!r}")
    fmt = ">" + _STRUCT[t]
    if t in ("f32", "f64"):
        raw_f = (float(value) - point.offset) / point.scale
        if t == "f32" and math.isfinite(raw_f) and abs(raw_f) > 3.4028234663852886e38:
            raise ValueError(f"{point.name}: {value!r} overflows f32")
        data = struct.pack(fmt, raw_f)
    else:
        data = struct.pack(fmt, _raw_integer(point, value))
    return _bytes_to_words(data, point.byte_order, point.word_order)
