"""Pure NMEA 0183 decoding: sentence checksum and fields, RMC and GGA -> position fixes.

A sentence is `$` + address (2-char talker + 3-char type, e.g. GPRMC, GNGGA) + `,`-separated fields
+ `*hh` + CRLF, where hh is the XOR of every character between `$` and `*` in hex. Sentences whose
checksum does not match are rejected (`NmeaError`, counted by `NmeaDecoder`); a missing checksum is
rejected unless `require_checksum=False` (old receivers omit it on some sentences).

RMC (recommended minimum): time, status A=valid/V=warning, lat, N/S, lon, E/W, speed over ground in
knots, course over ground in degrees true, date ddmmyy, magnetic variation, E/W, [mode A/D/E/M/S/N
(NMEA 2.3+)], [navigational status (4.1+)]. GGA (fix data): time, lat, N/S, lon, E/W, fix quality
(0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 estimated, ...), satellites used, HDOP, altitude,
M, geoid separation, M, [DGPS age, station id]. Empty fields mean "no value" and decode to None.
Two-digit years are 2000-2079 for 00-79 and 1980-1999 for 80-99 (GPS epoch is 1980).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass

NS_PER_S = 1_000_000_000
KNOT_KMH = 1.852  # km/h per knot, exact by definition
DAY_S = 86_400


class NmeaError(ValueError):
    """A sentence that cannot be used; `kind` is "checksum", "malformed" or "unsupported"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Sentence:
    talker: str  # "GP", "GN", "GL", "GA", "BD", ...; "P" for proprietary sentences
    kind: str  # "RMC", "GGA", ...
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RmcFix:
    talker: str
    utc_ns: int | None  # date + time of the fix, UTC epoch ns (None without date or time)
    time_of_day_s: float | None
    valid: bool  # status A (and mode not N)
    lat_deg: float | None
    lon_deg: float | None
    speed_kn: float | None
    course_deg: float | None
    mode: str | None

    @property
    def speed_kmh(self) -> float | None:
        return None if self.speed_kn is None else self.speed_kn * KNOT_KMH


@dataclass(frozen=True, slots=True)
class GgaFix:
    talker: str
    time_of_day_s: float | None
    lat_deg: float | None
    lon_deg: float | None
    fix_quality: int
    satellites: int | None
    hdop: float | None
    altitude_m: float | None
    geoid_separation_m: float | None


def checksum(body: bytes) -> int:
    """XOR of the bytes between `$` and `*`."""
    c = 0
    for b in body:
        c ^= b
    return c


def parse_sentence(line: bytes, *, require_checksum: bool = True) -> Sentence:
    """Split and verify one sentence (trailing CR/LF allowed); NmeaError if it is not usable."""
    line = line.strip(b"\r\n")
    if not line or line[:1] not in (b"$", b"!"):
        raise NmeaError("malformed", "does not start with $")
    star = line.rfind(b"*")
    if star >= 0:
        body, given = line[1:star], line[star + 1:]
        if len(given) != 2:
            raise NmeaError("malformed", f"checksum field {given[:4]!r} is not 2 hex digits")
        try:
            expected = int(given, 16)
        except ValueError:
            raise NmeaError("malformed", f"checksum {given!r} is not hex") from None
        actual = checksum(body)
        if actual != expected:
            raise NmeaError("checksum", f"bad checksum: {expected:02X} given, {actual:02X} computed")
    elif require_checksum:
        raise NmeaError("malformed", "no checksum")
    else:
        body = line[1:]
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise NmeaError("malformed", "non-ASCII bytes") from None
    parts = text.split(",")
    address = parts[0]
    if address.startswith("P"):
        return Sentence("P", address[1:], tuple(parts[1:]))
    if len(address) != 5 or not address.isalnum():
        raise NmeaError("malformed", f"bad address {address[:8]!r}")
    return Sentence(address[:2], address[2:], tuple(parts[1:]))


def _field(fields: tuple[str, ...], i: int) -> str:
    return fields[i] if i < len(fields) else ""


def _float(text: str, what: str) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise NmeaError("malformed", f"{what}: {text[:12]!r} is not a number") from None


def _int(text: str, what: str) -> int | None:
    if not text:
        return None
    try:
        return int(text, 10)
    except ValueError:
        raise NmeaError("malformed", f"{what}: {text[:12]!r} is not an integer") from None


def _time_of_day(text: str) -> float | None:
    """hhmmss[.sss] -> seconds since midnight."""
    if not text:
        return None
    if len(text) < 6 or not text[:6].isdigit():
        raise NmeaError("malformed", f"time {text[:12]!r} is not hhmmss")
    h, m = int(text[0:2]), int(text[2:4])
    s = _float(text[4:], "time")
    assert s is not None
    if h > 23 or m > 59 or not 0 <= s < 61:  # 60.x is a leap second
        raise NmeaError("malformed", f"time {text!r} out of range")
    return h * 3600 + m * 60 + s


def _angle(value: str, hemi: str, deg_digits: int, limit: float, what: str) -> float | None:
    """(d)ddmm.mmmm + hemisphere -> signed decimal degrees (S and W negative)."""
    if not value and not hemi:
        return None
    positive, negative = ("N", "S") if deg_digits == 2 else ("E", "W")
    if hemi not in (positive, negative):
        raise NmeaError("malformed", f"{what}: hemisphere {hemi!r} is not {positive}/{negative}")
    if len(value) < deg_digits + 2 or not value[:deg_digits].isdigit():
        raise NmeaError("malformed", f"{what}: {value[:14]!r} is not {'d' * deg_digits}mm.mmmm")
    deg = int(value[:deg_digits])
    minutes = _float(value[deg_digits:], what)
    assert minutes is not None
    if not 0 <= minutes < 60:
        raise NmeaError("malformed", f"{what}: minutes {minutes} out of range")
    out = deg + minutes / 60.0
    if out > limit:
        raise NmeaError("malformed", f"{what}: {out} degrees out of range")
    return -out if hemi == negative else out


