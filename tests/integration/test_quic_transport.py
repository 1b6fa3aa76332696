"""MQTT over QUIC: our client transport against our broker listener, item by item of the checklist.

Every test runs a real broker core behind the real QUIC listener on 127.0.0.1 and talks to it with
`uplink.quic` (plus raw aioquic where a test must misbehave in ways our client never would).
Data-stream tests speak MQTT on the streams with the real codec, so they see exactly what goes on
which stream.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect as aioquic_connect
from aioquic.quic.configuration import QuicConfiguration

from cloud_broker.core.settings import CoreSettings
from tests.integration.quic_support import Pki, RunningBroker, eventually, make_pki, start_broker
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import (
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
)
from uplink.quic import (
    APP_ERROR_CTRL_STREAM_DOWN,
    APP_ERROR_NORMAL,
    QuicHandshakeError,
    QuicLink,
    QuicOverloaded,
    QuicSettings,
    QuicStream,
    QuicStreamError,
    open_quic,
    read_ticket_file,
)

pytestmark = pytest.mark.integration

STEP_S = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def broker(pki: Pki) -> AsyncIterator[RunningBroker]:
    server = await start_broker(pki, tls=False)
    try:
        yield server
    finally:
        await server.close()


def settings(pki: Pki, broker: RunningBroker, **kw: object) -> QuicSettings:
    return QuicSettings(port=broker.quic_port, ca_file=pki.ca_file, handshake_timeout_s=3.0,
                        **kw)  # type: ignore[arg-type]


class MqttStream:
    """MQTT 5 packets over one QUIC stream (our test's view of what the broker sends on it)."""

    def __init__(self, stream: QuicStream) -> None:
        self.stream = stream
        self._decoder = Decoder(MQTT_5)
        self._packets: list[Packet] = []

    async def send(self, *packets: Packet) -> None:
        await self.stream.send(b"".join(encode(p, MQTT_5) for p in packets))

    async def read(self) -> Packet:
        async with asyncio.timeout(STEP_S):
            while not self._packets:
                data = await self.stream.recv()
                if not data:
                    raise EOFError("stream finished")
                self._packets.extend(self._decoder.feed(data))
        return self._packets.pop(0)

    async def nothing_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self.read()
        except TimeoutError:
            return True
        return False


def acked(packet: Packet) -> int:
    """The packet id of a successful PUBACK (0x10 "no matching subscribers" is a success)."""
    assert isinstance(packet, PubAck) and packet.reason_code < 0x80, packet
    return packet.packet_id


async def connected_link(pki: Pki, broker: RunningBroker, client_id: str,
                         **kw: object) -> tuple[QuicLink, MqttStream]:
    link = await open_quic("127.0.0.1", settings(pki, broker, **kw), keep_alive_s=30)
    ctrl = MqttStream(link.control)
    await ctrl.send(Connect(client_id=client_id, protocol_level=MQTT_5, keep_alive_s=30))
    connack = await ctrl.read()
    assert isinstance(connack, ConnAck) and connack.reason_code == 0
    return link, ctrl


def quic_factory(pki: Pki, broker: RunningBroker, links: list[QuicLink], **kw: object):  # type: ignore[no-untyped-def]
    async def factory(config: UplinkConfig) -> QuicStream:
        link = await open_quic(config.host, settings(pki, broker, **kw), keep_alive_s=config.keep_alive_s,
                               connect_timeout_s=config.connect_timeout_s)
        links.append(link)
        return link.control
    return factory


# -- A1 / B1: TLS 1.3, ALPN, verification ---------------------------------------------------------


async def test_an_uplink_over_quic_publishes_and_receives_with_the_server_verified_against_our_ca(
        pki: Pki, broker: RunningBroker) -> None:
    links: list[QuicLink] = []
    uplink = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="well-1"),
                    transport_factory=quic_factory(pki, broker, links))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_S):
            await uplink.wait_connected()
            assert await uplink.subscribe([("cmd/well-1/#", 1)]) == (1,)
            assert await uplink.publish("cmd/well-1/x", b"hello") == 0
            message = await anext(uplink.inbound())
        assert (message.topic, message.payload) == ("cmd/well-1/x", b"hello")
        await uplink.close()
    link = links[0]
    assert link.alpn == "mqtt" and link.handshake_completed
    assert link._quic.tls.key_schedule is not None  # TLS 1.3 is the only TLS aioquic speaks
    # DISCONNECT, then CONNECTION_CLOSE with application error 0 (A8/B8), whichever side closed first.
    assert link.peer_app_error == APP_ERROR_NORMAL or broker.quic.peer_close_codes[APP_ERROR_NORMAL] == 1


