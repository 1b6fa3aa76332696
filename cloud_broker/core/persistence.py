"""What the core hands to durable storage (retained messages, sessions), and an in-memory store.

The core calls these synchronously when state changes and reads everything back once at start
(`Broker.restore`). A durable implementation (SQLite, later) must not block: it buffers the calls and
commits them on its own thread. Offline queues and in-flight messages are saved when a session goes
offline or ends, not per message; per-message durability comes with the SQLite store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cloud_broker.core.model import Message, StoredDelivery, SubscriptionEntry


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """A persistent session at rest: enough to resume it after a broker restart."""

    client_id: str
    protocol_level: int
    expiry_interval_s: int
    subscriptions: tuple[SubscriptionEntry, ...]
    queued: tuple[StoredDelivery, ...]  # in-flight first (redelivered with DUP), then the offline queue


class Persistence(Protocol):
    def save_retained(self, message: Message) -> None: ...

    def delete_retained(self, topic: str) -> None: ...

    def load_retained(self) -> Iterable[Message]: ...

    def save_session(self, snapshot: SessionSnapshot) -> None: ...

    def delete_session(self, client_id: str) -> None: ...

    def load_sessions(self) -> Iterable[SessionSnapshot]: ...


class MemoryPersistence:
    """Keeps everything in dicts: the default, and the reference for the persistence contract tests."""

    def __init__(self) -> None:
        self.retained: dict[str, Message] = {}
        self.sessions: dict[str, SessionSnapshot] = {}

    def save_retained(self, message: Message) -> None:
        self.retained[message.topic] = message

    def delete_retained(self, topic: str) -> None:
        self.retained.pop(topic, None)

    def load_retained(self) -> Iterable[Message]:
        return list(self.retained.values())

    def save_session(self, snapshot: SessionSnapshot) -> None:
        self.sessions[snapshot.client_id] = snapshot

    def delete_session(self, client_id: str) -> None:
        self.sessions.pop(client_id, None)

    def load_sessions(self) -> Iterable[SessionSnapshot]:
        return list(self.sessions.values())
