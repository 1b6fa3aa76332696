"""SLCAN (Lawicel) lines <-> CAN frames, and CAN frames -> signals through the example vehicle DBC."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.serial.dbc import CanDatabase, DbcError, SignalDecodeError
from drivers.serial.slcan import CanFrame, SlcanError, format_frame, parse_line

DBC = Path(__file__).resolve().parents[2] / "hil" / "dbc" / "vehicle.dbc"


@pytest.fixture(scope="module")
def db() -> CanDatabase:
    return CanDatabase.from_file(DBC)


def test_a_standard_data_frame_line_parses_to_id_and_data() -> None:
    f = parse_line(b"t3C0419672693\r")
    assert f == CanFrame(0x3C0, bytes.fromhex("19672693"))


def test_an_extended_frame_with_a_timestamp_parses_both() -> None:
    f = parse_line(b"T0CF004008000000E02E000000EA5F")
    assert f is not None
    assert (f.arbitration_id, f.is_extended, f.timestamp_ms) == (0x0CF00400, True, 59999)
    assert f.data == bytes.fromhex("000000E02E000000")


def test_remote_frames_carry_a_length_but_no_data() -> None:
    f = parse_line(b"r1238")
    assert f is not None and f.is_remote and f.length == 8 and f.data == b""
    g = parse_line(b"R1ABCDEF02")
    assert g is not None and g.is_extended and g.is_remote and g.length == 2


def test_can_fd_lines_use_the_fd_length_codes() -> None:
    line = b"b123" + b"9" + b"AB" * 12
    f = parse_line(line)
    assert f is not None and f.is_fd and f.bitrate_switch and len(f.data) == 12


def test_adapter_answers_and_bells_are_not_frames() -> None:
    assert parse_line(b"z") is None
    assert parse_line(b"V1013") is None
    assert parse_line(b"\x07") is None
    assert parse_line(b"\n") is None


@pytest.mark.parametrize(("line", "reason"), [
    (b"t3C04196726", "truncated"),      # four data bytes announced, three sent
    (b"t3C", "short"),
    (b"t8001", "out of range"),         # 11-bit ids end at 7FF
    (b"t1239" + b"00" * 9, "dlc 9"),    # classic CAN carries at most 8 bytes
    (b"t12G100", "not hex"),
    (b"t1231ZZ", "not hex"),
    (b"t1230FFFF", "timestamp"),       # 65535 ms is past the minute
])
def test_malformed_frame_lines_raise_slcan_errors_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(SlcanError, match=reason):
        parse_line(line)


@pytest.mark.parametrize("frame", [
    CanFrame(0x123, b"\x01\x02"), CanFrame(0x1ABCDEF0, b"", is_extended=True),
    CanFrame(0x7FF, b"\xff" * 8, timestamp_ms=1234), CanFrame(0x10, b"", is_remote=True, dlc=4),
    CanFrame(0x1FFFFFFF, bytes(range(64)), is_extended=True, is_fd=True, bitrate_switch=True),
])
def test_formatted_frames_parse_back_unchanged(frame: CanFrame) -> None:
    assert parse_line(format_frame(frame)) == frame


def test_the_vehicle_dbc_lists_its_messages_with_cycle_times(db: CanDatabase) -> None:
    cycles = {m.name: m.cycle_time_ms for m in db.messages}
    assert cycles == {"EEC1": 20, "CCVS": 100, "ET1": 1000, "BMS_Pack": 10, "BMS_Status": 500}
    assert db.lookup(0x0CF00400, True) is not None
    assert db.lookup(0x0CF00400, False) is None  # same number as an 11-bit id is a different frame


@pytest.mark.parametrize(("line", "expected"), [
    (b"T0CF004008000000E02E000000", {"EngineSpeed": 1500.0}),           # J1939 SPN 190, 0.125 rpm/bit
    (b"T18FEF100800003C0000000000", {"VehicleSpeed": 60.0}),               # SPN 84, 1/256 km/h per bit
    (b"T18FEEE00882FFFFFFFFFFFFFF", {"CoolantTemp": 90.0}),               # SPN 110, 1 degC, -40 offset
    (b"t3C081967269300000000", {"PackVoltage": 650.3, "PackCurrent": -12.5}),  # Motorola, -1000 A offset
    (b"t3C12A901", {"SOC": 84.5, "ChargeState": 1}),
])
def test_golden_frames_decode_to_their_signal_values(db: CanDatabase, line: bytes,
                                                     expected: dict[str, float]) -> None:
    frame = parse_line(line)
    assert frame is not None
    assert db.decode(frame) == pytest.approx(expected)


def test_a_frame_shorter_than_its_message_is_a_decode_error_naming_the_message(db: CanDatabase) -> None:
    frame = parse_line(b"t3C021967")
    assert frame is not None
    with pytest.raises(SignalDecodeError, match="BMS_Pack: short frame, 2 of 8 bytes"):
        db.decode(frame)


def test_encoding_clamps_to_the_signal_range_and_decodes_back(db: CanDatabase) -> None:
    payload = db.encode("BMS_Pack", {"PackVoltage": 2000.0, "PackCurrent": -3.0})
    values = db.decode(CanFrame(0x3C0, payload))
    assert values == pytest.approx({"PackVoltage": 1000.0, "PackCurrent": -3.0})


def test_an_unreadable_dbc_is_a_dbc_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dbc"
    bad.write_text("BO_ this is not a dbc")
    with pytest.raises(DbcError):
        CanDatabase.from_file(bad)
    with pytest.raises(DbcError):
        CanDatabase.from_file(tmp_path / "missing.dbc")
