"""The core's deferred seams: held acknowledgements behind the journal and hooks, restore from the journal,
deferred authentication, congestion; and the SQLite store's agreement with the in-memory reference."""

from __future__ import annotations

from pathlib import Path

from cloud_broker.core.broker import Broker
from cloud_broker.core.hooks import ACK_LATER
from cloud_broker.core.model import AuthResult, ClientInfo, Message
from cloud_broker.core.persistence import MemoryPersistence, SaveDelivery
from cloud_broker.core.settings import CoreSettings
from cloud_broker.persistence.sqlite import SqlitePersistence
from cloud_broker.sys_topics import sys_messages
from tests.unit.test_broker_core import Rig, publishes, sub
from uplink.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
    Disconnect,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
)

EXPIRY = Properties(session_expiry_interval=3600)


def durable_rig(store: MemoryPersistence | None = None, **settings: object) -> Rig:
    broker = Broker(CoreSettings(allow_anonymous=True, **settings), journal=True)  # type: ignore[arg-type]
    return Rig(broker, store if store is not None else MemoryPersistence())


def test_a_puback_waits_until_the_message_is_durably_queued_for_a_persistent_subscriber() -> None:
    rig = durable_rig()
    s = rig.connect("s", properties=EXPIRY)
    sub(rig, s, "t", qos=1)
    rig.lose(s)
    p = rig.connect("p")
    rig.auto_commit = False
    rig.send(p, Publish("t", b"m", qos=1, packet_id=7))
    assert rig.take(p) == []
    assert rig.store is not None
    assert [d.delivery.message.payload for d in rig.store.deliveries.values()] == [b"m"]
    rig.commit()
    assert rig.take(p) == [PubAck(7, ReasonCode.SUCCESS)]


def test_acks_that_need_no_durability_still_wait_behind_earlier_held_ones() -> None:
    rig = durable_rig()
    s = rig.connect("s", properties=EXPIRY)
    sub(rig, s, "durable", qos=1)
    rig.lose(s)
    p = rig.connect("p")
    rig.auto_commit = False
    rig.send(p, Publish("durable", b"1", qos=1, packet_id=1), Publish("nobody", b"2", qos=1, packet_id=2),
             Publish("nobody", b"3", qos=2, packet_id=3))
    assert rig.take(p) == []
    rig.commit()
    assert rig.take(p) == [PubAck(1, 0), PubAck(2, ReasonCode.NO_MATCHING_SUBSCRIBERS),
                           PubRec(3, ReasonCode.NO_MATCHING_SUBSCRIBERS)]


def test_clean_sessions_cost_no_journal_and_no_waiting() -> None:
    rig = durable_rig()
    s = rig.connect("s")
    sub(rig, s, "t", qos=1)
    p = rig.connect("p")
    rig.auto_commit = False
    rig.send(p, Publish("t", b"m", qos=1, packet_id=1))
    assert rig.take(p) == [PubAck(1, 0)]
    assert not rig.broker.has_journal() and rig.store is not None and not rig.store.deliveries


def test_a_restart_resends_in_flight_messages_with_their_packet_ids_and_dup_then_the_queue() -> None:
    store = MemoryPersistence()
    rig = durable_rig(store, max_inflight_messages=2)
    s = rig.connect("s", properties=EXPIRY, clean_start=False)
    sub(rig, s, "t", qos=2)
    p = rig.connect("p")
    for i in range(4):
        rig.send(p, Publish("t", str(i).encode(), qos=2, packet_id=i + 1))
    first = publishes(rig.take(s))
    assert [m.payload for m in first] == [b"0", b"1"]  # the window is 2
    rig.send(s, PubRec(first[0].packet_id or 0))  # released (PUBREL sent), awaiting PUBCOMP

    again = Broker(CoreSettings(allow_anonymous=True, max_inflight_messages=2), journal=True)
    again.restore(store.load(), 0.0)
    rig2 = Rig(again, store)
    back = rig2.open()
    rig2.send(back, Connect("s", clean_start=False, properties=EXPIRY))
    packets = rig2.take(back)
    assert isinstance(packets[0], ConnAck) and packets[0].session_present
    assert packets[1] == PubRel(first[0].packet_id or 0)
    resent = packets[2]
    assert isinstance(resent, Publish) and resent.dup and resent.payload == b"1"
    assert resent.packet_id == first[1].packet_id
    rig2.send(back, PubComp(first[0].packet_id or 0))
    later = publishes(rig2.take(back))
    assert [m.payload for m in later] == [b"2"] and not later[0].dup


def test_acknowledged_deliveries_leave_the_store() -> None:
    store = MemoryPersistence()
    rig = durable_rig(store)
    s = rig.connect("s", properties=EXPIRY)
    sub(rig, s, "t", qos=1)
    p = rig.connect("p")
    rig.send(p, Publish("t", b"x", qos=1, packet_id=1))
    [msg] = publishes(rig.take(s))
    assert len(store.deliveries) == 1
    rig.send(s, PubAck(msg.packet_id or 0))
    assert store.deliveries == {}


