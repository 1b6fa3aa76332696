"""PortDecoder: bytes of one port -> Readings, with BAD status on garbage and recovery, for every protocol."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from drivers.base import Quality, Reading
from drivers.serial.config import SerialPortConfig
from drivers.serial.dbc import CanDatabase
from drivers.serial.decoder import PortDecoder
from drivers.serial.nmea import format_sentence

DBC = str(Path(__file__).resolve().parents[2] / "hil" / "dbc" / "vehicle.dbc")
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"
GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"


def port(protocol: dict[str, object], **extra: object) -> SerialPortConfig:
    return msgspec.convert({"name": "dev", "port": "/dev/null", "protocol": protocol, **extra},
                           SerialPortConfig)


def by_point(readings: list[Reading]) -> dict[str, Reading]:
    return {r.point: r for r in readings}


def test_nmea_rmc_and_gga_become_position_points_with_the_device_time() -> None:
    d = PortDecoder(port({"kind": "nmea"}))
    out = by_point(d.feed(RMC + GGA, ts_ns=5))
    assert out["link"].value is True
    assert out["lat_deg"].value == pytest.approx(48.1173)
    assert out["lon_deg"].quality is Quality.GOOD
    assert out["speed_kmh"].value == pytest.approx(41.4848)
    assert out["course_deg"].value == pytest.approx(84.4)
    assert out["fix_valid"].value is True
    assert (out["satellites"].value, out["fix_quality"].value, out["altitude_m"].value) == (8, 1, 545.4)
    assert out["lat_deg"].source_ts_ns == out["altitude_m"].source_ts_ns == 764426119 * 10**9
    assert all(r.ts_ns == 5 and r.device == "dev" for r in out.values())


def test_a_bad_nmea_checksum_turns_the_link_bad_once_and_the_next_good_sentence_restores_it() -> None:
    d = PortDecoder(port({"kind": "nmea"}))
    d.feed(RMC, 1)
    bad = RMC.replace(b"*6A", b"*00")
    out = d.feed(bad + bad + bad, 2)
    assert [(r.point, r.quality) for r in out] == [("link", Quality.BAD)]
    assert out[0].reason is not None and "bad checksum" in out[0].reason
    assert d.stats.frames_rejected == 3 and d.nmea.stats.bad_checksum == 3
    again = by_point(d.feed(RMC, 3))
    assert again["link"].quality is Quality.GOOD and again["lat_deg"].quality is Quality.GOOD


def test_an_rmc_without_a_fix_reports_the_position_bad_with_a_reason() -> None:
    d = PortDecoder(port({"kind": "nmea"}))
    line = format_sentence("GPRMC", ["123519", "V", "", "", "", "", "", "", "230394", "", "", "N"])
    out = by_point(d.feed(line, 1))
    assert out["fix_valid"].value is False
    assert out["lat_deg"].quality is Quality.BAD and out["lat_deg"].reason == "no fix"


def test_slcan_frames_decode_to_dbc_signals_and_unknown_ids_are_only_counted() -> None:
    d = PortDecoder(port({"kind": "slcan", "dbc": DBC}), dbc=CanDatabase.from_file(DBC))
    out = d.feed(b"T0CF004008000000E02E000000\rt7FF0\rt3C081967269300000000\r", 9)
    values = {r.point: r.value for r in out}
    assert values == pytest.approx({"link": True, "EngineSpeed": 1500.0, "PackVoltage": 650.3,
                                    "PackCurrent": -12.5})
    assert d.stats.unknown_ids == 1


def test_a_truncated_slcan_line_is_rejected_and_the_stream_continues() -> None:
    d = PortDecoder(port({"kind": "slcan", "dbc": DBC}), dbc=CanDatabase.from_file(DBC))
    out = d.feed(b"t3C0819672\rt3C12A901\r", 1)
    assert [(r.point, r.quality) for r in out] == [
        ("link", Quality.BAD), ("link", Quality.GOOD), ("SOC", Quality.GOOD), ("ChargeState", Quality.GOOD)]
    assert out[0].reason is not None and "truncated" in out[0].reason
    assert d.stats.frames_rejected == 1


def test_a_can_frame_shorter_than_its_dbc_message_makes_that_messages_signals_bad() -> None:
    d = PortDecoder(port({"kind": "slcan", "dbc": DBC, "signals": ["PackCurrent"]}),
                    dbc=CanDatabase.from_file(DBC))
    out = by_point(d.feed(b"t3C021967\r", 1))
    assert out["PackCurrent"].quality is Quality.BAD
    assert out["PackCurrent"].reason == "BMS_Pack: short frame, 2 of 8 bytes"
    assert "PackVoltage" not in out  # not selected


def test_adapter_bells_are_counted_as_adapter_errors() -> None:
    d = PortDecoder(port({"kind": "slcan", "dbc": DBC}), dbc=CanDatabase.from_file(DBC))
    out = d.feed(b"\x07\x07t3C12A901\r", 1)
    assert d.stats.adapter_errors == 2
    assert out[0].quality is Quality.BAD and out[-1].point == "ChargeState"


def test_slcan_signal_selection_must_name_signals_in_the_dbc() -> None:
    with pytest.raises(ValueError, match="not in the DBC"):
        PortDecoder(port({"kind": "slcan", "dbc": DBC, "signals": ["Nope"]}), dbc=CanDatabase.from_file(DBC))


def test_qualified_signal_names_carry_the_message_name() -> None:
    d = PortDecoder(port({"kind": "slcan", "dbc": DBC, "qualify_signals": True}),
                    dbc=CanDatabase.from_file(DBC))
    assert "BMS_Status.SOC" in {r.point for r in d.feed(b"t3C12A901\r", 1)}


def test_framed_regex_lines_yield_fields_and_garbage_lines_a_bad_link() -> None:
    d = PortDecoder(port({"kind": "framed",
                          "parser": {"kind": "regex", "pattern": r"W=(?P<w>\S+) (?P<u>kg|lb)",
                                     "fields": [{"name": "w"}, {"name": "u", "type": "str"}]}}))
    out = d.feed(b"W=12.5 kg\r\n#%&garbage\r\nW=x kg\r\n", 1)
    assert [(r.point, r.quality, r.value) for r in out] == [
        ("link", Quality.GOOD, True), ("w", Quality.GOOD, 12.5), ("u", Quality.GOOD, "kg"),
        ("link", Quality.BAD, False), ("link", Quality.GOOD, True), ("w", Quality.BAD, None),
        ("u", Quality.GOOD, "kg")]
    assert d.stats.frames_rejected == 1 and d.stats.fields_bad == 1


def test_framed_binary_with_sync_reports_resync_garbage_as_a_bad_link_then_decodes() -> None:
    d = PortDecoder(port({"kind": "framed",
                          "framing": {"kind": "fixed", "size_bytes": 6, "sync_hex": "aa55"},
                          "parser": {"kind": "struct", "format": ">hH", "offset_bytes": 2,
                                     "fields": [{"name": "t", "scale": 0.1}, {"name": "n", "type": "int"}]}}))
    out = d.feed(b"\x01\x02\x03\xaa\x55\xff\x38\x00\x07", 1)
    assert [(r.point, r.quality) for r in out] == [
        ("link", Quality.BAD), ("link", Quality.GOOD), ("t", Quality.GOOD), ("n", Quality.GOOD)]
    assert out[0].reason == "3 bytes of garbage dropped"
    assert out[2].value == pytest.approx(-20.0)
    assert d.stats.bytes_dropped == 3


def test_a_lost_port_forgets_the_partial_frame_and_always_reports_the_link_bad() -> None:
    d = PortDecoder(port({"kind": "nmea"}))
    d.feed(RMC[:20], 1)
    out = d.port_lost("gone", 2) + d.port_lost("still gone", 3)
    assert [r.reason for r in out] == ["gone", "still gone"]
    assert d.stats.bytes_dropped == 20
    assert d.feed(RMC, 4)[0].value is True


def test_silence_reports_the_link_bad_once() -> None:
    d = PortDecoder(port({"kind": "nmea"}))
    assert [r.reason for r in d.idle(30.0, 1)] == ["silent for 30 s"]
    assert d.idle(31.0, 2) == []
