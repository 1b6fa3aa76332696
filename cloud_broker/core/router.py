"""Subscription index: which subscriptions (and shared-subscription groups) match a topic name.

Ordinary subscriptions sit in a TopicTree under their filter. A shared subscription
(`$share/{group}/{filter}`) sits as one SharedGroup per (group, filter); a message matching the
filter goes to one member of each group, picked round-robin among members whose client is
connected (any member when none is).
"""

from __future__ import annotations

from collections.abc import Callable

from cloud_broker.core.model import SubscriptionEntry
from uplink.mqtt.topics import TopicTree, parse_shared


class SharedGroup:
    """Members of one shared subscription; identity is the group object itself."""

    __slots__ = ("_next", "members", "name", "topic_filter")

    def __init__(self, name: str, topic_filter: str) -> None:
        self.name = name
        self.topic_filter = topic_filter
        self.members: list[SubscriptionEntry] = []
        self._next = 0

    def pick(self, is_online: Callable[[str], bool]) -> SubscriptionEntry | None:
        """The next member round-robin, preferring connected clients; None if the group is empty."""
        count = len(self.members)
        if count == 0:
            return None
        for step in range(count):
            entry = self.members[(self._next + step) % count]
            if is_online(entry.client_id):
                self._next = (self._next + step + 1) % count
                return entry
        entry = self.members[self._next % count]
        self._next = (self._next + 1) % count
        return entry


Target = SubscriptionEntry | SharedGroup


_MATCH_CACHE_TOPICS = 16384


class Router:
    """Adds, removes and matches subscriptions. Filters are validated by the caller.

    Matches are cached per topic name until the next subscription change: devices publish to the
    same few topics over and over, so the trie walk is paid once per topic, not once per message.
    """

    def __init__(self) -> None:
        self._tree: TopicTree[Target] = TopicTree()
        self._groups: dict[tuple[str, str], SharedGroup] = {}
        self._count = 0
        self._cache: dict[str, list[Target]] = {}

    def __len__(self) -> int:
        return self._count

    def add(self, entry: SubscriptionEntry) -> None:
        """Index a subscription. The caller removes the session's previous entry for the same filter."""
        self._cache.clear()
        group_name, flt = parse_shared(entry.topic_filter)
        if group_name is None:
            self._tree.add(flt, entry)
        else:
            group = self._groups.get((group_name, flt))
            if group is None:
                group = self._groups[(group_name, flt)] = SharedGroup(group_name, flt)
                self._tree.add(flt, group)
            group.members.append(entry)
        self._count += 1

    def remove(self, entry: SubscriptionEntry) -> bool:
        """Forget a subscription; False if it was not indexed."""
        self._cache.clear()
        group_name, flt = parse_shared(entry.topic_filter)
        if group_name is None:
            removed = self._tree.remove(flt, entry)
        else:
            group = self._groups.get((group_name, flt))
            removed = False
            if group is not None:
                for i, member in enumerate(group.members):
                    if member is entry or member == entry:
                        del group.members[i]
                        removed = True
                        break
                if not group.members:
                    del self._groups[(group_name, flt)]
                    self._tree.remove(flt, group)
        if removed:
            self._count -= 1
        return removed

    def match(self, topic: str) -> list[Target]:
        """Every subscription entry and shared group whose filter matches topic (a valid topic name).

        The list is shared with the cache: callers must not mutate it.
        """
        found = self._cache.get(topic)
        if found is None:
            found = self._tree.match(topic)
            cache = self._cache
            if len(cache) >= _MATCH_CACHE_TOPICS:
                cache.clear()
            cache[topic] = found
        return found
