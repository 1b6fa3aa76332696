"""Inbound QoS 2 stays exactly once across lost connections and restarts (issue 6, finding 4): a resent
PUBLISH is acknowledged only once its first copy is durable and is never routed twice, also after the
broker restarted from its store (in-memory reference and SQLite); an id is freed (PUBCOMP) only once
its deletion is durable."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from cloud_broker.core.broker import Broker
from cloud_broker.core.hooks import ACK_LATER
from cloud_broker.core.model import ClientInfo, Message
from cloud_broker.core.persistence import (
    InboundQos2Record,
    Intent,
    MemoryPersistence,
    SaveInboundQos2,
    StoredState,
)
from cloud_broker.core.settings import CoreSettings
from cloud_broker.persistence.sqlite import SCHEMA_VERSION, SqlitePersistence
from tests.unit.test_broker_core import Client, Rig, sub
from uplink.mqtt.packets import (
    MQTT_311,
    ConnAck,
    Connect,
    Properties,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
)

EXPIRY = Properties(session_expiry_interval=3600)


class SqliteBackedStore(MemoryPersistence):
    """Plays the server's journal writer for the rig, on a real SQLite file (every intent goes to disk;
    `load` reads the file back)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.sqlite = SqlitePersistence(path, synchronous="normal")

    def apply(self, intents: Sequence[Intent], clock_offset_s: float = 0.0) -> None:
        self.sqlite.apply(intents, clock_offset_s)

    def load(self, clock_offset_s: float = 0.0) -> StoredState:
        return self.sqlite.load(clock_offset_s)

    def close(self) -> None:
        self.sqlite.close()


def durable_rig(store: MemoryPersistence, **settings: object) -> Rig:
    broker = Broker(CoreSettings(allow_anonymous=True, **settings), journal=True)  # type: ignore[arg-type]
    return Rig(broker, store)


def restarted(store: MemoryPersistence) -> Rig:
    """A new broker process: restored from what the store holds, nothing else."""
    broker = Broker(CoreSettings(allow_anonymous=True), journal=True)
    broker.restore(store.load(), 0.0)
    return Rig(broker, store)


def offline_subscriber(rig: Rig, topic: str = "t/#") -> None:
    s = rig.connect("sub", properties=EXPIRY)
    sub(rig, s, topic, qos=2)
    rig.lose(s)


def resume(rig: Rig, client_id: str, level: int = 5) -> Client:
    c = rig.open(level)
    if level == MQTT_311:
        rig.send(c, Connect(client_id, protocol_level=level, clean_start=False))
    else:
        rig.send(c, Connect(client_id, clean_start=False, properties=EXPIRY))
    [ack] = rig.take(c)
    assert isinstance(ack, ConnAck) and ack.session_present
    return c


def queued_payloads(rig: Rig, client_id: str = "sub") -> list[bytes]:
    session = rig.broker.session(client_id)
    assert session is not None
    return [d.message.payload for d in (*session.inflight.values(), *session.pending)]


def test_a_resent_qos2_publish_gets_its_pubrec_only_once_the_first_copys_batch_is_committed() -> None:
    rig = durable_rig(MemoryPersistence())
    offline_subscriber(rig)
    p = rig.connect("pub", properties=EXPIRY)
    rig.auto_commit = False
    rig.commit()
    rig.send(p, Publish("t/x", b"hello", qos=2, packet_id=7))
    first_batch = rig.applied_batch
    assert rig.take(p) == []  # held: the delivery to "sub" is not durable yet
    rig.lose(p)  # the held PUBREC dies with the connection
    again = resume(rig, "pub")
    rig.send(again, Publish("t/x", b"hello", qos=2, packet_id=7, dup=True))
    assert rig.take(again) == [], "a PUBREC before the first copy is durable promises a message a crash loses"
    rig.broker.journal_committed(first_batch, rig.now)
    rig.advance(0)
    assert rig.take(again) == [PubRec(7, ReasonCode.SUCCESS)]
    assert queued_payloads(rig) == [b"hello"]  # routed once


