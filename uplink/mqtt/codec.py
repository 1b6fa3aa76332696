"""Turns MQTT 3.1.1 / 5.0 packets into bytes and byte streams into packets, enforcing the wire rules.

Theory of operation. `encode` validates a packet against the protocol level it is sent at and raises
`LocalProtocolError` for anything the wire cannot carry; it never emits bytes a conforming peer would
reject. `Decoder.feed` is incremental: bytes are appended to one buffer, every complete packet in it is
parsed in a single pass of a position index over a memoryview (no per-packet buffer copies), and only the
unfinished tail is kept. Any split of a stream therefore yields the same packets. The first violation
raises `RemoteProtocolError` with the reason code a CONNACK/DISCONNECT should carry and poisons the
decoder, because after a framing error nothing that follows can be trusted.

A decoder built without a protocol level is a server-side decoder: the first packet must be CONNECT, its
level (4 or 5) becomes the decoder's level, and a second CONNECT is a Protocol Error (MQTT-3.1.0-2).

Error classes follow MQTT 5.0 section 4.13: a packet that cannot be parsed by the spec (bad flags,
lengths, strings, unknown properties) is MALFORMED_PACKET; a parsed packet that breaks a rule is
PROTOCOL_ERROR. At level 4 the reason code only informs our own logging: 3.1.1 just closes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final, TypeVar

from uplink.mqtt.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from uplink.mqtt.packets import (
    MAX_PACKET_ID,
    MAX_PACKET_SIZE,
    MAX_VARINT,
    MQTT_5,
    MQTT_311,
    NO_PROPERTIES,
    PROTOCOL_LEVELS,
    SUBACK_FAILURE_311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from uplink.mqtt.properties import (
    WILL,
    decode_properties,
    encode_properties,
    read_bin,
    read_str,
)

__all__ = [
    "Decoder",
    "decode_varint",
    "encode",
    "encode_publish",
    "encode_varint",
]

_U16 = struct.Struct("!H")

# Reason codes each MQTT 5.0 packet may carry (the tables in sections 3.2.2.2 ... 3.15.2.1). The encoder
# insists on them; the decoder carries unknown codes through so that a newer peer does not break us.
_CONNACK_CODES_5: Final = frozenset(
    (0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99)
) | {0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
_PUBACK_CODES_5: Final = frozenset((0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99))
_PUBREL_CODES_5: Final = frozenset((0x00, 0x92))
_SUBACK_CODES_5: Final = frozenset((0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2))
_UNSUBACK_CODES_5: Final = frozenset((0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91))
_DISCONNECT_CODES_5: Final = frozenset(
    (0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95)
) | {0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
_AUTH_CODES_5: Final = frozenset((0x00, 0x18, 0x19))
_CONNACK_CODES_311: Final = frozenset(range(6))
_SUBACK_CODES_311: Final = frozenset((0, 1, 2, SUBACK_FAILURE_311))

# Required low nibble of the fixed header per packet type (MQTT-2.1.3-1); PUBLISH (3) is checked apart.
_FLAGS: Final = (-1, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)


# --------------------------------------------------------------------------------------------- varint


def encode_varint(n: int) -> bytes:
    """Minimal variable byte integer (MQTT 1.5.5) for 0 <= n <= 268_435_455."""
    if n < 0x80:
        if n < 0:
            raise LocalProtocolError(f"variable byte integer {n} is negative", ReasonCode.MALFORMED_PACKET)
        return bytes((n,))
    if n > MAX_VARINT:
        raise LocalProtocolError(
            f"variable byte integer {n} exceeds {MAX_VARINT}", ReasonCode.MALFORMED_PACKET
        )
    out = bytearray()
    while n:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after) of the variable byte integer at `pos`.

    Raises RemoteProtocolError(MALFORMED_PACKET) if it is longer than four bytes or `buf` ends first.
    Non-minimal encodings are accepted here (MQTT 3.1.1 allows them); the MQTT 5 paths check minimality.
    """
    value = 0
    n = len(buf)
    for i in range(4):
        if pos >= n:
            raise RemoteProtocolError("variable byte integer is truncated", ReasonCode.MALFORMED_PACKET)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value, pos
    raise RemoteProtocolError("variable byte integer is longer than four bytes", ReasonCode.MALFORMED_PACKET)


# --------------------------------------------------------------------------------------------- encode


def _local(msg: str, code: int = ReasonCode.PROTOCOL_ERROR) -> LocalProtocolError:
    return LocalProtocolError(msg, code)


def _str(s: str, what: str) -> bytes:
    if "\x00" in s:
        raise _local(f"{what} contains U+0000", ReasonCode.MALFORMED_PACKET)
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _local(f"{what} is not UTF-8 encodable: {exc.reason}", ReasonCode.MALFORMED_PACKET) from exc
    if len(b) > 0xFFFF:
        raise _local(f"{what} is longer than 65535 bytes", ReasonCode.MALFORMED_PACKET)
    return _U16.pack(len(b)) + b


