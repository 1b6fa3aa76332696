"""Atomic A11 dynamometer-card capture over any register reader, and the acquisition-time codec.

Theory of operation. An A11 RTU rewrites its card in place: acquisition time (6 registers), point
count and four 250-register curve blocks. A reader that polls while the RTU publishes a new card can
see curves of two different strokes. The capture therefore
  1. reads the card header (acquisition time, point count) together with the card's scalars, in the
     fewest blocks the planner allows;
  2. reads only the n valid points of each curve (planned as one set, so adjacent curves merge when
     that saves a request);
  3. re-reads the acquisition time; if it changed, the card changed under us and the whole capture
     is repeated (up to `CardSpec.consistency_attempts`), else the card is consistent.
For the default map at 125 registers per request and n = 200 that is 2 + 8 + 1 = 11 requests. A
caller that already has the card the RTU holds (`known_at_ns`) pays only the 2 header requests.

The RTU writes time and curves together (domain.md §7 item 5), so an unchanged time before and after
proves the curves belong to that time. Acquisition time words are YYYY, MM, DD, hh, mm, ss in the
RTU's local time at `CardSpec.utc_offset_h` (default +8, China Standard Time), each word either a
plain decimal number or packed BCD (`CardSpec.time_encoding`).

`raw_registers` maps the 0-based PDU start address of every holding-register read of the final
attempt to the words it returned, so the card can be re-decoded or audited later.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from collections.abc import Awaitable, Callable, Sequence

from drivers.base import CardReading, Quality, Value
from drivers.modbus.blockdecode import BlockDecoder
from drivers.modbus.config import ModbusDevice, ModbusPoint, Table, modicon_to_pdu
from drivers.modbus.memo import IdentityMemo
from drivers.modbus.planner import DeviceLimits, plan_spans

Reader = Callable[[Table, int, int], Awaitable[Sequence[int]]]
TIME_WORDS = 6


def _from_bcd(word: int) -> int:
    digits = [(word >> shift) & 0xF for shift in (12, 8, 4, 0)]
    if any(d > 9 for d in digits):
        raise ValueError(f"0x{word:04X} is not packed BCD")
    return digits[0] * 1000 + digits[1] * 100 + digits[2] * 10 + digits[3]


def _to_bcd(value: int) -> int:
    if not 0 <= value <= 9999:
        raise ValueError(f"{value} does not fit 4 BCD digits")
    return int(str(value), 16)


@functools.lru_cache(maxsize=64)
def _tz(utc_offset_h: float) -> dt.timezone:
    return dt.timezone(dt.timedelta(hours=utc_offset_h))


def parse_acquisition_time(words: Sequence[int], *, encoding: str = "decimal",
                           utc_offset_h: float = 8.0) -> int:
    """UTC epoch ns of a card from its 6 time words; ValueError when the words are not a valid time."""
    if len(words) != TIME_WORDS:
        raise ValueError(f"acquisition time needs {TIME_WORDS} words, got {len(words)}")
    fields = [_from_bcd(w) for w in words] if encoding == "bcd" else list(words)
    year, month, day, hour, minute, second = fields
    # raises on an impossible date (month 13, February 30)
    stamp = dt.datetime(year, month, day, hour, minute, second, tzinfo=_tz(utc_offset_h))
    return int(stamp.timestamp()) * 1_000_000_000


def encode_acquisition_time(ts_ns: int, *, encoding: str = "decimal", utc_offset_h: float = 8.0) -> list[int]:
    """The 6 time words for a UTC epoch ns timestamp (whole seconds, truncated)."""
    t = dt.datetime.fromtimestamp(ts_ns // 1_000_000_000, _tz(utc_offset_h))
    fields = [t.year, t.month, t.day, t.hour, t.minute, t.second]
    return [_to_bcd(f) for f in fields] if encoding == "bcd" else fields


def curve_value(word: int, scale: float) -> float:
    """A signed 16-bit curve word scaled to engineering units, without binary noise for 1/N scales."""
    signed = word - 0x10000 if word & 0x8000 else word
    inverse = 1.0 / scale
    if abs(inverse - round(inverse)) < 1e-9:
        return signed / round(inverse)  # 1234 / 100 == 12.34 exactly rounded; 1234 * 0.01 is not
    return signed * scale


def curve_values(words: Sequence[int], scale: float) -> tuple[float, ...]:
    """`curve_value` of many words at once (the hot path of every card)."""
    n = len(words)
    signed = struct.unpack(f">{n}h", struct.pack(f">{n}H", *words))
    inverse = 1.0 / scale
    if abs(inverse - round(inverse)) < 1e-9:
        divisor = round(inverse)
        return tuple([v / divisor for v in signed])
    return tuple([v * scale for v in signed])


def _pdu(address: int) -> int:
    return modicon_to_pdu(address)[1]


class _Image:
    """Holding registers read so far in one attempt, as the blocks read (newest last), plus `raw`."""

    def __init__(self) -> None:
        self.raw: dict[int, tuple[int, ...]] = {}
        self._blocks: list[tuple[int, int, tuple[int, ...]]] = []  # (start, end, words)

    def add(self, start: int, count: int, answer: Sequence[int]) -> tuple[int, ...]:
        """Keep the words a read of `count` registers at `start` returned; ValueError if too few/many."""
        words = tuple(answer)
        if len(words) != count:
            raise ValueError(f"asked {count} registers at {start}, got {len(words)}")
        self.raw[start] = words
        self._blocks.append((start, start + count, words))
        return words

    def get(self, start: int, count: int) -> list[int]:
        """Words start..start+count-1, each from the newest block holding it; KeyError if one is missing."""
        end = start + count
        blocks = self._blocks
        for b_start, b_end, words in reversed(blocks):  # the common case: one block holds them all
            if b_start <= start and end <= b_end:
                return list(words[start - b_start:end - b_start])
        out: list[int] = []
        a = start
        while a < end:  # spread over blocks (a curve split between two reads): take runs of words
            for k in range(len(blocks) - 1, -1, -1):
                b_start, b_end, words = blocks[k]
                if b_start <= a < b_end:
                    # stop where a newer block takes over
                    stop = min([end, b_end] + [s for s, _, _ in blocks[k + 1:] if a < s < b_end])
                    out += words[a - b_start:stop - b_start]
                    a = stop
                    break
            else:
                raise KeyError(a)
        return out


@functools.lru_cache(maxsize=512)
def _planned(spans: tuple[tuple[int, int], ...], max_count: int, max_gap: int,
             forbidden: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    # Card layouts repeat on every capture (same n, same limits): plan each one once. Planning 800
    # single-register curve spans costs milliseconds; a capture of a known layout should cost none.
    return tuple((start, count) for start, count, _ in
                 plan_spans(spans, max_count=max_count, max_gap=max_gap, forbidden=forbidden))


@functools.lru_cache(maxsize=512)
def _planned_curves(starts: tuple[int, ...], n: int, max_count: int, max_gap: int,
                    forbidden: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    # keyed by the few numbers that define the spans: hashing 800 spans on every capture would cost
    # more than the cache saves. One span per register: curves may be split anywhere, unlike points.
    spans = tuple((start + k, 1) for start in starts for k in range(n))
    return _planned(spans, max_count, max_gap, forbidden)


class _Layout:
    """Where a device's card lives, worked out once per (points, card) configuration."""

    __slots__ = ("_scalar_decoders", "curve_starts", "curves", "header", "n_pdu", "scalars", "time_pdu")

    def __init__(self, device: ModbusDevice) -> None:
        spec = device.card
        assert spec is not None
        scalar_points = card_scalar_points(device)
        for p in scalar_points:
            if p.location()[0] != "holding":
                raise ValueError(f"card scalar {p.name} is not a holding register")
        self.time_pdu, self.n_pdu = _pdu(spec.acquisition_time_register), _pdu(spec.n_points_register)
        self.scalars = tuple((p, p.location()[1], p.register_count()) for p in scalar_points)
        self.header = ((self.time_pdu, TIME_WORDS), (self.n_pdu, 1),
                       *((start, count) for _, start, count in self.scalars))
        self.curves = {name: (_pdu(start), scale) for name, (start, scale) in spec.curves().items()}
        self.curve_starts = tuple(start for start, _ in self.curves.values())
        self._scalar_decoders: dict[tuple[tuple[int, int], ...], tuple[tuple[int, BlockDecoder], ...]] = {}

    def decode_scalars(self, header_plan: tuple[tuple[int, int], ...], image: _Image) -> dict[str, Value]:
        """The card scalars from the header blocks just read, in `CardSpec.scalars` order.

        One compiled decoder per header block (a point never straddles two reads); ValueError as
        `decode.decode` raises it for a point that cannot be decoded."""
        decoders = self._scalar_decoders.get(header_plan)
        if decoders is None:
            decoders = tuple(
                (start, BlockDecoder(start, count, [p for p, s, c in self.scalars
                                                    if start <= s and s + c <= start + count]))
                for start, count in header_plan)
            self._scalar_decoders[header_plan] = decoders
        by_name: dict[str, Value] = {}
        for start, decoder in decoders:
            values, errors = decoder(image.raw[start])
            if errors:
                raise errors[0][1]
            by_name.update(zip((p.name for p in decoder.points), values, strict=True))
        return {p.name: by_name[p.name] for p, _, _ in self.scalars}