def _date_days(text: str) -> int | None:
    """ddmmyy -> days since 1970-01-01."""
    if not text:
        return None
    if len(text) != 6 or not text.isdigit():
        raise NmeaError("malformed", f"date {text[:10]!r} is not ddmmyy")
    d, mo, yy = int(text[0:2]), int(text[2:4]), int(text[4:6])
    year = 2000 + yy if yy < 80 else 1900 + yy
    if not 1 <= mo <= 12 or not 1 <= d <= calendar.monthrange(year, mo)[1]:
        raise NmeaError("malformed", f"date {text!r} out of range")
    return calendar.timegm((year, mo, d, 0, 0, 0, 0, 0, 0)) // DAY_S


def decode_rmc(s: Sentence) -> RmcFix:
    f = s.fields
    if len(f) < 9:
        raise NmeaError("malformed", f"RMC has {len(f)} fields, needs at least 9")
    tod = _time_of_day(f[0])
    status = f[1]
    if status not in ("A", "V", ""):
        raise NmeaError("malformed", f"RMC status {status[:4]!r} is not A/V")
    lat = _angle(f[2], f[3], 2, 90.0, "latitude")
    lon = _angle(f[4], f[5], 3, 180.0, "longitude")
    speed = _float(f[6], "speed")
    course = _float(f[7], "course")
    days = _date_days(f[8])
    mode = _field(f, 11) or None
    utc_ns = None
    if days is not None and tod is not None:
        utc_ns = days * DAY_S * NS_PER_S + round(tod * NS_PER_S)
    valid = status == "A" and mode != "N" and lat is not None and lon is not None
    return RmcFix(s.talker, utc_ns, tod, valid, lat, lon, speed, course, mode)


def decode_gga(s: Sentence) -> GgaFix:
    f = s.fields
    if len(f) < 9:
        raise NmeaError("malformed", f"GGA has {len(f)} fields, needs at least 9")
    tod = _time_of_day(f[0])
    lat = _angle(f[1], f[2], 2, 90.0, "latitude")
    lon = _angle(f[3], f[4], 3, 180.0, "longitude")
    quality = _int(f[5], "fix quality")
    sats = _int(f[6], "satellites")
    hdop = _float(f[7], "hdop")
    alt = _float(f[8], "altitude")
    sep = _float(_field(f, 10), "geoid separation")
    return GgaFix(s.talker, tod, lat, lon, quality or 0, sats, hdop, alt, sep)


@dataclass(slots=True)
class NmeaStats:
    decoded: int = 0
    bad_checksum: int = 0
    malformed: int = 0
    ignored: int = 0  # valid sentences of types we do not decode (GSV, VTG, proprietary ...)


class NmeaDecoder:
    """Stateful sentence -> fix decoder that counts what it rejects.

    GGA carries no date; the decoder remembers the date of the last RMC so GGA fixes get a full UTC
    time too (`utc_ns_of`), rolling over to the next day when the time of day wraps past midnight.
    """

    def __init__(self, *, require_checksum: bool = True) -> None:
        self.require_checksum = require_checksum
        self.stats = NmeaStats()
        self._day_start_ns: int | None = None  # UTC ns of 00:00 of the last RMC date
        self._last_tod_s: float | None = None

    def decode(self, line: bytes) -> RmcFix | GgaFix | None:
        """The fix in `line`, None for sentence types we ignore; NmeaError (counted) otherwise."""
        try:
            s = parse_sentence(line, require_checksum=self.require_checksum)
            if s.kind == "RMC" and s.talker != "P":
                fix: RmcFix | GgaFix = decode_rmc(s)
            elif s.kind == "GGA" and s.talker != "P":
                fix = decode_gga(s)
            else:
                self.stats.ignored += 1
                return None
        except NmeaError as exc:
            if exc.kind == "checksum":
                self.stats.bad_checksum += 1
            else:
                self.stats.malformed += 1
            raise
        self.stats.decoded += 1
        if isinstance(fix, RmcFix) and fix.utc_ns is not None and fix.time_of_day_s is not None:
            self._day_start_ns = fix.utc_ns - round(fix.time_of_day_s * NS_PER_S)
            self._last_tod_s = fix.time_of_day_s
        return fix

    def utc_ns_of(self, fix: RmcFix | GgaFix) -> int | None:
        """Full UTC time of a fix: RMC's own, or GGA's time of day on the last RMC date."""
        if isinstance(fix, RmcFix):
            return fix.utc_ns
        if fix.time_of_day_s is None or self._day_start_ns is None or self._last_tod_s is None:
            return None
        day = self._day_start_ns
        if fix.time_of_day_s < self._last_tod_s - DAY_S / 2:  # wrapped past midnight since that RMC
            day += DAY_S * NS_PER_S
        return day + round(fix.time_of_day_s * NS_PER_S)


def format_sentence(address: str, fields: list[str]) -> bytes:
    """Build `$address,f1,...*hh\\r\\n` (for simulators and tests)."""
    body = ",".join([address, *fields]).encode("ascii")
    return b"$" + body + b"*" + f"{checksum(body):02X}".encode() + b"\r\n"
