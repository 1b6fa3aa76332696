"""Typed, frozen configuration of serial line devices: port settings, framing, parsing, NMEA, SLCAN+DBC.

One `SerialPortConfig` is one port (a path such as /dev/ttyUSB0, or any pyserial URL) with one
protocol, chosen by `protocol.kind`:

  * "nmea"   - a GNSS receiver: NMEA 0183 lines; RMC/GGA become the points lat_deg, lon_deg,
               speed_kmh, course_deg, fix_valid (from `position_sentence`) and fix_quality, satellites,
               hdop, altitude_m (from GGA);
  * "slcan"  - a Lawicel/SLCAN CAN adapter; frames are decoded with the DBC file at `dbc`; points are
               signal names (or "Message.Signal" with `qualify_signals`);
  * "framed" - anything else: a `framing` (delimiter, length_prefixed, fixed) cuts the byte stream into
               frames and a `parser` (regex, struct) turns each frame into named, typed fields.

Every reading carries `device = name`. The pseudo-point `status_point` (default "link") reports the
line itself: BAD with a reason when frames are garbled or the port is lost, GOOD again when frames
flow. `report_interval_s` decimates every point to one value per interval (the last one before each
report); `report_intervals_s` overrides it per point (a value <= 0 is rejected; omit to inherit).
Binary strings (`header_hex`, `sync_hex`) are hex; `delimiter` is text whose characters are bytes
0-255 (so "\\r\\n" or "\\u0003" in TOML).
"""

from __future__ import annotations

import re
import struct
from typing import Literal

import msgspec

FieldType = Literal["float", "int", "hex", "bool", "str"]
Parity = Literal["N", "E", "O", "M", "S"]