_LAYOUTS: IdentityMemo[_Layout] = IdentityMemo(256)


def _layout(device: ModbusDevice) -> _Layout:
    return _LAYOUTS.get(device.points, (device.card,), _Layout, device)


def card_scalar_points(device: ModbusDevice) -> tuple[ModbusPoint, ...]:
    """The device points whose values travel with the card."""
    assert device.card is not None
    return tuple(device.point(name) for name in device.card.scalars)


async def capture_card(reader: Reader, device: ModbusDevice, *, clock_ns: Callable[[], int],
                       limits: DeviceLimits | None = None,
                       known_at_ns: int | None = None) -> CardReading | None:
    """One consistent card from `device`, or None when the device holds no card yet (n_points == 0)
    or still holds the card acquired at `known_at_ns` (one the caller already has: only the header is
    read, 2 requests of the default map's 11).

    Reader errors propagate (the caller decides about retries and quarantine). A card that keeps
    changing during capture is returned with quality BAD and reason "torn"; an impossible point count
    or time gives BAD with empty curves.
    """
    spec = device.card
    if spec is None:
        raise ValueError(f"device {device.name} has no card")
    limits = limits or DeviceLimits()
    layout = _layout(device)
    max_count = limits.cap("holding", device.max_registers_per_read)
    forbidden = limits.forbidden.get("holding", ())
    header_plan = _planned(layout.header, max_count, device.max_gap, forbidden)
    time_pdu = layout.time_pdu
    image = _Image()
    for attempt in range(1, spec.consistency_attempts + 1):
        image = _Image()
        for start, count in header_plan:
            image.add(start, count, await reader("holding", start, count))
        time_words = image.get(time_pdu, TIME_WORDS)
        (n,) = image.get(layout.n_pdu, 1)
        scalars = layout.decode_scalars(header_plan, image)
        if n == 0:
            return None
        if n > spec.max_points:
            return _bad(device, scalars, image, clock_ns(), f"n_points {n} outside 1..{spec.max_points}")
        try:
            acquired_at_ns = parse_acquisition_time(time_words, encoding=spec.time_encoding,
                                                    utc_offset_h=spec.utc_offset_h)
        except ValueError as exc:
            return _bad(device, scalars, image, clock_ns(), f"bad acquisition time: {exc}")
        if acquired_at_ns == known_at_ns:
            return None  # the RTU has no newer card: leave its curves unread
        for start, count in _planned_curves(layout.curve_starts, n, max_count, device.max_gap, forbidden):
            image.add(start, count, await reader("holding", start, count))
        again = image.add(time_pdu, TIME_WORDS, await reader("holding", time_pdu, TIME_WORDS))
        if list(again) != time_words:
            continue  # the RTU published a new card mid-capture: start over
        arrays = {name: curve_values(image.get(start, n), scale)
                  for name, (start, scale) in layout.curves.items()}
        return CardReading(
            device=device.name,
            acquired_at_ns=acquired_at_ns,
            n_points=n,
            position_m=arrays["position_m"],
            load_kn=arrays["load_kn"],
            current_a=_absent_if_zero(arrays.get("current_a")),
            power_kw=_absent_if_zero(arrays.get("power_kw")),
            scalars=scalars,
            quality=Quality.GOOD,
            ts_ns=clock_ns(),
            reason=None if attempt == 1 else f"consistent after {attempt} attempts",
            raw_registers=dict(image.raw),
        )
    return _bad(device, {}, image, clock_ns(),
                f"torn: card changed during each of {spec.consistency_attempts} captures")


def _absent_if_zero(curve: tuple[float, ...] | None) -> tuple[float, ...] | None:
    # RTUs without a power meter leave the current/power blocks at zero (domain.md §1.3): that is
    # "not measured", not a measured zero.
    if curve is None or not any(curve):
        return None
    return curve


def _bad(device: ModbusDevice, scalars: dict[str, Value], image: _Image, ts_ns: int,
         reason: str) -> CardReading:
    return CardReading(device=device.name, acquired_at_ns=0, n_points=0, position_m=(), load_kn=(),
                       current_a=None, power_kw=None, scalars=scalars, quality=Quality.BAD, ts_ns=ts_ns,
                       reason=reason, raw_registers=dict(image.raw))
