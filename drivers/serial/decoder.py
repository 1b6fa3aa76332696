"""Pure per-port decoding: bytes from one serial port -> Readings (framer + parser/NMEA/SLCAN+DBC + status).

Theory of operation. `PortDecoder.feed(data, ts_ns)` runs the port's framer over the chunk and decodes
each frame; it returns readings in stream order, all stamped `ts_ns` (the agent time the chunk
arrived). Nothing here raises on bad input: a frame that cannot be used is counted in `stats` and
turns the status point BAD with the reason; the next good frame turns it GOOD again. Status readings
are emitted on transitions only, so a burst of garbage costs one BAD reading, not one per line. A
field that fails on its own (an unconvertible regex group, a CAN frame too short for its DBC message)
becomes a BAD reading of that point, and the rest of the frame is still reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drivers.base import Quality, Reading, Value
from drivers.serial.config import (
    DelimiterFraming,
    FixedFraming,
    FramedProtocol,
    Framing,
    LengthPrefixedFraming,
    NmeaProtocol,
    ParsedField,
    RegexParser,
    SerialPortConfig,
    SlcanProtocol,
)
from drivers.serial.dbc import CanDatabase, SignalDecodeError
from drivers.serial.framing import DelimiterFramer, FixedFramer, Framer, LengthPrefixedFramer
from drivers.serial.nmea import GgaFix, NmeaDecoder, NmeaError, RmcFix
from drivers.serial.parsers import FieldSpec, ParseError
from drivers.serial.parsers import RegexParser as RegexFrameParser
from drivers.serial.parsers import StructParser as StructFrameParser
from drivers.serial.slcan import SlcanError, parse_line


@dataclass(slots=True)
class PortStats:
    """Counters of one port (monotonic). Framer drops are read live from the framer."""

    bytes_in: int = 0
    frames: int = 0  # frames the framer produced
    frames_rejected: int = 0  # frames that failed to parse (bad checksum, no match, malformed)
    fields_bad: int = 0  # single fields/signals reported BAD
    unknown_ids: int = 0  # CAN frames whose id is not in the DBC
    adapter_errors: int = 0  # SLCAN BEL answers
    bytes_dropped: int = 0  # framer: garbage skipped while resynchronising, overlong frames
    frames_dropped: int = 0  # framer: overlong / impossible-length frames
    opens: int = 0  # successful opens of the port (driver)
    open_failures: int = 0  # failed open attempts (driver)
    losses: int = 0  # times an open port failed (driver)


def build_framer(framing: Framing) -> Framer:
    if isinstance(framing, DelimiterFraming):
        return DelimiterFramer(framing.delimiter_bytes, max_frame_bytes=framing.max_frame_bytes)
    if isinstance(framing, LengthPrefixedFraming):
        return LengthPrefixedFramer(length_bytes=framing.length_bytes, byte_order=framing.byte_order,
                                    header=framing.header, length_offset=framing.length_offset,
                                    length_adjust=framing.length_adjust,
                                    max_frame_bytes=framing.max_frame_bytes)
    assert isinstance(framing, FixedFraming)
    return FixedFramer(framing.size_bytes, sync=framing.sync)


def _spec(f: ParsedField) -> FieldSpec:
    return FieldSpec(f.name, f.type, f.scale, f.offset, f.group)


def signal_points(cfg: SlcanProtocol, db: CanDatabase) -> dict[tuple[int, bool], list[tuple[str, str]]]:
    """(frame id, extended) -> [(signal, point)] for the signals `cfg` selects; ValueError if misnamed."""
    owners: dict[str, list[str]] = {}
    for m in db.messages:
        for s in m.signals:
            owners.setdefault(s, []).append(m.name)
    if not cfg.qualify_signals:
        dup = sorted(s for s, ms in owners.items() if len(ms) > 1)
        if dup:
            raise ValueError(f"signal names repeat across messages ({dup}); set qualify_signals = true")
    out: dict[tuple[int, bool], list[tuple[str, str]]] = {}
    known: set[str] = set()
    wanted = set(cfg.signals)
    for m in db.messages:
        for s in m.signals:
            point = f"{m.name}.{s}" if cfg.qualify_signals else s
            known.add(point)
            if not wanted or point in wanted:
                out.setdefault((m.frame_id, m.is_extended), []).append((s, point))
    unknown = wanted - known
    if unknown:
        raise ValueError(f"signals not in the DBC: {sorted(unknown)}")
    return out


class PortDecoder:
    """Bytes of one port in, Readings out; see the module docstring."""

    def __init__(self, cfg: SerialPortConfig, *, dbc: CanDatabase | None = None) -> None:
        self.cfg = cfg
        self.stats = PortStats()
        self._status_ok: bool | None = None
        self._out: list[Reading] = []
        self._ts_ns = 0
        proto = cfg.protocol
        self._handle: Callable[[bytes], None]
        if isinstance(proto, FramedProtocol):
            self.framer: Framer = build_framer(proto.framing)
            specs = [_spec(f) for f in proto.parser.fields]
            if isinstance(proto.parser, RegexParser):
                self._parser: RegexFrameParser | StructFrameParser = RegexFrameParser(
                    proto.parser.pattern, specs, encoding=proto.parser.encoding)
            else:
                self._parser = StructFrameParser(proto.parser.format, specs,
                                                 offset_bytes=proto.parser.offset_bytes)
            self.point_names: tuple[str, ...] = proto.point_names()
            self._handle = self._framed
        elif isinstance(proto, NmeaProtocol):
            self.framer = DelimiterFramer(b"\n", max_frame_bytes=proto.max_line_bytes)
            self.nmea = NmeaDecoder(require_checksum=proto.require_checksum)
            self.point_names = proto.point_names()
            self._handle = self._nmea
        else:
            if dbc is None:
                raise ValueError(f"{cfg.name}: an slcan port needs its DBC database")
            self.framer = DelimiterFramer(b"\r", max_frame_bytes=proto.max_line_bytes)
            self.dbc = dbc
            self._signals = signal_points(proto, dbc)
            self.point_names = tuple(p for sigs in self._signals.values() for _, p in sigs)
            self._handle = self._slcan
        unknown = set(cfg.report_intervals_s) - set(self.point_names) - {cfg.status_point}
        if unknown:
            raise ValueError(f"{cfg.name}: report_intervals_s names unknown points: {sorted(unknown)}")
        if cfg.status_point in self.point_names:
            raise ValueError(f"{cfg.name}: status_point {cfg.status_point!r} collides with a point name")

    # -- status ---------------------------------------------------------------------------------

    def _reading(self, point: str, value: Value, quality: Quality = Quality.GOOD, *,
                 reason: str | None = None, source_ts_ns: int | None = None) -> None:
        self._out.append(Reading(self.cfg.name, point, value, quality, self._ts_ns,
                                 source_ts_ns=source_ts_ns, reason=reason))

    def _good(self) -> None:
        if self._status_ok is not True:
            self._status_ok = True
            self._reading(self.cfg.status_point, True)

    def _bad(self, reason: str, *, force: bool = False) -> None:
        if self._status_ok is not False or force:
            self._status_ok = False
            self._reading(self.cfg.status_point, False, Quality.BAD, reason=reason)

    def port_lost(self, reason: str, ts_ns: int) -> list[Reading]:
        """The port failed or vanished: forget the partial frame and report the line BAD."""
        self._ts_ns = ts_ns
        self.framer.reset()
        self.stats.bytes_dropped = self.framer.stats.bytes_dropped
        self._bad(reason, force=True)
        out, self._out = self._out, []
        return out

    def idle(self, silent_s: float, ts_ns: int) -> list[Reading]:
        """No frame for `silent_s` seconds: report the line BAD (once)."""
        self._ts_ns = ts_ns
        self._bad(f"silent for {silent_s:.0f} s")
        out, self._out = self._out, []
        return out

    # -- bytes in ------------------------------------------------------------------------------

    def feed(self, data: bytes, ts_ns: int) -> list[Reading]:
        self._ts_ns = ts_ns
        self.stats.bytes_in += len(data)
        fs = self.framer.stats
        dropped_before, overlong_before = fs.bytes_dropped, fs.frames_dropped
        frames = self.framer.feed(data)
        # Garbage usually precedes the frames that resynchronised after it, so report it first.
        if fs.frames_dropped > overlong_before:
            self._bad(f"frame longer than {getattr(self.framer, 'max_frame_bytes', '?')} bytes dropped")
        elif fs.bytes_dropped > dropped_before:
            self._bad(f"{fs.bytes_dropped - dropped_before} bytes of garbage dropped")
        self.stats.bytes_dropped, self.stats.frames_dropped = fs.bytes_dropped, fs.frames_dropped
        self.stats.frames += len(frames)
        for frame in frames:
            self._handle(frame)
        out, self._out = self._out, []
        return out

    def _framed(self, frame: bytes) -> None:
        try:
            fields = self._parser.parse(frame)
        except ParseError as exc:
            self.stats.frames_rejected += 1
            self._bad(f"parse: {exc}")
            return
        self._good()
        for name, result in fields.items():
            if result.error is not None:
                self.stats.fields_bad += 1
                self._reading(name, None, Quality.BAD, reason=result.error)
            else:
                self._reading(name, result.value)

    def _nmea(self, line: bytes) -> None:
        if not line.strip(b"\r"):
            return
        try:
            fix = self.nmea.decode(line)
        except NmeaError as exc:
            self.stats.frames_rejected += 1
            self._bad(f"nmea: {exc}")
            return
        self._good()
        if fix is None:
            return
        assert isinstance(self.cfg.protocol, NmeaProtocol)
        src = self.nmea.utc_ns_of(fix)
        position_here = (self.cfg.protocol.position_sentence == "RMC") == isinstance(fix, RmcFix)
        if isinstance(fix, RmcFix):
            valid = fix.valid
        else:
            valid = fix.fix_quality > 0 and fix.lat_deg is not None and fix.lon_deg is not None
        if position_here:
            self._reading("fix_valid", valid, source_ts_ns=src)
            for point, value in (("lat_deg", fix.lat_deg), ("lon_deg", fix.lon_deg)):
                if value is None:
                    self._reading(point, None, Quality.BAD, reason="no fix", source_ts_ns=src)
                elif not valid:
                    self._reading(point, value, Quality.UNCERTAIN, reason="receiver reports no valid fix",
                                  source_ts_ns=src)
                else:
                    self._reading(point, value, source_ts_ns=src)
        if isinstance(fix, RmcFix):
            quality = Quality.GOOD if fix.valid else Quality.UNCERTAIN
            reason = None if fix.valid else "receiver reports no valid fix"
            for point, value in (("speed_kmh", fix.speed_kmh), ("course_deg", fix.course_deg)):
                if value is not None:  # course is often empty while standing still
                    self._reading(point, value, quality, reason=reason, source_ts_ns=src)
        elif isinstance(fix, GgaFix):
            self._reading("fix_quality", fix.fix_quality, source_ts_ns=src)
            extras = (("satellites", fix.satellites), ("hdop", fix.hdop), ("altitude_m", fix.altitude_m))
            for point, v in extras:
                if v is not None:
                    self._reading(point, v, source_ts_ns=src)

    def _slcan(self, line: bytes) -> None:
        bells = line.count(b"\x07")
        if bells:
            self.stats.adapter_errors += bells
            self._bad("CAN adapter answered BEL (error)")
        try:
            frame = parse_line(line)
        except SlcanError as exc:
            self.stats.frames_rejected += 1
            self._bad(f"slcan: {exc}")
            return
        if frame is None or frame.is_remote:
            return
        self._good()
        key = (frame.arbitration_id, frame.is_extended)
        if self.dbc.lookup(*key) is None:
            self.stats.unknown_ids += 1
            return
        selected = self._signals.get(key)
        if not selected:
            return
        try:
            values = self.dbc.decode(frame)
        except SignalDecodeError as exc:
            for _, point in selected:
                self.stats.fields_bad += 1
                self._reading(point, None, Quality.BAD, reason=str(exc))
            return
        for signal, point in selected:
            if signal in values:  # multiplexed signals are only in some frames
                self._reading(point, values[signal])
