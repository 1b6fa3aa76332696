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
For the default map at 125 registers per request and n = 200 that is 2 + 8 + 1 = 11 requests.

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
from drivers.modbus.config import ModbusDevice, ModbusPoint, Table, modicon_to_pdu
from drivers.modbus.decode import decode
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


def parse_acquisition_time(words: Sequence[int], *, encoding: str = "decimal",
                           utc_offset_h: float = 8.0) -> int:
    """UTC epoch ns of a card from its 6 time words; ValueError when the words are not a valid time."""
    if len(words) != TIME_WORDS:
        raise ValueError(f"acquisition time needs {TIME_WORDS} words, got {len(words)}")
    fields = [_from_bcd(w) for w in words] if encoding == "bcd" else list(words)
    year, month, day, hour, minute, second = fields
    tz = dt.timezone(dt.timedelta(hours=utc_offset_h))
    stamp = dt.datetime(year, month, day, hour, minute, second, tzinfo=tz)  # raises on e.g. month 13
    return int(stamp.timestamp()) * 1_000_000_000


def encode_acquisition_time(ts_ns: int, *, encoding: str = "decimal", utc_offset_h: float = 8.0) -> list[int]:
    """The 6 time words for a UTC epoch ns timestamp (whole seconds, truncated)."""
    tz = dt.timezone(dt.timedelta(hours=utc_offset_h))
    t = dt.datetime.fromtimestamp(ts_ns // 1_000_000_000, tz)
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
    """Holding registers read so far in one attempt: address -> word, plus the raw blocks."""

    def __init__(self) -> None:
        self.words: dict[int, int] = {}
        self.raw: dict[int, tuple[int, ...]] = {}

    async def read(self, reader: Reader, start: int, count: int) -> tuple[int, ...]:
        words = tuple(int(w) for w in await reader("holding", start, count))
        if len(words) != count:
            raise ValueError(f"asked {count} registers at {start}, got {len(words)}")
        self.raw[start] = words
        self.words.update(zip(range(start, start + count), words, strict=True))
        return words

    def get(self, start: int, count: int) -> list[int]:
        return [self.words[a] for a in range(start, start + count)]


@functools.lru_cache(maxsize=512)
def _planned(spans: tuple[tuple[int, int], ...], max_count: int, max_gap: int,
             forbidden: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    # Card layouts repeat on every capture (same n, same limits): plan each one once. Planning 800
    # single-register curve spans costs milliseconds; a capture of a known layout should cost none.
    return tuple((start, count) for start, count, _ in
                 plan_spans(spans, max_count=max_count, max_gap=max_gap, forbidden=forbidden))


@functools.lru_cache(maxsize=512)
def _curve_spans(starts: tuple[int, ...], n: int) -> tuple[tuple[int, int], ...]:
    # one span per register: curves may be split anywhere, unlike points
    return tuple((start + k, 1) for start in starts for k in range(n))


async def _read_spans(image: _Image, reader: Reader, spans: tuple[tuple[int, int], ...], device: ModbusDevice,
                      limits: DeviceLimits) -> None:
    plan = _planned(spans, limits.cap("holding", device.max_registers_per_read), device.max_gap,
                    limits.forbidden.get("holding", ()))
    for start, count in plan:
        await image.read(reader, start, count)


def card_scalar_points(device: ModbusDevice) -> tuple[ModbusPoint, ...]:
    """The device points whose values travel with the card."""
    assert device.card is not None
    return tuple(device.point(name) for name in device.card.scalars)


async def capture_card(reader: Reader, device: ModbusDevice, *, clock_ns: Callable[[], int],
                       limits: DeviceLimits | None = None) -> CardReading | None:
    """One consistent card from `device`, or None when the device holds no card yet (n_points == 0).

    Reader errors propagate (the caller decides about retries and quarantine). A card that keeps
    changing during capture is returned with quality BAD and reason "torn"; an impossible point count
    or time gives BAD with empty curves.
    """
    spec = device.card
    if spec is None:
        raise ValueError(f"device {device.name} has no card")
    limits = limits or DeviceLimits()
    scalar_points = card_scalar_points(device)
    for p in scalar_points:
        if p.location()[0] != "holding":
            raise ValueError(f"card scalar {p.name} is not a holding register")
    time_pdu, n_pdu = _pdu(spec.acquisition_time_register), _pdu(spec.n_points_register)
    header = ((time_pdu, TIME_WORDS), (n_pdu, 1),
              *((p.location()[1], p.register_count()) for p in scalar_points))
    curves = {name: (_pdu(start), scale) for name, (start, scale) in spec.curves().items()}
    image = _Image()
    for attempt in range(1, spec.consistency_attempts + 1):
        image = _Image()
        await _read_spans(image, reader, header, device, limits)
        time_words = image.get(time_pdu, TIME_WORDS)
        n = image.words[n_pdu]
        scalars: dict[str, Value] = {
            p.name: decode(p, image.get(p.location()[1], p.register_count())) for p in scalar_points
        }
        if n == 0:
            return None
        if n > spec.max_points:
            return _bad(device, scalars, image, clock_ns(), f"n_points {n} outside 1..{spec.max_points}")
        try:
            acquired_at_ns = parse_acquisition_time(time_words, encoding=spec.time_encoding,
                                                    utc_offset_h=spec.utc_offset_h)
        except ValueError as exc:
            return _bad(device, scalars, image, clock_ns(), f"bad acquisition time: {exc}")
        curve_spans = _curve_spans(tuple(start for start, _ in curves.values()), n)
        await _read_spans(image, reader, curve_spans, device, limits)
        again = await image.read(reader, time_pdu, TIME_WORDS)
        if list(again) != time_words:
            continue  # the RTU published a new card mid-capture: start over
        arrays = {name: curve_values(image.get(start, n), scale) for name, (start, scale) in curves.items()}
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