def _bin(b: bytes, what: str) -> bytes:
    if len(b) > 0xFFFF:
        raise _local(f"{what} is longer than 65535 bytes", ReasonCode.MALFORMED_PACKET)
    return _U16.pack(len(b)) + bytes(b)


def _pid(packet_id: int | None, what: str) -> bytes:
    if packet_id is None or not 0 < packet_id <= MAX_PACKET_ID:
        raise _local(f"{what} needs a packet identifier in 1..65535, got {packet_id!r}")
    return _U16.pack(packet_id)


def _props(props: Properties, kind: int, level: int) -> bytes:
    """Property section at level 5; at level 4 checks there is nothing 3.1.1 would have to drop."""
    if level == MQTT_5:
        return encode_properties(props, kind)
    if props is not NO_PROPERTIES and props != NO_PROPERTIES:
        raise _local(f"MQTT 3.1.1 {PacketType(kind).name if kind else 'will'} cannot carry properties")
    return b""


def _frame(first: int, body: bytes, max_packet_size: int | None) -> bytes:
    n = len(body)
    if n > MAX_VARINT:
        raise _local(f"packet body of {n} bytes exceeds the MQTT maximum", ReasonCode.PACKET_TOO_LARGE)
    out = bytes((first,)) + encode_varint(n) + body
    if max_packet_size is not None and len(out) > max_packet_size:
        raise _local(
            f"packet of {len(out)} bytes exceeds the maximum packet size {max_packet_size}",
            ReasonCode.PACKET_TOO_LARGE,
        )
    return out


def _check_topic_name(topic: str, level: int, props: Properties) -> None:
    if "+" in topic or "#" in topic:
        raise _local(f"topic name {topic!r} contains a wildcard", ReasonCode.TOPIC_NAME_INVALID)
    if not topic and (level == MQTT_311 or props.topic_alias is None):
        # MQTT 5 allows an empty topic only when a topic alias stands in for it (MQTT-3.3.2-... alias rules).
        raise _local("topic name is empty", ReasonCode.TOPIC_NAME_INVALID)


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int | None,
    protocol_level: int,
    properties: Properties = NO_PROPERTIES,
    max_packet_size: int | None = None,
) -> bytes:
    """One PUBLISH on the wire. The broker's fast path: no Publish object, one join, no payload copies."""
    if qos == 0:
        if packet_id is not None:
            raise _local("a QoS 0 PUBLISH must not carry a packet identifier (MQTT-2.2.1-2)")
        if dup:
            raise _local("DUP must be 0 for QoS 0 (MQTT-3.3.1-2)")
        pid = b""
    elif qos == 1 or qos == 2:
        pid = _pid(packet_id, f"a QoS {qos} PUBLISH")
    else:
        raise _local(f"QoS {qos!r} does not exist", ReasonCode.QOS_NOT_SUPPORTED)
    if protocol_level == MQTT_5:
        props = b"\x00" if properties is NO_PROPERTIES else encode_properties(properties, PacketType.PUBLISH)
    elif protocol_level == MQTT_311:
        props = b""
        if properties is not NO_PROPERTIES and properties != NO_PROPERTIES:
            raise _local("MQTT 3.1.1 PUBLISH cannot carry properties")
    else:
        raise _local(
            f"protocol level {protocol_level!r} is not supported", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        )
    _check_topic_name(topic, protocol_level, properties)
    topic_b = _str(topic, "topic name")
    n = len(topic_b) + len(pid) + len(props) + len(payload)
    if n > MAX_VARINT:
        raise _local(f"PUBLISH body of {n} bytes exceeds the MQTT maximum", ReasonCode.PACKET_TOO_LARGE)
    header = bytes((0x30 | (dup << 3) | (qos << 1) | retain,)) + (
        bytes((n,)) if n < 0x80 else encode_varint(n)
    )
    if max_packet_size is not None and len(header) + n > max_packet_size:
        raise _local(
            f"PUBLISH of {len(header) + n} bytes exceeds the maximum packet size {max_packet_size}",
            ReasonCode.PACKET_TOO_LARGE,
        )
    return b"".join((header, topic_b, pid, props, payload))