def test_a_restart_does_not_route_a_resent_qos2_publish_a_second_time() -> None:
    store = MemoryPersistence()
    rig = durable_rig(store)
    offline_subscriber(rig)
    p = rig.connect("pub", properties=EXPIRY)
    rig.send(p, Publish("t/x", b"once", qos=2, packet_id=7))
    assert rig.take(p) == [PubRec(7, ReasonCode.SUCCESS)]  # the broker owns it now; PUBREL not yet sent

    rig2 = restarted(store)
    p2 = resume(rig2, "pub")
    rig2.send(p2, Publish("t/x", b"once", qos=2, packet_id=7, dup=True))
    assert rig2.take(p2) == [PubRec(7, ReasonCode.SUCCESS)]
    assert queued_payloads(rig2) == [b"once"]
    rig2.send(p2, PubRel(7))
    assert rig2.take(p2) == [PubComp(7, ReasonCode.SUCCESS)]  # known id, not 0x92
    assert store.inbound_qos2 == set()


def test_the_inbound_qos2_ids_survive_a_restart_through_sqlite_and_leave_with_pubrel(tmp_path: Path) -> None:
    store = SqliteBackedStore(tmp_path / "broker.sqlite3")
    rig = durable_rig(store)
    offline_subscriber(rig)
    p = rig.connect("pub", properties=EXPIRY)
    rig.send(p, Publish("t/x", b"a", qos=2, packet_id=7), Publish("t/x", b"b", qos=2, packet_id=8))
    assert rig.take(p) == [PubRec(7, 0), PubRec(8, 0)]
    rig.send(p, PubRel(8))
    assert rig.take(p) == [PubComp(8, 0)]
    store.close()

    reopened = SqliteBackedStore(tmp_path / "broker.sqlite3")
    assert reopened.load().inbound_qos2 == (InboundQos2Record("pub", 7),)
    rig2 = restarted(reopened)
    p2 = resume(rig2, "pub")
    rig2.send(p2, Publish("t/x", b"a", qos=2, packet_id=7, dup=True))
    assert rig2.take(p2) == [PubRec(7, 0)]
    # Id 8 was released before the restart: the client may reuse it, and the new message is routed.
    rig2.send(p2, Publish("t/x", b"c", qos=2, packet_id=8))
    assert rig2.take(p2) == [PubRec(8, 0)]
    assert queued_payloads(rig2) == [b"a", b"b", b"c"]
    rig2.send(p2, PubRel(7), PubRel(8))
    assert rig2.take(p2) == [PubComp(7, 0), PubComp(8, 0)]
    assert reopened.load().inbound_qos2 == ()
    reopened.close()


def test_ending_a_session_forgets_its_stored_inbound_qos2_ids(tmp_path: Path) -> None:
    store = SqliteBackedStore(tmp_path / "broker.sqlite3")
    rig = durable_rig(store)
    offline_subscriber(rig)
    p = rig.connect("pub", properties=EXPIRY)
    rig.send(p, Publish("t/x", b"a", qos=2, packet_id=7))
    rig.lose(p)
    fresh = rig.open()
    rig.send(fresh, Connect("pub", clean_start=True))  # clean start: the old session and its ids go
    rig.take(fresh)
    assert store.load().inbound_qos2 == ()
    store.close()


def test_a_pubcomp_waits_until_the_freed_id_is_durable_also_for_a_resent_pubrel() -> None:
    rig = durable_rig(MemoryPersistence())
    p = rig.connect("pub", properties=EXPIRY)
    rig.send(p, Publish("nobody/listens", b"x", qos=2, packet_id=3))
    assert rig.take(p) == [PubRec(3, ReasonCode.NO_MATCHING_SUBSCRIBERS)]
    rig.auto_commit = False
    rig.send(p, PubRel(3))
    assert rig.take(p) == [], "PUBCOMP lets the client reuse id 3; a crash now would revive it"
    rig.lose(p)
    again = resume(rig, "pub")
    rig.send(again, PubRel(3))  # the resent PUBREL of an exchange whose deletion is still in flight
    assert rig.take(again) == []
    rig.commit()
    assert rig.take(again) == [PubComp(3, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)]


