"""What the core asks durable storage to do (intents), what it restores from, and an in-memory store.

Theory of operation. The core never calls storage. While it runs it appends intents (`SaveDelivery`,
`DeleteDelivery`, `SaveSession`, ...) to a journal, in the order the state changed; the owner takes
them with `Broker.drain_journal()` as one numbered batch, applies batches in order on a writer thread
(`Persistence.apply`, one transaction per group of batches) and reports the highest committed batch
back with `Broker.journal_committed()`. Acknowledgements that promise durability (PUBACK/PUBREC of a
message that landed in a persistent session's queue, or in the retained store) are held by the core
until their batch is committed. On start the owner loads a `StoredState` and hands it to
`Broker.restore()`.

Besides queues and retained messages, storage keeps each persistent session's inbound QoS 2 packet ids
(`SaveInboundQos2` / `DeleteInboundQos2`): without them a restart would route a resent QoS 2 PUBLISH a
second time. SaveSession does not touch them; DeleteSession forgets them with the session.

Times inside intents and records are the core's monotonic seconds. A store that outlives the process
translates them to wall-clock time with the offset it is given (wall = monotonic + offset), so a
message's expiry and a detached session's expiry keep counting down across restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from cloud_broker.core.model import Message, StoredDelivery, SubscriptionEntry


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A persistent session's own state (its queue is stored per delivery, see `QueuedRecord`).

    `expires_at` is set while the session is detached (monotonic seconds), None while attached or
    when it never expires.
    """

    client_id: str
    protocol_level: int
    expiry_interval_s: int
    subscriptions: tuple[SubscriptionEntry, ...]
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class QueuedRecord:
    """One delivery owed to a session. `seq` orders a session's deliveries; `packet_id` is set once
    it went in flight (it is resent with the same id), `released` once a QoS 2 PUBREL went out."""

    client_id: str
    seq: int
    delivery: StoredDelivery
    packet_id: int | None = None
    released: bool = False


@dataclass(frozen=True, slots=True)
class InboundQos2Record:
    """A QoS 2 PUBLISH a session's client sent us that we routed and whose PUBREL has not arrived: a
    resend with this packet id is acknowledged, never routed again (exactly once across restarts)."""

    client_id: str
    packet_id: int


@dataclass(frozen=True, slots=True)
class StoredState:
    retained: tuple[Message, ...] = ()
    sessions: tuple[SessionRecord, ...] = ()
    deliveries: tuple[QueuedRecord, ...] = ()
    inbound_qos2: tuple[InboundQos2Record, ...] = ()


# ------------------------------------------------------------------------------------------ intents


@dataclass(frozen=True, slots=True)
class SaveSession:
    record: SessionRecord


@dataclass(frozen=True, slots=True)
class DeleteSession:
    """Forget the session and every delivery it was owed."""

    client_id: str


@dataclass(frozen=True, slots=True)
class SaveDelivery:
    client_id: str
    seq: int
    delivery: StoredDelivery
    packet_id: int | None = None


@dataclass(frozen=True, slots=True)
class MarkSent:
    client_id: str
    seq: int
    packet_id: int


@dataclass(frozen=True, slots=True)
class MarkReleased:
    client_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class DeleteDelivery:
    client_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class SaveInboundQos2:
    """The client's QoS 2 PUBLISH with this packet id was routed; journaled in the same batch as its
    deliveries, so after a crash either both exist or neither does."""

    client_id: str
    packet_id: int


@dataclass(frozen=True, slots=True)
class DeleteInboundQos2:
    """Its PUBREL arrived (or the message was refused): the packet id is free for a new message."""

    client_id: str
    packet_id: int


@dataclass(frozen=True, slots=True)
class SaveRetained:
    message: Message


@dataclass(frozen=True, slots=True)
class DeleteRetained:
    topic: str


Intent = (SaveSession | DeleteSession | SaveDelivery | MarkSent | MarkReleased | DeleteDelivery
          | SaveInboundQos2 | DeleteInboundQos2 | SaveRetained | DeleteRetained)


class Persistence(Protocol):
    """Durable storage of the core's state. Called from one writer thread; `apply` returns once durable."""

    def apply(self, intents: Sequence[Intent], clock_offset_s: float) -> None: ...

    def load(self, clock_offset_s: float) -> StoredState: ...

    def close(self) -> None: ...


class MemoryPersistence:
    """Applies intents to dicts: the non-durable mode's stand-in and the reference for store tests."""

    def __init__(self) -> None:
        self.retained: dict[str, Message] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.deliveries: dict[tuple[str, int], QueuedRecord] = {}
        self.inbound_qos2: set[tuple[str, int]] = set()

    def apply(self, intents: Sequence[Intent], clock_offset_s: float = 0.0) -> None:
        for intent in intents:
            apply_one(self, intent)

    def load(self, clock_offset_s: float = 0.0) -> StoredState:
        deliveries = sorted(self.deliveries.values(), key=lambda r: (r.client_id, r.seq))
        inbound = tuple(InboundQos2Record(cid, pid) for cid, pid in sorted(self.inbound_qos2))
        return StoredState(tuple(self.retained.values()), tuple(self.sessions.values()), tuple(deliveries),
                           inbound)

    def close(self) -> None:
        pass


def apply_one(store: MemoryPersistence, intent: Intent) -> None:
    """The meaning of each intent, stated once over dicts (durable stores must agree with this)."""
    if isinstance(intent, SaveDelivery):
        store.deliveries[(intent.client_id, intent.seq)] = QueuedRecord(
            intent.client_id, intent.seq, intent.delivery, intent.packet_id)
    elif isinstance(intent, DeleteDelivery):
        store.deliveries.pop((intent.client_id, intent.seq), None)
    elif isinstance(intent, MarkSent):
        found = store.deliveries.get((intent.client_id, intent.seq))
        if found is not None:
            store.deliveries[(intent.client_id, intent.seq)] = replace(found, packet_id=intent.packet_id)
    elif isinstance(intent, MarkReleased):
        found = store.deliveries.get((intent.client_id, intent.seq))
        if found is not None:
            store.deliveries[(intent.client_id, intent.seq)] = replace(found, released=True)
    elif isinstance(intent, SaveSession):
        store.sessions[intent.record.client_id] = intent.record
    elif isinstance(intent, DeleteSession):
        store.sessions.pop(intent.client_id, None)
        for key in [k for k in store.deliveries if k[0] == intent.client_id]:
            del store.deliveries[key]
        store.inbound_qos2 = {k for k in store.inbound_qos2 if k[0] != intent.client_id}
    elif isinstance(intent, SaveInboundQos2):
        store.inbound_qos2.add((intent.client_id, intent.packet_id))
    elif isinstance(intent, DeleteInboundQos2):
        store.inbound_qos2.discard((intent.client_id, intent.packet_id))
    elif isinstance(intent, SaveRetained):
        store.retained[intent.message.topic] = intent.message
    elif isinstance(intent, DeleteRetained):
        store.retained.pop(intent.topic, None)
