"""Serial port configuration: typed, frozen, defaults in the model, invalid settings rejected at load."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from drivers.serial.config import (
    DelimiterFraming,
    FramedProtocol,
    LengthPrefixedFraming,
    NmeaProtocol,
    SerialPortConfig,
    SlcanProtocol,
)


def load(**overrides: Any) -> SerialPortConfig:
    raw: dict[str, Any] = {"name": "gps", "port": "/dev/ttyUSB0", "protocol": {"kind": "nmea"}}
    raw.update(overrides)
    return msgspec.convert(raw, SerialPortConfig)


def test_a_minimal_port_gets_its_defaults_from_the_model() -> None:
    cfg = load()
    assert isinstance(cfg.protocol, NmeaProtocol)
    assert (cfg.baudrate, cfg.bytesize, cfg.parity, cfg.stopbits) == (9600, 8, "N", 1)
    assert cfg.status_point == "link" and cfg.report_interval_s is None


def test_a_toml_style_framed_port_decodes_into_tagged_framing_and_parser() -> None:
    cfg = load(protocol={
        "kind": "framed",
        "framing": {"kind": "length_prefixed", "length_bytes": 2, "header_hex": "2323", "length_offset": 20,
                    "length_adjust": 1},
        "parser": {"kind": "struct", "format": ">BB", "fields": [{"name": "cmd", "type": "int"},
                                                                  {"name": "_flag"}]},
    })
    assert isinstance(cfg.protocol, FramedProtocol)
    assert isinstance(cfg.protocol.framing, LengthPrefixedFraming)
    assert cfg.protocol.framing.header == b"##"
    assert cfg.protocol.point_names() == ("cmd",)


def test_the_default_framing_is_crlf_lines() -> None:
    cfg = load(protocol={"kind": "framed", "parser": {"kind": "regex", "pattern": "(?P<v>.*)",
                                                       "fields": [{"name": "v"}]}})
    assert isinstance(cfg.protocol, FramedProtocol)
    assert cfg.protocol.framing == DelimiterFraming()
    assert cfg.protocol.framing.delimiter_bytes == b"\r\n"


def test_config_is_frozen() -> None:
    cfg = load()
    with pytest.raises(AttributeError):
        cfg.baudrate = 4800  # type: ignore[misc]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"baudrate": 10}, "baudrate"),
    ({"stopbits": 3}, "stopbits"),
    ({"parity": "X"}, "parity"),
    ({"report_interval_s": 0}, "report_interval_s"),
    ({"report_intervals_s": {"lat_deg": -1}}, "report_intervals_s.lat_deg"),
    ({"report_intervals_s": {"nope": 1}}, "unknown points"),
    ({"status_point": "lat_deg"}, "collides"),
    ({"reopen_initial_s": 5, "reopen_max_s": 1}, "reopen"),
    ({"protocol": {"kind": "slcan", "dbc": ""}}, "dbc"),
    ({"protocol": {"kind": "slcan", "dbc": "x.dbc", "init_commands": ["S6\r"]}}, "init command"),
    ({"protocol": {"kind": "nmea", "bogus": 1}}, "bogus"),
    ({"protocol": {"kind": "modbus"}}, "kind"),
    ({"protocol": {"kind": "framed", "parser": {"kind": "regex", "pattern": "(", "fields": [{"name": "a"}]}}},
     "pattern"),
    ({"protocol": {"kind": "framed", "parser": {"kind": "regex", "pattern": "(?P<a>x)",
                                                  "fields": [{"name": "b"}]}}}, "no group"),
    ({"protocol": {"kind": "framed", "parser": {"kind": "struct", "format": "<HH",
                                                  "fields": [{"name": "a"}]}}}, "unpacks 2"),
    ({"protocol": {"kind": "framed", "parser": {"kind": "struct", "format": "<H", "fields": [{"name": "a"}]},
                   "framing": {"kind": "fixed", "size_bytes": 2, "sync_hex": "zz"}}}, "sync_hex"),
    ({"protocol": {"kind": "framed", "parser": {"kind": "struct", "format": "<H", "fields": [{"name": "a"}]},
                   "framing": {"kind": "length_prefixed", "length_bytes": 3}}}, "length_bytes"),
    ({"protocol": {"kind": "framed", "parser": {"kind": "struct", "format": "<HH",
                                                  "fields": [{"name": "a"}, {"name": "a"}]}}}, "duplicate"),
])
def test_invalid_settings_are_rejected_with_a_message_naming_them(overrides: dict[str, Any],
                                                                  message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        load(**overrides)


def test_slcan_protocol_defaults() -> None:
    p = SlcanProtocol(dbc="vehicle.dbc")
    assert p.signals == () and not p.qualify_signals and p.max_line_bytes >= 143
