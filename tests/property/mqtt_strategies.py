"""Hypothesis strategies for valid MQTT 3.1.1 / 5.0 packets, topic names and topic filters (reusable).

Written from the OASIS specifications, not from the codec's own tables, so that round-trip tests compare
two readings of the spec. Every strategy yields only values `uplink.mqtt.codec.encode` must accept at
the given protocol level. Entry points: `packets(level)`, `packet_streams(level)`, `properties(kind)`,
`topic_names()`, `topic_filters()`, `shared_filters()`, `mqtt_strings()`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from uplink.mqtt.packets import (
    MAX_VARINT,
    MQTT_5,
    MQTT_311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

# --------------------------------------------------------------------------------------------- strings

_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")


def mqtt_strings(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    """UTF-8 encoded strings as MQTT allows them: any code point but surrogates and U+0000."""
    return st.text(_CHARS, min_size=min_size, max_size=max_size)


# Levels drawn mostly from a small pool so that filters and names collide often enough to match.
_LEVEL_POOL = ["a", "b", "c", "", "$SYS", "$x", "sensor", "ü", "x y", "A"]
_LEVEL_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00/+#")
levels = st.one_of(st.sampled_from(_LEVEL_POOL), st.text(_LEVEL_CHARS, max_size=4))


def topic_names(max_levels: int = 5) -> st.SearchStrategy[str]:
    """Valid topic names: no wildcards, at least one character; empty levels and '$' prefixes included."""
    return st.lists(levels, min_size=1, max_size=max_levels).map("/".join).filter(bool)


def topic_filters(max_levels: int = 5) -> st.SearchStrategy[str]:
    """Valid non-shared topic filters: '+' as whole levels, '#' alone at the end."""
    body = st.lists(st.one_of(levels, st.just("+")), min_size=0, max_size=max_levels)
    return st.tuples(body, st.booleans()).map(_join_filter).filter(bool)


def _join_filter(parts: tuple[list[str], bool]) -> str:
    lv, hash_end = parts
    return "/".join([*lv, "#"] if hash_end else lv)


share_names = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00/+#"), min_size=1, max_size=5
)


def shared_filters() -> st.SearchStrategy[str]:
    return st.builds(lambda g, f: f"$share/{g}/{f}", share_names, topic_filters())


def any_filters() -> st.SearchStrategy[str]:
    return st.one_of(topic_filters(), shared_filters())


# --------------------------------------------------------------------------------------------- properties

# Which packet may carry which property: MQTT 5.0 section 2.2.2.2, table 2-4. "WILL" = will properties.
_PUBLISH_LIKE = {"payload_format_indicator", "message_expiry_interval", "content_type", "response_topic"}
_PUBLISH_LIKE |= {"correlation_data", "user_properties"}
_ACK = {"reason_string", "user_properties"}
ALLOWED: dict[str, frozenset[str]] = {
    "CONNECT": frozenset(
        {
            "session_expiry_interval",
            "authentication_method",
            "authentication_data",
            "request_problem_information",
            "request_response_information",
            "receive_maximum",
            "topic_alias_maximum",
            "user_properties",
            "maximum_packet_size",
        }
    ),
    "CONNACK": frozenset(
        {
            "session_expiry_interval",
            "assigned_client_identifier",
            "server_keep_alive",
            "authentication_method",
            "authentication_data",
            "response_information",
            "server_reference",
            "reason_string",
            "receive_maximum",
            "topic_alias_maximum",
            "maximum_qos",
            "retain_available",
            "user_properties",
            "maximum_packet_size",
            "wildcard_subscription_available",
            "subscription_identifier_available",
            "shared_subscription_available",
        }
    ),
    "PUBLISH": frozenset(_PUBLISH_LIKE | {"subscription_identifiers", "topic_alias"}),
    "WILL": frozenset(_PUBLISH_LIKE | {"will_delay_interval"}),
    "PUBACK": frozenset(_ACK),
    "PUBREC": frozenset(_ACK),
    "PUBREL": frozenset(_ACK),
    "PUBCOMP": frozenset(_ACK),
    "SUBSCRIBE": frozenset({"subscription_identifiers", "user_properties"}),
    "SUBACK": frozenset(_ACK),
    "UNSUBSCRIBE": frozenset({"user_properties"}),
    "UNSUBACK": frozenset(_ACK),
    "DISCONNECT": frozenset(
        {"session_expiry_interval", "server_reference", "reason_string", "user_properties"}
    ),
    "AUTH": frozenset({"authentication_method", "authentication_data", "reason_string", "user_properties"}),
}

_U8_BOOL = st.sampled_from([0, 1])
_U16 = st.integers(0, 0xFFFF)
_U32 = st.integers(0, 0xFFFF_FFFF)
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": _U8_BOOL,
    "message_expiry_interval": _U32,
    "content_type": mqtt_strings(),
    "response_topic": topic_names(),
    "correlation_data": st.binary(max_size=16),
    "subscription_identifiers": st.lists(st.integers(1, MAX_VARINT), min_size=1, max_size=3).map(tuple),
    "session_expiry_interval": _U32,
    "assigned_client_identifier": mqtt_strings(),
    "server_keep_alive": _U16,
    "authentication_method": mqtt_strings(),
    "authentication_data": st.binary(max_size=16),
    "request_problem_information": _U8_BOOL,
    "will_delay_interval": _U32,
    "request_response_information": _U8_BOOL,
    "response_information": mqtt_strings(),
    "server_reference": mqtt_strings(),
    "reason_string": mqtt_strings(),
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": _U16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": _U8_BOOL,
    "retain_available": _U8_BOOL,
    "user_properties": st.lists(st.tuples(mqtt_strings(), mqtt_strings()), min_size=1, max_size=3).map(tuple),
    "maximum_packet_size": st.integers(1, 0xFFFF_FFFF),
    "wildcard_subscription_available": _U8_BOOL,
    "subscription_identifier_available": _U8_BOOL,
    "shared_subscription_available": _U8_BOOL,
}


def _fix_properties(kind: str, values: dict[str, Any]) -> Properties:
    if "authentication_data" in values and "authentication_method" not in values:
        values["authentication_method"] = "SCRAM-SHA-1"  # data without a method is a Protocol Error
    if kind == "SUBSCRIBE" and "subscription_identifiers" in values:
        values["subscription_identifiers"] = values["subscription_identifiers"][:1]  # at most one there
    return Properties(**values)


def properties(kind: str) -> st.SearchStrategy[Properties]:
    """Valid MQTT 5 properties for packet `kind` ("CONNECT", ..., "AUTH", or "WILL"); often empty."""
    optional = {name: _VALUES[name] for name in sorted(ALLOWED[kind])}
    return st.fixed_dictionaries({}, optional=optional).map(lambda d: _fix_properties(kind, d))


def _props(kind: str, level: int) -> st.SearchStrategy[Properties]:
    return properties(kind) if level == MQTT_5 else st.just(Properties())


# --------------------------------------------------------------------------------------------- packets

# Reason codes each MQTT 5.0 packet may carry (sections 3.2.2.2, 3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1,
# 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1).
CONNACK_CODES_5 = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95]
CONNACK_CODES_5 += [0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
PUBACK_CODES_5 = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
PUBREL_CODES_5 = [0x00, 0x92]
SUBACK_CODES_5 = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
UNSUBACK_CODES_5 = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
DISCONNECT_CODES_5 = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93]
DISCONNECT_CODES_5 += [
    0x94,
    0x95,
    0x96,
    0x97,
    0x98,
    0x99,
    0x9A,
    0x9B,
    0x9C,
    0x9D,
    0x9E,
    0x9F,
    0xA0,
    0xA1,
    0xA2,
]
AUTH_CODES_5 = [0x00, 0x18, 0x19]

packet_ids = st.integers(1, 0xFFFF)


@st.composite
def wills(draw: st.DrawFn, level: int) -> Will:
    return Will(
        topic=draw(topic_names()),
        payload=draw(st.binary(max_size=16)),
        qos=draw(st.integers(0, 2)),
        retain=draw(st.booleans()),
        properties=draw(_props("WILL", level)),
    )


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    username = draw(st.none() | mqtt_strings())
    password = draw(st.none() | st.binary(max_size=16))
    if level == MQTT_311 and username is None:
        password = None  # MQTT-3.1.2-22
    return Connect(
        client_id=draw(mqtt_strings(max_size=23)),
        protocol_level=level,
        clean_start=draw(st.booleans()),
        keep_alive_s=draw(_U16),
        username=username,
        password=password,
        will=draw(st.none() | wills(level)),
        properties=draw(_props("CONNECT", level)),
    )


@st.composite
def connacks(draw: st.DrawFn, level: int) -> ConnAck:
    code = draw(st.sampled_from(CONNACK_CODES_5 if level == MQTT_5 else list(range(6))))
    return ConnAck(
        session_present=draw(st.booleans()) if code == 0 else False,
        reason_code=code,
        properties=draw(_props("CONNACK", level)),
    )


@st.composite
def publishes(draw: st.DrawFn, level: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(_props("PUBLISH", level))
    topic = draw(topic_names())
    if props.topic_alias is not None and draw(st.booleans()):
        topic = ""  # MQTT 5: an alias may stand in for the topic
    return Publish(
        topic=topic,
        payload=draw(st.binary(max_size=64)),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else None,
        properties=props,
    )


def _acks(cls: type[PubAck | PubRec | PubRel | PubComp], level: int) -> st.SearchStrategy[Packet]:
    if level == MQTT_311:
        return st.builds(cls, packet_ids)
    codes = PUBREL_CODES_5 if cls in (PubRel, PubComp) else PUBACK_CODES_5
    return st.builds(cls, packet_ids, st.sampled_from(codes), properties(cls.__name__.upper()))


@st.composite
def subscriptions(draw: st.DrawFn, level: int) -> Subscription:
    flt = draw(any_filters())
    qos = draw(st.integers(0, 2))
    if level == MQTT_311:
        return Subscription(flt, qos)
    return Subscription(
        flt,
        qos,
        no_local=draw(st.booleans()) if not flt.startswith("$share/") else False,
        retain_as_published=draw(st.booleans()),
        retain_handling=draw(st.integers(0, 2)),
    )


def subscribes(level: int) -> st.SearchStrategy[Packet]:
    subs = st.lists(subscriptions(level), min_size=1, max_size=4).map(tuple)
    return st.builds(Subscribe, packet_ids, subs, _props("SUBSCRIBE", level))


def subacks(level: int) -> st.SearchStrategy[Packet]:
    pool = SUBACK_CODES_5 if level == MQTT_5 else [0, 1, 2, 0x80]
    codes = st.lists(st.sampled_from(pool), min_size=1, max_size=4).map(tuple)
    return st.builds(SubAck, packet_ids, codes, _props("SUBACK", level))


def unsubscribes(level: int) -> st.SearchStrategy[Packet]:
    filters = st.lists(any_filters(), min_size=1, max_size=4).map(tuple)
    return st.builds(Unsubscribe, packet_ids, filters, _props("UNSUBSCRIBE", level))


def unsubacks(level: int) -> st.SearchStrategy[Packet]:
    if level == MQTT_311:
        return st.builds(UnsubAck, packet_ids)
    codes = st.lists(st.sampled_from(UNSUBACK_CODES_5), min_size=1, max_size=4).map(tuple)
    return st.builds(UnsubAck, packet_ids, codes, properties("UNSUBACK"))


def disconnects(level: int) -> st.SearchStrategy[Packet]:
    if level == MQTT_311:
        return st.just(Disconnect())
    return st.builds(Disconnect, st.sampled_from(DISCONNECT_CODES_5), properties("DISCONNECT"))


def auths() -> st.SearchStrategy[Packet]:
    return st.builds(Auth, st.sampled_from(AUTH_CODES_5), properties("AUTH"))


def packets(level: int, *, include_connect: bool = True) -> st.SearchStrategy[Packet]:
    """Any valid packet at `level`. CONNECT is optional because a decoder accepts it only first."""
    options: list[st.SearchStrategy[Packet]] = [
        connacks(level),
        publishes(level),
        _acks(PubAck, level),
        _acks(PubRec, level),
        _acks(PubRel, level),
        _acks(PubComp, level),
        subscribes(level),
        subacks(level),
        unsubscribes(level),
        unsubacks(level),
        st.just(PingReq()),
        st.just(PingResp()),
        disconnects(level),
    ]
    if include_connect:
        options.append(connects(level))
    if level == MQTT_5:
        options.append(auths())
    return st.one_of(options)


def packet_streams(level: int, max_size: int = 6) -> st.SearchStrategy[list[Packet]]:
    """A client's stream as a server sees it: CONNECT at `level`, then any other packets."""
    return st.builds(
        lambda c, rest: [c, *rest],
        connects(level),
        st.lists(packets(level, include_connect=False), max_size=max_size),
    )


levels_under_test = st.sampled_from([MQTT_311, MQTT_5])
