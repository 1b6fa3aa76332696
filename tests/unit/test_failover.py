"""Failover policy and QUIC client pieces that need no network: configuration, tickets, close codes."""

from __future__ import annotations

import datetime
import os
import random
import stat
from pathlib import Path

import pytest
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import CipherSuite, Epoch, SessionTicket

from uplink.failover import FailoverConfig, FailoverTransportFactory
from uplink.mqtt.codec import encode
from uplink.mqtt.packets import MQTT_5, Disconnect, PingReq, Publish
from uplink.quic import (
    LossTolerantCongestionControl,
    QuicSettings,
    _last_packet_type,
    read_ticket_file,
    ticket_from_json,
    ticket_to_json,
    write_ticket_file,
)


def _ticket(valid_for: datetime.timedelta = datetime.timedelta(hours=1)) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(age_add=12345, cipher_suite=CipherSuite.AES_128_GCM_SHA256,
                         not_valid_after=now + valid_for,
                         not_valid_before=now - datetime.timedelta(minutes=1),
                         resumption_secret=b"\x01" * 32, server_name="broker.example",
                         ticket=b"\x02" * 64,
                         max_early_data_size=0xFFFFFFFF, other_extensions=[(0x39, b"\x03\x04")])


def test_a_session_ticket_survives_its_json_round_trip_field_for_field() -> None:
    ticket = _ticket()
    assert ticket_from_json(ticket_to_json(ticket)) == ticket


def test_a_ticket_file_is_written_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ticket.json"
    write_ticket_file(str(path), _ticket())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = read_ticket_file(str(path))
    assert back is not None and back.ticket == b"\x02" * 64 and back.server_name == "broker.example"
    assert [p.name for p in path.parent.iterdir()] == ["ticket.json"]  # no temp file left behind


def test_an_expired_or_corrupt_ticket_file_is_ignored(tmp_path: Path) -> None:
    expired = tmp_path / "expired.json"
    write_ticket_file(str(expired), _ticket(valid_for=datetime.timedelta(seconds=-1)))
    assert read_ticket_file(str(expired)) is None
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_bytes(b"{not json")
    assert read_ticket_file(str(corrupt)) is None
    assert read_ticket_file(str(tmp_path / "missing.json")) is None


def test_the_close_code_follows_whether_the_last_packet_written_was_a_disconnect() -> None:
    publish = encode(Publish("t", b"x" * 300, 1, packet_id=1), MQTT_5)
    assert _last_packet_type(publish + encode(Disconnect(0), MQTT_5)) == 14
    assert _last_packet_type(encode(Disconnect(0), MQTT_5) + encode(PingReq(), MQTT_5)) == 12
    assert _last_packet_type(publish) == 3
    assert _last_packet_type(b"") is None


def test_the_quic_idle_timeout_is_three_keepalives_unless_configured() -> None:
    assert QuicSettings().idle_timeout_for(30) == 90.0
    assert QuicSettings().idle_timeout_for(0) == 60.0
    assert QuicSettings(idle_timeout_s=45.0).idle_timeout_for(30) == 45.0


@pytest.mark.parametrize(("fields", "path"), [
    ({"port": 0}, "port"),
    ({"cert_file": "c.pem"}, "cert_file"),
    ({"ping_interval_s": 0}, "ping_interval_s"),
    ({"max_data_streams": -1}, "max_data_streams"),
])
def test_bad_quic_settings_name_their_field(fields: dict[str, object], path: str) -> None:
    with pytest.raises(ValueError, match=f"^{path}:"):
        QuicSettings(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "path"), [
    ({"quic_enabled": False, "tcp_enabled": False}, "quic_enabled"),
    ({"probe_initial_s": 0}, "probe_initial_s"),
    ({"probe_initial_s": 10, "probe_max_s": 5}, "probe_initial_s"),
    ({"fleet_spread_window_s": -1}, "fleet_spread_window_s"),
])
def test_bad_failover_settings_name_their_field(fields: dict[str, object], path: str) -> None:
    with pytest.raises(ValueError, match=f"^{path}:"):
        FailoverConfig(**fields)  # type: ignore[arg-type]


def test_a_factory_starts_with_quic_allowed_and_no_transport_active() -> None:
    clock = [100.0]
    factory = FailoverTransportFactory(FailoverConfig(), clock=lambda: clock[0], rng=random.Random(1))
    assert factory.active is None and factory.quic_link is None
    assert factory.quic_allowed_now
    assert not FailoverTransportFactory(FailoverConfig(quic_enabled=False)).quic_allowed_now


def _sent(sent_time: float, size: int = 1200) -> QuicSentPacket:
    packet = QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True,
                            is_crypto_packet=False, packet_number=0, packet_type=QuicPacketType.ONE_RTT)
    packet.sent_time = sent_time
    packet.sent_bytes = size
    return packet


def test_a_loss_without_queueing_delay_leaves_the_window_alone_and_one_with_a_queue_cuts_it_as_cubic(
) -> None:
    cc = LossTolerantCongestionControl(max_datagram_size=1200)
    for i in range(20):
        cc.on_rtt_measurement(now=1.0 + i * 0.01, rtt=0.100)
    window = cc.congestion_window
    in_flight = [_sent(2.0) for _ in range(10)]
    for packet in in_flight:
        cc.on_packet_sent(packet=packet)
    cc.on_packets_lost(now=2.2, packets=[in_flight[0]])
    assert cc.congestion_window == window and cc.random_losses == 1  # radio loss: keep going
    for i in range(40):
        cc.on_rtt_measurement(now=3.0 + i * 0.01, rtt=0.300)  # a queue builds up
    cc.on_packet_sent(packet=(lost := _sent(4.0)))
    cc.on_packets_lost(now=4.4, packets=[lost])
    # CUBIC's multiplicative decrease: 0.7 of the bytes still in flight (9 packets), not below 2 MSS.
    assert cc.congestion_window == max(int(9 * 1200 * 0.7), 2 * 1200) and cc.congestion_losses == 1
    # A second loss from the same flight is the same congestion event.
    cc.on_packets_lost(now=4.5, packets=[in_flight[1]])
    assert cc.congestion_losses == 1
