"""SQLite storage of the broker's durable state (sessions, their queued and in-flight deliveries,
retained messages): every SQL statement of the broker lives here.

Each persistent session's unreleased inbound QoS 2 packet ids have their own table (`inbound_qos2`):
they change with every QoS 2 message, the session row rarely.

The store is driven from one thread (the journal writer, or the caller at start). `apply` runs a
whole group of intents in one transaction and returns once it is durable, which is what lets the
broker acknowledge a QoS 1/2 message only after it is safely queued for every persistent subscriber.
WAL mode keeps commits cheap; `synchronous=FULL` (default) survives power loss, `NORMAL` survives a
crash of the process (SIGKILL) but may lose the last commits on power loss.

Expiry times arrive as monotonic seconds and are stored as wall-clock seconds (wall = monotonic +
offset), so a message's Message Expiry Interval and a detached session's expiry keep running while the
broker is down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from cloud_broker.core.model import Message, StoredDelivery, SubscriptionEntry
from cloud_broker.core.persistence import (
    DeleteDelivery,
    DeleteInboundQos2,
    DeleteRetained,
    DeleteSession,
    InboundQos2Record,
    Intent,
    MarkReleased,
    MarkSent,
    QueuedRecord,
    SaveDelivery,
    SaveInboundQos2,
    SaveRetained,
    SaveSession,
    SessionRecord,
    StoredState,
)
from uplink.mqtt.packets import NO_PROPERTIES, PacketType, Properties
from uplink.mqtt.properties import decode_properties, encode_properties

SCHEMA_VERSION = 2  # 2: inbound_qos2 (a version 1 file is upgraded in place: the table is added)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, props BLOB,
    expires_at_wall REAL, publisher_id TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY, protocol_level INTEGER NOT NULL, expiry_interval_s INTEGER NOT NULL,
    subscriptions BLOB NOT NULL, expires_at_wall REAL
);
CREATE TABLE IF NOT EXISTS deliveries (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, packet_id INTEGER, released INTEGER NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, sub_ids TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, msg_qos INTEGER NOT NULL, msg_retain INTEGER NOT NULL,
    props BLOB, expires_at_wall REAL, publisher_id TEXT,
    PRIMARY KEY (client_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbound_qos2 (
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL, PRIMARY KEY (client_id, packet_id)
) WITHOUT ROWID;
"""

_subs_encoder = msgspec.json.Encoder()
_subs_decoder = msgspec.json.Decoder(tuple[SubscriptionEntry, ...])


class StoreError(RuntimeError):
    """The state file cannot be used (corrupt, newer schema, unwritable): fix or move it, then restart."""


def _props_blob(props: Properties) -> bytes | None:
    return None if props is NO_PROPERTIES else encode_properties(props, PacketType.PUBLISH)


def _props_from(blob: bytes | None) -> Properties:
    if not blob:
        return NO_PROPERTIES
    props, _ = decode_properties(memoryview(blob), 0, len(blob), PacketType.PUBLISH)
    return props


def _wall(mono: float | None, offset_s: float) -> float | None:
    return None if mono is None else mono + offset_s


def _mono(wall: float | None, offset_s: float) -> float | None:
    return None if wall is None else wall - offset_s


