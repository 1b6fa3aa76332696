"""Retained messages: the last retained message per topic, and lookup by topic filter."""

from __future__ import annotations

from collections.abc import Callable

from cloud_broker.core.model import Message
from uplink.mqtt.topics import topic_matches

_WILDCARDS = frozenset("+#")


class RetainedStore:
    """topic -> last retained message. Storing an empty payload clears the topic (MQTT 3.3.1.3)."""

    def __init__(self, on_expired: Callable[[str], None] | None = None) -> None:
        self._by_topic: dict[str, Message] = {}
        # Told about topics dropped because their Message Expiry Interval passed (to update persistence).
        self._on_expired = on_expired

    def __len__(self) -> int:
        return len(self._by_topic)

    def store(self, message: Message) -> bool:
        """Keep message as the topic's retained message, or clear it when the payload is empty.

        Returns True when the store changed (so the caller persists the change).
        """
        if message.payload:
            self._by_topic[message.topic] = message
            return True
        return self._by_topic.pop(message.topic, None) is not None

    def get(self, topic: str) -> Message | None:
        return self._by_topic.get(topic)

    def matching(self, topic_filter: str, now: float) -> list[Message]:
        """Retained messages whose topic matches topic_filter, dropping those whose expiry has passed.

        A filter without wildcards is a dict lookup; a wildcard filter scans every retained topic,
        which is fine while retained topics number in the tens of thousands (a trie can come later).
        """
        if _WILDCARDS.isdisjoint(topic_filter):
            found = self._by_topic.get(topic_filter)
            candidates = [found] if found is not None else []
        else:
            candidates = [m for t, m in self._by_topic.items() if topic_matches(topic_filter, t)]
        live = []
        for message in candidates:
            if message.expires_at is not None and message.expires_at <= now:
                del self._by_topic[message.topic]
                if self._on_expired is not None:
                    self._on_expired(message.topic)
            else:
                live.append(message)
        return live

    def all(self) -> list[Message]:
        return list(self._by_topic.values())
