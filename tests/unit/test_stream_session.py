"""DataStreamSession: the per-QUIC-data-stream MQTT state (checklist A5, A6, A9, A10), bytes in and out."""

from __future__ import annotations

import pytest

from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import (
    MQTT_5,
    ConnAck,
    Packet,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
)
from uplink.mqtt.session import (
    ClientSession,
    Connected,
    InflightWindowFull,
    MessageReceived,
    NotConnectedError,
    PublishAcked,
    SessionConfig,
    Subscribed,
)
from uplink.mqtt.stream_session import (
    DataStreamConfig,
    DataStreamSession,
    PacketIdRegistry,
    StreamFailed,
    StreamLimits,
)


def sent(session: DataStreamSession) -> list[Packet]:
    return Decoder(MQTT_5).feed(session.data_to_send())


def feed(session: DataStreamSession, *packets: Packet) -> None:
    session.receive_data(b"".join(encode(p, MQTT_5) for p in packets))


def events(session: DataStreamSession) -> list[object]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def attached(max_inflight: int = 32, receive_maximum: int = 100,
             registry: PacketIdRegistry | None = None) -> DataStreamSession:
    session = DataStreamSession(DataStreamConfig(max_inflight=max_inflight), registry)
    session.attach(StreamLimits(receive_maximum=receive_maximum))
    return session


def test_a_publish_goes_out_on_the_stream_and_its_puback_completes_it() -> None:
    session = attached()
    pid = session.publish("$file/f1/0", b"abc", qos=1)
    assert pid is not None
    [packet] = sent(session)
    assert isinstance(packet, Publish) and packet.topic == "$file/f1/0" and packet.packet_id == pid
    feed(session, PubAck(pid, 0))
    assert events(session) == [PublishAcked(pid, 0)]
    assert session.inflight == 0


def test_nothing_can_be_published_or_subscribed_before_the_stream_is_attached() -> None:
    session = DataStreamSession(DataStreamConfig())
    with pytest.raises(NotConnectedError):
        session.publish("t", b"x", qos=1)
    with pytest.raises(NotConnectedError):
        session.subscribe([("t", 1)])


def test_the_window_is_the_smaller_of_our_max_inflight_and_the_servers_receive_maximum() -> None:
    session = attached(max_inflight=8, receive_maximum=3)
    for _ in range(3):
        session.publish("t", b"x", qos=1)
    assert not session.can_publish(1)
    assert session.can_publish(0)
    with pytest.raises(InflightWindowFull):
        session.publish("t", b"x", qos=1)
    assert attached(max_inflight=2, receive_maximum=50).inflight_window == 2


def test_on_a_new_stream_unacked_publishes_are_resent_in_order_after_the_resubscription() -> None:
    session = attached()
    sub_pid = session.subscribe([("cmd/#", 1)])
    feed(session, SubAck(sub_pid, (1,)))
    assert events(session) == [Subscribed(sub_pid, (1,))]
    pids = [session.publish(f"t/{i}", b"%d" % i, qos=1) for i in range(3)]
    sent(session)
    feed(session, PubAck(pids[1], 0))
    events(session)
    session.detach()
    session.attach(StreamLimits(receive_maximum=100))
    packets = sent(session)
    assert isinstance(packets[0], Subscribe)
    assert packets[0].subscriptions == (Subscription("cmd/#", 1),)
    resent = [p for p in packets[1:] if isinstance(p, Publish)]
    assert [(p.packet_id, p.topic, p.dup) for p in resent] == [(pids[0], "t/0", True), (pids[2], "t/2", True)]
    assert session.resent == 2
    # The session's own resubscription raises no event for the caller.
    feed(session, SubAck(packets[0].packet_id, (1,)))
    assert events(session) == []


def test_resends_on_a_new_stream_respect_a_smaller_window() -> None:
    session = attached(max_inflight=4)
    pids = [session.publish("t", b"%d" % i, qos=1) for i in range(4)]
    sent(session)
    session.detach()
    session.attach(StreamLimits(receive_maximum=2))
    assert [p.packet_id for p in sent(session) if isinstance(p, Publish)] == pids[:2]
    feed(session, PubAck(pids[0], 0))
    assert [p.packet_id for p in sent(session) if isinstance(p, Publish)] == [pids[2]]


def test_a_qos2_publish_the_server_pubrecd_is_complete_when_its_stream_dies() -> None:
    session = attached()
    pid = session.publish("t", b"x", qos=2)
    assert pid is not None
    sent(session)
    feed(session, PubRec(pid, 0))
    assert sent(session) == [PubRel(pid)]
    session.detach()
    session.attach(StreamLimits())
    assert events(session) == [PublishAcked(pid, 0)]
    assert sent(session) == []  # neither PUBLISH (a duplicate) nor PUBREL (no state on the new stream)


