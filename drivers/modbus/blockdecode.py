"""Compiled decoders: every point of one block read from the block's registers in one go (pure).

`decode.decode` works one point at a time: slice its registers, pack them to bytes in the point's
orders, unpack, scale. A fleet decodes the same few blocks millions of times, so `block_decoder`
compiles, once per block layout, one `struct.Struct` over the whole response: big-endian standard
(ABCD) numeric points become one field each, the registers between and under other points become pad
bytes, and one `unpack` of the packed response yields every raw value; scale and offset (and the
float32 shortest-decimal rounding of `decode`) are applied per value after it. Points the combined
format cannot express - other byte/word orders, strings, bits, bools, points overlapping an earlier
one - keep the per-point path. Every value is the one `decode.decode` gives for the same registers
(tests/property/test_modbus_blockdecode_props.py holds the two side by side).

A block whose registers cannot be packed (a value outside 0..65535, which no client returns) falls
back to the per-point path, so each bad point reports its own error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from drivers.base import Value
from drivers.modbus.config import ModbusPoint
from drivers.modbus.decode import decoder, shortest_f32
from drivers.modbus.memo import IdentityMemo

# decode.py's struct codes, big-endian
_FIELD = {"u16": "H", "i16": "h", "u32": "I", "i32": "i", "u64": "Q", "i64": "q", "f32": "f", "f64": "d"}
_INTEGERS = frozenset(("u16", "i16", "u32", "i32", "u64", "i64"))

Finish = Callable[[float | int], Value] | None  # raw value -> point value; None: the raw value as is
DecodeError = ValueError | UnicodeDecodeError
Decoded = tuple[list[Value], list[tuple[int, DecodeError]]]  # values, (point index, error) per failure


class BlockDecoder:
    """Values of `points` (in their order) from the `count` registers read at `start`.

    `__call__(words)` returns `(values, errors)`: one value per point, and (point index, error) for
    each point whose decoding raised - the per-point path's error, for a BAD reading with its
    reason; that point's value is None. `errors` is empty in the common case.
    """

    __slots__ = ("_fast", "_finish", "_pack", "_slow", "_unpack", "count", "points", "start")

    def __init__(self, start: int, count: int, points: Sequence[ModbusPoint]) -> None:
        self.start, self.count, self.points = start, count, tuple(points)
        self._pack = struct.Struct(f">{count}H").pack
        fmt = [">"]
        cursor = 0  # register offset the format has reached
        fast: list[int] = []  # indices of points decoded from the combined format, in format order
        finish: list[Finish] = []
        slow: list[tuple[int, int, int, Callable[[Sequence[int]], Value]]] = []
        order = sorted(range(len(self.points)), key=lambda k: (self.points[k].location()[1], k))
        for k in order:
            p = self.points[k]
            offset = p.location()[1] - start
            width = p.register_count()
            if offset < 0 or offset + width > count:
                raise ValueError(f"{p.name}: registers {offset}..{offset + width} outside a block of {count}")
            if p.type in _FIELD and p.byte_order == "big" and p.word_order == "big" and offset >= cursor:
                if offset > cursor:
                    fmt.append(f"{2 * (offset - cursor)}x")
                fmt.append(_FIELD[p.type])
                cursor = offset + width
                fast.append(k)
                finish.append(_finisher(p))
            else:
                slow.append((k, offset, offset + width, decoder(p)))
        self._unpack = struct.Struct("".join(fmt)).unpack_from if fast else None
        self._fast = tuple(fast)
        self._finish = tuple(finish)
        self._slow = tuple(slow)

    def __call__(self, words: Sequence[int] | Sequence[bool]) -> Decoded:
        if len(words) != self.count:
            raise ValueError(f"block at {self.start}: expected {self.count} registers, got {len(words)}")
        out: list[Value] = [None] * len(self.points)
        errors: list[tuple[int, DecodeError]] = []
        unpack = self._unpack
        if unpack is not None:
            try:
                data = self._pack(*words)
            except struct.error:  # a word outside 0..65535: let each point say so on its own
                return _per_point(self.points, self.start, words)
            for k, finish, raw in zip(self._fast, self._finish, unpack(data), strict=True):
                out[k] = raw if finish is None else finish(raw)
        for k, lo, hi, point_decoder in self._slow:
            try:
                out[k] = point_decoder(words[lo:hi])
            except (ValueError, UnicodeDecodeError) as exc:
                errors.append((k, exc))
        return out, errors


def _finisher(p: ModbusPoint) -> Finish:
    # mirrors decode._build_decoder exactly, including float arithmetic when scale is 1 and offset 0
    scale, offset = p.scale, p.offset
    if p.type == "f32":
        return lambda raw: shortest_f32(raw) * scale + offset
    if p.type in _INTEGERS and scale == 1.0 and offset == 0.0:
        return None  # integers stay exact
    return lambda raw: raw * scale + offset


def _per_point(points: Sequence[ModbusPoint], start: int,
               words: Sequence[int] | Sequence[bool]) -> Decoded:
    out: list[Value] = []
    errors: list[tuple[int, DecodeError]] = []
    for k, p in enumerate(points):
        lo = p.location()[1] - start
        try:
            out.append(decoder(p)(words[lo:lo + p.register_count()]))
        except (ValueError, UnicodeDecodeError) as exc:
            out.append(None)
            errors.append((k, exc))
    return out, errors


_DECODERS: IdentityMemo[BlockDecoder] = IdentityMemo(4096)


def block_decoder(start: int, count: int, points: tuple[ModbusPoint, ...]) -> BlockDecoder:
    """The compiled decoder of a block, built once per `points` tuple (a planned block's own tuple)."""
    return _DECODERS.get(points, (start, count), BlockDecoder, start, count, points)
