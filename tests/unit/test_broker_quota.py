"""The broker never acknowledges a message nobody took (issue 6, finding 5): when every matching
subscriber's queue is full, an MQTT 5 publisher gets 0x97 Quota exceeded and keeps the message; an
MQTT 3.1.1 publisher, which has no negative PUBACK, has its connection closed without the ack and
resends the message after it reconnects. A message at least one subscriber took is acknowledged."""

from __future__ import annotations

from cloud_broker.core.broker import Broker
from cloud_broker.core.model import ClientInfo, Message
from cloud_broker.core.persistence import MemoryPersistence
from cloud_broker.core.settings import CoreSettings
from tests.unit.test_broker_core import Rig, publishes, sub
from uplink.mqtt.packets import (
    MQTT_311,
    ConnAck,
    Connect,
    Properties,
    PubAck,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    Will,
)

EXPIRY = Properties(session_expiry_interval=3600)
TOPIC = "fg/v1/pad-07/data/telemetry"


def full_ingest(rig: Rig) -> None:
    """The only subscriber: a persistent ingest session, offline, its queue (2) about to fill."""
    s = rig.connect("ingest", properties=EXPIRY)
    sub(rig, s, "fg/v1/+/data/#", qos=1)
    rig.lose(s)


def queued(rig: Rig, client_id: str = "ingest") -> list[bytes]:
    session = rig.broker.session(client_id)
    assert session is not None
    return [d.message.payload for d in session.pending]


def test_a_v5_publisher_gets_0x97_when_the_only_persistent_subscribers_queue_is_full() -> None:
    rig = Rig(max_queued_messages=2)
    full_ingest(rig)
    p = rig.connect("pad-07")
    rig.send(p, *[Publish(TOPIC, b"batch%d" % i, qos=1, packet_id=i) for i in (1, 2, 3)])
    assert rig.take(p) == [PubAck(1, 0), PubAck(2, 0), PubAck(3, ReasonCode.QUOTA_EXCEEDED)]
    assert queued(rig) == [b"batch1", b"batch2"]
    assert rig.broker.counters.publish_quota_exceeded == 1 and rig.broker.counters.messages_dropped == 1
    assert not p.closed  # a refusal, not a punishment: the publisher retries later


def test_the_refused_message_gets_through_once_the_queue_has_room() -> None:
    rig = Rig(max_queued_messages=1)
    full_ingest(rig)
    p = rig.connect("pad-07")
    rig.send(p, Publish(TOPIC, b"a", qos=1, packet_id=1), Publish(TOPIC, b"b", qos=1, packet_id=2))
    assert rig.take(p) == [PubAck(1, 0), PubAck(2, ReasonCode.QUOTA_EXCEEDED)]
    back = rig.open()
    rig.send(back, Connect("ingest", clean_start=False, properties=EXPIRY))
    [ack, delivered] = rig.take(back)
    assert isinstance(ack, ConnAck) and isinstance(delivered, Publish) and delivered.payload == b"a"
    rig.send(back, PubAck(delivered.packet_id or 0))
    rig.lose(back)
    rig.send(p, Publish(TOPIC, b"b", qos=1, packet_id=3))  # the forwarder's retry
    assert rig.take(p) == [PubAck(3, 0)]
    assert queued(rig) == [b"b"]


def test_a_qos2_publish_nobody_could_take_gets_pubrec_0x97_and_its_id_is_free_again() -> None:
    rig = Rig(max_queued_messages=0)
    full_ingest(rig)
    p = rig.connect("pad-07")
    rig.send(p, Publish(TOPIC, b"x", qos=2, packet_id=4))
    assert rig.take(p) == [PubRec(4, ReasonCode.QUOTA_EXCEEDED)]
    rig.send(p, PubRel(4))  # not needed after a refusing PUBREC; the id is unknown now
    assert [type(x).__name__ for x in rig.take(p)] == ["PubComp"]
    session = rig.broker.session("pad-07")
    assert session is not None and session.inbound_qos2 == {}


def test_a_message_another_subscriber_took_is_acknowledged_and_the_drop_counted() -> None:
    rig = Rig(max_queued_messages=1)
    full_ingest(rig)
    dashboard = rig.connect("dashboard")
    sub(rig, dashboard, "fg/v1/#", qos=1)
    p = rig.connect("pad-07")
    rig.send(p, Publish(TOPIC, b"a", qos=1, packet_id=1), Publish(TOPIC, b"b", qos=1, packet_id=2))
    assert rig.take(p) == [PubAck(1, 0), PubAck(2, 0)]
    assert [m.payload for m in publishes(rig.take(dashboard))] == [b"a", b"b"]
    assert queued(rig) == [b"a"]
    assert rig.broker.counters.messages_dropped == 1 and rig.broker.counters.publish_quota_exceeded == 0


def test_no_subscriber_at_all_is_still_0x10_not_a_quota_refusal() -> None:
    rig = Rig(max_queued_messages=0)
    p = rig.connect("pad-07")
    rig.send(p, Publish("nobody/listens", b"x", qos=1, packet_id=1))
    assert rig.take(p) == [PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS)]


