"""The pure broker core, driven with real MQTT bytes (encoded by our codec) and a hand-moved clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cloud_broker.core.broker import Broker
from cloud_broker.core.model import AuthRequest, AuthResult, ClientInfo, Message
from cloud_broker.core.persistence import MemoryPersistence
from cloud_broker.core.settings import CoreSettings
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
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
    Will,
)


@dataclass
class Client:
    conn_id: int
    level: int
    decoder: Decoder
    inbox: list[Packet] = field(default_factory=list)
    closed: bool = False


class Rig:
    """Moves bytes between fake client endpoints and one Broker; time moves only when a test says so."""

    def __init__(self, broker: Broker | None = None, store: MemoryPersistence | None = None,
                 **settings: object) -> None:
        self.broker = broker or Broker(CoreSettings(allow_anonymous=True, **settings))  # type: ignore[arg-type]
        # With a store, the rig plays the server's writer: journal batches are applied, then committed
        # at once unless `auto_commit` is off (then `commit()` does it).
        self.store = store
        self.auto_commit = True
        self.applied_batch = 0
        self.now = 1000.0
        self._next = 0
        self.clients: dict[int, Client] = {}

    def open(self, level: int = MQTT_5) -> Client:
        self._next += 1
        c = Client(self._next, level, Decoder(level))
        self.clients[c.conn_id] = c
        self.broker.connection_opened(c.conn_id, f"test:{c.conn_id}", self.now)
        return c

    def connect(self, client_id: str, level: int = MQTT_5, **kw: object) -> Client:
        c = self.open(level)
        self.send(c, Connect(client_id, protocol_level=level, **kw))  # type: ignore[arg-type]
        ack = self.take(c)
        assert isinstance(ack[0], ConnAck), ack
        return c

    def send(self, c: Client, *packets: Packet) -> None:
        self.send_raw(c, b"".join(encode(p, c.level) for p in packets))

    def send_raw(self, c: Client, data: bytes) -> None:
        self.broker.data_received(c.conn_id, data, self.now)
        self._pump()

    def lose(self, c: Client) -> None:
        c.closed = True
        self.broker.connection_lost(c.conn_id, self.now)
        self._pump()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.broker.handle_deadlines(self.now)
        self._pump()

    def commit(self) -> None:
        self.broker.journal_committed(self.applied_batch, self.now)
        self._pump()

    def _pump(self) -> None:
        if self.store is not None and self.broker.has_journal():
            batch, intents = self.broker.drain_journal()
            self.store.apply(intents)
            self.applied_batch = batch
            if self.auto_commit:
                self.broker.journal_committed(batch, self.now)
        writes, closes = self.broker.drain()
        for conn_id, data in writes:
            c = self.clients[conn_id]
            assert not c.closed, "the broker wrote to a connection it had closed"
            c.inbox.extend(c.decoder.feed(data))
        for conn_id in closes:
            self.clients[conn_id].closed = True

    def take(self, c: Client) -> list[Packet]:
        out, c.inbox = c.inbox, []
        return out


def sub(rig: Rig, c: Client, *filters: str, qos: int = 0, pid: int = 1, **opts: object) -> SubAck:
    rig.send(c, Subscribe(pid, tuple(Subscription(f, qos, **opts) for f in filters)))  # type: ignore[arg-type]
    packets = rig.take(c)
    assert isinstance(packets[0], SubAck), packets
    c.inbox = packets[1:]  # retained messages that followed the SUBACK stay in the inbox
    return packets[0]


def publishes(packets: list[Packet]) -> list[Publish]:
    return [p for p in packets if isinstance(p, Publish)]


# ------------------------------------------------------------------------------------------ CONNECT


def test_a_v5_connack_announces_the_brokers_limits_and_capabilities() -> None:
    rig = Rig(receive_maximum=10, max_packet_size_bytes=4096, topic_alias_maximum=5)
    c = rig.open()
    rig.send(c, Connect("dev-1"))
    [ack] = rig.take(c)
    assert isinstance(ack, ConnAck)
    assert ack.reason_code == ReasonCode.SUCCESS and not ack.session_present
    p = ack.properties
    assert (p.receive_maximum, p.maximum_packet_size, p.topic_alias_maximum) == (10, 4096, 5)
    assert p.retain_available == 1 and p.wildcard_subscription_available == 1
    assert p.shared_subscription_available == 1 and p.maximum_qos is None  # QoS 2 supported


def test_a_first_packet_that_is_not_connect_closes_the_connection_without_an_answer() -> None:
    rig = Rig()
    c = rig.open(MQTT_311)
    rig.send(c, PingReq())
    assert rig.take(c) == [] and c.closed


def test_a_second_connect_is_a_protocol_error() -> None:
    rig = Rig()
    c = rig.connect("dev-1")
    rig.send_raw(c, encode(Connect("dev-1"), MQTT_5))
    assert rig.take(c) == [Disconnect(ReasonCode.PROTOCOL_ERROR)] and c.closed


def test_an_empty_client_id_with_clean_start_gets_an_assigned_id_in_v5() -> None:
    rig = Rig()
    c = rig.open()
    rig.send(c, Connect("", clean_start=True))
    [ack] = rig.take(c)
    assert isinstance(ack, ConnAck) and ack.reason_code == 0
    assigned = ack.properties.assigned_client_identifier
    assert assigned and rig.broker.session(assigned) is not None


def test_an_empty_client_id_without_clean_session_is_rejected_in_311() -> None:
    rig = Rig()
    c = rig.open(MQTT_311)
    rig.send(c, Connect("", protocol_level=MQTT_311, clean_start=False))
    assert rig.take(c) == [ConnAck(False, 2)] and c.closed


def test_an_unsupported_protocol_level_gets_return_code_1() -> None:
    rig = Rig()
    c = rig.open(MQTT_311)
    # MQTT 3.1: protocol name "MQIsdp", level 3.
    body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x02id"
    rig.send_raw(c, bytes((0x10, len(body))) + body)
    assert rig.take(c) == [ConnAck(False, 1)] and c.closed


def test_anonymous_clients_are_refused_when_anonymous_access_is_off_and_no_authenticator_exists() -> None:
    rig = Rig(Broker(CoreSettings(allow_anonymous=False)))
    c5 = rig.open()
    rig.send(c5, Connect("a"))
    assert rig.take(c5) == [ConnAck(False, ReasonCode.NOT_AUTHORIZED)] and c5.closed
    c3 = rig.open(MQTT_311)
    rig.send(c3, Connect("b", protocol_level=MQTT_311, username="u", password=b"p"))
    assert rig.take(c3) == [ConnAck(False, 5)] and c3.closed


class PasswordTable:
    def authenticate(self, request: AuthRequest) -> AuthResult:
        if (request.username, request.password) == ("op", b"secret"):
            return AuthResult(ReasonCode.SUCCESS)
        return AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD)


def test_an_authenticator_decides_who_connects() -> None:
    rig = Rig(Broker(CoreSettings(allow_anonymous=False), authenticator=PasswordTable()))
    good = rig.open()
    rig.send(good, Connect("a", username="op", password=b"secret"))
    assert rig.take(good)[0] == ConnAck(False, 0, rig.broker._connack_properties)
    bad = rig.open()
    rig.send(bad, Connect("b", username="op", password=b"wrong"))
    assert rig.take(bad) == [ConnAck(False, ReasonCode.BAD_USER_NAME_OR_PASSWORD)] and bad.closed


# ------------------------------------------------------------------------------------------ routing


def test_qos0_messages_reach_wildcard_subscribers_and_not_others() -> None:
    rig = Rig()
    plus, hash_, other, pub = (rig.connect(n) for n in ("plus", "hash", "other", "pub"))
    sub(rig, plus, "site/+/pressure")
    sub(rig, hash_, "site/#")
    sub(rig, other, "elsewhere/#")
    rig.send(pub, Publish("site/w1/pressure", b"12.5"))
    assert publishes(rig.take(plus)) == [Publish("site/w1/pressure", b"12.5")]
    assert publishes(rig.take(hash_)) == [Publish("site/w1/pressure", b"12.5")]
    assert rig.take(other) == []


def test_filters_starting_with_a_wildcard_do_not_match_dollar_topics() -> None:
    rig = Rig()
    everything, sys_, pub = rig.connect("all"), rig.connect("sys"), rig.connect("pub")
    sub(rig, everything, "#")
    sub(rig, sys_, "$fg/#")
    rig.send(pub, Publish("$fg/health", b"1"))  # ($SYS itself is the broker's: clients cannot publish there)
    assert rig.take(everything) == []
    assert [p.topic for p in publishes(rig.take(sys_))] == ["$fg/health"]


def test_a_v311_and_a_v5_subscriber_both_get_one_message() -> None:
    rig = Rig()
    old, new, pub = rig.connect("old", MQTT_311), rig.connect("new"), rig.connect("pub")
    sub(rig, old, "t")
    sub(rig, new, "t")
    rig.send(pub, Publish("t", b"x", properties=Properties(content_type="text/plain")))
    assert publishes(rig.take(old)) == [Publish("t", b"x")]
    assert publishes(rig.take(new)) == [Publish("t", b"x", properties=Properties(content_type="text/plain"))]


def test_qos1_is_acknowledged_to_the_publisher_and_delivered_with_a_packet_id() -> None:
    rig = Rig()
    s, p = rig.connect("s"), rig.connect("p")
    sub(rig, s, "t", qos=1)
    rig.send(p, Publish("t", b"v", qos=1, packet_id=7))
    assert rig.take(p) == [PubAck(7, ReasonCode.SUCCESS)]
    [msg] = publishes(rig.take(s))
    assert (msg.qos, msg.payload) == (1, b"v") and msg.packet_id is not None
    rig.send(s, PubAck(msg.packet_id))
    assert not rig.broker.session("s").inflight  # type: ignore[union-attr]


def test_a_v5_publish_nobody_subscribes_to_is_acknowledged_with_no_matching_subscribers() -> None:
    rig = Rig()
    p = rig.connect("p")
    rig.send(p, Publish("nobody", b"v", qos=1, packet_id=1))
    assert rig.take(p) == [PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS)]


def test_a_311_publish_nobody_subscribes_to_gets_a_plain_puback() -> None:
    rig = Rig()
    p = rig.connect("p", MQTT_311)
    rig.send(p, Publish("nobody", b"v", qos=1, packet_id=1), Publish("nobody", b"v", qos=2, packet_id=2))
    assert rig.take(p) == [PubAck(1), PubRec(2)]
    rig.send(p, PubRel(2), PubRel(3))
    assert rig.take(p) == [PubComp(2), PubComp(3)] and not p.closed


def test_a_311_publish_the_authorizer_refuses_is_acknowledged_and_dropped() -> None:
    rig = Rig(Broker(CoreSettings(allow_anonymous=True), authorizer=TreeOnly()))
    a = rig.connect("a", MQTT_311)
    rig.send(a, Publish("dev/b/x", b"v", qos=1, packet_id=1))
    assert rig.take(a) == [PubAck(1)] and not a.closed


def test_delivery_qos_is_the_lower_of_publish_and_subscription_qos() -> None:
    rig = Rig()
    s0, p = rig.connect("s0"), rig.connect("p")
    sub(rig, s0, "t", qos=0)
    rig.send(p, Publish("t", b"v", qos=1, packet_id=1))
    [msg] = publishes(rig.take(s0))
    assert msg.qos == 0 and msg.packet_id is None


def test_qos2_flows_end_to_end_and_a_resent_publish_is_not_routed_twice() -> None:
    rig = Rig()
    s, p = rig.connect("s"), rig.connect("p")
    sub(rig, s, "t", qos=2)
    rig.send(p, Publish("t", b"once", qos=2, packet_id=3))
    assert rig.take(p) == [PubRec(3)]
    rig.send(p, Publish("t", b"once", qos=2, packet_id=3, dup=True))  # PUBREC lost, publisher retries
    assert rig.take(p) == [PubRec(3)]
    rig.send(p, PubRel(3))
    assert rig.take(p) == [PubComp(3)]
    [msg] = publishes(rig.take(s))
    assert msg.qos == 2 and msg.packet_id is not None
    rig.send(s, PubRec(msg.packet_id))
    assert rig.take(s) == [PubRel(msg.packet_id)]
    rig.send(s, PubComp(msg.packet_id))
    assert not rig.broker.session("s").inflight  # type: ignore[union-attr]


def test_a_pubrel_for_an_unknown_packet_id_gets_packet_identifier_not_found() -> None:
    rig = Rig()
    p = rig.connect("p")
    rig.send(p, PubRel(9))
    assert rig.take(p) == [PubComp(9, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)]


def test_overlapping_subscriptions_deliver_one_copy_with_the_highest_qos_and_every_subscription_id() -> None:
    rig = Rig()
    s, p = rig.connect("s"), rig.connect("p")
    rig.send(s, Subscribe(1, (Subscription("a/+", 0),), Properties(subscription_identifiers=(5,))))
    rig.send(s, Subscribe(2, (Subscription("a/#", 1),), Properties(subscription_identifiers=(6,))))
    rig.take(s)
    rig.send(p, Publish("a/b", b"v", qos=1, packet_id=1))
    [msg] = publishes(rig.take(s))
    assert msg.qos == 1 and sorted(msg.properties.subscription_identifiers) == [5, 6]


def test_no_local_keeps_a_clients_own_messages_from_it() -> None:
    rig = Rig()
    c = rig.connect("c")
    sub(rig, c, "echo", no_local=True)
    rig.send(c, Publish("echo", b"mine"))
    assert rig.take(c) == []


def test_a_shared_subscription_gives_each_message_to_one_member_in_turn() -> None:
    rig = Rig()
    a, b, p = rig.connect("a"), rig.connect("b"), rig.connect("p")
    sub(rig, a, "$share/workers/jobs/#")
    sub(rig, b, "$share/workers/jobs/#")
    for i in range(4):
        rig.send(p, Publish("jobs/x", str(i).encode()))
    got_a, got_b = publishes(rig.take(a)), publishes(rig.take(b))
    assert len(got_a) == 2 and len(got_b) == 2
    assert sorted(m.payload for m in got_a + got_b) == [b"0", b"1", b"2", b"3"]


def test_a_topic_alias_set_by_the_client_stands_for_its_topic() -> None:
    rig = Rig()
    s, p = rig.connect("s"), rig.connect("p")
    sub(rig, s, "long/topic/name")
    rig.send(p, Publish("long/topic/name", b"1", properties=Properties(topic_alias=1)))
    rig.send(p, Publish("", b"2", properties=Properties(topic_alias=1)))
    got = publishes(rig.take(s))
    assert [(m.topic, m.payload) for m in got] == [("long/topic/name", b"1"), ("long/topic/name", b"2")]
    assert all(m.properties.topic_alias is None for m in got)


def test_an_unknown_topic_alias_is_a_disconnect_0x94() -> None:
    rig = Rig()
    p = rig.connect("p")
    rig.send(p, Publish("", b"2", properties=Properties(topic_alias=3)))
    assert rig.take(p) == [Disconnect(ReasonCode.TOPIC_ALIAS_INVALID)] and p.closed


def test_unsubscribe_stops_delivery_and_reports_missing_subscriptions() -> None:
    rig = Rig()
    s, p = rig.connect("s"), rig.connect("p")
    sub(rig, s, "t")
    rig.send(s, Unsubscribe(2, ("t", "never")))
    assert rig.take(s) == [UnsubAck(2, (ReasonCode.SUCCESS, ReasonCode.NO_SUBSCRIPTION_EXISTED))]
    rig.send(p, Publish("t", b"v"))
    assert rig.take(s) == []


def test_an_invalid_filter_is_refused_in_the_suback_and_the_rest_are_granted() -> None:
    rig = Rig()
    s = rig.connect("s")
    ack = sub(rig, s, "a/#/b", "ok/+", qos=1)
    assert ack.reason_codes == (ReasonCode.TOPIC_FILTER_INVALID, 1)
    s3 = rig.connect("s3", MQTT_311)
    assert sub(rig, s3, "a/b#", "ok").reason_codes == (0x80, 0)


# ------------------------------------------------------------------------------------------ retained


def test_a_retained_message_is_sent_after_the_suback_and_an_empty_payload_clears_it() -> None:
    rig = Rig()
    p = rig.connect("p")
    rig.send(p, Publish("cfg/a", b"on", retain=True, qos=1, packet_id=1))
    s = rig.connect("s")
    sub(rig, s, "cfg/#", qos=1)
    [msg] = publishes(rig.take(s))
    assert (msg.topic, msg.payload, msg.retain) == ("cfg/a", b"on", True)
    rig.send(p, Publish("cfg/a", b"", retain=True))
    rig.take(s)
    late = rig.connect("late")
    sub(rig, late, "cfg/#")
    assert rig.take(late) == []


def test_live_messages_lose_the_retain_flag_unless_retain_as_published() -> None:
    rig = Rig()
    plain, rap, p = rig.connect("plain"), rig.connect("rap"), rig.connect("p")
    sub(rig, plain, "t")
    sub(rig, rap, "t", retain_as_published=True)
    rig.send(p, Publish("t", b"v", retain=True))
    assert publishes(rig.take(plain))[0].retain is False
    assert publishes(rig.take(rap))[0].retain is True


def test_retain_handling_1_sends_retained_only_to_new_subscriptions_and_2_never() -> None:
    rig = Rig()
    p = rig.connect("p")
    rig.send(p, Publish("t", b"r", retain=True))
    s = rig.connect("s")
    sub(rig, s, "t", retain_handling=1)
    assert len(publishes(rig.take(s))) == 1
    sub(rig, s, "t", retain_handling=1, pid=2)
    assert rig.take(s) == []
    never = rig.connect("never")
    sub(rig, never, "t", retain_handling=2)
    assert rig.take(never) == []


# ------------------------------------------------------------------------------------------ sessions


def test_a_duplicate_client_id_takes_over_and_the_old_connection_gets_disconnect_0x8e() -> None:
    rig = Rig()
    old = rig.connect("dev")
    new = rig.open()
    rig.send(new, Connect("dev"))
    assert isinstance(rig.take(new)[0], ConnAck)
    assert rig.take(old) == [Disconnect(ReasonCode.SESSION_TAKEN_OVER)] and old.closed
    assert not new.closed


def test_a_persistent_session_keeps_subscriptions_and_queues_qos1_while_offline() -> None:
    rig = Rig()
    s = rig.connect("s", clean_start=True, properties=Properties(session_expiry_interval=3600))
    sub(rig, s, "t", qos=1)
    rig.send(s, Disconnect())
    assert s.closed
    p = rig.connect("p")
    rig.send(p, Publish("t", b"while-away", qos=1, packet_id=1))
    rig.send(p, Publish("t", b"qos0-dropped"))
    back = rig.open()
    rig.send(back, Connect("s", clean_start=False, properties=Properties(session_expiry_interval=3600)))
    packets = rig.take(back)
    assert isinstance(packets[0], ConnAck) and packets[0].session_present
    assert [m.payload for m in publishes(packets)] == [b"while-away"]


def test_a_311_session_with_clean_session_0_survives_any_time_offline() -> None:
    rig = Rig()
    s = rig.connect("s", MQTT_311, clean_start=False)
    sub(rig, s, "t", qos=1)
    rig.lose(s)
    rig.advance(10 * 365 * 86400)
    back = rig.open(MQTT_311)
    rig.send(back, Connect("s", protocol_level=MQTT_311, clean_start=False))
    assert rig.take(back) == [ConnAck(True, 0)]


def test_a_v5_session_expires_after_its_interval() -> None:
    rig = Rig()
    s = rig.connect("s", properties=Properties(session_expiry_interval=60))
    sub(rig, s, "t", qos=1)
    rig.lose(s)
    rig.advance(59)
    assert rig.broker.session("s") is not None
    rig.advance(2)
    assert rig.broker.session("s") is None
    back = rig.open()
    rig.send(back, Connect("s", clean_start=False))
    assert rig.take(back)[0].session_present is False  # type: ignore[union-attr]


def test_clean_start_discards_the_previous_session() -> None:
    rig = Rig()
    s = rig.connect("s", properties=Properties(session_expiry_interval=60))
    sub(rig, s, "t", qos=1)
    rig.lose(s)
    again = rig.connect("s", clean_start=True)
    assert rig.broker.session("s").subscriptions == {}  # type: ignore[union-attr]
    assert not again.closed


def test_unacknowledged_deliveries_are_resent_with_dup_on_resume() -> None:
    rig = Rig()
    s = rig.connect("s", properties=Properties(session_expiry_interval=60))
    sub(rig, s, "t", qos=1)
    p = rig.connect("p")
    rig.send(p, Publish("t", b"v", qos=1, packet_id=1))
    [first] = publishes(rig.take(s))
    rig.lose(s)
    back = rig.open()
    rig.send(back, Connect("s", clean_start=False, properties=Properties(session_expiry_interval=60)))
    [again] = publishes(rig.take(back))
    assert again.dup and again.packet_id == first.packet_id and again.payload == b"v"


def test_deliveries_beyond_the_clients_receive_maximum_wait_for_acks() -> None:
    rig = Rig()
    s = rig.connect("s", properties=Properties(receive_maximum=2))
    sub(rig, s, "t", qos=1)
    p = rig.connect("p")
    for i in range(5):
        rig.send(p, Publish("t", bytes([i]), qos=1, packet_id=i + 1))
    first = publishes(rig.take(s))
    assert [m.payload for m in first] == [b"\x00", b"\x01"]
    rig.send(s, PubAck(first[0].packet_id))  # type: ignore[arg-type]
    assert [m.payload for m in publishes(rig.take(s))] == [b"\x02"]


def test_a_message_larger_than_the_clients_maximum_packet_size_is_not_sent() -> None:
    rig = Rig()
    s = rig.connect("s", properties=Properties(maximum_packet_size=64))
    sub(rig, s, "t")
    p = rig.connect("p")
    rig.send(p, Publish("t", b"x" * 100))
    rig.send(p, Publish("t", b"small"))
    assert [m.payload for m in publishes(rig.take(s))] == [b"small"]


def test_queued_messages_past_their_expiry_are_not_delivered() -> None:
    rig = Rig()
    s = rig.connect("s", properties=Properties(session_expiry_interval=600))
    sub(rig, s, "t", qos=1)
    rig.lose(s)
    p = rig.connect("p")
    rig.send(p, Publish("t", b"short", qos=1, packet_id=1, properties=Properties(message_expiry_interval=5)))
    rig.send(p, Publish("t", b"long", qos=1, packet_id=2, properties=Properties(message_expiry_interval=500)))
    rig.advance(10)
    back = rig.open()
    rig.send(back, Connect("s", clean_start=False, properties=Properties(session_expiry_interval=600)))
    [msg] = publishes(rig.take(back))
    assert msg.payload == b"long" and msg.properties.message_expiry_interval == 490


# ------------------------------------------------------------------------------------------ keepalive, wills


def test_silence_beyond_one_and_a_half_keepalives_closes_with_0x8d() -> None:
    rig = Rig()
    c = rig.connect("c", keep_alive_s=10)
    rig.advance(14)
    rig.send(c, PingReq())
    assert rig.take(c) == [PingResp()]
    rig.advance(14.9)
    assert not c.closed
    rig.advance(0.2)
    assert rig.take(c) == [Disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)] and c.closed


def test_a_connection_that_never_sends_connect_is_closed_after_the_connect_timeout() -> None:
    rig = Rig(connect_timeout_s=5.0)
    c = rig.open()
    rig.advance(4)
    assert not c.closed
    rig.advance(2)
    assert c.closed and rig.take(c) == []


def test_a_will_is_published_on_abnormal_disconnect_only() -> None:
    rig = Rig()
    watcher = rig.connect("watcher")
    sub(rig, watcher, "status/#")
    a = rig.connect("a", will=Will("status/a", b"offline", qos=1, retain=True))
    rig.lose(a)
    [will] = publishes(rig.take(watcher))
    assert (will.topic, will.payload) == ("status/a", b"offline")
    b = rig.connect("b", will=Will("status/b", b"offline"))
    rig.send(b, Disconnect())
    assert rig.take(watcher) == []
    late = rig.connect("late")
    sub(rig, late, "status/#")
    assert [m.topic for m in publishes(rig.take(late))] == ["status/a"]  # the will was retained


def test_a_keepalive_timeout_publishes_the_will() -> None:
    rig = Rig()
    watcher = rig.connect("watcher")
    sub(rig, watcher, "status/#")
    rig.connect("a", keep_alive_s=2, will=Will("status/a", b"gone"))
    rig.send(watcher, PingReq())
    rig.take(watcher)
    rig.advance(3.1)
    assert [m.payload for m in publishes(rig.take(watcher))] == [b"gone"]


def test_disconnect_with_will_message_still_publishes_the_will() -> None:
    rig = Rig()
    watcher = rig.connect("watcher")
    sub(rig, watcher, "w")
    a = rig.connect("a", will=Will("w", b"bye"))
    rig.send(a, Disconnect(ReasonCode.DISCONNECT_WITH_WILL))
    assert [m.payload for m in publishes(rig.take(watcher))] == [b"bye"]


def test_a_delayed_will_is_cancelled_when_the_client_reconnects_in_time() -> None:
    rig = Rig()
    watcher = rig.connect("watcher", keep_alive_s=0)
    sub(rig, watcher, "w")
    props = Properties(session_expiry_interval=300)
    will = Will("w", b"bye", properties=Properties(will_delay_interval=30))
    a = rig.connect("a", properties=props, will=will)
    rig.lose(a)
    rig.advance(10)
    rig.connect("a", clean_start=False, properties=props, will=will)
    rig.advance(60)
    assert rig.take(watcher) == []
    rig.lose(rig.clients[max(rig.clients)])
    rig.advance(31)
    assert [m.payload for m in publishes(rig.take(watcher))] == [b"bye"]


def test_takeover_of_a_311_session_publishes_the_old_connections_will() -> None:
    rig = Rig()
    watcher = rig.connect("watcher")
    sub(rig, watcher, "w")
    rig.connect("dev", MQTT_311, will=Will("w", b"dropped"))
    rig.connect("dev", MQTT_311)
    assert [m.payload for m in publishes(rig.take(watcher))] == [b"dropped"]


# ------------------------------------------------------------------------------------ limits and bad input


def test_malformed_bytes_get_disconnect_0x81_and_other_clients_keep_working() -> None:
    rig = Rig()
    healthy, p = rig.connect("healthy"), rig.connect("p")
    sub(rig, healthy, "t")
    bad = rig.connect("bad")
    rig.send_raw(bad, b"\x30\x04\x00\x09ab")  # PUBLISH whose topic length runs past the packet
    assert rig.take(bad) == [Disconnect(ReasonCode.MALFORMED_PACKET)] and bad.closed
    rig.send(p, Publish("t", b"still-here"))
    assert [m.payload for m in publishes(rig.take(healthy))] == [b"still-here"]


def test_a_packet_over_the_brokers_maximum_size_is_disconnect_0x95() -> None:
    rig = Rig(max_packet_size_bytes=128)
    c = rig.connect("c")
    rig.send(c, Publish("t", b"x" * 200))
    assert rig.take(c) == [Disconnect(ReasonCode.PACKET_TOO_LARGE)] and c.closed


def test_with_maximum_qos_1_qos2_is_refused_cleanly() -> None:
    rig = Rig(maximum_qos=1)
    c = rig.open()
    rig.send(c, Connect("c"))
    [ack] = rig.take(c)
    assert ack.properties.maximum_qos == 1  # type: ignore[union-attr]
    assert sub(rig, c, "t", qos=2).reason_codes == (1,)
    rig.send(c, Publish("t", b"v", qos=2, packet_id=1))
    assert rig.take(c) == [Disconnect(ReasonCode.QOS_NOT_SUPPORTED)] and c.closed


def test_a_will_with_an_unsupported_qos_is_refused_in_v5() -> None:
    rig = Rig(maximum_qos=1)
    c = rig.open()
    rig.send(c, Connect("c", will=Will("w", b"x", qos=2)))
    assert rig.take(c) == [ConnAck(False, ReasonCode.QOS_NOT_SUPPORTED)] and c.closed


def test_shutdown_sends_server_shutting_down_to_v5_clients_and_closes_all() -> None:
    rig = Rig()
    c5, c3 = rig.connect("c5"), rig.connect("c3", MQTT_311)
    rig.broker.shutdown(rig.now)
    rig._pump()
    assert rig.take(c5) == [Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)] and c5.closed
    assert rig.take(c3) == [] and c3.closed


def test_input_for_a_closed_or_unknown_connection_is_ignored() -> None:
    rig = Rig()
    c = rig.connect("c")
    rig.lose(c)
    rig.broker.data_received(c.conn_id, encode(PingReq(), MQTT_5), rig.now)
    rig.broker.connection_lost(c.conn_id, rig.now)
    rig.broker.data_received(999, b"\x00\x00", rig.now)
    assert rig.broker.drain() == ([], [])


# ------------------------------------------------------------------------------------------ seams


class TreeOnly:
    """Each client may use only its own subtree `dev/<client_id>/...`."""

    def can_publish(self, client: ClientInfo, topic: str) -> bool:
        return topic.startswith(f"dev/{client.client_id}/")

    def can_subscribe(self, client: ClientInfo, topic_filter: str) -> bool:
        return topic_filter.startswith(f"dev/{client.client_id}/")


def test_an_authorizer_limits_topics_per_client() -> None:
    rig = Rig(Broker(CoreSettings(allow_anonymous=True), authorizer=TreeOnly()))
    a = rig.connect("a")
    assert sub(rig, a, "dev/a/#", "dev/b/#").reason_codes == (0, ReasonCode.NOT_AUTHORIZED)
    rig.send(a, Publish("dev/b/x", b"v", qos=1, packet_id=1))
    assert rig.take(a) == [PubAck(1, ReasonCode.NOT_AUTHORIZED)]


class FileSink:
    def __init__(self) -> None:
        self.seen: list[Message] = []

    def on_publish(self, client: ClientInfo, message: Message, ticket: int, packet_id: int) -> int | None:
        if message.topic.startswith("$file/"):
            self.seen.append(message)
            return ReasonCode.SUCCESS
        return None


def test_a_message_hook_can_consume_messages_before_routing() -> None:
    hook = FileSink()
    rig = Rig(Broker(CoreSettings(allow_anonymous=True), hooks=(hook,)))
    spy, c = rig.connect("spy"), rig.connect("c")
    sub(rig, spy, "$file/#")
    rig.send(c, Publish("$file/f1/0", b"seg", qos=1, packet_id=1))
    assert rig.take(c) == [PubAck(1, ReasonCode.SUCCESS)]
    assert rig.take(spy) == [] and [m.payload for m in hook.seen] == [b"seg"]


def test_retained_messages_and_sessions_are_restored_from_persistence() -> None:
    store = MemoryPersistence()
    first = Rig(Broker(CoreSettings(allow_anonymous=True), journal=True), store)
    s = first.connect("s", properties=Properties(session_expiry_interval=3600))
    sub(first, s, "t", qos=1)
    first.lose(s)
    p = first.connect("p")
    first.send(p, Publish("keep", b"r", retain=True))
    first.send(p, Publish("t", b"while-offline", qos=1, packet_id=1))
    broker2 = Broker(CoreSettings(allow_anonymous=True), journal=True)
    broker2.restore(store.load(), 0.0)
    second = Rig(broker2, store)
    back = second.open()
    second.send(back, Connect("s", clean_start=False, properties=Properties(session_expiry_interval=3600)))
    first_packets = second.take(back)
    assert first_packets[0].session_present is True  # type: ignore[union-attr]
    assert [m.payload for m in publishes(first_packets)] == [b"while-offline"]
    p2 = second.connect("p2")
    second.send(p2, Publish("t", b"after-restart"))
    assert [m.payload for m in publishes(second.take(back))] == [b"after-restart"]
    sub(second, p2, "keep")
    assert [m.payload for m in publishes(second.take(p2))] == [b"r"]


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_ping_is_answered_at_both_protocol_levels(level: int) -> None:
    rig = Rig()
    c = rig.connect("c", level)
    rig.send(c, PingReq())
    assert rig.take(c) == [PingResp()]