class Later:
    def __init__(self) -> None:
        self.tickets: list[int] = []

    def on_publish(self, client: ClientInfo, message: Message, ticket: int, packet_id: int) -> int | None:
        if message.topic.startswith("$file/"):
            self.tickets.append(ticket)
            return ACK_LATER
        return None


def test_a_hook_can_settle_an_acknowledgement_later_and_later_acks_wait_for_it() -> None:
    hook = Later()
    rig = Rig(Broker(CoreSettings(allow_anonymous=True), hooks=(hook,)))
    c = rig.connect("c")
    rig.send(c, Publish("$file/a/0", b"seg", qos=1, packet_id=1), Publish("x", b"", qos=1, packet_id=2))
    assert rig.take(c) == []
    rig.broker.complete_ack(hook.tickets[0], ReasonCode.UNSPECIFIED_ERROR, rig.now)
    rig.advance(0)
    assert rig.take(c) == [PubAck(1, ReasonCode.UNSPECIFIED_ERROR),
                           PubAck(2, ReasonCode.NO_MATCHING_SUBSCRIBERS)]


def test_a_deferred_authentication_runs_the_packets_pipelined_behind_connect_afterwards() -> None:
    rig = Rig(Broker(CoreSettings(), deferred_auth=True))
    c = rig.open()
    rig.send(c, Connect("dev1", username="dev1", password=b"pw"), Publish("x", b"v", qos=1, packet_id=1))
    [request] = rig.broker.drain_auth_requests()
    assert (request.username, request.password, request.conn_id) == ("dev1", b"pw", c.conn_id)
    assert rig.take(c) == []
    rig.broker.auth_completed(c.conn_id, AuthResult(0, "dev1", "device"), rig.now)
    rig.advance(0)
    packets = rig.take(c)
    assert isinstance(packets[0], ConnAck) and packets[0].reason_code == 0
    assert packets[1:] == [PubAck(1, ReasonCode.NO_MATCHING_SUBSCRIBERS)]


def test_a_refused_deferred_authentication_gets_its_reason_code_and_is_closed() -> None:
    rig = Rig(Broker(CoreSettings(), deferred_auth=True))
    c = rig.open(MQTT_311)
    rig.send(c, Connect("d", protocol_level=MQTT_311, username="d", password=b"bad"))
    [request] = rig.broker.drain_auth_requests()
    rig.broker.auth_completed(request.conn_id, AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD), rig.now)
    rig.advance(0)
    assert rig.take(c) == [ConnAck(False, 4)] and c.closed
    assert rig.broker.counters.auth_failures == 1


def test_a_congested_subscriber_loses_qos0_counted_and_gets_qos1_once_it_drains() -> None:
    rig = Rig()
    s = rig.connect("s")
    sub(rig, s, "t", qos=1)
    p = rig.connect("p")
    rig.broker.set_congested(s.conn_id, True, rig.now)
    rig.send(p, Publish("t", b"q0"), Publish("t", b"q1", qos=1, packet_id=1))
    assert rig.take(s) == []
    assert rig.broker.counters.qos0_dropped_congested == 1
    rig.broker.set_congested(s.conn_id, False, rig.now)
    rig.advance(0)
    assert [m.payload for m in publishes(rig.take(s))] == [b"q1"]


def test_the_sqlite_store_agrees_with_the_memory_reference_and_keeps_expiry_in_wall_clock(
        tmp_path: Path) -> None:
    memory = MemoryPersistence()
    rig = durable_rig(memory)
    s = rig.connect("s", properties=EXPIRY)
    sub(rig, s, "t/#", qos=1)
    rig.lose(s)
    p = rig.connect("p")
    props = Properties(message_expiry_interval=100, response_topic="r/1", correlation_data=b"c",
                       user_properties=(("k", "v"),))
    rig.send(p, Publish("t/a", b"with-props", qos=1, packet_id=1, properties=props))
    rig.send(p, Publish("t/b", b"retained", qos=1, packet_id=2, retain=True))
    sqlite = SqlitePersistence(tmp_path / "s.db", synchronous="normal")
    # Replay what the core journaled (the rig applied it to memory) into SQLite at wall offset 5000 s.
    intents = _replay(memory)
    sqlite.apply(intents, clock_offset_s=5000.0)
    # Loaded 40 s of wall time later by a process whose monotonic clock has a different origin.
    loaded = sqlite.load(clock_offset_s=5040.0)
    reference = memory.load()
    assert [r.client_id for r in loaded.sessions] == ["s"]
    assert loaded.sessions[0].subscriptions == reference.sessions[0].subscriptions
    assert [d.delivery.message.payload for d in loaded.deliveries] == [b"with-props", b"retained"]
    msg = loaded.deliveries[0].delivery.message
    assert msg.properties == props
    ref_expiry = reference.deliveries[0].delivery.message.expires_at
    assert ref_expiry is not None and msg.expires_at == ref_expiry - 40.0
    assert [m.payload for m in loaded.retained] == [b"retained"]
    sqlite.close()


