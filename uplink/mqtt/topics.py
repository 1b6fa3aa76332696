"""Validates MQTT topic names and filters and matches names against filters, one at a time or indexed.

Rules (MQTT 3.1.1 section 4.7, MQTT 5.0 sections 4.7 and 4.8.2):
- Names and filters are at least one character, UTF-8 encodable in at most 65535 bytes, without U+0000.
- Names contain no wildcard. In filters '#' stands alone as the last level, '+' stands alone in a level.
- '#' also matches the parent level ("a/#" matches "a"); '+' matches exactly one level, empty ones too.
- A filter starting with a wildcard never matches a name starting with '$' (MQTT-4.7.2-1).
- "$share/<ShareName>/<filter>" is a shared subscription; ShareName is non-empty without '/', '+', '#'.
  Matching uses only <filter>; the share name groups subscribers, it does not filter topics.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from uplink.mqtt.errors import ProtocolError
from uplink.mqtt.packets import ReasonCode

__all__ = [
    "TopicError",
    "TopicTree",
    "parse_shared",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]

SHARE_PREFIX = "$share/"

V = TypeVar("V")


class TopicError(ProtocolError, ValueError):
    """An invalid topic name or filter; `reason_code` is TOPIC_NAME_INVALID or TOPIC_FILTER_INVALID."""


def _check_common(s: str, what: str, code: int) -> None:
    if not s:
        raise TopicError(f"{what} is empty (MQTT-4.7.3-1)", code)
    if "\x00" in s:
        raise TopicError(f"{what} contains U+0000 (MQTT-4.7.3-2)", code)
    if len(s) > 0x3FFF:  # only long strings can exceed 65535 UTF-8 bytes (at most 4 bytes per character)
        try:
            n = len(s.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise TopicError(f"{what} is not UTF-8 encodable", code) from exc
        if n > 0xFFFF:
            raise TopicError(f"{what} is longer than 65535 bytes (MQTT-4.7.3-3)", code)
    elif not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TopicError(f"{what} is not UTF-8 encodable", code) from exc


def validate_topic_name(name: str) -> None:
    """Raise TopicError(TOPIC_NAME_INVALID) unless `name` may be published to."""
    _check_common(name, "topic name", ReasonCode.TOPIC_NAME_INVALID)
    if "+" in name or "#" in name:
        raise TopicError(
            f"topic name {name!r} contains a wildcard (MQTT-3.3.2-2)", ReasonCode.TOPIC_NAME_INVALID
        )


def validate_topic_filter(flt: str) -> None:
    """Raise TopicError(TOPIC_FILTER_INVALID) unless `flt` may be subscribed to (shared filters included)."""
    code = ReasonCode.TOPIC_FILTER_INVALID
    _check_common(flt, "topic filter", code)
    _, inner = parse_shared(flt)
    if "+" not in inner and "#" not in inner:
        return
    levels = inner.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#" or i != last:
                raise TopicError(f"'#' must be alone in the last level of {flt!r} (MQTT-4.7.1-1)", code)
        elif "+" in level and level != "+":
            raise TopicError(f"'+' must occupy a whole level of {flt!r} (MQTT-4.7.1-2)", code)


def parse_shared(flt: str) -> tuple[str | None, str]:
    """("group", "a/b") for "$share/group/a/b"; (None, flt) for a plain filter. TopicError if malformed."""
    if not flt.startswith(SHARE_PREFIX):
        return None, flt
    rest = flt[len(SHARE_PREFIX) :]
    slash = rest.find("/")
    code = ReasonCode.TOPIC_FILTER_INVALID
    if slash < 0:
        raise TopicError(f"shared subscription {flt!r} has no topic filter (MQTT-4.8.2-2)", code)
    group = rest[:slash]
    inner = rest[slash + 1 :]
    if not group or "+" in group or "#" in group:
        raise TopicError(f"share name {group!r} must be non-empty without '+' or '#' (MQTT-4.8.2-1/2)", code)
    if not inner:
        raise TopicError(f"shared subscription {flt!r} has an empty topic filter", code)
    return group, inner


def topic_matches(flt: str, name: str) -> bool:
    """Whether topic `name` matches filter `flt` (a shared filter matches like its inner filter).

    Both are assumed valid (see the validate functions); a malformed shared filter raises TopicError.
    """
    if flt.startswith(SHARE_PREFIX):
        flt = parse_shared(flt)[1]
    if "+" not in flt and "#" not in flt:
        return flt == name
    if name.startswith("$") and flt[0] in "+#":
        return False
    names = name.split("/")
    n = len(names)
    for i, level in enumerate(flt.split("/")):
        if level == "#":
            return True
        if i >= n or (level != "+" and level != names[i]):
            return False
    return len(flt.split("/")) == n


class _Node(Generic[V]):
    __slots__ = ("children", "shared", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.values: list[V] = []
        # share name -> members; None until the first shared subscription lands here (most nodes have none)
        self.shared: dict[str, list[V]] | None = None

    def empty(self) -> bool:
        return not self.children and not self.values and not self.shared


class TopicTree(Generic[V]):
    """Index of (topic filter, value) entries answering "which values match this topic name?".

    A trie keyed by filter level; matching walks only the branches a name can reach (literal level, '+',
    '#'), so cost depends on the name's depth and the matching filters, not on the number of filters.
    Entries are a multiset: adding the same (filter, value) twice needs two removes. Values are compared
    with ==. Shared filters are stored under their inner filter, grouped by share name.
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, flt: str, value: V) -> None:
        """Index `value` under `flt`. Raises TopicError(TOPIC_FILTER_INVALID) for an invalid filter."""
        validate_topic_filter(flt)
        group, inner = parse_shared(flt)
        node = self._root
        for level in inner.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if group is None:
            node.values.append(value)
        else:
            if node.shared is None:
                node.shared = {}
            node.shared.setdefault(group, []).append(value)
        self._count += 1

    def remove(self, flt: str, value: V) -> bool:
        """Drop one (flt, value) entry; False if there was none (an invalid filter never has entries)."""
        try:
            group, inner = parse_shared(flt)
        except TopicError:
            return False
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in inner.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if group is None:
            bucket = node.values
        else:
            if node.shared is None or group not in node.shared:
                return False
            bucket = node.shared[group]
        try:
            bucket.remove(value)
        except ValueError:
            return False
        if group is not None and not bucket and node.shared is not None:
            del node.shared[group]
        self._count -= 1
        # Prune branches that no longer lead to an entry, so churn of filters does not leak memory.
        for parent, level in reversed(path):
            if not parent.children[level].empty():
                break
            del parent.children[level]
        return True

    def match(self, name: str) -> list[V]:
        """Every value whose filter matches topic `name` (shared members included), each entry once."""
        plain, shared = self.match_split(name)
        for _group, members in shared:
            plain.extend(members)
        return plain

    def match_split(self, name: str) -> tuple[list[V], list[tuple[str, list[V]]]]:
        """(values of matching plain filters, [(share name, members)] per matching shared subscription).

        A shared subscription is one (share name, filter) pair (MQTT 5.0 section 4.8.2): a broker picks
        one member of each list. The member lists are the tree's own: copy before mutating them.
        """
        levels = name.split("/")
        n = len(levels)
        plain: list[V] = []
        shared: list[tuple[str, list[V]]] = []

        def collect(node: _Node[V]) -> None:
            if node.values:
                plain.extend(node.values)
            if node.shared:
                shared.extend(node.shared.items())

        # Wildcards at the first level do not match '$' topics (MQTT-4.7.2-1).
        dollar = name.startswith("$")
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            children = node.children
            if not children:
                if i == n:
                    collect(node)
                continue
            if i == n:
                collect(node)
                hash_node = children.get("#")
                if hash_node is not None:  # "a/#" matches "a"
                    collect(hash_node)
                continue
            if not (i == 0 and dollar):
                hash_node = children.get("#")
                if hash_node is not None:
                    collect(hash_node)
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
        return plain, shared
