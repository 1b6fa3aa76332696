"""The README's config examples (a wellsite and a T-Box) pass `edge-agent check` and mean what they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from hil.tbox import DEFAULT_DBC

WELLSITE = """\
# Wellsite RTU box: two A11 beam-pump wells behind one Modbus TCP gateway; broker over TLS.
version = "2024-06-wellsite-1"

[agent]
id = "pad-07"
data_dir = "/var/lib/edge-agent"
drain_on_stop_s = 10.0

[uplink]
host = "broker.example.net"
port = 8883
tls = true
ca_file = "/etc/edge-agent/ca.pem"
username = "pad-07"
password = "change-me"
encoding = "msgpack"
compression = "zstd"
batch_max_records = 200

[queue]
synchronous = "FULL"             # every accepted record survives a power cut
max_bytes = 536870912            # 512 MiB of payload at most
max_age_s = 2592000.0            # 30 days
min_free_disk_bytes = 134217728  # keep 128 MiB of the flash free
thin = ["telemetry"]             # over a bound, thin telemetry (every other record) before dropping it
live_window_s = 60.0
backlog_bytes_per_s = 32768.0    # after an outage, drain the backlog at ~32 KiB/s behind live data
backlog_burst_bytes = 262144

[[modbus]]
name = "well-01"
host = "192.168.10.20"
port = 502
unit_id = 1
profile = "a11"                  # A11 register map: 29 scalars + the dynamometer card
poll_interval_s = 10.0
card = { interval_s = 1800.0 }   # one card every 30 min

[[modbus]]
name = "well-02"
host = "192.168.10.20"
port = 502
unit_id = 2
profile = "a11"
poll_interval_s = 10.0
card = { interval_s = 1800.0 }
"""

TBOX = """\
# Vehicle T-Box: GNSS on NMEA, the CAN bus through an SLCAN adapter decoded with a DBC, CAN logs as files.
version = "2024-06-tbox-1"

[agent]
id = "truck-0042"
data_dir = "/var/lib/edge-agent"

[uplink]
host = "broker.example.net"
port = 8883
tls = true
username = "truck-0042"
password = "change-me"
keep_alive_s = 60

[queue]
max_bytes = 268435456            # 256 MiB
min_free_disk_bytes = 67108864
thin = ["telemetry"]
backlog_bytes_per_s = 16384.0    # a thin cellular link: live data first, history at 16 KiB/s

[[serial]]
name = "gps"
port = "/dev/ttyUSB0"
baudrate = 9600
protocol = { kind = "nmea" }
report_interval_s = 1.0          # one position per second
idle_timeout_s = 5.0             # no sentence for 5 s: the "link" point turns BAD "silent"

[[serial]]
name = "can"
port = "/dev/ttyACM0"
baudrate = 115200
report_interval_s = 1.0          # CAN messages at 10-100 ms, reported once per second

[serial.protocol]                # the protocol of the [[serial]] entry just above
kind = "slcan"
dbc = "/etc/edge-agent/vehicle.dbc"
init_commands = ["C", "S6", "O"] # close, 500 kbit/s, open
signals = ["EngineSpeed", "VehicleSpeed", "CoolantTemp", "SOC", "PackVoltage", "PackCurrent"]

[files]
segment_size_bytes = 262144

[[files.folders]]
path = "/var/log/canlogs"        # the logger closes each file when it rotates
glob = "*.blf"
file_class = "can-log"
priority = 5
after_upload = "archive"         # moved to /var/log/canlogs/.uploaded once the cloud confirmed it
stable_s = 5.0
"""


def test_the_wellsite_example_checks_and_bounds_its_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(WELLSITE)
    assert main(["check", "--config", str(path)]) == 0
    assert "2 modbus device(s)" in capsys.readouterr().out
    cfg = load_config(path)
    assert all(d.card is not None and d.card.interval_s == 1800.0 for d in cfg.modbus)
    assert cfg.queue.max_bytes == 512 * 1024 * 1024 and cfg.queue.thin == ("telemetry",)


def test_the_tbox_example_checks_once_its_dbc_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(TBOX)
    assert main(["check", "--config", str(path)]) == 78  # /etc/edge-agent/vehicle.dbc is not on this box
    assert "serial[1].protocol.dbc" in capsys.readouterr().err
    path.write_text(TBOX.replace("/etc/edge-agent/vehicle.dbc", str(DEFAULT_DBC)))
    assert main(["check", "--config", str(path)]) == 0
    assert "2 serial port(s), 1 watched folder(s)" in capsys.readouterr().out
    cfg = load_config(path)
    assert cfg.files.folders[0].archive_path() == Path("/var/log/canlogs/.uploaded")


def test_device_names_must_be_unique_across_buses(tmp_path: Path) -> None:
    from agent.config import ConfigError, parse_toml

    text = WELLSITE + '\n[[serial]]\nname = "well-01"\nport = "/dev/ttyS0"\nprotocol = { kind = "nmea" }\n'
    with pytest.raises(ConfigError, match="well-01"):
        parse_toml(text)