def _replay(memory: MemoryPersistence) -> list[SaveDelivery]:
    from cloud_broker.core.persistence import SaveRetained, SaveSession

    out: list = []  # type: ignore[type-arg]
    out += [SaveSession(r) for r in memory.sessions.values()]
    out += [SaveDelivery(d.client_id, d.seq, d.delivery, d.packet_id) for d in memory.deliveries.values()]
    out += [SaveRetained(m) for m in memory.retained.values()]
    return out


def test_a_delivery_saved_and_acknowledged_within_one_group_never_reaches_the_disk(tmp_path: Path) -> None:
    from cloud_broker.core.model import StoredDelivery
    from cloud_broker.core.persistence import DeleteDelivery

    sqlite = SqlitePersistence(tmp_path / "s.db", synchronous="normal")
    d = StoredDelivery(Message("t", b"x", 1), 1, False)
    sqlite.apply([SaveDelivery("c", 1, d, 5), DeleteDelivery("c", 1), SaveDelivery("c", 2, d)], 0.0)
    assert [r.seq for r in sqlite.load(0.0).deliveries] == [2]
    sqlite.close()


def test_sys_messages_are_retained_decimal_statistics() -> None:
    rig = Rig()
    rig.connect("a")
    messages = {m.topic: m for m in sys_messages(rig.broker.stats(), 12.7, "9.9")}
    assert messages["$SYS/broker/clients/connected"].payload == b"1"
    assert messages["$SYS/broker/uptime"].payload == b"12 seconds"
    assert all(m.retain and m.qos == 0 for m in messages.values())
    assert {"$SYS/broker/messages/received", "$SYS/broker/bytes/sent", "$SYS/broker/version"} <= set(messages)


def test_sys_topics_are_never_journaled() -> None:
    rig = durable_rig()
    rig.broker.publish(Message("$SYS/broker/uptime", b"1 seconds", 0, True), rig.now)
    assert not rig.broker.has_journal()
    assert rig.broker.stats()["retained"] == 1 and MQTT_5 == 5


def test_request_response_properties_pass_through_and_expiry_counts_down() -> None:
    rig = Rig()
    responder, requester = rig.connect("agent"), rig.connect("operator")
    sub(rig, responder, "fg/v1/agent/cmd", qos=1)
    props = Properties(response_topic="fg/v1/agent/reply/7", correlation_data=b"\x01\x02",
                       content_type="application/json", user_properties=(("trace", "t1"),),
                       message_expiry_interval=60, payload_format_indicator=1)
    rig.send(requester, Publish("fg/v1/agent/cmd", b"{}", qos=1, packet_id=1, properties=props))
    [got] = publishes(rig.take(responder))
    assert got.properties.response_topic == "fg/v1/agent/reply/7"
    assert got.properties.correlation_data == b"\x01\x02"
    assert got.properties.user_properties == (("trace", "t1"),)
    assert got.properties.content_type == "application/json" and got.properties.payload_format_indicator == 1
    assert got.properties.message_expiry_interval == 60
    rig.lose(responder)
    late = rig.open()
    rig.send(late, Connect("agent2"))
    rig.take(late)
    sub(rig, late, "fg/v1/agent/cmd", qos=1)
    rig.send(requester, Publish("fg/v1/agent/cmd", b"{}", qos=1, packet_id=2, retain=True, properties=props))
    rig.take(late)
    rig.advance(45)
    fresh = rig.connect("agent3")
    sub(rig, fresh, "fg/v1/agent/cmd", qos=1)
    [retained] = publishes(fresh.inbox)
    assert retained.properties.message_expiry_interval == 15  # 60 s minus the 45 s it waited (MQTT 3.3.2.3.3)


def test_clients_cannot_publish_into_the_brokers_sys_tree() -> None:
    rig = Rig()
    spy, c = rig.connect("spy"), rig.connect("c")
    sub(rig, spy, "$SYS/#")
    rig.send(c, Publish("$SYS/broker/clients/connected", b"9999", qos=1, packet_id=1))
    assert rig.take(c) == [PubAck(1, ReasonCode.NOT_AUTHORIZED)]
    assert rig.take(spy) == []


def test_acks_held_beyond_the_receive_maximum_end_the_connection_with_0x93() -> None:
    rig = durable_rig(receive_maximum=2)
    s = rig.connect("s", properties=EXPIRY)
    sub(rig, s, "t", qos=1)
    rig.lose(s)
    p = rig.connect("p")
    rig.auto_commit = False
    rig.send(p, *[Publish("t", b"m", qos=1, packet_id=i) for i in (1, 2, 3)])
    assert rig.take(p) == [Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)] and p.closed