async def test_a_server_certificate_from_another_ca_fails_the_handshake(
        pki: Pki, broker: RunningBroker) -> None:
    with pytest.raises(QuicHandshakeError):
        await open_quic("127.0.0.1", QuicSettings(port=broker.quic_port, ca_file=pki.other_ca_file,
                                                  handshake_timeout_s=3.0))


async def test_a_server_name_the_certificate_does_not_cover_fails_the_handshake(
        pki: Pki, broker: RunningBroker) -> None:
    with pytest.raises(QuicHandshakeError):
        await open_quic("127.0.0.1", settings(pki, broker, server_name="broker.example.com"))


async def test_the_listener_refuses_a_client_that_offers_another_alpn(
        pki: Pki, broker: RunningBroker) -> None:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"])
    configuration.load_verify_locations(cafile=pki.ca_file)
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(STEP_S), aioquic_connect("127.0.0.1", broker.quic_port,
                                                             configuration=configuration):
            pass


async def test_with_client_certificates_required_only_a_client_presenting_one_gets_in(pki: Pki) -> None:
    server = await start_broker(pki, tls=False, client_ca_file=pki.ca_file, verify_client=True)
    try:
        link = await open_quic("127.0.0.1", settings(pki, server))
        with pytest.raises(QuicStreamError):  # the handshake completes, then the broker closes
            async with asyncio.timeout(STEP_S):
                await MqttStream(link.control).send(Connect(client_id="anon", protocol_level=MQTT_5))
                await link.control.recv()
        await link.close()
        link, _ = await connected_link(pki, server, "well-0001", cert_file=pki.client_cert_file,
                                       key_file=pki.client_key_file)
        assert server.broker.session("well-0001") is not None
        await link.close()
    finally:
        await server.close()


# -- A2 / B2: transport parameters ------------------------------------------------------------------


async def test_the_idle_timeout_is_three_keepalives_and_streams_are_limited_as_emqx_does(
        pki: Pki, broker: RunningBroker) -> None:
    link = await open_quic("127.0.0.1", settings(pki, broker), keep_alive_s=40)
    assert link._quic._configuration.idle_timeout == 120.0
    assert link._quic._local_max_streams_bidi.value == 0  # no server-initiated streams
    assert link._quic._remote_max_streams_bidi == 10
    assert link._quic._remote_max_streams_uni == 1
    await link.close()


# -- A3/A5 / B3/B4: control stream first, data streams parked until CONNACK -------------------------


async def test_a_data_stream_written_before_connect_is_served_after_the_connack(
        pki: Pki, broker: RunningBroker) -> None:
    link = await open_quic("127.0.0.1", settings(pki, broker), keep_alive_s=30)
    ctrl = MqttStream(link.control)
    data = MqttStream(await link.open_data_stream())
    await data.send(Publish("t/early", b"x", 1, packet_id=7))
    assert await data.nothing_within(0.3)  # parked: no CONNECT yet
    await ctrl.send(Connect(client_id="early", protocol_level=MQTT_5))
    assert isinstance(await ctrl.read(), ConnAck)
    assert acked(await data.read()) == 7
    await link.close()


async def test_a_first_packet_other_than_connect_on_the_control_stream_ends_the_connection(
        pki: Pki, broker: RunningBroker) -> None:
    link = await open_quic("127.0.0.1", settings(pki, broker), keep_alive_s=30)
    await MqttStream(link.control).send(PingReq())
    async with asyncio.timeout(STEP_S):
        with pytest.raises(QuicStreamError):
            while await link.control.recv():
                pass
            await link.control.recv()  # EOF first, then the connection is gone
    assert link.peer_app_error == APP_ERROR_CTRL_STREAM_DOWN
    await link.close()


