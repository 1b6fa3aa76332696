"""Encodes and decodes MQTT 5.0 property lists (spec section 2.2.2) against the table of who may carry what.

The table below is the single source of truth: identifier, `Properties` field, wire type, the set of
packet kinds that may carry it, and whether it may appear more than once. A "kind" is a `PacketType`
value, or `WILL` (0) for the will properties inside CONNECT, which have their own allowance.

Decoding errors follow MQTT 5.0 section 2.2.2.2 and the per-property text: an unknown identifier, an
identifier not valid for the packet, or a value of the wrong shape is a Malformed Packet; a second copy
of a single-valued property or a value outside its allowed range is a Protocol Error.
"""

from __future__ import annotations

import struct
from dataclasses import fields
from typing import Any, Final

from uplink.mqtt.errors import LocalProtocolError, RemoteProtocolError
from uplink.mqtt.packets import MAX_VARINT, NO_PROPERTIES, PacketType, Properties, PropertyId, ReasonCode

WILL: Final = 0  # pseudo packet kind: the will properties of a CONNECT

# Wire types (MQTT 5.0 section 1.5).
BYTE: Final = 1
TWO_BYTE: Final = 2
FOUR_BYTE: Final = 4
VARINT: Final = 5
UTF8: Final = 6
BINARY: Final = 7
UTF8_PAIR: Final = 8

_P = PacketType
_ACKS = (_P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP)


def _mask(*kinds: int) -> int:
    m = 0
    for k in kinds:
        m |= 1 << k
    return m