def _enc_connect(p: Connect, level: int) -> tuple[int, bytes]:
    if p.protocol_level != level:
        raise _local(f"CONNECT says protocol level {p.protocol_level} but is encoded at {level}")
    if p.protocol_name != "MQTT":
        raise _local(f"protocol name must be 'MQTT' at level {level}, got {p.protocol_name!r}")
    if not 0 <= p.keep_alive_s <= 0xFFFF:
        raise _local(f"keep alive {p.keep_alive_s} s does not fit two bytes")
    flags = 0x02 if p.clean_start else 0
    will_part = b""
    if p.will is not None:
        w = p.will
        if w.qos not in (0, 1, 2):
            raise _local(f"will QoS {w.qos!r} does not exist", ReasonCode.QOS_NOT_SUPPORTED)
        _check_topic_name(w.topic, MQTT_311, NO_PROPERTIES)  # a will has no alias: never empty
        flags |= 0x04 | (w.qos << 3) | (0x20 if w.retain else 0)
        will_part = (
            _props(w.properties, WILL, level) + _str(w.topic, "will topic") + _bin(w.payload, "will payload")
        )
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if p.username is None and level == MQTT_311:
            raise _local("MQTT 3.1.1 does not allow a password without a user name (MQTT-3.1.2-22)")
        flags |= 0x40
    body = [
        b"\x00\x04MQTT",
        bytes((level, flags)),
        _U16.pack(p.keep_alive_s),
        _props(p.properties, PacketType.CONNECT, level),
        _str(p.client_id, "client identifier"),
        will_part,
    ]
    if p.username is not None:
        body.append(_str(p.username, "user name"))
    if p.password is not None:
        body.append(_bin(p.password, "password"))
    return 0x10, b"".join(body)


def _enc_connack(p: ConnAck, level: int) -> tuple[int, bytes]:
    codes = _CONNACK_CODES_5 if level == MQTT_5 else _CONNACK_CODES_311
    if p.reason_code not in codes:
        raise _local(f"CONNACK cannot carry code 0x{p.reason_code:02X} at level {level}")
    if p.session_present and p.reason_code:
        raise _local("session present must be 0 when the connection is refused (MQTT-3.2.2-6)")
    return 0x20, bytes((int(p.session_present), p.reason_code)) + _props(
        p.properties, PacketType.CONNACK, level
    )


_AckT = PubAck | PubRec | PubRel | PubComp
_A = TypeVar("_A", PubAck, PubRec, PubRel, PubComp)
_ACK_TYPES: Final[dict[type, PacketType]] = {
    PubAck: PacketType.PUBACK,
    PubRec: PacketType.PUBREC,
    PubRel: PacketType.PUBREL,
    PubComp: PacketType.PUBCOMP,
}


def _enc_ack(p: _AckT, level: int) -> tuple[int, bytes]:
    name = p.type.name
    pid = _pid(p.packet_id, name)
    first = 0x62 if p.type == PacketType.PUBREL else p.type << 4
    if level == MQTT_311:
        if p.reason_code:
            raise _local(f"MQTT 3.1.1 {name} cannot carry reason code 0x{p.reason_code:02X}")
        _props(p.properties, p.type, level)
        return first, pid
    codes = _PUBREL_CODES_5 if p.type in (PacketType.PUBREL, PacketType.PUBCOMP) else _PUBACK_CODES_5
    if p.reason_code not in codes:
        raise _local(f"{name} cannot carry reason code 0x{p.reason_code:02X}")
    if p.properties is NO_PROPERTIES or p.properties == NO_PROPERTIES:
        # Shortest forms allowed by MQTT 5.0 section 3.4.2.1: omit the code when it is Success.
        return first, pid if not p.reason_code else pid + bytes((p.reason_code,))
    return first, pid + bytes((p.reason_code,)) + encode_properties(p.properties, p.type)


def _enc_subscribe(p: Subscribe, level: int) -> tuple[int, bytes]:
    if not p.subscriptions:
        raise _local("SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-3)")
    body = [_pid(p.packet_id, "SUBSCRIBE"), _props(p.properties, PacketType.SUBSCRIBE, level)]
    for s in p.subscriptions:
        if s.qos not in (0, 1, 2):
            raise _local(f"subscription QoS {s.qos!r} does not exist", ReasonCode.QOS_NOT_SUPPORTED)
        if not s.topic_filter:
            raise _local("topic filter is empty", ReasonCode.TOPIC_FILTER_INVALID)
        opts = s.qos
        if level == MQTT_5:
            if s.retain_handling not in (0, 1, 2):
                raise _local(f"retain handling {s.retain_handling!r} does not exist")
            if s.no_local and s.topic_filter.startswith("$share/"):
                raise _local("no local is not allowed on a shared subscription (MQTT-3.8.3-4)")
            opts |= (s.no_local << 2) | (s.retain_as_published << 3) | (s.retain_handling << 4)
        elif s.no_local or s.retain_as_published or s.retain_handling:
            raise _local("MQTT 3.1.1 has no subscription options other than QoS")
        body.append(_str(s.topic_filter, "topic filter"))
        body.append(bytes((opts,)))
    return 0x82, b"".join(body)