# -- A4/A6 / B5: per-stream packet ids, acks and deliveries ----------------------------------------


async def test_acks_return_on_the_stream_of_the_publish_even_with_the_same_packet_id_on_two_streams(
        pki: Pki, broker: RunningBroker) -> None:
    link, ctrl = await connected_link(pki, broker, "two-streams")
    data = MqttStream(await link.open_data_stream())
    await ctrl.send(Publish("t/a", b"ctrl", 1, packet_id=1))
    await data.send(Publish("t/b", b"data", 1, packet_id=1))
    assert acked(await ctrl.read()) == 1
    assert acked(await data.read()) == 1
    await link.close()


async def test_deliveries_go_to_the_stream_that_subscribed_and_their_acks_are_taken_there(
        pki: Pki, broker: RunningBroker) -> None:
    link, ctrl = await connected_link(pki, broker, "sub-streams")
    data = MqttStream(await link.open_data_stream())
    await data.send(Subscribe(1, (Subscription("files/#", 1),)))
    assert await data.read() == SubAck(1, (1,))
    await ctrl.send(Subscribe(1, (Subscription("telemetry/#", 1),)))
    assert await ctrl.read() == SubAck(1, (1,))
    publisher, pub_ctrl = await connected_link(pki, broker, "publisher")
    await pub_ctrl.send(Publish("files/a", b"F", 1, packet_id=1),
                        Publish("telemetry/a", b"T", 1, packet_id=2))
    assert {acked(await pub_ctrl.read()), acked(await pub_ctrl.read())} == {1, 2}
    on_data = await data.read()
    on_ctrl = await ctrl.read()
    assert isinstance(on_data, Publish) and on_data.topic == "files/a"
    assert isinstance(on_ctrl, Publish) and on_ctrl.topic == "telemetry/a"
    assert on_data.packet_id is not None and on_ctrl.packet_id is not None
    await data.send(PubAck(on_data.packet_id))
    await ctrl.send(PubAck(on_ctrl.packet_id))
    session = broker.broker.session("sub-streams")
    assert session is not None
    # both acks, each on its own stream, settle their deliveries
    await eventually(lambda: not session.inflight, 5.0, "deliveries settled")
    await publisher.close()
    await link.close()


async def test_an_ack_on_the_wrong_stream_does_not_settle_the_delivery(
        pki: Pki, broker: RunningBroker) -> None:
    link, ctrl = await connected_link(pki, broker, "wrong-stream")
    data = MqttStream(await link.open_data_stream())
    await data.send(Subscribe(1, (Subscription("w/#", 1),)))
    assert await data.read() == SubAck(1, (1,))
    publisher, pub_ctrl = await connected_link(pki, broker, "publisher-w")
    await pub_ctrl.send(Publish("w/1", b"x", 1, packet_id=1))
    delivery = await data.read()
    assert isinstance(delivery, Publish) and delivery.packet_id is not None
    await ctrl.send(PubAck(delivery.packet_id))  # wrong stream
    await asyncio.sleep(0.2)
    session = broker.broker.session("wrong-stream")
    assert session is not None and delivery.packet_id in session.inflight
    await publisher.close()
    await link.close()


async def _held_qos2(stream: MqttStream, first_pid: int, count: int) -> None:
    """count QoS 2 PUBLISHes whose PUBRECs we get and whose PUBRELs we never send: each stays
    unacknowledged (it counts against Receive Maximum) until its PUBCOMP."""
    await stream.send(*(Publish(f"held/{pid}", b"x", 2, packet_id=pid)
                        for pid in range(first_pid, first_pid + count)))
    for _ in range(count):
        rec = await stream.read()
        assert isinstance(rec, PubRec) and rec.reason_code < 0x80, rec


