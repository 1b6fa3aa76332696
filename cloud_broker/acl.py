"""Topic authorization: ordered allow/deny rules per role, with `${clientid}`/`${username}` placeholders.

A rule applies to a client when its `role` is the client's role ("device", "operator", ...), or
"anonymous" for clients without credentials, or "*" for everyone. Rules are tried in order; the first
rule whose action and topic match decides; nothing matching means deny. A placeholder is replaced by
the client's own id or user name; a value that is empty or contains '/', '+' or '#' could widen the
rule, so a rule with such a value is skipped (it never matches), never widened.

Publishing checks the topic name against the rule's filter. Subscribing checks that every topic the
subscription filter can match lies inside the rule's filter (`fg/v1/dev1/#` admits `fg/v1/dev1/+/x`
but not `fg/v1/#`); for a shared subscription the filter after `$share/{group}/` counts.

Decisions are cached per client and topic: the hot path is a dict lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cloud_broker.core.model import ClientInfo
from uplink.mqtt.topics import TopicError, parse_shared, topic_matches

Action = Literal["publish", "subscribe", "all"]

_CACHE_CLIENTS = 65536
_CACHE_TOPICS_PER_CLIENT = 1024


@dataclass(frozen=True, slots=True)
class AclRule:
    role: str  # "device", "operator", ..., "anonymous" or "*"
    action: Action
    topic: str  # a topic filter, may hold ${clientid} / ${username}
    allow: bool = True


def filter_within(flt: str, outer: str) -> bool:
    """Whether every topic name matching filter `flt` also matches filter `outer` (both valid filters)."""
    inner_levels = flt.split("/")
    outer_levels = outer.split("/")
    if flt.startswith("$") != outer.startswith("$") and outer_levels[0] in ("+", "#"):
        # '$' topics never match a leading wildcard (MQTT-4.7.2-1): '#' does not cover '$SYS/...'.
        return False
    for i, level in enumerate(outer_levels):
        if level == "#":
            return True
        if i >= len(inner_levels):
            return False
        mine = inner_levels[i]
        if mine == "#":
            return False  # flt reaches deeper than outer allows at this level
        if level == "+":
            continue
        if mine == "+" or mine != level:
            return False
    return len(inner_levels) == len(outer_levels)


def _expand(pattern: str, client: ClientInfo) -> str | None:
    out = pattern
    for name, value in (("${clientid}", client.client_id), ("${username}", client.username)):
        if name in out:
            if not value or "/" in value or "+" in value or "#" in value:
                return None
            out = out.replace(name, value)
    return out


class Acl:
    """The broker's `Authorizer`: ordered rules, first match decides, default deny."""

    def __init__(self, rules: Sequence[AclRule]) -> None:
        self.rules = tuple(rules)
        # id(client) -> (client, expanded rules, {(action, topic): verdict}). Keyed by identity: hashing
        # a frozen dataclass on every PUBLISH costs more than the whole cached decision; the stored
        # client guards against a recycled id.
        self._clients: dict[
            int, tuple[ClientInfo, list[tuple[str, str, bool]], dict[tuple[int, str], bool]]] = {}
        self.denied = 0

    def _for(self, client: ClientInfo) -> tuple[list[tuple[str, str, bool]], dict[tuple[int, str], bool]]:
        hit = self._clients.get(id(client))
        if hit is not None and hit[0] is client:
            return hit[1], hit[2]
        role = client.role if client.role is not None else "anonymous"
        expanded: list[tuple[str, str, bool]] = []
        for rule in self.rules:
            if rule.role != "*" and rule.role != role:
                continue
            topic = _expand(rule.topic, client)
            if topic is not None:
                expanded.append((rule.action, topic, rule.allow))
        if len(self._clients) >= _CACHE_CLIENTS:
            self._clients.clear()
        verdicts: dict[tuple[int, str], bool] = {}
        self._clients[id(client)] = (client, expanded, verdicts)
        return expanded, verdicts

    def can_publish(self, client: ClientInfo, topic: str) -> bool:
        rules, cache = self._for(client)
        key = (0, topic)
        verdict = cache.get(key)
        if verdict is None:
            verdict = False
            for action, flt, allow in rules:
                if action != "subscribe" and topic_matches(flt, topic):
                    verdict = allow
                    break
            if len(cache) >= _CACHE_TOPICS_PER_CLIENT:
                cache.clear()
            cache[key] = verdict
        if not verdict:
            self.denied += 1
        return verdict

    def can_subscribe(self, client: ClientInfo, topic_filter: str) -> bool:
        rules, cache = self._for(client)
        key = (1, topic_filter)
        verdict = cache.get(key)
        if verdict is None:
            try:
                inner = parse_shared(topic_filter)[1]
            except TopicError:
                return False
            verdict = False
            for action, flt, allow in rules:
                if action == "publish":
                    continue
                if allow:
                    if filter_within(inner, flt):
                        verdict = True
                        break
                elif _overlaps(inner, flt):
                    # A deny rule wins as soon as the subscription could see any topic it covers.
                    verdict = False
                    break
            if len(cache) >= _CACHE_TOPICS_PER_CLIENT:
                cache.clear()
            cache[key] = verdict
        if not verdict:
            self.denied += 1
        return verdict

    def forget(self, client: ClientInfo) -> None:
        """Drop a client's cached decisions (after its connection ended)."""
        self._clients.pop(id(client), None)


def _overlaps(a: str, b: str) -> bool:
    """Whether some topic name matches both filters."""
    la, lb = a.split("/"), b.split("/")
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else None
        y = lb[i] if i < len(lb) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != "+" and y != "+" and x != y:
            return False
    return True


def default_rules(prefix: str = "fg/v1") -> tuple[AclRule, ...]:
    """Devices touch only their own tree but never publish their own commands; operators command every
    device and read everything; anonymous clients (only when allowed at all) may do anything."""
    return (
        AclRule("device", "publish", f"{prefix}/${{username}}/cmd", allow=False),
        AclRule("device", "all", f"{prefix}/${{username}}/#"),
        AclRule("operator", "publish", f"{prefix}/+/cmd"),
        AclRule("operator", "subscribe", "#"),
        AclRule("operator", "subscribe", "$SYS/#"),
        AclRule("anonymous", "all", "#"),
        AclRule("anonymous", "subscribe", "$SYS/#"),
    )
