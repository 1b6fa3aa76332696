"""`[uplink]` transport quic|tcp|auto: validation with path-named errors, the link it builds, `check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.config import ConfigError, parse_toml
from agent.link import build_link, control_max_inflight, failover_config, quic_settings, uplink_config

BASE = """
[agent]
id = "pad-07"
data_dir = "/var/lib/edge-agent"
"""

QUIC_WITH_FALLBACK = BASE + """
[uplink]
host = "broker.example.net"
port = 8883
tls = true
ca_file = "/etc/edge-agent/ca.pem"
transport = "auto"

[uplink.quic]
port = 14567
server_name = "broker.example.net"
ping_interval_s = 15
handshake_timeout_s = 5

[uplink.failover]
probe_initial_s = 30
probe_max_s = 600
fleet_spread_window_s = 60
"""


def test_a_quic_uplink_with_tcp_fallback_becomes_quic_settings_and_a_failover_policy() -> None:
    cfg = parse_toml(QUIC_WITH_FALLBACK)
    quic = quic_settings(cfg)
    assert (quic.port, quic.server_name) == (14567, "broker.example.net")
    assert quic.ca_file == "/etc/edge-agent/ca.pem"
    assert quic.ticket_file == str(Path("/var/lib/edge-agent") / "quic-ticket.json")
    assert quic.early_data and quic.congestion_control == "loss-tolerant"
    assert quic.handshake_timeout_s == 5
    policy = failover_config(cfg)
    assert policy.tcp_enabled and policy.quic_enabled
    assert (policy.probe_initial_s, policy.probe_max_s, policy.fleet_spread_window_s) == (30, 600, 60)
    link = uplink_config(cfg)
    assert (link.port, link.tls, link.ca_file) == (8883, True, "/etc/edge-agent/ca.pem")


def test_quic_only_disables_the_tcp_fallback_and_keeps_the_ca_for_quic_alone() -> None:
    cfg = parse_toml(BASE + '[uplink]\nhost = "b"\ntransport = "quic"\nca_file = "/ca.pem"\n')
    assert not failover_config(cfg).tcp_enabled
    assert quic_settings(cfg).ca_file == "/ca.pem"
    assert uplink_config(cfg).ca_file is None  # TCP without TLS has no use for it (and would refuse it)


def test_the_file_data_stream_gets_its_own_window_out_of_the_brokers_receive_maximum() -> None:
    quic = parse_toml(BASE + '[uplink]\nhost = "b"\ntransport = "quic"\n'
                      "[files]\nmax_inflight_segments = 24\n")
    tcp = parse_toml(BASE + '[uplink]\nhost = "b"\n')
    assert control_max_inflight(quic) == 1024 - 24
    assert uplink_config(quic).max_inflight == 1000
    assert control_max_inflight(tcp) == 65535


def test_only_quic_and_auto_put_a_failover_factory_under_the_uplink() -> None:
    tcp = build_link(parse_toml(BASE + '[uplink]\nhost = "b"\n'))
    auto = build_link(parse_toml(QUIC_WITH_FALLBACK))
    assert tcp.failover is None and tcp.files_link() is tcp.uplink
    assert auto.failover is not None and auto.failover.config.tcp_enabled
    assert auto.transport is None  # nothing connected yet
    assert auto.files_link() is not auto.uplink  # a QUIC data stream beside it


@pytest.mark.parametrize(
    ("fragment", "path", "words"),
    [
        ('transport = "udp"', "uplink.transport", "invalid enum value"),
        ("[uplink.quic]\nport = 0", "uplink.quic", "port"),
        ("[uplink.quic]\nprot = 14567", "uplink.quic.prot", "unknown field"),
        ('[uplink.quic]\ncert_file = "/c.pem"', "uplink.quic", "key_file"),
        ("[uplink.quic]\nhandshake_timeout_s = 0", "uplink.quic", "handshake_timeout_s"),
        ('[uplink.quic]\ncongestion_control = "bbr"', "uplink.quic.congestion_control", "invalid enum value"),
        ("[uplink.failover]\nprobe_initial_s = 700", "uplink.failover", "probe_max_s"),
        ("[uplink.failover]\nfleet_spread_window_s = -1", "uplink.failover", "fleet_spread_window_s"),
    ],
)
def test_a_bad_quic_or_failover_setting_is_named_by_its_path(fragment: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_toml(BASE + '[uplink]\nhost = "b"\n' + fragment + "\n")
    assert info.value.path == path
    assert words in info.value.reason


def test_check_prints_the_transport_and_its_fallback(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(QUIC_WITH_FALLBACK)
    assert cli_main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "transport quic broker.example.net:14567, fallback tls broker.example.net:8883" in out


def test_check_says_a_plain_tcp_fallback_is_not_encrypted(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + '[uplink]\nhost = "b"\ntransport = "auto"\n')
    assert cli_main(["check", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "transport quic b:14567, fallback tcp b:1883" in captured.out
    assert "not encrypted" in captured.err