async def test_each_stream_has_its_own_receive_maximum_window_and_a_data_stream_over_it_is_reset(
        pki: Pki) -> None:
    # B5, EMQX semantics: Receive Maximum counts per stream, not per connection.
    broker = await start_broker(pki, tls=False,
                                settings=CoreSettings(allow_anonymous=True, receive_maximum=3))
    try:
        link, ctrl = await connected_link(pki, broker, "windows")
        first = MqttStream(await link.open_data_stream())
        second = MqttStream(await link.open_data_stream())
        await _held_qos2(ctrl, 1, 3)
        await _held_qos2(first, 1, 3)  # the same packet ids as the control stream: per-stream ids
        await _held_qos2(second, 10, 3)  # 9 open on the connection, 3 per stream: all within limits
        await first.send(Publish("held/over", b"x", 2, packet_id=4))  # a 4th on one stream
        async with asyncio.timeout(STEP_S):
            with pytest.raises(QuicStreamError) as reset:
                while await first.stream.recv():
                    pass
        assert reset.value.code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
        # Only that stream died: the connection and the other windows go on.
        await second.send(PubRel(10))
        assert await second.read() == PubComp(10)
        await second.send(Publish("held/again", b"x", 2, packet_id=13))
        assert isinstance(await second.read(), PubRec)
        await ctrl.send(PingReq())
        assert await ctrl.read() == PingResp()
        assert link.terminated is None
        await link.close()
    finally:
        await broker.close()


async def test_the_control_stream_over_its_receive_maximum_gets_disconnect_0x93(pki: Pki) -> None:
    broker = await start_broker(pki, tls=False,
                                settings=CoreSettings(allow_anonymous=True, receive_maximum=2))
    try:
        link, ctrl = await connected_link(pki, broker, "ctrl-window")
        data = MqttStream(await link.open_data_stream())
        await _held_qos2(data, 1, 2)
        await _held_qos2(ctrl, 1, 2)
        await ctrl.send(Publish("held/over", b"x", 2, packet_id=3))
        assert await ctrl.read() == Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
        await link.close()
    finally:
        await broker.close()


async def test_connect_on_a_data_stream_resets_only_that_stream(
        pki: Pki, broker: RunningBroker) -> None:
    link, ctrl = await connected_link(pki, broker, "bad-data")
    data = await link.open_data_stream()
    await MqttStream(data).send(Connect(client_id="again", protocol_level=MQTT_5))
    async with asyncio.timeout(STEP_S):
        with pytest.raises(QuicStreamError):
            await data.recv()
    await ctrl.send(PingReq())
    assert await ctrl.read() == PingResp()
    other = MqttStream(await link.open_data_stream())
    await other.send(Publish("t/ok", b"x", 1, packet_id=3))
    assert acked(await other.read()) == 3
    await link.close()


async def test_a_finished_data_stream_loses_its_subscriptions_but_not_the_connection(
        pki: Pki, broker: RunningBroker) -> None:
    link, ctrl = await connected_link(pki, broker, "fin-data")
    data = MqttStream(await link.open_data_stream())
    await data.send(Subscribe(1, (Subscription("gone/#", 1),)))
    assert await data.read() == SubAck(1, (1,))
    session = broker.broker.session("fin-data")
    assert session is not None and "gone/#" in session.subscriptions
    await data.stream.close()
    await eventually(lambda: "gone/#" not in session.subscriptions, what="subscription dropped")
    await ctrl.send(PingReq())
    assert await ctrl.read() == PingResp()
    await link.close()


# -- A8 / B8 / B9: close codes ------------------------------------------------------------------------


async def test_a_session_taken_over_gets_stop_sending_0x8e_and_application_error_1(
        pki: Pki, broker: RunningBroker) -> None:
    first, first_ctrl = await connected_link(pki, broker, "twin")
    second, _ = await connected_link(pki, broker, "twin")
    disconnect = await first_ctrl.read()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x8E
    await eventually(lambda: first.closed, what="first link closed")
    assert first.control.peer_stop_code == 0x8E
    assert first.peer_app_error == APP_ERROR_CTRL_STREAM_DOWN
    await second.close()