def test_a_clean_session_publisher_journals_nothing_for_qos2_and_waits_for_nothing() -> None:
    rig = durable_rig(MemoryPersistence())
    p = rig.connect("pub")
    rig.auto_commit = False
    rig.send(p, Publish("nobody", b"x", qos=2, packet_id=1))
    rig.send(p, PubRel(1))
    assert rig.take(p) == [PubRec(1, ReasonCode.NO_MATCHING_SUBSCRIBERS), PubComp(1, 0)]
    assert not rig.broker.has_journal()


def test_the_inbound_qos2_id_is_journaled_in_the_same_batch_as_the_messages_deliveries() -> None:
    broker = Broker(CoreSettings(allow_anonymous=True), journal=True)
    rig = Rig(broker)  # no store: the test reads the journal itself
    offline_subscriber(rig)
    broker.drain_journal()
    p = rig.connect("pub", properties=EXPIRY)
    broker.drain_journal()
    rig.send(p, Publish("t/x", b"m", qos=2, packet_id=9))
    _batch, intents = broker.drain_journal()
    assert [type(i).__name__ for i in intents] == ["SaveDelivery", "SaveInboundQos2"]
    assert intents[-1] == SaveInboundQos2("pub", 9)


class LaterForFiles:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_publish(self, client: ClientInfo, message: Message, ticket: int, packet_id: int) -> int | None:
        if message.topic.startswith("$file/"):
            self.seen.append(ticket)
            return ACK_LATER
        return None


def test_a_qos2_resend_whose_hook_verdict_died_with_the_connection_goes_to_the_hook_again() -> None:
    hook = LaterForFiles()
    rig = Rig(Broker(CoreSettings(allow_anonymous=True), hooks=(hook,)))
    p = rig.connect("pub", properties=EXPIRY)
    rig.send(p, Publish("$file/f1/0", b"segment", qos=2, packet_id=5))
    assert rig.take(p) == [] and len(hook.seen) == 1
    rig.lose(p)
    again = resume(rig, "pub")
    rig.send(again, Publish("$file/f1/0", b"segment", qos=2, packet_id=5, dup=True))
    assert rig.take(again) == [], "a PUBREC 0x00 here would claim a verdict nobody gave"
    assert len(hook.seen) == 2
    rig.broker.complete_ack(hook.seen[1], ReasonCode.SUCCESS, rig.now)
    rig.advance(0)
    assert rig.take(again) == [PubRec(5, 0)]


def test_a_version_1_state_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "INSERT INTO meta VALUES ('schema_version', '1');")
    db.close()
    store = SqlitePersistence(path, synchronous="normal")
    assert store.load(0.0).inbound_qos2 == ()
    store.close()
    db = sqlite3.connect(path)
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),) and SCHEMA_VERSION == 2
    db.close()


def test_a_v311_publisher_gets_the_same_exactly_once_after_a_restart() -> None:
    store = MemoryPersistence()
    rig = durable_rig(store)
    offline_subscriber(rig)
    p = rig.connect("pub", MQTT_311, clean_start=False)
    rig.send(p, Publish("t/x", b"once", qos=2, packet_id=2))
    assert rig.take(p) == [PubRec(2)]
    rig2 = restarted(store)
    p2 = resume(rig2, "pub", MQTT_311)
    rig2.send(p2, Publish("t/x", b"once", qos=2, packet_id=2, dup=True))
    assert rig2.take(p2) == [PubRec(2)]
    assert queued_payloads(rig2) == [b"once"]