# (id, field name, wire type, kinds allowed, kinds where it may repeat)
_TABLE: Final[tuple[tuple[PropertyId, str, int, int, int], ...]] = (
    (PropertyId.PAYLOAD_FORMAT_INDICATOR, "payload_format_indicator", BYTE, _mask(_P.PUBLISH, WILL), 0),
    (PropertyId.MESSAGE_EXPIRY_INTERVAL, "message_expiry_interval", FOUR_BYTE, _mask(_P.PUBLISH, WILL), 0),
    (PropertyId.CONTENT_TYPE, "content_type", UTF8, _mask(_P.PUBLISH, WILL), 0),
    (PropertyId.RESPONSE_TOPIC, "response_topic", UTF8, _mask(_P.PUBLISH, WILL), 0),
    (PropertyId.CORRELATION_DATA, "correlation_data", BINARY, _mask(_P.PUBLISH, WILL), 0),
    # A server's PUBLISH carries one identifier per matching subscription; SUBSCRIBE carries at most one.
    (
        PropertyId.SUBSCRIPTION_IDENTIFIER,
        "subscription_identifiers",
        VARINT,
        _mask(_P.PUBLISH, _P.SUBSCRIBE),
        _mask(_P.PUBLISH),
    ),
    (
        PropertyId.SESSION_EXPIRY_INTERVAL,
        "session_expiry_interval",
        FOUR_BYTE,
        _mask(_P.CONNECT, _P.CONNACK, _P.DISCONNECT),
        0,
    ),
    (PropertyId.ASSIGNED_CLIENT_IDENTIFIER, "assigned_client_identifier", UTF8, _mask(_P.CONNACK), 0),
    (PropertyId.SERVER_KEEP_ALIVE, "server_keep_alive", TWO_BYTE, _mask(_P.CONNACK), 0),
    (
        PropertyId.AUTHENTICATION_METHOD,
        "authentication_method",
        UTF8,
        _mask(_P.CONNECT, _P.CONNACK, _P.AUTH),
        0,
    ),
    (
        PropertyId.AUTHENTICATION_DATA,
        "authentication_data",
        BINARY,
        _mask(_P.CONNECT, _P.CONNACK, _P.AUTH),
        0,
    ),
    (PropertyId.REQUEST_PROBLEM_INFORMATION, "request_problem_information", BYTE, _mask(_P.CONNECT), 0),
    (PropertyId.WILL_DELAY_INTERVAL, "will_delay_interval", FOUR_BYTE, _mask(WILL), 0),
    (PropertyId.REQUEST_RESPONSE_INFORMATION, "request_response_information", BYTE, _mask(_P.CONNECT), 0),
    (PropertyId.RESPONSE_INFORMATION, "response_information", UTF8, _mask(_P.CONNACK), 0),
    (PropertyId.SERVER_REFERENCE, "server_reference", UTF8, _mask(_P.CONNACK, _P.DISCONNECT), 0),
    (
        PropertyId.REASON_STRING,
        "reason_string",
        UTF8,
        _mask(_P.CONNACK, *_ACKS, _P.SUBACK, _P.UNSUBACK, _P.DISCONNECT, _P.AUTH),
        0,
    ),
    (PropertyId.RECEIVE_MAXIMUM, "receive_maximum", TWO_BYTE, _mask(_P.CONNECT, _P.CONNACK), 0),
    (PropertyId.TOPIC_ALIAS_MAXIMUM, "topic_alias_maximum", TWO_BYTE, _mask(_P.CONNECT, _P.CONNACK), 0),
    (PropertyId.TOPIC_ALIAS, "topic_alias", TWO_BYTE, _mask(_P.PUBLISH), 0),
    (PropertyId.MAXIMUM_QOS, "maximum_qos", BYTE, _mask(_P.CONNACK), 0),
    (PropertyId.RETAIN_AVAILABLE, "retain_available", BYTE, _mask(_P.CONNACK), 0),
    (
        PropertyId.USER_PROPERTY,
        "user_properties",
        UTF8_PAIR,
        _mask(
            _P.CONNECT,
            _P.CONNACK,
            _P.PUBLISH,
            WILL,
            *_ACKS,
            _P.SUBSCRIBE,
            _P.SUBACK,
            _P.UNSUBSCRIBE,
            _P.UNSUBACK,
            _P.DISCONNECT,
            _P.AUTH,
        ),
        0xFFFF,  # everywhere
    ),
    (PropertyId.MAXIMUM_PACKET_SIZE, "maximum_packet_size", FOUR_BYTE, _mask(_P.CONNECT, _P.CONNACK), 0),
    (
        PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,
        "wildcard_subscription_available",
        BYTE,
        _mask(_P.CONNACK),
        0,
    ),
    (
        PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        "subscription_identifier_available",
        BYTE,
        _mask(_P.CONNACK),
        0,
    ),
    (
        PropertyId.SHARED_SUBSCRIPTION_AVAILABLE,
        "shared_subscription_available",
        BYTE,
        _mask(_P.CONNACK),
        0,
    ),
)

# Indexed by identifier byte for the decoder (all identifiers are < 128, so one varint byte).
_BY_ID: Final[dict[int, tuple[str, int, int, int]]] = {
    int(pid): (name, wtype, allowed, multi) for pid, name, wtype, allowed, multi in _TABLE
}
_FIELD_NAMES: Final = frozenset(f.name for f in fields(Properties))
assert {row[1] for row in _TABLE} == _FIELD_NAMES, "property table and Properties fields disagree"

# Properties whose only legal values are 0 and 1 (each spec section says "Protocol Error" otherwise).
_BOOLEAN_BYTES: Final = (
    "payload_format_indicator",
    "request_problem_information",
    "request_response_information",
    "maximum_qos",
    "retain_available",
    "wildcard_subscription_available",
    "subscription_identifier_available",
    "shared_subscription_available",
)
_NONZERO: Final = ("receive_maximum", "maximum_packet_size")

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_RANGE_MAX: Final = {BYTE: 0xFF, TWO_BYTE: 0xFFFF, FOUR_BYTE: 0xFFFF_FFFF, VARINT: MAX_VARINT}


def kind_name(kind: int) -> str:
    return "will properties" if kind == WILL else PacketType(kind).name


