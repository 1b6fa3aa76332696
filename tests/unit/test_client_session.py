"""The sans-I/O client session, driven by hand-built server packets (real codec) and a fake clock."""

from __future__ import annotations

import pytest

from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
    ConnectReturnCode,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
)
from uplink.mqtt.session import (
    ClientSession,
    Connected,
    ConnectionRefused,
    ConnectTimedOut,
    Disconnected,
    Event,
    InflightWindowFull,
    MessageReceived,
    NotConnectedError,
    PingTimedOut,
    PublishAcked,
    SessionConfig,
    SessionState,
    Subscribed,
    Unsubscribed,
)

LEVELS = pytest.mark.parametrize("level", [MQTT_311, MQTT_5], ids=["v311", "v5"])


class Broker:
    """The server end of one connection: decodes what the client wrote, encodes what we answer."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.level = session.protocol_level
        self.decoder = Decoder()  # server side: learns the level from CONNECT

    def read(self) -> list[Packet]:
        return self.decoder.feed(self.session.data_to_send())

    def send(self, *packets: Packet, now: float = 0.0) -> list[Event]:
        self.session.receive_data(b"".join(encode(p, self.level) for p in packets), now)
        return drain(self.session)


def drain(session: ClientSession) -> list[Event]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def connected(
    level: int = MQTT_5, connack: ConnAck | None = None, **config: object
) -> tuple[ClientSession, Broker]:
    config.setdefault("client_id", "rtu-1")
    session = ClientSession(SessionConfig(protocol_level=level, **config))  # type: ignore[arg-type]
    broker = Broker(session)
    session.connect(now=0.0)
    [connect] = broker.read()
    assert isinstance(connect, Connect)
    events = broker.send(connack or ConnAck())
    assert isinstance(events[0], Connected)
    return session, broker


def reconnect(session: ClientSession, connack: ConnAck, now: float = 100.0) -> tuple[Broker, list[Event]]:
    session.connection_lost()
    broker = Broker(session)
    session.connect(now)
    [connect] = broker.read()
    assert isinstance(connect, Connect)
    return broker, broker.send(connack, now=now)


# -- connecting ---------------------------------------------------------------------------------


@LEVELS
def test_connect_sends_connect_and_an_accepting_connack_connects(level: int) -> None:
    session = ClientSession(SessionConfig(client_id="rtu-1", protocol_level=level, clean_start=False,
                                          keep_alive_s=30, username="u", password=b"p"))
    broker = Broker(session)
    assert not session.connected
    session.connect(now=5.0)
    assert session.state.value == "connecting"
    [connect] = broker.read()
    assert isinstance(connect, Connect)
    assert (connect.client_id, connect.protocol_level, connect.clean_start, connect.keep_alive_s) == (
        "rtu-1", level, False, 30)
    assert (connect.username, connect.password) == ("u", b"p")
    events = broker.send(ConnAck(session_present=True), now=5.1)
    assert events == [Connected(ConnAck(session_present=True), session_present=True)]
    assert session.state is SessionState.CONNECTED


def test_connect_announces_our_mqtt5_limits() -> None:
    session = ClientSession(SessionConfig(client_id="c", session_expiry_s=3600, receive_maximum=10,
                                          maximum_packet_size=4096, topic_alias_maximum=8))
    broker = Broker(session)
    session.connect(now=0.0)
    [connect] = broker.read()
    assert isinstance(connect, Connect)
    props = connect.properties
    assert (props.session_expiry_interval, props.receive_maximum, props.maximum_packet_size,
            props.topic_alias_maximum) == (3600, 10, 4096, 8)


def test_a_refused_connack_reports_the_mqtt5_reason_and_disconnects() -> None:
    session = ClientSession(SessionConfig(client_id="c"))
    broker = Broker(session)
    session.connect(now=0.0)
    broker.read()
    refusal = ConnAck(reason_code=ReasonCode.NOT_AUTHORIZED, properties=Properties(reason_string="no"))
    assert broker.send(refusal) == [ConnectionRefused(ReasonCode.NOT_AUTHORIZED, "no")]
    assert session.state is SessionState.DISCONNECTED
    with pytest.raises(NotConnectedError):
        session.publish("a", b"x", 1)


def test_a_refused_mqtt311_connack_reports_the_return_code() -> None:
    session = ClientSession(SessionConfig(client_id="c", protocol_level=MQTT_311))
    broker = Broker(session)
    session.connect(now=0.0)
    broker.read()
    events = broker.send(ConnAck(reason_code=ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD))
    assert events == [ConnectionRefused(ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD, None)]
    assert session.state is SessionState.DISCONNECTED


def test_no_connack_within_the_connect_timeout_gives_up_the_connection() -> None:
    session = ClientSession(SessionConfig(client_id="c", connect_timeout_s=10.0))
    session.connect(now=100.0)
    assert session.next_deadline() == 110.0
    session.handle_deadline(109.9)
    assert drain(session) == []
    session.handle_deadline(110.0)
    assert drain(session) == [ConnectTimedOut()]
    assert session.state is SessionState.DISCONNECTED
    assert session.next_deadline() is None


def test_the_assigned_client_identifier_is_kept_and_used_to_reconnect() -> None:
    session, _ = connected(
        connack=ConnAck(properties=Properties(assigned_client_identifier="auto-77")),
        client_id="", clean_start=False,
    )
    assert session.client_id == "auto-77"
    session.connection_lost()
    broker = Broker(session)
    session.connect(now=1.0)
    [connect] = broker.read()
    assert isinstance(connect, Connect)
    assert connect.client_id == "auto-77"


# -- keepalive ------------------------------------------------------------------------------------


def test_an_idle_connection_pings_after_keep_alive_and_a_pingresp_keeps_it() -> None:
    session, broker = connected(keep_alive_s=30)
    assert session.next_deadline() == 30.0
    session.handle_deadline(29.0)
    assert broker.read() == []
    session.handle_deadline(30.0)
    assert broker.read() == [PingReq()]
    assert broker.send(PingResp(), now=31.0) == []
    assert session.state is SessionState.CONNECTED
    assert session.next_deadline() == 60.0


def test_a_missing_pingresp_times_the_connection_out() -> None:
    session, broker = connected(keep_alive_s=30, ping_timeout_s=5.0)
    session.handle_deadline(30.0)
    assert broker.read() == [PingReq()]
    assert session.next_deadline() == 35.0
    session.handle_deadline(34.9)
    assert drain(session) == []
    session.handle_deadline(35.0)
    assert drain(session) == [PingTimedOut()]
    assert session.state is SessionState.DISCONNECTED


def test_sending_anything_postpones_the_ping() -> None:
    session, broker = connected(keep_alive_s=30)
    session.publish("t", b"x", 0, now=20.0)
    broker.read()
    assert session.next_deadline() == 50.0
    session.handle_deadline(30.0)
    assert broker.read() == []


def test_the_server_keep_alive_overrides_ours() -> None:
    session, _ = connected(connack=ConnAck(properties=Properties(server_keep_alive=10)), keep_alive_s=60)
    assert session.keep_alive_s == 10
    assert session.next_deadline() == 10.0


def test_keep_alive_zero_never_pings() -> None:
    session, _ = connected(keep_alive_s=0)
    assert session.next_deadline() is None


# -- QoS both directions ---------------------------------------------------------------------------


@LEVELS
def test_a_qos1_publish_completes_on_puback(level: int) -> None:
    session, broker = connected(level)
    packet_id = session.publish("wells/7/data", b"\x01\x02", 1)
    assert packet_id is not None
    [publish] = broker.read()
    assert publish == Publish("wells/7/data", b"\x01\x02", qos=1, packet_id=packet_id)
    assert session.inflight == 1
    assert broker.send(PubAck(packet_id)) == [PublishAcked(packet_id, 0)]
    assert session.inflight == 0


def test_a_qos1_publish_refused_by_the_server_reports_its_reason_and_frees_the_slot() -> None:
    session, broker = connected(connack=ConnAck(properties=Properties(receive_maximum=1)))
    packet_id = session.publish("t", b"x", 1)
    assert packet_id is not None
    broker.read()
    assert session.inflight_free == 0
    events = broker.send(PubAck(packet_id, ReasonCode.NOT_AUTHORIZED))
    assert events == [PublishAcked(packet_id, ReasonCode.NOT_AUTHORIZED)]
    assert session.inflight_free == 1


@LEVELS
def test_a_qos2_publish_releases_on_pubrec_and_completes_on_pubcomp(level: int) -> None:
    session, broker = connected(level)
    packet_id = session.publish("t", b"x", 2)
    assert packet_id is not None
    [publish] = broker.read()
    assert isinstance(publish, Publish) and publish.qos == 2
    assert broker.send(PubRec(packet_id)) == []
    assert broker.read() == [PubRel(packet_id)]
    assert broker.send(PubComp(packet_id)) == [PublishAcked(packet_id, 0)]
    assert session.inflight == 0


def test_a_failing_pubrec_ends_the_qos2_exchange() -> None:
    session, broker = connected()
    packet_id = session.publish("t", b"x", 2)
    assert packet_id is not None
    broker.read()
    assert broker.send(PubRec(packet_id, ReasonCode.QUOTA_EXCEEDED)) == [
        PublishAcked(packet_id, ReasonCode.QUOTA_EXCEEDED)]
    assert broker.read() == []


@LEVELS
def test_an_inbound_qos1_message_is_delivered_and_acknowledged(level: int) -> None:
    _session, broker = connected(level)
    message = Publish("cmd/rtu-1", b"restart", qos=1, packet_id=42)
    assert broker.send(message) == [MessageReceived(message)]
    assert broker.read() == [PubAck(42)]


@LEVELS
def test_an_inbound_qos2_message_is_delivered_exactly_once_despite_a_duplicate(level: int) -> None:
    _session, broker = connected(level)
    message = Publish("cmd/rtu-1", b"setpoint", qos=2, packet_id=9)
    assert broker.send(message) == [MessageReceived(message)]
    assert broker.read() == [PubRec(9)]
    resent = Publish("cmd/rtu-1", b"setpoint", qos=2, dup=True, packet_id=9)
    assert broker.send(resent) == []
    assert broker.read() == [PubRec(9)]
    assert broker.send(PubRel(9)) == []
    assert broker.read() == [PubComp(9)]
    # Released: the id is free again and a new message with it is a new delivery.
    again = Publish("cmd/rtu-1", b"next", qos=2, packet_id=9)
    assert broker.send(again) == [MessageReceived(again)]


def test_a_pubrel_for_an_unknown_id_is_answered_with_packet_identifier_not_found() -> None:
    session, broker = connected()
    broker.send(PubRel(5))
    assert broker.read() == [PubComp(5, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)]
    assert session.state is SessionState.CONNECTED


def test_inbound_qos2_ids_survive_a_reconnect_into_the_same_session() -> None:
    session, broker = connected(clean_start=False)
    message = Publish("cmd", b"once", qos=2, packet_id=3)
    assert broker.send(message) == [MessageReceived(message)]
    broker, _ = reconnect(session, ConnAck(session_present=True))
    assert broker.send(Publish("cmd", b"once", qos=2, dup=True, packet_id=3), now=100.0) == []
    assert broker.read() == [PubRec(3)]


# -- flow control and limits ----------------------------------------------------------------------


def test_the_inflight_window_honours_the_servers_receive_maximum() -> None:
    session, broker = connected(connack=ConnAck(properties=Properties(receive_maximum=2)))
    first = session.publish("t", b"1", 1)
    session.publish("t", b"2", 2)
    assert not session.can_publish(1)
    assert session.can_publish(0)
    assert session.inflight_free == 0
    with pytest.raises(InflightWindowFull):
        session.publish("t", b"3", 1)
    assert len(broker.read()) == 2
    assert first is not None
    broker.send(PubAck(first))
    assert session.inflight_free == 1
    assert session.publish("t", b"3", 1) is not None


def test_our_own_max_inflight_caps_the_window_at_mqtt311() -> None:
    session, _ = connected(MQTT_311, max_inflight=3)
    for _ in range(3):
        session.publish("t", b"x", 1)
    with pytest.raises(InflightWindowFull):
        session.publish("t", b"x", 1)


def test_publishing_while_not_connected_raises() -> None:
    session = ClientSession(SessionConfig(client_id="c"))
    with pytest.raises(NotConnectedError):
        session.publish("t", b"x", 1)
    session.connect(now=0.0)
    with pytest.raises(NotConnectedError):
        session.subscribe([("t", 1)])
    assert not session.can_publish(0)


def test_a_publish_larger_than_the_servers_maximum_packet_size_is_refused_without_side_effects() -> None:
    session, broker = connected(connack=ConnAck(properties=Properties(maximum_packet_size=64)))
    with pytest.raises(LocalProtocolError) as info:
        session.publish("t", b"x" * 100, 1)
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert session.inflight == 0
    assert broker.read() == []
    assert session.publish("t", b"small", 1) == 1


def test_qos_and_retain_above_what_the_server_supports_are_refused() -> None:
    session, _ = connected(connack=ConnAck(properties=Properties(maximum_qos=1, retain_available=0)))
    with pytest.raises(LocalProtocolError) as qos:
        session.publish("t", b"x", 2)
    assert qos.value.reason_code == ReasonCode.QOS_NOT_SUPPORTED
    with pytest.raises(LocalProtocolError) as retain:
        session.publish("t", b"x", 1, retain=True)
    assert retain.value.reason_code == ReasonCode.RETAIN_NOT_SUPPORTED


def test_packet_ids_skip_ids_still_in_use_when_they_wrap() -> None:
    session, broker = connected()
    ids = [session.publish("t", b"", 1) for _ in range(65535)]
    assert sorted(i for i in ids if i is not None) == list(range(1, 65536))
    with pytest.raises(InflightWindowFull):
        session.publish("t", b"", 1)
    broker.read()
    broker.send(PubAck(40000))
    assert session.publish("t", b"", 1) == 40000


def test_subscribe_and_unsubscribe_report_the_servers_reason_codes() -> None:
    session, broker = connected()
    sub_id = session.subscribe([("cmd/#", 1), Subscription("cfg/+", 2, no_local=True)])
    [subscribe] = broker.read()
    assert isinstance(subscribe, Subscribe)
    assert subscribe.subscriptions == (Subscription("cmd/#", 1), Subscription("cfg/+", 2, no_local=True))
    assert broker.send(SubAck(sub_id, (1, ReasonCode.NOT_AUTHORIZED))) == [
        Subscribed(sub_id, (1, ReasonCode.NOT_AUTHORIZED))]
    unsub_id = session.unsubscribe(["cmd/#"])
    [unsubscribe] = broker.read()
    assert unsubscribe == Unsubscribe(unsub_id, ("cmd/#",))
    assert broker.send(UnsubAck(unsub_id, (0,))) == [Unsubscribed(unsub_id, (0,))]


def test_invalid_topic_names_and_filters_are_refused_locally() -> None:
    session, broker = connected()
    with pytest.raises(LocalProtocolError):
        session.publish("a/+/b", b"x", 1)
    with pytest.raises(LocalProtocolError):
        session.subscribe([("a/#/b", 0)])
    assert broker.read() == []


# -- topic aliases ------------------------------------------------------------------------------


def test_inbound_topic_aliases_are_resolved() -> None:
    _session, broker = connected(topic_alias_maximum=4)
    first = Publish("wells/7/cmd", b"1", properties=Properties(topic_alias=2))
    second = Publish("", b"2", properties=Properties(topic_alias=2))
    events = broker.send(first, second)
    assert events == [
        MessageReceived(Publish("wells/7/cmd", b"1")),
        MessageReceived(Publish("wells/7/cmd", b"2")),
    ]


def test_an_inbound_topic_alias_above_our_maximum_disconnects_with_topic_alias_invalid() -> None:
    _session, broker = connected(topic_alias_maximum=4)
    [event] = broker.send(Publish("t", b"", properties=Properties(topic_alias=5)))
    assert isinstance(event, Disconnected)
    assert (event.reason_code, event.by_server) == (ReasonCode.TOPIC_ALIAS_INVALID, False)
    assert broker.read() == [Disconnect(ReasonCode.TOPIC_ALIAS_INVALID)]


def test_outbound_topics_get_aliases_up_to_the_servers_maximum_least_recently_used_first_out() -> None:
    session, broker = connected(connack=ConnAck(properties=Properties(topic_alias_maximum=2)))
    for topic in ("a/1", "b/2", "a/1", "c/3", "b/2"):
        session.publish(topic, b"x", 0)
    wire = [(p.topic, p.properties.topic_alias) for p in broker.read() if isinstance(p, Publish)]
    # a/1 -> 1, b/2 -> 2, a/1 reuses 1 with an empty topic, c/3 evicts the least recently used b/2 (2),
    # b/2 then evicts a/1 and takes alias 1 again with its full topic.
    assert wire == [("a/1", 1), ("b/2", 2), ("", 1), ("c/3", 2), ("b/2", 1)]


def test_no_outbound_aliases_when_the_server_allows_none() -> None:
    session, broker = connected()
    session.publish("a/1", b"x", 0)
    session.publish("a/1", b"x", 0)
    assert [p.properties.topic_alias for p in broker.read() if isinstance(p, Publish)] == [None, None]


# -- reconnect and resend ----------------------------------------------------------------------


def test_a_reconnect_into_the_session_resends_unacked_publishes_with_dup_and_pubrels_again() -> None:
    session, broker = connected(clean_start=False)
    q1 = session.publish("t", b"q1", 1)
    q2_released = session.publish("t", b"q2a", 2)
    q2_unacked = session.publish("t", b"q2b", 2)
    assert q1 is not None and q2_released is not None and q2_unacked is not None
    broker.read()
    broker.send(PubRec(q2_released))
    assert broker.read() == [PubRel(q2_released)]

    broker, events = reconnect(session, ConnAck(session_present=True))
    assert events == [Connected(ConnAck(session_present=True), True)]
    assert broker.read() == [
        PubRel(q2_released),
        Publish("t", b"q1", qos=1, dup=True, packet_id=q1),
        Publish("t", b"q2b", qos=2, dup=True, packet_id=q2_unacked),
    ]
    assert broker.send(PubAck(q1), PubComp(q2_released), now=100.0) == [
        PublishAcked(q1, 0), PublishAcked(q2_released, 0)]


def test_a_reconnect_into_a_new_session_resends_unacked_as_new_and_completes_pubrecd_ones() -> None:
    session, broker = connected(clean_start=False)
    q1 = session.publish("t", b"q1", 1)
    q2_released = session.publish("t", b"q2a", 2)
    assert q1 is not None and q2_released is not None
    broker.read()
    broker.send(PubRec(q2_released))
    broker.read()

    broker, events = reconnect(session, ConnAck(session_present=False))
    # The server owned the PUBREC'd message already: it completes instead of being duplicated.
    assert events == [Connected(ConnAck(), False), PublishAcked(q2_released, 0)]
    assert broker.read() == [Publish("t", b"q1", qos=1, dup=False, packet_id=q1)]


def test_resends_after_a_reconnect_respect_a_smaller_receive_maximum() -> None:
    session, broker = connected(clean_start=False)
    ids = [session.publish("t", bytes([i]), 1) for i in range(3)]
    broker.read()
    broker, _ = reconnect(session, ConnAck(session_present=True, properties=Properties(receive_maximum=1)))
    assert broker.read() == [Publish("t", b"\x00", qos=1, dup=True, packet_id=ids[0])]
    assert ids[0] is not None and ids[1] is not None
    broker.send(PubAck(ids[0]), now=100.0)
    assert broker.read() == [Publish("t", b"\x01", qos=1, dup=True, packet_id=ids[1])]


def test_subscribes_in_flight_are_dropped_with_the_connection() -> None:
    session, broker = connected(clean_start=False)
    sub_id = session.subscribe([("cmd/#", 1)])
    broker.read()
    broker, _ = reconnect(session, ConnAck(session_present=True))
    events = broker.send(SubAck(sub_id, (1,)), now=100.0)
    assert isinstance(events[0], Disconnected)  # that SUBACK is unknown on the new connection


# -- server violations and disconnects ------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (PubAck(77), ReasonCode.PROTOCOL_ERROR),
        (PubComp(77), ReasonCode.PROTOCOL_ERROR),
        (SubAck(77, (0,)), ReasonCode.PROTOCOL_ERROR),
        (ConnAck(), ReasonCode.PROTOCOL_ERROR),
        (PingReq(), ReasonCode.PROTOCOL_ERROR),
    ],
    ids=["puback-unknown-id", "pubcomp-unknown-id", "suback-unknown-id", "second-connack", "pingreq"],
)
def test_a_server_protocol_violation_sends_disconnect_with_the_reason(packet: Packet, reason: int) -> None:
    session, broker = connected()
    events = broker.send(packet)
    assert len(events) == 1 and isinstance(events[0], Disconnected)
    assert (events[0].reason_code, events[0].by_server) == (reason, False)
    assert broker.read() == [Disconnect(reason)]
    assert session.state is SessionState.DISCONNECTED


def test_a_puback_for_a_qos2_publish_is_a_protocol_error() -> None:
    session, broker = connected()
    packet_id = session.publish("t", b"x", 2)
    assert packet_id is not None
    broker.read()
    [event] = broker.send(PubAck(packet_id))
    assert isinstance(event, Disconnected) and event.reason_code == ReasonCode.PROTOCOL_ERROR


def test_malformed_bytes_disconnect_with_malformed_packet() -> None:
    session, broker = connected()
    session.receive_data(b"\x40\x01\x00", now=1.0)  # PUBACK with a one-byte body
    [event] = drain(session)
    assert isinstance(event, Disconnected) and event.reason_code == ReasonCode.MALFORMED_PACKET
    assert broker.read() == [Disconnect(ReasonCode.MALFORMED_PACKET)]


def test_acks_that_arrive_intact_before_malformed_bytes_still_complete_their_publishes() -> None:
    session, broker = connected()
    packet_id = session.publish("t", b"x", 1)
    assert packet_id is not None
    broker.read()
    session.receive_data(encode(PubAck(packet_id), MQTT_5) + b"\x40\x01\x00", now=1.0)
    events = drain(session)
    assert events[0] == PublishAcked(packet_id, 0)
    assert isinstance(events[1], Disconnected) and events[1].reason_code == ReasonCode.MALFORMED_PACKET
    assert session.inflight == 0


def test_a_packet_before_connack_is_a_protocol_error() -> None:
    session = ClientSession(SessionConfig(client_id="c"))
    broker = Broker(session)
    session.connect(now=0.0)
    broker.read()
    [event] = broker.send(Publish("t", b"x"))
    assert isinstance(event, Disconnected) and event.reason_code == ReasonCode.PROTOCOL_ERROR


def test_at_mqtt311_a_violation_only_closes_because_disconnect_would_mean_a_normal_close() -> None:
    session, broker = connected(MQTT_311)
    [event] = broker.send(PubAck(77))
    assert isinstance(event, Disconnected) and not event.by_server
    assert broker.read() == []
    assert session.state is SessionState.DISCONNECTED


def test_a_server_disconnect_is_reported_and_keeps_the_session_for_a_reconnect() -> None:
    session, broker = connected(clean_start=False)
    packet_id = session.publish("t", b"x", 1)
    broker.read()
    events = broker.send(Disconnect(ReasonCode.SERVER_SHUTTING_DOWN, Properties(reason_string="bye")))
    assert events == [Disconnected(ReasonCode.SERVER_SHUTTING_DOWN, "bye", by_server=True)]
    assert session.state is SessionState.DISCONNECTED
    assert session.inflight == 1
    broker, _ = reconnect(session, ConnAck(session_present=True))
    assert broker.read() == [Publish("t", b"x", qos=1, dup=True, packet_id=packet_id)]


def test_our_disconnect_is_sent_and_later_data_is_ignored() -> None:
    session, broker = connected()
    session.disconnect(ReasonCode.DISCONNECT_WITH_WILL)
    assert broker.read() == [Disconnect(ReasonCode.DISCONNECT_WITH_WILL)]
    assert session.state is SessionState.DISCONNECTED
    assert broker.send(Publish("t", b"late")) == []
    session.disconnect()  # idempotent
    assert session.data_to_send() == b""


def test_a_session_present_after_a_clean_start_is_a_protocol_error() -> None:
    session = ClientSession(SessionConfig(client_id="c", clean_start=True))
    broker = Broker(session)
    session.connect(now=0.0)
    broker.read()
    [event] = broker.send(ConnAck(session_present=True))
    assert isinstance(event, Disconnected) and event.reason_code == ReasonCode.PROTOCOL_ERROR


def test_exceeding_our_receive_maximum_with_qos2_disconnects_with_receive_maximum_exceeded() -> None:
    _session, broker = connected(receive_maximum=2)
    broker.send(Publish("t", b"", qos=2, packet_id=1), Publish("t", b"", qos=2, packet_id=2))
    events = broker.send(Publish("t", b"", qos=2, packet_id=3))
    assert isinstance(events[0], Disconnected)
    assert events[0].reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED


def test_config_rejects_nonsense_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="keep_alive_s"):
        SessionConfig(client_id="c", keep_alive_s=70000)
    with pytest.raises(ValueError, match="protocol_level"):
        SessionConfig(client_id="c", protocol_level=3)