def _enc_suback(p: SubAck, level: int) -> tuple[int, bytes]:
    if not p.reason_codes:
        raise _local("SUBACK needs one reason code per topic filter")
    codes = _SUBACK_CODES_5 if level == MQTT_5 else _SUBACK_CODES_311
    for c in p.reason_codes:
        if c not in codes:
            raise _local(f"SUBACK cannot carry code 0x{c:02X} at level {level}")
    return 0x90, _pid(p.packet_id, "SUBACK") + _props(p.properties, PacketType.SUBACK, level) + bytes(
        p.reason_codes
    )


def _enc_unsubscribe(p: Unsubscribe, level: int) -> tuple[int, bytes]:
    if not p.topic_filters:
        raise _local("UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
    body = [_pid(p.packet_id, "UNSUBSCRIBE"), _props(p.properties, PacketType.UNSUBSCRIBE, level)]
    for f in p.topic_filters:
        if not f:
            raise _local("topic filter is empty", ReasonCode.TOPIC_FILTER_INVALID)
        body.append(_str(f, "topic filter"))
    return 0xA2, b"".join(body)


def _enc_unsuback(p: UnsubAck, level: int) -> tuple[int, bytes]:
    pid = _pid(p.packet_id, "UNSUBACK")
    if level == MQTT_311:
        # 3.1.1 UNSUBACK only says "done": an all-Success list says no more, anything else would be lost.
        if any(p.reason_codes):
            raise _local("MQTT 3.1.1 UNSUBACK cannot carry reason codes")
        _props(p.properties, PacketType.UNSUBACK, level)
        return 0xB0, pid
    if not p.reason_codes:
        raise _local("MQTT 5 UNSUBACK needs one reason code per topic filter")
    for c in p.reason_codes:
        if c not in _UNSUBACK_CODES_5:
            raise _local(f"UNSUBACK cannot carry code 0x{c:02X}")
    return 0xB0, pid + encode_properties(p.properties, PacketType.UNSUBACK) + bytes(p.reason_codes)


def _enc_disconnect(p: Disconnect, level: int) -> tuple[int, bytes]:
    if level == MQTT_311:
        if p.reason_code:
            raise _local(f"MQTT 3.1.1 DISCONNECT cannot carry reason code 0x{p.reason_code:02X}")
        _props(p.properties, PacketType.DISCONNECT, level)
        return 0xE0, b""
    if p.reason_code not in _DISCONNECT_CODES_5:
        raise _local(f"DISCONNECT cannot carry reason code 0x{p.reason_code:02X}")
    if p.properties is NO_PROPERTIES or p.properties == NO_PROPERTIES:
        return 0xE0, bytes((p.reason_code,)) if p.reason_code else b""
    return 0xE0, bytes((p.reason_code,)) + encode_properties(p.properties, PacketType.DISCONNECT)


def _enc_auth(p: Auth, level: int) -> tuple[int, bytes]:
    if level == MQTT_311:
        raise _local("MQTT 3.1.1 has no AUTH packet")
    if p.reason_code not in _AUTH_CODES_5:
        raise _local(f"AUTH cannot carry reason code 0x{p.reason_code:02X}")
    if not p.reason_code and (p.properties is NO_PROPERTIES or p.properties == NO_PROPERTIES):
        return 0xF0, b""
    return 0xF0, bytes((p.reason_code,)) + encode_properties(p.properties, PacketType.AUTH)


def _enc_pingreq(p: PingReq, level: int) -> tuple[int, bytes]:
    return 0xC0, b""


def _enc_pingresp(p: PingResp, level: int) -> tuple[int, bytes]:
    return 0xD0, b""


_ENCODERS: Final[dict[type, Callable[[Packet, int], tuple[int, bytes]]]] = {
    Connect: _enc_connect,  # type: ignore[dict-item]
    ConnAck: _enc_connack,  # type: ignore[dict-item]
    PubAck: _enc_ack,  # type: ignore[dict-item]
    PubRec: _enc_ack,  # type: ignore[dict-item]
    PubRel: _enc_ack,  # type: ignore[dict-item]
    PubComp: _enc_ack,  # type: ignore[dict-item]
    Subscribe: _enc_subscribe,  # type: ignore[dict-item]
    SubAck: _enc_suback,  # type: ignore[dict-item]
    Unsubscribe: _enc_unsubscribe,  # type: ignore[dict-item]
    UnsubAck: _enc_unsuback,  # type: ignore[dict-item]
    PingReq: _enc_pingreq,  # type: ignore[dict-item]
    PingResp: _enc_pingresp,  # type: ignore[dict-item]
    Disconnect: _enc_disconnect,  # type: ignore[dict-item]
    Auth: _enc_auth,  # type: ignore[dict-item]
}


def encode(packet: Packet, protocol_level: int, max_packet_size: int | None = None) -> bytes:
    """The wire form of `packet` at `protocol_level` (4 or 5).

    Raises LocalProtocolError for anything the protocol cannot carry at that level, with reason code
    PACKET_TOO_LARGE when the result would exceed `max_packet_size` (the peer's Maximum Packet Size).
    """
    if protocol_level not in PROTOCOL_LEVELS:
        raise _local(
            f"protocol level {protocol_level!r} is not supported", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        )
    if type(packet) is Publish:
        p = packet
        return encode_publish(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            p.dup,
            p.packet_id,
            protocol_level,
            p.properties,
            max_packet_size,
        )
    enc = _ENCODERS.get(type(packet))
    if enc is None:
        raise _local(f"{type(packet).__name__} is not an MQTT packet")
    first, body = enc(packet, protocol_level)
    return _frame(first, body, max_packet_size)


# --------------------------------------------------------------------------------------------- decode


def _malformed(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, ReasonCode.MALFORMED_PACKET)


def _protocol(msg: str, code: int = ReasonCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code)


def _read_u16(mv: memoryview, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise _malformed(f"{what} runs past the end of the packet")
    return (mv[pos] << 8) | mv[pos + 1]


def _read_pid(mv: memoryview, pos: int, end: int, what: str) -> int:
    pid = _read_u16(mv, pos, end, f"{what} packet identifier")
    if not pid:
        raise _protocol(f"{what} packet identifier must not be 0 (MQTT-2.2.1-3)")
    return pid


def _dec_connect(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Connect:
    name, pos = read_str(mv, pos, end)
    if pos >= end:
        raise _malformed("CONNECT ends before its protocol level")
    declared = mv[pos]
    pos += 1
    if name != "MQTT" or declared not in PROTOCOL_LEVELS:
        # MQTT 3.1 ("MQIsdp", level 3) and anything newer are refused here (CONNACK 0x01 / 0x84).
        raise _protocol(
            f"protocol {name!r} level {declared} is not supported", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        )
    if pos + 3 > end:
        raise _malformed("CONNECT ends inside its variable header")
    cflags = mv[pos]
    keep_alive_s = (mv[pos + 1] << 8) | mv[pos + 2]
    pos += 3
    if cflags & 0x01:
        raise _malformed("CONNECT reserved flag is set (MQTT-3.1.2-3)")
    has_will = cflags & 0x04
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = cflags & 0x40
    has_username = cflags & 0x80
    if not has_will and (will_qos or will_retain):
        raise _malformed("will QoS/retain set without the will flag (MQTT-3.1.2-11/13)")
    if will_qos == 3:
        raise _malformed("will QoS 3 does not exist (MQTT-3.1.2-12)")
    if has_password and not has_username and declared == MQTT_311:
        raise _malformed("MQTT 3.1.1 does not allow a password without a user name (MQTT-3.1.2-22)")
    props = NO_PROPERTIES
    if declared == MQTT_5:
        props, pos = decode_properties(mv, pos, end, PacketType.CONNECT)
    client_id, pos = read_str(mv, pos, end)
    will = None
    if has_will:
        wprops = NO_PROPERTIES
        if declared == MQTT_5:
            wprops, pos = decode_properties(mv, pos, end, WILL)
        wtopic, pos = read_str(mv, pos, end)
        if not wtopic or "+" in wtopic or "#" in wtopic:
            raise _protocol(f"will topic {wtopic!r} is not a valid topic name", ReasonCode.TOPIC_NAME_INVALID)
        wpayload, pos = read_bin(mv, pos, end)
        will = Will(wtopic, wpayload, will_qos, will_retain, wprops)
    username = password = None
    if has_username:
        username, pos = read_str(mv, pos, end)
    if has_password:
        password, pos = read_bin(mv, pos, end)
    if pos != end:
        raise _malformed("CONNECT has bytes after its payload")
    return Connect(
        client_id, declared, bool(cflags & 0x02), keep_alive_s, username, password, will, props, name
    )


def _dec_connack(mv: memoryview, pos: int, end: int, flags: int, level: int) -> ConnAck:
    if pos + 2 > end:
        raise _malformed("CONNACK is shorter than two bytes")
    ack_flags = mv[pos]
    code = mv[pos + 1]
    pos += 2
    if ack_flags & 0xFE:
        raise _malformed("CONNACK reserved flags are set (MQTT-3.2.2-1)")
    if ack_flags and code:
        raise _protocol("session present set on a refused connection (MQTT-3.2.2-6)")
    props = NO_PROPERTIES
    if level == MQTT_311:
        if code not in _CONNACK_CODES_311:
            raise _protocol(f"MQTT 3.1.1 CONNACK return code {code} is reserved")
    elif pos < end:
        props, pos = decode_properties(mv, pos, end, PacketType.CONNACK)
    # else: a level 5 CONNACK without property length. Only a 3.1.1-only server refusing our level sends
    # that (20 02 00 01); accepting it lets the session report the refusal instead of "malformed".
    if pos != end:
        raise _malformed("CONNACK has trailing bytes")
    return ConnAck(bool(ack_flags), code, props)


def _dec_ack(cls: type[_A], mv: memoryview, pos: int, end: int, level: int) -> _A:
    name = cls.__name__.upper()
    pid = _read_pid(mv, pos, end, name)
    pos += 2
    if pos == end:
        return cls(pid)
    if level == MQTT_311:
        raise _malformed(f"MQTT 3.1.1 {name} must have remaining length 2")
    code = mv[pos]
    pos += 1
    if pos == end:  # remaining length 3: reason code, no property length (MQTT 5.0 section 3.4.2.2.1)
        return cls(pid, code)
    props, pos = decode_properties(mv, pos, end, _ACK_TYPES[cls])
    if pos != end:
        raise _malformed(f"{name} has trailing bytes")
    return cls(pid, code, props)


def _dec_publish(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise _malformed("PUBLISH QoS 3 (MQTT-3.3.1-4)")
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise _malformed("DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)")
    if pos + 2 > end:
        raise _malformed("PUBLISH ends before its topic name")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise _malformed("PUBLISH topic name runs past the end of the packet")
    try:
        topic = str(mv[pos + 2 : stop], "utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"PUBLISH topic name is not well-formed UTF-8: {exc.reason}") from exc
    if "\x00" in topic:
        raise _malformed("PUBLISH topic name contains U+0000")
    if "+" in topic or "#" in topic:
        raise _protocol(f"PUBLISH topic name {topic!r} contains a wildcard", ReasonCode.TOPIC_NAME_INVALID)
    pos = stop
    packet_id = None
    if qos:
        if pos + 2 > end:
            raise _malformed("PUBLISH ends before its packet identifier")
        packet_id = (mv[pos] << 8) | mv[pos + 1]
        if not packet_id:
            raise _protocol("PUBLISH packet identifier must not be 0 (MQTT-2.2.1-3)")
        pos += 2
    props = NO_PROPERTIES
    if level == MQTT_5:
        if pos < end and mv[pos] == 0:  # the common case: no properties
            pos += 1
        else:
            props, pos = decode_properties(mv, pos, end, PacketType.PUBLISH)
        if not topic and props.topic_alias is None:
            raise _protocol("empty topic name without a topic alias")
    elif not topic:
        raise _protocol("PUBLISH topic name is empty (MQTT-4.7.3-1)", ReasonCode.TOPIC_NAME_INVALID)
    return Publish(topic, bytes(mv[pos:end]), qos, bool(flags & 0x01), dup, packet_id, props)


def _dec_puback(mv: memoryview, pos: int, end: int, flags: int, level: int) -> PubAck:
    return _dec_ack(PubAck, mv, pos, end, level)


def _dec_pubrec(mv: memoryview, pos: int, end: int, flags: int, level: int) -> PubRec:
    return _dec_ack(PubRec, mv, pos, end, level)


def _dec_pubrel(mv: memoryview, pos: int, end: int, flags: int, level: int) -> PubRel:
    return _dec_ack(PubRel, mv, pos, end, level)


def _dec_pubcomp(mv: memoryview, pos: int, end: int, flags: int, level: int) -> PubComp:
    return _dec_ack(PubComp, mv, pos, end, level)


def _dec_subscribe(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Subscribe:
    pid = _read_pid(mv, pos, end, "SUBSCRIBE")
    pos += 2
    props = NO_PROPERTIES
    if level == MQTT_5:
        props, pos = decode_properties(mv, pos, end, PacketType.SUBSCRIBE)
    subs: list[Subscription] = []
    while pos < end:
        flt, pos = read_str(mv, pos, end)
        if pos >= end:
            raise _malformed("SUBSCRIBE topic filter without subscription options")
        opts = mv[pos]
        pos += 1
        qos = opts & 0x03
        if level == MQTT_311:
            if opts & 0xFC or qos == 3:
                raise _malformed(f"MQTT 3.1.1 requested QoS byte 0x{opts:02X} is invalid (MQTT-3.8.3-4)")
            subs.append(Subscription(flt, qos))
            continue
        if opts & 0xC0:
            raise _malformed("subscription options reserved bits are set (MQTT-3.8.3-5)")
        if qos == 3:
            raise _protocol("subscription maximum QoS 3 does not exist")
        retain_handling = (opts >> 4) & 0x03
        if retain_handling == 3:
            raise _protocol("retain handling 3 does not exist")
        no_local = bool(opts & 0x04)
        if no_local and flt.startswith("$share/"):
            raise _protocol("no local on a shared subscription (MQTT-3.8.3-4)")
        subs.append(Subscription(flt, qos, no_local, bool(opts & 0x08), retain_handling))
    if not subs:
        raise _protocol("SUBSCRIBE without topic filters (MQTT-3.8.3-3)")
    return Subscribe(pid, tuple(subs), props)


def _dec_suback(mv: memoryview, pos: int, end: int, flags: int, level: int) -> SubAck:
    pid = _read_pid(mv, pos, end, "SUBACK")
    pos += 2
    props = NO_PROPERTIES
    if level == MQTT_5:
        props, pos = decode_properties(mv, pos, end, PacketType.SUBACK)
    codes = tuple(mv[pos:end])
    if not codes:
        raise _protocol("SUBACK without reason codes")
    if level == MQTT_311 and not _SUBACK_CODES_311.issuperset(codes):
        raise _protocol(f"MQTT 3.1.1 SUBACK return codes {codes} include a reserved value")
    return SubAck(pid, codes, props)


def _dec_unsubscribe(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Unsubscribe:
    pid = _read_pid(mv, pos, end, "UNSUBSCRIBE")
    pos += 2
    props = NO_PROPERTIES
    if level == MQTT_5:
        props, pos = decode_properties(mv, pos, end, PacketType.UNSUBSCRIBE)
    filters: list[str] = []
    while pos < end:
        flt, pos = read_str(mv, pos, end)
        filters.append(flt)
    if not filters:
        raise _protocol("UNSUBSCRIBE without topic filters (MQTT-3.10.3-2)")
    return Unsubscribe(pid, tuple(filters), props)


def _dec_unsuback(mv: memoryview, pos: int, end: int, flags: int, level: int) -> UnsubAck:
    pid = _read_pid(mv, pos, end, "UNSUBACK")
    pos += 2
    if level == MQTT_311:
        if pos != end:
            raise _malformed("MQTT 3.1.1 UNSUBACK must have remaining length 2")
        return UnsubAck(pid)
    props, pos = decode_properties(mv, pos, end, PacketType.UNSUBACK)
    codes = tuple(mv[pos:end])
    if not codes:
        raise _protocol("UNSUBACK without reason codes")
    return UnsubAck(pid, codes, props)


def _dec_pingreq(mv: memoryview, pos: int, end: int, flags: int, level: int) -> PingReq:
    if pos != end:
        raise _malformed("PINGREQ must have remaining length 0")
    return PingReq()


def _dec_pingresp(mv: memoryview, pos: int, end: int, flags: int, level: int) -> PingResp:
    if pos != end:
        raise _malformed("PINGRESP must have remaining length 0")
    return PingResp()


def _dec_disconnect(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Disconnect:
    if pos == end:
        return Disconnect()
    if level == MQTT_311:
        raise _malformed("MQTT 3.1.1 DISCONNECT must have remaining length 0")
    code = mv[pos]
    pos += 1
    if pos == end:  # remaining length 1: no property length (MQTT 5.0 section 3.14.2.2.1)
        return Disconnect(code)
    props, pos = decode_properties(mv, pos, end, PacketType.DISCONNECT)
    if pos != end:
        raise _malformed("DISCONNECT has trailing bytes")
    return Disconnect(code, props)


def _dec_auth(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Auth:
    if level == MQTT_311:
        raise _malformed("packet type 15 is reserved in MQTT 3.1.1")
    if pos == end:
        return Auth()
    code = mv[pos]
    pos += 1
    # The spec names only lengths 0 and >= 2; a reason code without property length is read like
    # DISCONNECT's short form rather than refused, since its meaning is unambiguous.
    if pos == end:
        return Auth(code)
    props, pos = decode_properties(mv, pos, end, PacketType.AUTH)
    if pos != end:
        raise _malformed("AUTH has trailing bytes")
    return Auth(code, props)


def _dec_reserved(mv: memoryview, pos: int, end: int, flags: int, level: int) -> Packet:
    raise _malformed("packet type 0 is reserved")


_DecodeFn = Callable[[memoryview, int, int, int, int], Packet]
_DECODERS: Final[tuple[_DecodeFn, ...]] = (
    _dec_reserved,
    _dec_connect,
    _dec_connack,
    _dec_publish,
    _dec_puback,
    _dec_pubrec,
    _dec_pubrel,
    _dec_pubcomp,
    _dec_subscribe,
    _dec_suback,
    _dec_unsubscribe,
    _dec_unsuback,
    _dec_pingreq,
    _dec_pingresp,
    _dec_disconnect,
    _dec_auth,
)


class Decoder:
    """Incremental MQTT stream decoder: `feed(bytes) -> [Packet]`. See the module docstring."""

    __slots__ = ("_buf", "_connect_seen", "_failure", "_level", "max_packet_size")

    def __init__(self, protocol_level: int | None = None, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        if protocol_level is not None and protocol_level not in PROTOCOL_LEVELS:
            raise ValueError(f"protocol_level must be 4, 5 or None, not {protocol_level!r}")
        self._level = protocol_level
        self._connect_seen = False
        self._buf = bytearray()
        self._failure: ProtocolError | None = None
        self.max_packet_size = max_packet_size

    @property
    def protocol_level(self) -> int | None:
        """4 or 5 once known. After a failed CONNECT: the level it declared (if 4 or 5), else None."""
        return self._level

    @protocol_level.setter
    def protocol_level(self, level: int | None) -> None:
        if level is not None and level not in PROTOCOL_LEVELS:
            raise ValueError(f"protocol_level must be 4, 5 or None, not {level!r}")
        self._level = level

    def buffered_bytes(self) -> int:
        """Bytes received but not yet part of a complete packet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Every packet completed by `data`, in order. Raises RemoteProtocolError on the first violation."""
        if self._failure is not None:
            raise RemoteProtocolError(f"decoder already failed: {self._failure}", self._failure.reason_code)
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data  # fast path: parse the caller's bytes in place, copy only an unfinished tail
        parsed: list[Packet] = []
        try:
            packets, pos = self._parse(src, parsed)
        except ProtocolError as exc:
            self._failure = exc
            buf.clear()
            # The packets before the violation were valid: the caller handles them, then closes.
            exc.packets_before = tuple(parsed)
            raise
        if src is buf:
            del buf[:pos]
        elif pos < len(src):
            buf += memoryview(src)[pos:]
        return packets

    def _parse(self, src: bytes | bytearray | memoryview, packets: list[Packet]) -> tuple[list[Packet], int]:
        append = packets.append
        decoders = _DECODERS
        n = len(src)
        pos = 0
        level = self._level
        with memoryview(src) as mv:
            while n - pos >= 2:
                first = mv[pos]
                b = mv[pos + 1]
                if b < 0x80:
                    length = b
                    body = pos + 2
                    minimal = True
                else:
                    length = b & 0x7F
                    i = pos + 2
                    shift = 7
                    while True:
                        if i >= n:
                            return packets, pos  # header not complete yet
                        b = mv[i]
                        i += 1
                        length |= (b & 0x7F) << shift
                        if not b & 0x80:
                            break
                        if i - pos > 4:
                            raise _malformed("remaining length is longer than four bytes")
                        shift += 7
                    body = i
                    minimal = b != 0
                end = body + length
                ptype = first >> 4
                flags = first & 0x0F
                if ptype != PacketType.PUBLISH and flags != _FLAGS[ptype]:
                    if ptype == 0:
                        raise _malformed("packet type 0 is reserved")
                    raise _malformed(f"{PacketType(ptype).name} fixed header flags 0x{flags:X} are invalid")
                if level is None and not self._connect_seen and ptype != PacketType.CONNECT:
                    raise _protocol(f"first packet is {PacketType(ptype).name}, not CONNECT (MQTT-3.1.0-1)")
                if end - pos > self.max_packet_size:
                    raise _protocol(
                        f"packet of {end - pos} bytes exceeds the maximum packet size {self.max_packet_size}",
                        ReasonCode.PACKET_TOO_LARGE,
                    )
                if end > n:
                    break
                if ptype == PacketType.CONNECT:
                    packet: Packet = self._connect(mv, body, end, level)
                    level = self._level
                else:
                    # Only CONNECT may arrive before the level is known (checked above).
                    assert level is not None
                    packet = decoders[ptype](mv, body, end, flags, level)
                if not minimal and level == MQTT_5:
                    raise _malformed("remaining length is not minimally encoded (MQTT-1.5.5-1)")
                append(packet)
                pos = end
        return packets, pos

    def _connect(self, mv: memoryview, body: int, end: int, level: int | None) -> Connect:
        if self._connect_seen:
            raise _protocol("second CONNECT on one connection (MQTT-3.1.0-2)")
        if (
            level is None
            and end - body >= 7
            and bytes(mv[body : body + 6]) == b"\x00\x04MQTT"
            and mv[body + 6] in (4, 5)
        ):
            # Adopt the declared level before the rest is parsed, so that a server whose CONNECT fails
            # below can still answer in the client's own version (CONNACK 0x81/0x82... at level 5).
            self._level = mv[body + 6]
        packet = _dec_connect(mv, body, end, 0, level or MQTT_5)
        if level is None:
            self._connect_seen = True
            self._level = packet.protocol_level
        elif packet.protocol_level != level:
            raise _protocol(f"CONNECT at level {packet.protocol_level} on a level {level} decoder")
        return packet