class SqlitePersistence:
    """The broker's state in one SQLite file. Not thread-safe: one thread at a time uses it."""

    def __init__(self, path: str | Path, synchronous: Literal["full", "normal"] = "full") -> None:
        self.path = Path(path)
        try:
            # isolation_level=None: transactions are explicit (BEGIN ... COMMIT) below.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {row[0]}, newer than this broker's "
                                 f"{SCHEMA_VERSION}: run a newer broker or move the file away")
            if row is None or int(row[0]) < SCHEMA_VERSION:
                # Older files only lack tables, which the schema script above just created; the new
                # version number keeps older brokers (which would ignore those tables) away from it.
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open broker state {self.path}: {exc} (move the file away to start "
                             "empty)") from exc

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- write

    def apply(self, intents: Sequence[Intent], clock_offset_s: float) -> None:
        """Apply a group of intents in order, in one transaction; durable when this returns."""
        skip = _cancelled_pairs(intents)
        db = self._db
        try:
            db.execute("BEGIN")
            for i, intent in enumerate(intents):
                if i in skip:
                    continue
                self._apply_one(intent, clock_offset_s)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"cannot write broker state {self.path}: {exc}") from exc

    def _apply_one(self, intent: Intent, offset_s: float) -> None:
        db = self._db
        if isinstance(intent, SaveDelivery):
            d = intent.delivery
            m = d.message
            db.execute(
                "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (intent.client_id, intent.seq, intent.packet_id, d.qos, int(d.retain),
                 ",".join(map(str, d.subscription_ids)), m.topic, m.payload, m.qos, int(m.retain),
                 _props_blob(m.properties), _wall(m.expires_at, offset_s), m.publisher_id))
        elif isinstance(intent, DeleteDelivery):
            db.execute("DELETE FROM deliveries WHERE client_id = ? AND seq = ?",
                       (intent.client_id, intent.seq))
        elif isinstance(intent, MarkSent):
            db.execute("UPDATE deliveries SET packet_id = ? WHERE client_id = ? AND seq = ?",
                       (intent.packet_id, intent.client_id, intent.seq))
        elif isinstance(intent, MarkReleased):
            db.execute("UPDATE deliveries SET released = 1 WHERE client_id = ? AND seq = ?",
                       (intent.client_id, intent.seq))
        elif isinstance(intent, SaveSession):
            r = intent.record
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
                       (r.client_id, r.protocol_level, r.expiry_interval_s,
                        _subs_encoder.encode(r.subscriptions), _wall(r.expires_at, offset_s)))
        elif isinstance(intent, DeleteSession):
            db.execute("DELETE FROM sessions WHERE client_id = ?", (intent.client_id,))
            db.execute("DELETE FROM deliveries WHERE client_id = ?", (intent.client_id,))
            db.execute("DELETE FROM inbound_qos2 WHERE client_id = ?", (intent.client_id,))
        elif isinstance(intent, SaveInboundQos2):
            db.execute("INSERT OR IGNORE INTO inbound_qos2 VALUES (?, ?)",
                       (intent.client_id, intent.packet_id))
        elif isinstance(intent, DeleteInboundQos2):
            db.execute("DELETE FROM inbound_qos2 WHERE client_id = ? AND packet_id = ?",
                       (intent.client_id, intent.packet_id))
        elif isinstance(intent, SaveRetained):
            m = intent.message
            db.execute("INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?, ?)",
                       (m.topic, m.payload, m.qos, _props_blob(m.properties), _wall(m.expires_at, offset_s),
                        m.publisher_id))
        elif isinstance(intent, DeleteRetained):
            db.execute("DELETE FROM retained WHERE topic = ?", (intent.topic,))

    # ---------------------------------------------------------------- read

    def load(self, clock_offset_s: float) -> StoredState:
        """Everything stored, with expiry times turned back into this process's monotonic clock."""
        db = self._db
        try:
            retained = tuple(
                Message(topic, bytes(payload), qos, True, _props_from(props), _mono(exp, clock_offset_s), pub)
                for topic, payload, qos, props, exp, pub in db.execute(
                    "SELECT topic, payload, qos, props, expires_at_wall, publisher_id FROM retained"))
            sessions = tuple(
                SessionRecord(cid, level, expiry, _subs_decoder.decode(subs), _mono(exp, clock_offset_s))
                for cid, level, expiry, subs, exp in db.execute(
                    "SELECT client_id, protocol_level, expiry_interval_s, subscriptions, expires_at_wall "
                    "FROM sessions"))
            deliveries = tuple(
                QueuedRecord(
                    cid, seq,
                    StoredDelivery(
                        Message(topic, bytes(payload), msg_qos, bool(msg_retain), _props_from(props),
                                _mono(exp, clock_offset_s), pub),
                        qos, bool(retain), tuple(int(x) for x in sub_ids.split(",") if x)),
                    pid, bool(released))
                for (cid, seq, pid, released, qos, retain, sub_ids, topic, payload, msg_qos, msg_retain,
                     props, exp, pub) in db.execute("SELECT * FROM deliveries ORDER BY client_id, seq"))
            inbound = tuple(
                InboundQos2Record(cid, pid) for cid, pid in db.execute(
                    "SELECT client_id, packet_id FROM inbound_qos2 ORDER BY client_id, packet_id"))
        except (sqlite3.DatabaseError, msgspec.DecodeError, ValueError) as exc:
            raise StoreError(f"cannot read broker state {self.path}: {exc} (move the file away to start "
                             "empty)") from exc
        return StoredState(retained, sessions, deliveries, inbound)


def _cancelled_pairs(intents: Sequence[Intent]) -> set[int]:
    """Indexes of intents that cancel out within this group: a delivery saved and deleted again (the
    subscriber acknowledged it before the commit) never needs to touch the disk. Only for clients
    whose session is not deleted in the same group, where a sequence number could be reused."""
    deleted: dict[tuple[str, int], int] = {}
    dropped_clients: set[str] = set()
    for i, intent in enumerate(intents):
        if isinstance(intent, DeleteDelivery):
            deleted[(intent.client_id, intent.seq)] = i
        elif isinstance(intent, DeleteSession):
            dropped_clients.add(intent.client_id)
    if not deleted:
        return set()
    skip: set[int] = set()
    saved: set[tuple[str, int]] = set()
    for i, intent in enumerate(intents):
        if isinstance(intent, SaveDelivery | MarkSent | MarkReleased | DeleteDelivery):
            key = (intent.client_id, intent.seq)
            if key[0] in dropped_clients or key not in deleted:
                continue
            if isinstance(intent, SaveDelivery):
                saved.add(key)
            if key in saved and i <= deleted[key]:
                skip.add(i)
    return skip