def test_a_v311_publisher_is_disconnected_unacknowledged_and_its_resend_is_taken_once_there_is_room() -> None:
    rig = Rig(max_queued_messages=1)
    full_ingest(rig)
    p = rig.connect("pad-07", MQTT_311, clean_start=False)
    rig.send(p, Publish(TOPIC, b"a", qos=1, packet_id=1), Publish(TOPIC, b"b", qos=1, packet_id=2),
             Publish(TOPIC, b"never-read", qos=1, packet_id=3))
    # 3.1.1 has no negative PUBACK: no ack for "b" and the connection ends (the later PUBLISH unread).
    assert rig.take(p) == [PubAck(1)] and p.closed
    assert queued(rig) == [b"a"]
    assert rig.broker.counters.publish_quota_exceeded == 1
    # The subscriber drains; the publisher resumes its session and resends what was not acknowledged.
    back = rig.open()
    rig.send(back, Connect("ingest", clean_start=False, properties=EXPIRY))
    [_ack, delivered] = rig.take(back)
    assert isinstance(delivered, Publish)
    rig.send(back, PubAck(delivered.packet_id or 0))
    again = rig.open(MQTT_311)
    rig.send(again, Connect("pad-07", protocol_level=MQTT_311, clean_start=False))
    [connack] = rig.take(again)
    assert isinstance(connack, ConnAck) and connack.session_present
    rig.send(again, Publish(TOPIC, b"b", qos=1, packet_id=2, dup=True))
    assert rig.take(again) == [PubAck(2)]
    assert [m.payload for m in publishes(rig.take(back))] == [b"b"]


def test_a_v311_publishers_quota_disconnect_publishes_its_will() -> None:
    rig = Rig(max_queued_messages=0)
    full_ingest(rig)
    watcher = rig.connect("watcher")
    sub(rig, watcher, "status/#", qos=0)
    p = rig.open(MQTT_311)
    rig.send(p, Connect("pad-07", protocol_level=MQTT_311, will=Will("status/pad-07", b"offline", 0)))
    rig.take(p)
    rig.send(p, Publish(TOPIC, b"x", qos=1, packet_id=1))
    assert p.closed and rig.take(p) == []
    assert [m.payload for m in publishes(rig.take(watcher))] == [b"offline"]


def test_a_v5_publisher_behind_a_journal_gets_0x97_in_order_after_its_held_acks() -> None:
    store = MemoryPersistence()
    rig = Rig(Broker(CoreSettings(allow_anonymous=True, max_queued_messages=1), journal=True), store)
    full_ingest(rig)
    p = rig.connect("pad-07")
    rig.auto_commit = False
    rig.send(p, Publish(TOPIC, b"a", qos=1, packet_id=1), Publish(TOPIC, b"b", qos=1, packet_id=2))
    assert rig.take(p) == []  # "a" waits for its commit, and "b"'s refusal waits behind it
    rig.commit()
    assert rig.take(p) == [PubAck(1, 0), PubAck(2, ReasonCode.QUOTA_EXCEEDED)]
    assert [d.delivery.message.payload for d in store.deliveries.values()] == [b"a"]


def test_the_brokers_own_messages_count_only_the_sessions_that_took_them() -> None:
    rig = Rig(max_queued_messages=0)
    full_ingest(rig)
    assert rig.broker.publish(Message(TOPIC, b"rule output", 1), rig.now) == 0
    live = rig.connect("live")
    sub(rig, live, TOPIC, qos=1)
    assert rig.broker.publish(Message(TOPIC, b"rule output", 1), rig.now) == 1


def test_qos0_publishes_to_full_queues_are_only_counted_even_at_v311() -> None:
    rig = Rig(max_queued_messages=0, queue_qos0_offline=True)
    full_ingest(rig)
    p = rig.connect("pad-07", MQTT_311)
    rig.send(p, Publish(TOPIC, b"x", qos=0))
    assert not p.closed and rig.take(p) == []
    assert rig.broker.counters.messages_dropped == 1


class QuotaHook:
    """A hook with a quota of its own (e.g. file-transfer storage) answers 0x97 itself."""

    def on_publish(self, client: ClientInfo, message: Message, ticket: int, packet_id: int) -> int | None:
        return ReasonCode.QUOTA_EXCEEDED if message.topic.startswith("$file/") else None


def test_a_hooks_own_0x97_is_acked_at_v311_like_its_other_refusals_not_a_disconnect() -> None:
    rig = Rig(Broker(CoreSettings(allow_anonymous=True), hooks=(QuotaHook(),)))
    v5, v311 = rig.connect("a"), rig.connect("b", MQTT_311)
    rig.send(v5, Publish("$file/f/0", b"seg", qos=1, packet_id=1))
    rig.send(v311, Publish("$file/f/0", b"seg", qos=1, packet_id=1))
    assert rig.take(v5) == [PubAck(1, ReasonCode.QUOTA_EXCEEDED)]
    assert rig.take(v311) == [PubAck(1)] and not v311.closed
    assert rig.broker.counters.publish_quota_exceeded == 0  # counts full subscriber queues only