async def test_an_overloaded_listener_turns_new_connections_away_with_error_2(pki: Pki) -> None:
    server = await start_broker(pki, tls=False, max_connections=1)
    try:
        link, _ = await connected_link(pki, server, "only-one")
        with pytest.raises(QuicOverloaded):
            await open_quic("127.0.0.1", settings(pki, server))
        await link.close()
    finally:
        await server.close()


async def test_a_client_that_aborts_its_control_stream_has_its_will_published(
        pki: Pki, broker: RunningBroker) -> None:
    watcher, watch_ctrl = await connected_link(pki, broker, "watcher")
    await watch_ctrl.send(Subscribe(1, (Subscription("wills/#", 0),)))
    assert isinstance(await watch_ctrl.read(), SubAck)
    link = await open_quic("127.0.0.1", settings(pki, broker), keep_alive_s=30)
    ctrl = MqttStream(link.control)
    from uplink.mqtt.packets import Will

    await ctrl.send(Connect(client_id="doomed", protocol_level=MQTT_5,
                            will=Will("wills/doomed", b"gone", 0, False)))
    assert isinstance(await ctrl.read(), ConnAck)
    link.control.abort(0x80)
    will = await watch_ctrl.read()
    assert isinstance(will, Publish) and will.topic == "wills/doomed"
    await link.close()
    await watcher.close()


# -- A11 / B10: session tickets and 0-RTT ----------------------------------------------------------------


async def test_a_restarted_client_resumes_with_connect_in_0rtt_using_the_persisted_ticket(
        pki: Pki, broker: RunningBroker, tmp_path: Path) -> None:
    ticket_file = tmp_path / "state" / "quic-ticket.json"
    links: list[QuicLink] = []
    for run in range(2):
        uplink = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="resumer"),
                        transport_factory=quic_factory(pki, broker, links, ticket_file=str(ticket_file)))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name=f"uplink-{run}")
            async with asyncio.timeout(STEP_S):
                await uplink.wait_connected()
                assert await uplink.publish("t/resume", b"%d" % run) < 0x80
            await eventually(ticket_file.exists, what="ticket persisted")
            await uplink.close()
    first, second = links
    assert not first.early_data_attempted and not first.session_resumed
    assert second.early_data_attempted  # CONNECT left before the handshake completed ...
    assert second.early_data_accepted and second.session_resumed  # ... and the broker took it
    assert stat.S_IMODE(os.stat(ticket_file).st_mode) == 0o600
    assert read_ticket_file(str(ticket_file)) is not None


async def test_a_ticket_is_good_for_one_resumption_only(
        pki: Pki, broker: RunningBroker, tmp_path: Path) -> None:
    ticket_file = tmp_path / "ticket.json"
    link, _ = await connected_link(pki, broker, "once", ticket_file=str(ticket_file))
    await eventually(ticket_file.exists, what="ticket persisted")
    await link.close()
    saved = ticket_file.read_bytes()
    second, _ = await connected_link(pki, broker, "once", ticket_file=str(ticket_file))
    assert second.early_data_accepted
    await second.close()
    ticket_file.write_bytes(saved)  # replay the used ticket
    third, _ = await connected_link(pki, broker, "once", ticket_file=str(ticket_file))
    assert not third.early_data_accepted and not third.session_resumed  # full handshake instead
    await third.close()


# -- migration ---------------------------------------------------------------------------------------


async def test_the_client_moving_to_a_new_udp_port_keeps_its_mqtt_connection(
        pki: Pki, broker: RunningBroker) -> None:
    links: list[QuicLink] = []
    uplink = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="mover"),
                    transport_factory=quic_factory(pki, broker, links))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_S):
            await uplink.wait_connected()
            ports = {links[0].local_port}
            for i in range(3):
                ports.add(await links[0].rebind())
                assert await uplink.publish(f"t/move/{i}", b"x") < 0x80
        await uplink.close()
    assert len(ports) == 4 and len(links) == 1 and uplink.reconnects == 0