def check_values(props: Properties) -> tuple[str, int] | None:
    """Cross-field and range rules that hold for any packet; returns (problem, reason code) or None."""
    for name in _BOOLEAN_BYTES:
        v = getattr(props, name)
        if v is not None and v not in (0, 1):
            return f"{name} must be 0 or 1, got {v}", ReasonCode.PROTOCOL_ERROR
    for name in _NONZERO:
        if getattr(props, name) == 0:
            return f"{name} must not be 0", ReasonCode.PROTOCOL_ERROR
    if props.topic_alias == 0:
        return "topic alias 0 is not permitted (MQTT-3.3.2-8)", ReasonCode.TOPIC_ALIAS_INVALID
    if 0 in props.subscription_identifiers:
        return "subscription identifier 0 is not permitted", ReasonCode.PROTOCOL_ERROR
    if props.authentication_data is not None and props.authentication_method is None:
        return "authentication data without authentication method", ReasonCode.PROTOCOL_ERROR
    rt = props.response_topic
    if rt is not None and (not rt or "+" in rt or "#" in rt):
        return "response topic must be a topic name without wildcards", ReasonCode.PROTOCOL_ERROR
    return None


# --------------------------------------------------------------------------------------------- encode


def _enc_str(s: str, what: str) -> bytes:
    if "\x00" in s:
        raise LocalProtocolError(f"{what} contains U+0000", ReasonCode.MALFORMED_PACKET)
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(
            f"{what} is not UTF-8 encodable: {exc}", ReasonCode.MALFORMED_PACKET
        ) from exc
    if len(b) > 0xFFFF:
        raise LocalProtocolError(f"{what} is longer than 65535 bytes", ReasonCode.MALFORMED_PACKET)
    return _U16.pack(len(b)) + b


def _enc_bin(b: bytes, what: str) -> bytes:
    if len(b) > 0xFFFF:
        raise LocalProtocolError(f"{what} is longer than 65535 bytes", ReasonCode.MALFORMED_PACKET)
    return _U16.pack(len(b)) + bytes(b)


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_int(v: Any, wtype: int, name: str) -> bytes:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _RANGE_MAX[wtype]:
        raise LocalProtocolError(f"property {name}={v!r} is out of range", ReasonCode.PROTOCOL_ERROR)
    if wtype == BYTE:
        return bytes((v,))
    if wtype == TWO_BYTE:
        return _U16.pack(v)
    if wtype == FOUR_BYTE:
        return _U32.pack(v)
    return _enc_varint(v)


def encode_properties(props: Properties, kind: int) -> bytes:
    """Property length + properties for packet `kind`. Raises LocalProtocolError for what MQTT 5 forbids."""
    if props is NO_PROPERTIES:
        return b"\x00"
    bit = 1 << kind
    parts: list[bytes] = []
    for pid, name, wtype, allowed, multi in _TABLE:
        v = getattr(props, name)
        if v is None or v == ():
            continue
        if not allowed & bit:
            raise LocalProtocolError(
                f"property {name} is not allowed in {kind_name(kind)}", ReasonCode.PROTOCOL_ERROR
            )
        ident = bytes((pid,))
        if wtype == UTF8_PAIR:
            for key, value in v:
                parts.append(ident + _enc_str(key, name) + _enc_str(value, name))
        elif name == "subscription_identifiers":
            if len(v) > 1 and not multi & bit:
                raise LocalProtocolError(
                    f"{kind_name(kind)} may carry only one subscription identifier", ReasonCode.PROTOCOL_ERROR
                )
            for n in v:
                parts.append(ident + _enc_int(n, VARINT, name))
        elif wtype == UTF8:
            parts.append(ident + _enc_str(v, name))
        elif wtype == BINARY:
            parts.append(ident + _enc_bin(v, name))
        else:
            parts.append(ident + _enc_int(v, wtype, name))
    problem = check_values(props)
    if problem is not None:
        raise LocalProtocolError(*problem)
    body = b"".join(parts)
    return _enc_varint(len(body)) + body


# --------------------------------------------------------------------------------------------- decode