def _hex_bytes(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not hex") from None


class DelimiterFraming(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                       tag="delimiter", tag_field="kind"):
    """Frames end with `delimiter`; frames longer than `max_frame_bytes` are dropped."""

    delimiter: str = "\r\n"
    max_frame_bytes: int = 1024

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise ValueError("delimiter must not be empty")
        try:
            self.delimiter.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("delimiter characters must be bytes (code points 0-255)") from None
        if self.max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")

    @property
    def delimiter_bytes(self) -> bytes:
        return self.delimiter.encode("latin-1")


class LengthPrefixedFraming(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                            tag="length_prefixed", tag_field="kind"):
    """[header][length_offset bytes][length field][body]; total = prefix + length + length_adjust."""

    length_bytes: Literal[1, 2, 4] = 1
    byte_order: Literal["big", "little"] = "big"
    header_hex: str = ""
    length_offset: int = 0
    length_adjust: int = 0
    max_frame_bytes: int = 1024

    def __post_init__(self) -> None:
        header = _hex_bytes(self.header_hex, "header_hex")
        if self.length_offset < 0:
            raise ValueError("length_offset must be >= 0")
        if self.max_frame_bytes < len(header) + self.length_offset + self.length_bytes:
            raise ValueError("max_frame_bytes is shorter than header + length field")

    @property
    def header(self) -> bytes:
        return bytes.fromhex(self.header_hex)


class FixedFraming(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   tag="fixed", tag_field="kind"):
    """Frames of `size_bytes`, optionally starting with the sync word `sync_hex` (part of the size)."""

    size_bytes: int
    sync_hex: str = ""

    def __post_init__(self) -> None:
        sync = _hex_bytes(self.sync_hex, "sync_hex")
        if self.size_bytes < 1:
            raise ValueError("size_bytes must be >= 1")
        if len(sync) > self.size_bytes:
            raise ValueError("sync_hex is longer than size_bytes")

    @property
    def sync(self) -> bytes:
        return bytes.fromhex(self.sync_hex)


Framing = DelimiterFraming | LengthPrefixedFraming | FixedFraming


class ParsedField(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One field of a frame: its type and value = raw * scale + offset. Names starting with _ are skipped."""

    name: str
    type: FieldType = "float"
    group: str | None = None  # regex only: the named group, default `name`
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("field name must not be empty")
        if self.scale == 0:
            raise ValueError(f"{self.name}: scale must not be 0")


def _check_names(fields: tuple[ParsedField, ...]) -> None:
    names = [f.name for f in fields if not f.name.startswith("_")]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate field names: {dup}")


class RegexParser(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                  tag="regex", tag_field="kind"):
    """The pattern must match a whole frame; each field reads the named group of the same name."""

    pattern: str
    fields: tuple[ParsedField, ...]
    encoding: str = "ascii"

    def __post_init__(self) -> None:
        try:
            regex = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern: {exc}") from None
        if not self.fields:
            raise ValueError("fields must not be empty")
        for f in self.fields:
            if (f.group or f.name) not in regex.groupindex:
                raise ValueError(f"field {f.name}: pattern has no group named {f.group or f.name!r}")
        _check_names(self.fields)
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ValueError(f"encoding {self.encoding!r} is unknown") from None


class StructParser(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   tag="struct", tag_field="kind"):
    """A Python `struct` format (e.g. ">HhI"); one field per unpacked item, in order."""

    format: str
    fields: tuple[ParsedField, ...]
    offset_bytes: int = 0

    def __post_init__(self) -> None:
        try:
            s = struct.Struct(self.format)
        except struct.error as exc:
            raise ValueError(f"format {self.format!r}: {exc}") from None
        items = len(s.unpack(bytes(s.size)))
        if items != len(self.fields):
            raise ValueError(f"format {self.format!r} unpacks {items} items but {len(self.fields)} "
                             "fields are given")
        if self.offset_bytes < 0:
            raise ValueError("offset_bytes must be >= 0")
        for f in self.fields:
            if f.group is not None:
                raise ValueError(f"field {f.name}: group applies to regex parsers only")
        _check_names(self.fields)


Parser = RegexParser | StructParser


class FramedProtocol(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                     tag="framed", tag_field="kind"):
    parser: Parser
    framing: Framing = DelimiterFraming()

    def point_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.parser.fields if not f.name.startswith("_"))


NMEA_POSITION_POINTS = ("lat_deg", "lon_deg", "speed_kmh", "course_deg", "fix_valid")
NMEA_GGA_POINTS = ("fix_quality", "satellites", "hdop", "altitude_m")


class NmeaProtocol(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   tag="nmea", tag_field="kind"):
    require_checksum: bool = True
    position_sentence: Literal["RMC", "GGA"] = "RMC"  # which sentence feeds lat_deg/lon_deg
    max_line_bytes: int = 256  # NMEA allows 82; some receivers send longer proprietary lines

    def __post_init__(self) -> None:
        if self.max_line_bytes < 16:
            raise ValueError("max_line_bytes must be >= 16")

    def point_names(self) -> tuple[str, ...]:
        return NMEA_POSITION_POINTS + NMEA_GGA_POINTS


class SlcanProtocol(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                    tag="slcan", tag_field="kind"):
    dbc: str  # path of the DBC file
    signals: tuple[str, ...] = ()  # points to report; empty = every signal in the DBC
    qualify_signals: bool = False  # name points "Message.Signal" (needed when signal names repeat)
    init_commands: tuple[str, ...] = ()  # written (CR-terminated) after opening, e.g. ("C", "S6", "O")
    max_line_bytes: int = 160  # an extended CAN FD line with 64 bytes and a timestamp is 143

    def __post_init__(self) -> None:
        if not self.dbc:
            raise ValueError("dbc must name a DBC file")
        if self.max_line_bytes < 32:
            raise ValueError("max_line_bytes must be >= 32")
        for c in self.init_commands:
            if "\r" in c or not c.isascii():
                raise ValueError(f"init command {c!r} must be ASCII without CR")


Protocol = FramedProtocol | NmeaProtocol | SlcanProtocol


class SerialPortConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One serial port, its line settings, protocol and reporting policy."""

    name: str
    port: str  # /dev/ttyUSB0, /dev/serial/by-id/..., or a pyserial URL
    protocol: Protocol
    baudrate: int = 9600
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Parity = "N"
    stopbits: float = 1
    rtscts: bool = False
    xonxoff: bool = False
    status_point: str = "link"
    report_interval_s: float | None = None  # None: report every value as it arrives
    report_intervals_s: dict[str, float] = {}
    reopen_initial_s: float = 0.5  # first wait before reopening a lost port; doubles up to reopen_max_s
    reopen_max_s: float = 10.0
    idle_timeout_s: float | None = None  # no frame for this long -> status BAD "silent"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if not self.port:
            raise ValueError("port must not be empty")
        if not 50 <= self.baudrate <= 4_000_000:
            raise ValueError("baudrate must be in 50..4000000")
        if self.stopbits not in (1, 1.5, 2):
            raise ValueError("stopbits must be 1, 1.5 or 2")
        if self.report_interval_s is not None and self.report_interval_s <= 0:
            raise ValueError("report_interval_s must be > 0")
        for point, interval in self.report_intervals_s.items():
            if interval <= 0:
                raise ValueError(f"report_intervals_s.{point} must be > 0")
        if self.reopen_initial_s <= 0 or self.reopen_max_s < self.reopen_initial_s:
            raise ValueError("need 0 < reopen_initial_s <= reopen_max_s")
        if self.idle_timeout_s is not None and self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        if not self.status_point:
            raise ValueError("status_point must not be empty")
        if isinstance(self.protocol, (FramedProtocol, NmeaProtocol)):
            if self.status_point in self.protocol.point_names():
                raise ValueError(f"status_point {self.status_point!r} collides with a point name")
            unknown = set(self.report_intervals_s) - set(self.protocol.point_names()) - {self.status_point}
            if unknown:
                raise ValueError(f"report_intervals_s names unknown points: {sorted(unknown)}")
