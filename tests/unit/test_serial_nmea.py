"""NMEA 0183: checksums, RMC and GGA golden sentences, counted rejects, GGA dating from the last RMC."""

from __future__ import annotations

import calendar

import pytest

from drivers.serial.nmea import (
    GgaFix,
    NmeaDecoder,
    NmeaError,
    RmcFix,
    decode_gga,
    decode_rmc,
    format_sentence,
    parse_sentence,
)

# The classic examples from the NMEA 0183 literature (checksums as published).
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"
GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
# A u-blox NMEA 4.x RMC with mode and navigational status, southern and western hemispheres.
RMC_41 = format_sentence("GNRMC", ["235959.50", "A", "3345.1234", "S", "07036.5678", "W", "0.50", "",
                                   "311299", "", "", "D", "V"])


def test_the_published_rmc_example_decodes_to_its_position_speed_course_and_time() -> None:
    fix = decode_rmc(parse_sentence(RMC))
    assert fix.talker == "GP"
    assert fix.valid
    assert fix.lat_deg == pytest.approx(48 + 7.038 / 60)
    assert fix.lon_deg == pytest.approx(11 + 31.0 / 60)
    assert fix.speed_kn == pytest.approx(22.4)
    assert fix.speed_kmh == pytest.approx(22.4 * 1.852)
    assert fix.course_deg == pytest.approx(84.4)
    assert fix.utc_ns == calendar.timegm((1994, 3, 23, 12, 35, 19)) * 10**9


def test_the_published_gga_example_decodes_to_fix_quality_satellites_hdop_and_altitude() -> None:
    fix = decode_gga(parse_sentence(GGA))
    assert (fix.fix_quality, fix.satellites, fix.hdop) == (1, 8, 0.9)
    assert fix.altitude_m == pytest.approx(545.4)
    assert fix.geoid_separation_m == pytest.approx(46.9)
    assert fix.time_of_day_s == 12 * 3600 + 35 * 60 + 19


def test_southern_and_western_positions_are_negative_and_two_digit_years_before_80_are_2000s() -> None:
    fix = decode_rmc(parse_sentence(RMC_41))
    assert fix.lat_deg == pytest.approx(-(33 + 45.1234 / 60))
    assert fix.lon_deg == pytest.approx(-(70 + 36.5678 / 60))
    assert fix.course_deg is None
    assert fix.mode == "D"
    assert fix.utc_ns == (calendar.timegm((1999, 12, 31, 23, 59, 59)) * 10**9) + 500_000_000


def test_a_bad_checksum_is_rejected_and_counted_never_raised_past_the_decoder_as_anything_else() -> None:
    d = NmeaDecoder()
    with pytest.raises(NmeaError) as err:
        d.decode(RMC.replace(b"*6A", b"*6B"))
    assert err.value.kind == "checksum"
    assert d.stats.bad_checksum == 1
    assert d.decode(RMC) is not None
    assert d.stats.decoded == 1


def test_a_missing_checksum_is_rejected_unless_allowed() -> None:
    bare = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
    with pytest.raises(NmeaError, match="no checksum"):
        parse_sentence(bare)
    assert parse_sentence(bare, require_checksum=False).kind == "GGA"


@pytest.mark.parametrize("line", [
    b"", b"GPRMC,1", b"$", b"$*00", b"$GPRMC*52", b"$GPRMC,1,2,3*1", b"$GPRMC,1,2,3*ZZ",
    format_sentence("GPRMC", ["123519", "A", "4807.038", "X", "01131.000", "E", "1", "2", "230394"]),
    format_sentence("GPRMC", ["123519", "A", "4860.000", "N", "01131.000", "E", "1", "2", "230394"]),
    format_sentence("GPRMC", ["126019", "A", "4807.038", "N", "01131.000", "E", "1", "2", "230394"]),
    format_sentence("GPRMC", ["123519", "A", "4807.038", "N", "01131.000", "E", "1", "2", "310294"]),
    format_sentence("GPRMC", ["123519", "Q", "4807.038", "N", "01131.000", "E", "1", "2", "230394"]),
    format_sentence("GPGGA", ["123519", "4807.038", "N", "01131.000", "E", "x", "08", "0.9", "5"]),
    format_sentence("GPGGA", ["123519", "9107.038", "N", "01131.000", "E", "1", "08", "0.9", "5"]),
    b"$GP\xffRMC*00",
])
def test_malformed_sentences_are_nmea_errors_with_a_reason(line: bytes) -> None:
    d = NmeaDecoder()
    with pytest.raises(NmeaError):
        d.decode(line)
    assert d.stats.bad_checksum + d.stats.malformed == 1


def test_sentences_we_do_not_decode_are_ignored_and_counted() -> None:
    d = NmeaDecoder()
    assert d.decode(format_sentence("GPGSV", ["3", "1", "11"])) is None
    assert d.decode(format_sentence("PUBX", ["00"])) is None
    assert d.stats.ignored == 2


def test_an_rmc_without_a_fix_is_not_valid_and_has_no_position() -> None:
    no_fix = format_sentence("GPRMC", ["", "V", "", "", "", "", "", "", "", "", "", "N"])
    fix = decode_rmc(parse_sentence(no_fix))
    assert not fix.valid
    assert fix.lat_deg is None and fix.utc_ns is None


def test_gga_gets_a_full_utc_time_from_the_date_of_the_last_rmc_even_across_midnight() -> None:
    d = NmeaDecoder()
    rmc = d.decode(format_sentence("GPRMC", ["235959", "A", "4807.038", "N", "01131.000", "E", "0", "",
                                              "230394"]))
    assert isinstance(rmc, RmcFix) and rmc.utc_ns is not None
    gga = d.decode(format_sentence("GPGGA", ["000001", "4807.038", "N", "01131.000", "E", "1", "08", "0.9",
                                              "545.4", "M", "46.9", "M", "", ""]))
    assert isinstance(gga, GgaFix)
    assert d.utc_ns_of(gga) == rmc.utc_ns + 2 * 10**9


def test_gga_before_any_rmc_has_no_full_time() -> None:
    d = NmeaDecoder()
    gga = d.decode(GGA)
    assert gga is not None and d.utc_ns_of(gga) is None