def test_an_inbound_publish_is_acked_on_its_stream_and_aliases_are_per_stream() -> None:
    session = attached()
    feed(session, Publish("resp/1", b"r", 1, packet_id=7, properties=Properties(topic_alias=2)),
         Publish("", b"s", 1, packet_id=8, properties=Properties(topic_alias=2)))
    got = events(session)
    assert [e.publish.topic for e in got if isinstance(e, MessageReceived)] == ["resp/1", "resp/1"]
    assert sent(session) == [PubAck(7), PubAck(8)]
    session.detach()
    session.attach(StreamLimits())
    feed(session, Publish("", b"s", 1, packet_id=9, properties=Properties(topic_alias=2)))
    assert any(isinstance(e, StreamFailed) for e in events(session))  # the alias died with the stream


def test_an_inbound_qos2_publish_is_delivered_once_and_released() -> None:
    session = attached()
    feed(session, Publish("t", b"x", 2, packet_id=5), Publish("t", b"x", 2, dup=True, packet_id=5))
    assert len([e for e in events(session) if isinstance(e, MessageReceived)]) == 1
    assert sent(session) == [PubRec(5), PubRec(5)]
    feed(session, PubRel(5))
    assert sent(session) == [PubComp(5)]


@pytest.mark.parametrize("packet", [ConnAck(False, 0), PingResp()])
def test_a_control_packet_on_a_data_stream_fails_only_the_stream(packet: Packet) -> None:
    session = attached()
    pid = session.publish("t", b"x", qos=1)
    sent(session)
    feed(session, packet)
    [failed] = events(session)
    assert isinstance(failed, StreamFailed)
    assert not session.attached and session.inflight == 1
    session.attach(StreamLimits())
    assert [p.packet_id for p in sent(session) if isinstance(p, Publish)] == [pid]


def test_an_ack_for_an_id_we_do_not_hold_is_counted_not_fatal() -> None:
    session = attached()
    feed(session, PubAck(999, 0), SubAck(998, (0,)))
    assert events(session) == []
    assert session.attached and session.stray_acks == 2


def test_packet_ids_are_unique_across_the_control_session_and_the_data_streams() -> None:
    registry = PacketIdRegistry()
    control = ClientSession(SessionConfig(client_id="c"))
    registry.join_control(control)
    control.connect(0.0)
    control.data_to_send()
    control.receive_data(encode(ConnAck(False, 0), MQTT_5), 0.0)
    assert isinstance(control.next_event(), Connected)
    first = attached(registry=registry)
    second = attached(registry=registry)
    ids: list[int | None] = []
    for _ in range(5):
        ids.append(control.publish("t", b"x", qos=1))
        ids.append(first.publish("t", b"x", qos=1))
        ids.append(second.subscribe([("s", 1)]))
    assert len(set(ids)) == len(ids) == 15
    # A released id is free again for anyone.
    [pid] = [i for i in ids[1:2] if i is not None]
    feed(first, PubAck(pid, 0))
    assert not registry.held_elsewhere(pid, control)


def test_take_pending_hands_over_unacked_publishes_and_caller_requests() -> None:
    session = attached()
    a = session.publish("t/a", b"a", qos=1)
    b = session.publish("t/b", b"b", qos=1)
    sub = session.subscribe([("x", 1)])
    sent(session)
    session.detach()
    assert [(pid, p.topic) for pid, p in session.take_pending()] == [(a, "t/a"), (b, "t/b")]
    assert [pid for pid, _ in session.take_requests()] == [sub]
    assert session.inflight == 0


def test_an_unsubscribed_filter_is_not_reissued_on_a_new_stream() -> None:
    session = attached()
    pid = session.subscribe([("a", 1), ("b", 1)])
    feed(session, SubAck(pid, (1, 1)))
    session.unsubscribe(["a"])
    sent(session)
    session.detach()
    session.attach(StreamLimits())
    subscribes = [p for p in sent(session) if isinstance(p, Subscribe)]
    assert [s.topic_filter for s in subscribes[0].subscriptions] == ["b"]


def test_a_topic_alias_from_the_caller_is_refused() -> None:
    session = attached()
    with pytest.raises(LocalProtocolError):
        session.publish("t", b"x", qos=1, properties=Properties(topic_alias=1))
    assert session.inflight == 0 and session.data_to_send() == b""