def _malformed(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, ReasonCode.MALFORMED_PACKET)


def read_varint_strict(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    """A minimal, at most four-byte variable byte integer within [pos, end) (MQTT-1.5.5-1)."""
    value = 0
    shift = 0
    for i in range(4):
        if pos >= end:
            raise _malformed("variable byte integer runs past the end of its packet")
        b = mv[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if i and not b:
                raise _malformed("variable byte integer is not minimally encoded")
            return value, pos
        shift += 7
    raise _malformed("variable byte integer is longer than four bytes")


def read_str(mv: memoryview, pos: int, end: int) -> tuple[str, int]:
    """A UTF-8 encoded string (MQTT-1.5.4-1/2: well formed, no surrogates, no U+0000)."""
    if pos + 2 > end:
        raise _malformed("string length runs past the end of its packet")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise _malformed("string runs past the end of its packet")
    try:
        s = str(mv[pos + 2 : stop], "utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"string is not well-formed UTF-8: {exc.reason}") from exc
    if "\x00" in s:
        raise _malformed("string contains U+0000")
    return s, stop


def read_bin(mv: memoryview, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _malformed("binary length runs past the end of its packet")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise _malformed("binary data runs past the end of its packet")
    return bytes(mv[pos + 2 : stop]), stop


def decode_properties(mv: memoryview, pos: int, end: int, kind: int) -> tuple[Properties, int]:
    """Property length + properties at `pos` for packet `kind`; returns (properties, position after)."""
    length, pos = read_varint_strict(mv, pos, end)
    if length == 0:
        return NO_PROPERTIES, pos
    stop = pos + length
    if stop > end:
        raise _malformed("properties run past the end of the packet")
    bit = 1 << kind
    values: dict[str, Any] = {}
    user: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    while pos < stop:
        ident = mv[pos]
        pos += 1
        spec = _BY_ID.get(ident)
        if spec is None:
            # Identifiers >= 0x80 would need a two-byte varint; none is defined, so they are unknown too.
            raise _malformed(f"unknown property identifier 0x{ident:02X}")
        name, wtype, allowed, multi = spec
        if not allowed & bit:
            raise _malformed(f"property {name} is not valid in {kind_name(kind)}")
        v: Any
        if wtype == BYTE:
            if pos >= stop:
                raise _malformed(f"property {name} runs past the properties")
            v = mv[pos]
            pos += 1
        elif wtype == TWO_BYTE:
            if pos + 2 > stop:
                raise _malformed(f"property {name} runs past the properties")
            v = (mv[pos] << 8) | mv[pos + 1]
            pos += 2
        elif wtype == FOUR_BYTE:
            if pos + 4 > stop:
                raise _malformed(f"property {name} runs past the properties")
            v = int.from_bytes(mv[pos : pos + 4], "big")
            pos += 4
        elif wtype == VARINT:
            v, pos = read_varint_strict(mv, pos, stop)
        elif wtype == UTF8:
            v, pos = read_str(mv, pos, stop)
        elif wtype == BINARY:
            v, pos = read_bin(mv, pos, stop)
        else:
            key, pos = read_str(mv, pos, stop)
            val, pos = read_str(mv, pos, stop)
            user.append((key, val))
            continue
        if name == "subscription_identifiers":
            if sub_ids and not multi & bit:
                raise RemoteProtocolError(
                    f"subscription identifier appears more than once in {kind_name(kind)}",
                    ReasonCode.PROTOCOL_ERROR,
                )
            sub_ids.append(v)
            continue
        if name in values:
            raise RemoteProtocolError(f"property {name} appears more than once", ReasonCode.PROTOCOL_ERROR)
        values[name] = v
    if user:
        values["user_properties"] = tuple(user)
    if sub_ids:
        values["subscription_identifiers"] = tuple(sub_ids)
    props = Properties(**values)
    problem = check_values(props)
    if problem is not None:
        raise RemoteProtocolError(*problem)
    return props, pos
