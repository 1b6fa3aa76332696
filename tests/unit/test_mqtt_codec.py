"""Unit tests for the MQTT codec: golden byte vectors at both levels and every wire rule it enforces.

Vectors are assembled field by field from the OASIS MQTT 3.1.1 and 5.0 specifications (the figures of
sections 1.5, 3.1, 3.8, 3.9, 3.10 where the spec gives them) and written out as hex here, so they do not
depend on the encoder under test.
"""

from __future__ import annotations

import pytest

from uplink.mqtt.codec import Decoder, decode_varint, encode, encode_publish, encode_varint
from uplink.mqtt.errors import LocalProtocolError, RemoteProtocolError
from uplink.mqtt.packets import (
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
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

MALFORMED = ReasonCode.MALFORMED_PACKET
PROTOCOL = ReasonCode.PROTOCOL_ERROR


def h(s: str) -> bytes:
    return bytes.fromhex(s)


GOLDEN: list[tuple[int, Packet, str]] = [
    # --- MQTT 3.1.1
    (MQTT_311, Connect("test", MQTT_311), "10 10 0004 4d515454 04 02 003c 0004 74657374"),
    # Figure 3.6's flags 0xCE: user name, password, will QoS 1, will flag, clean session; keep alive 10.
    (
        MQTT_311,
        Connect("c", MQTT_311, True, 10, "u", b"p", Will("w", b"x", qos=1)),
        "10 19 0004 4d515454 04 ce 000a 0001 63 0001 77 0001 78 0001 75 0001 70",
    ),
    (MQTT_311, ConnAck(True, 0), "20 02 01 00"),
    (MQTT_311, ConnAck(False, 5), "20 02 00 05"),
    (MQTT_311, Publish("a/b", b"hi"), "30 07 0003 612f62 6869"),
    (MQTT_311, Publish("a/b", b"hi", 1, True, True, 10), "3b 09 0003 612f62 000a 6869"),
    # Figure 1.1: "A\U0002A6D4" is 00 05 41 F0 AA 9B 94.
    (MQTT_311, Publish("A\U0002a6d4"), "30 07 0005 41f0aa9b94"),
    (MQTT_311, PubAck(10), "40 02 000a"),
    (MQTT_311, PubRec(10), "50 02 000a"),
    (MQTT_311, PubRel(10), "62 02 000a"),
    (MQTT_311, PubComp(10), "70 02 000a"),
    (
        MQTT_311,
        Subscribe(10, (Subscription("a/b", 1), Subscription("c/d", 2))),
        "82 0e 000a 0003 612f62 01 0003 632f64 02",
    ),
    (MQTT_311, SubAck(10, (0, 1, 2, 0x80)), "90 06 000a 00 01 02 80"),
    (MQTT_311, Unsubscribe(10, ("a/b", "c/d")), "a2 0c 000a 0003 612f62 0003 632f64"),
    (MQTT_311, UnsubAck(10), "b0 02 000a"),
    (MQTT_311, PingReq(), "c0 00"),
    (MQTT_311, PingResp(), "d0 00"),
    (MQTT_311, Disconnect(), "e0 00"),
    # --- MQTT 5.0
    (MQTT_5, Connect("test"), "10 11 0004 4d515454 05 02 003c 00 0004 74657374"),
    (
        MQTT_5,
        Connect("c", properties=Properties(session_expiry_interval=10, receive_maximum=20)),
        "10 16 0004 4d515454 05 02 003c 08 11 0000000a 21 0014 0001 63",
    ),
    # MQTT 5 allows a password without a user name (3.1.2.9).
    (MQTT_5, Connect("", password=b"p"), "10 10 0004 4d515454 05 42 003c 00 0000 0001 70"),
    (MQTT_5, ConnAck(), "20 03 00 00 00"),
    (MQTT_5, ConnAck(properties=Properties(assigned_client_identifier="ab")), "20 08 00 00 05 12 0002 6162"),
    (MQTT_5, Publish("a/b", b"hi"), "30 08 0003 612f62 00 6869"),
    (
        MQTT_5,
        Publish(
            "a/b",
            b"hi",
            qos=1,
            packet_id=1,
            properties=Properties(
                payload_format_indicator=1,
                message_expiry_interval=60,
                correlation_data=b"\x01",
                user_properties=(("k", "v"),),
            ),
        ),
        "32 1c 0003 612f62 0001 12 01 01 02 0000003c 09 0001 01 26 0001 6b 0001 76 6869",
    ),
    (MQTT_5, Publish("", b"", properties=Properties(topic_alias=7)), "30 06 0000 03 23 0007"),
    (
        MQTT_5,
        Publish("t", properties=Properties(subscription_identifiers=(1, 268435455))),
        "30 0b 0001 74 07 0b 01 0b ffffff7f",
    ),
    (MQTT_5, PubAck(10), "40 02 000a"),
    (MQTT_5, PubAck(10, 0x10), "40 03 000a 10"),
    (MQTT_5, PubAck(10, 0x80, Properties(reason_string="x")), "40 08 000a 80 04 1f 0001 78"),
    (MQTT_5, PubRel(10, 0x92), "62 03 000a 92"),
    (
        MQTT_5,
        Subscribe(10, (Subscription("a/b", 1, True, True, 2),), Properties(subscription_identifiers=(5,))),
        "82 0b 000a 02 0b 05 0003 612f62 2d",
    ),
    (MQTT_5, SubAck(10, (0x01, 0x8F)), "90 05 000a 00 01 8f"),
    (MQTT_5, Unsubscribe(10, ("a/b",)), "a2 08 000a 00 0003 612f62"),
    (MQTT_5, UnsubAck(10, (0x11,)), "b0 04 000a 00 11"),
    (MQTT_5, Disconnect(), "e0 00"),
    (MQTT_5, Disconnect(ReasonCode.SESSION_TAKEN_OVER), "e0 01 8e"),
    (MQTT_5, Disconnect(0, Properties(session_expiry_interval=0)), "e0 07 00 05 11 00000000"),
    (MQTT_5, Auth(), "f0 00"),
    (MQTT_5, Auth(0x18, Properties(authentication_method="m")), "f0 06 18 04 15 0001 6d"),
]


@pytest.mark.parametrize(("level", "packet", "wire"), GOLDEN)
def test_packets_encode_to_the_bytes_the_spec_defines(level: int, packet: Packet, wire: str) -> None:
    assert encode(packet, level) == h(wire)


@pytest.mark.parametrize(("level", "packet", "wire"), GOLDEN)
def test_the_bytes_the_spec_defines_decode_to_the_packet(level: int, packet: Packet, wire: str) -> None:
    decoder = Decoder() if isinstance(packet, Connect) else Decoder(level)
    assert decoder.feed(h(wire)) == [packet]


@pytest.mark.parametrize(
    ("n", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16_383, "ff7f"),
        (16_384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
        (268_435_455, "ffffff7f"),
    ],
)
def test_variable_byte_integers_match_the_spec_table(n: int, wire: str) -> None:
    # MQTT 5.0 table 1-1 / MQTT 3.1.1 table 2.4: the boundaries of each length.
    assert encode_varint(n) == h(wire)
    assert decode_varint(h("ff" + wire), 1) == (n, 1 + len(wire) // 2)


def test_a_varint_of_five_bytes_is_malformed() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_varint(h("ffffffff7f"), 0)
    assert exc.value.reason_code == MALFORMED


def test_varints_outside_the_range_cannot_be_encoded() -> None:
    for n in (-1, 268_435_456):
        with pytest.raises(LocalProtocolError):
            encode_varint(n)


# (level, bytes after the decoder has the level, expected reason code)
BAD_STREAMS: list[tuple[str, int, str, int]] = [
    ("PUBACK with flags 1", MQTT_311, "41 02 0001", MALFORMED),
    ("PUBREL with flags 0", MQTT_5, "60 02 0001", MALFORMED),
    ("SUBSCRIBE with flags 0", MQTT_311, "80 06 0001 0001 61 00", MALFORMED),
    ("UNSUBSCRIBE with flags 0", MQTT_5, "a0 05 0001 00 0001 61", MALFORMED),
    ("PINGREQ with flags", MQTT_311, "c1 00", MALFORMED),
    ("reserved packet type 0", MQTT_5, "00 00", MALFORMED),
    ("AUTH in MQTT 3.1.1", MQTT_311, "f0 00", MALFORMED),
    ("PUBLISH QoS 3", MQTT_311, "36 05 0001 61 0001", MALFORMED),
    ("DUP on QoS 0", MQTT_311, "38 03 0001 61", MALFORMED),
    ("remaining length of five bytes", MQTT_311, "30 ffffffff7f", MALFORMED),
    ("non-minimal remaining length in MQTT 5", MQTT_5, "c0 8000", MALFORMED),
    ("3.1.1 PUBACK with trailing byte", MQTT_311, "40 03 0001 00", MALFORMED),
    ("PINGREQ with a body", MQTT_5, "c0 01 00", MALFORMED),
    ("3.1.1 DISCONNECT with a body", MQTT_311, "e0 01 00", MALFORMED),
    ("3.1.1 UNSUBACK with codes", MQTT_311, "b0 03 0001 00", MALFORMED),
    ("topic length past the packet", MQTT_311, "30 03 0005 61", MALFORMED),
    ("PUBLISH without packet identifier", MQTT_311, "32 03 0001 61", MALFORMED),
    ("invalid UTF-8", MQTT_311, "30 03 0001 ff", MALFORMED),
    ("UTF-8 encoded surrogate", MQTT_5, "30 06 0003 eda080 00", MALFORMED),
    ("overlong UTF-8 NUL", MQTT_5, "30 05 0002 c080 00", MALFORMED),
    ("U+0000 in a topic", MQTT_311, "30 03 0001 00", MALFORMED),
    ("U+0000 in a filter", MQTT_311, "82 06 0001 0001 00 00", MALFORMED),
    ("wildcard in a topic name", MQTT_311, "30 03 0001 23", ReasonCode.TOPIC_NAME_INVALID),
    ("'+' in a topic name", MQTT_5, "30 04 0001 2b 00", ReasonCode.TOPIC_NAME_INVALID),
    ("empty topic name in 3.1.1", MQTT_311, "30 02 0000", ReasonCode.TOPIC_NAME_INVALID),
    ("empty topic name without alias", MQTT_5, "30 03 0000 00", PROTOCOL),
    ("PUBLISH packet identifier 0", MQTT_311, "32 05 0001 61 0000", PROTOCOL),
    ("PUBACK packet identifier 0", MQTT_5, "40 02 0000", PROTOCOL),
    ("SUBSCRIBE packet identifier 0", MQTT_311, "82 06 0000 0001 61 00", PROTOCOL),
    ("unknown property identifier", MQTT_5, "40 06 0001 00 02 05 00", MALFORMED),
    ("property not valid on the packet", MQTT_5, "40 07 0001 00 03 23 0001", MALFORMED),
    ("will delay on a PUBLISH", MQTT_5, "30 09 0001 61 05 18 00000001", MALFORMED),
    ("property length past the packet", MQTT_5, "40 05 0001 00 09 1f", MALFORMED),
    ("property value past the property length", MQTT_5, "40 06 0001 00 02 1f 0001", MALFORMED),
    ("non-minimal property length", MQTT_5, "30 05 0001 61 8000", MALFORMED),
    ("duplicate reason string", MQTT_5, "40 0c 0001 00 08 1f 0001 61 1f 0001 62", PROTOCOL),
    ("duplicate message expiry", MQTT_5, "30 0e 0001 61 0a 02 00000001 02 00000002", PROTOCOL),
    ("two subscription identifiers in SUBSCRIBE", MQTT_5, "82 0a 0001 04 0b 01 0b 02 0001 61 00", PROTOCOL),
    ("subscription identifier 0", MQTT_5, "30 06 0001 61 02 0b 00", PROTOCOL),
    ("topic alias 0", MQTT_5, "30 07 0001 61 03 23 0000", ReasonCode.TOPIC_ALIAS_INVALID),
    ("payload format indicator 2", MQTT_5, "30 06 0001 61 02 01 02", PROTOCOL),
    ("response topic with a wildcard", MQTT_5, "30 09 0001 61 05 08 0002 612b", PROTOCOL),
    ("SUBSCRIBE without filters 3.1.1", MQTT_311, "82 02 0001", PROTOCOL),
    ("SUBSCRIBE without filters 5", MQTT_5, "82 03 0001 00", PROTOCOL),
    ("SUBSCRIBE filter without options", MQTT_311, "82 05 0001 0001 61", MALFORMED),
    ("3.1.1 subscription option bits", MQTT_311, "82 06 0001 0001 61 04", MALFORMED),
    ("3.1.1 requested QoS 3", MQTT_311, "82 06 0001 0001 61 03", MALFORMED),
    ("MQTT 5 subscription reserved bits", MQTT_5, "82 07 0001 00 0001 61 40", MALFORMED),
    ("MQTT 5 subscription QoS 3", MQTT_5, "82 07 0001 00 0001 61 03", PROTOCOL),
    ("MQTT 5 retain handling 3", MQTT_5, "82 07 0001 00 0001 61 30", PROTOCOL),
    ("no local on a shared subscription", MQTT_5, "82 10 0001 00 000a 2473686172652f672f61 04", PROTOCOL),
    ("UNSUBSCRIBE without filters", MQTT_311, "a2 02 0001", PROTOCOL),
    ("SUBACK without codes", MQTT_5, "90 03 0001 00", PROTOCOL),
    ("3.1.1 SUBACK code 3", MQTT_311, "90 03 0001 03", PROTOCOL),
    ("3.1.1 SUBACK code 0x8F", MQTT_311, "90 03 0001 8f", PROTOCOL),
    ("UNSUBACK without codes", MQTT_5, "b0 03 0001 00", PROTOCOL),
    ("3.1.1 CONNACK return code 6", MQTT_311, "20 02 00 06", PROTOCOL),
    ("CONNACK reserved flag bits", MQTT_311, "20 02 02 00", MALFORMED),
    ("session present on refusal", MQTT_5, "20 03 01 87 00", PROTOCOL),
    ("3.1.1 CONNACK too long", MQTT_311, "20 03 00 00 00", MALFORMED),
    ("PUBACK properties with trailing bytes", MQTT_5, "40 05 0001 00 00 ff", MALFORMED),
    ("CONNECT on a client decoder of another level", MQTT_5, "10 0c 0004 4d515454 04 02 003c 0000", PROTOCOL),
]


@pytest.mark.parametrize(
    ("level", "wire", "code"), [c[1:] for c in BAD_STREAMS], ids=[c[0] for c in BAD_STREAMS]
)
def test_rule_breaking_bytes_raise_with_the_spec_reason_code(level: int, wire: str, code: int) -> None:
    decoder = Decoder(level)
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(h(wire))
    assert exc.value.reason_code == code


def _connect(flags: str, rest: str, level: str = "04", name: str = "0004 4d515454") -> bytes:
    body = h(f"{name} {level} {flags} 003c {rest}")
    return bytes((0x10, len(body))) + body


BAD_CONNECTS: list[tuple[str, bytes, int]] = [
    ("MQTT 3.1 'MQIsdp' level 3", _connect("02", "0000", "03", "0006 4d5149736470"), 0x84),
    ("level 6", _connect("02", "00 0000", "06"), 0x84),
    ("level 3 under the name MQTT", _connect("02", "0000", "03"), 0x84),
    ("an unknown protocol name", _connect("02", "0000", "04", "0004 4d515455"), 0x84),
    ("the reserved flag", _connect("03", "0000"), MALFORMED),
    ("will QoS without will flag", _connect("0a", "0000"), MALFORMED),
    ("will retain without will flag", _connect("22", "0000"), MALFORMED),
    ("will QoS 3", _connect("1e", "0000 0001 77 0000"), MALFORMED),
    ("3.1.1 password without user name", _connect("42", "0000 0001 70"), MALFORMED),
    ("a will topic with a wildcard", _connect("06", "0000 0001 23 0000"), ReasonCode.TOPIC_NAME_INVALID),
    ("an empty will topic", _connect("06", "0000 0000 0000"), ReasonCode.TOPIC_NAME_INVALID),
    ("a missing user name", _connect("82", "0000"), MALFORMED),
    ("trailing bytes", _connect("02", "0000 00"), MALFORMED),
    ("receive maximum 0", _connect("02", "03 21 0000 0000", "05"), PROTOCOL),
    ("maximum packet size 0", _connect("02", "05 27 00000000 0000", "05"), PROTOCOL),
    ("request problem information 2", _connect("02", "02 17 02 0000", "05"), PROTOCOL),
    ("authentication data without method", _connect("02", "04 16 0001 00 0000", "05"), PROTOCOL),
    ("a CONNACK-only property", _connect("02", "02 24 01 0000", "05"), MALFORMED),
    ("a will-only property on CONNECT", _connect("02", "05 18 00000001 0000", "05"), MALFORMED),
]


@pytest.mark.parametrize(("wire", "code"), [c[1:] for c in BAD_CONNECTS], ids=[c[0] for c in BAD_CONNECTS])
def test_a_server_decoder_refuses_bad_connects_with_the_spec_reason_code(wire: bytes, code: int) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        Decoder().feed(wire)
    assert exc.value.reason_code == code


def test_a_failed_v5_connect_still_tells_the_server_which_level_to_answer_in() -> None:
    decoder = Decoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(_connect("02", "03 21 0000 0000", "05"))
    assert decoder.protocol_level == 5


def test_an_error_while_bytes_are_buffered_is_still_a_remote_protocol_error() -> None:
    decoder = Decoder(MQTT_311)
    assert decoder.feed(h("30")) == []
    with pytest.raises(RemoteProtocolError):
        decoder.feed(h("03 0001 ff"))
    assert decoder.buffered_bytes() == 0


def test_a_v5_connect_may_carry_a_password_without_a_user_name() -> None:
    [packet] = Decoder().feed(_connect("42", "00 0000 0001 70", "05"))
    assert isinstance(packet, Connect)
    assert packet.password == b"p"
    assert packet.username is None


def test_a_server_decoder_insists_on_connect_first() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        Decoder().feed(h("c0 00"))
    assert exc.value.reason_code == PROTOCOL


def test_a_second_connect_is_a_protocol_error() -> None:
    decoder = Decoder()
    wire = encode(Connect("a", MQTT_311), MQTT_311)
    decoder.feed(wire)
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(wire)
    assert exc.value.reason_code == PROTOCOL


def test_a_server_decoder_learns_the_level_and_decodes_what_follows_in_the_same_buffer() -> None:
    decoder = Decoder()
    wire = encode(Connect("a"), MQTT_5) + h("40 03 000a 10") + h("30 08 0003 612f62 00 6869")
    assert decoder.feed(wire) == [Connect("a"), PubAck(10, 0x10), Publish("a/b", b"hi")]
    assert decoder.protocol_level == MQTT_5


def test_non_minimal_lengths_are_accepted_in_3_1_1_only() -> None:
    # MQTT 3.1.1 section 2.2.3 does not require the minimal encoding; MQTT 5.0 MQTT-1.5.5-1 does.
    assert Decoder(MQTT_311).feed(h("c0 8000")) == [PingReq()]
    with pytest.raises(RemoteProtocolError):
        Decoder(MQTT_5).feed(h("c0 8000"))
    connect_5 = encode(Connect("a"), MQTT_5)
    with pytest.raises(RemoteProtocolError):
        Decoder().feed(bytes((0x10, 0x80 | connect_5[1], 0x00)) + connect_5[2:])


def test_v5_short_forms_mean_success_and_no_properties() -> None:
    decoder = Decoder(MQTT_5)
    got = decoder.feed(h("40 02 0001  50 03 0002 10  e0 00  e0 01 04  f0 00  f0 01 19"))
    assert got == [PubAck(1), PubRec(2, 0x10), Disconnect(), Disconnect(4), Auth(), Auth(0x19)]


def test_a_v5_connack_without_properties_from_a_3_1_1_server_is_still_readable() -> None:
    assert Decoder(MQTT_5).feed(h("20 02 00 01")) == [ConnAck(False, 1)]


def test_unknown_v5_reason_codes_are_carried_not_rejected() -> None:
    assert Decoder(MQTT_5).feed(h("40 03 0001 7e")) == [PubAck(1, 0x7E)]


def test_a_too_large_packet_is_refused_from_its_header_alone() -> None:
    decoder = Decoder(MQTT_5, max_packet_size=10)
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(h("30 64 0001"))  # announces 100 bytes; only 4 arrived
    assert exc.value.reason_code == ReasonCode.PACKET_TOO_LARGE


def test_the_max_packet_size_can_be_lowered_after_construction() -> None:
    decoder = Decoder(MQTT_311)
    assert decoder.feed(h("30 07 0003 612f62 6869")) == [Publish("a/b", b"hi")]
    decoder.max_packet_size = 8
    with pytest.raises(RemoteProtocolError):
        decoder.feed(h("30 07 0003 612f62 6869"))


def test_a_failed_decoder_keeps_failing() -> None:
    decoder = Decoder(MQTT_311)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(h("00 00"))
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(h("c0 00"))
    assert exc.value.reason_code == MALFORMED


def test_many_small_packets_in_one_buffer_all_come_out_and_a_partial_tail_waits() -> None:
    one = encode(Publish("t", b"x"), MQTT_311)
    decoder = Decoder(MQTT_311)
    assert decoder.feed(one * 1000 + one[:3]) == [Publish("t", b"x")] * 1000
    assert decoder.buffered_bytes() == 3
    assert decoder.feed(one[3:]) == [Publish("t", b"x")]
    assert decoder.buffered_bytes() == 0


def test_a_header_split_inside_the_remaining_length_waits_for_the_rest() -> None:
    wire = encode(Publish("t", b"x" * 200), MQTT_311)
    decoder = Decoder(MQTT_311)
    assert decoder.feed(wire[:2]) == []
    assert decoder.buffered_bytes() == 2
    assert decoder.feed(wire[2:]) == [Publish("t", b"x" * 200)]


def test_decoder_levels_are_checked() -> None:
    with pytest.raises(ValueError):
        Decoder(3)
    decoder = Decoder()
    decoder.protocol_level = MQTT_5
    assert decoder.protocol_level == MQTT_5
    with pytest.raises(ValueError):
        decoder.protocol_level = 6


# ------------------------------------------------------------------------------------------ encoding


BAD_ENCODES: list[tuple[str, Packet, int, int]] = [
    ("QoS 3", Publish("t", qos=3, packet_id=1), MQTT_5, ReasonCode.QOS_NOT_SUPPORTED),
    ("QoS 1 without packet id", Publish("t", qos=1), MQTT_311, PROTOCOL),
    ("QoS 1 with packet id 0", Publish("t", qos=1, packet_id=0), MQTT_311, PROTOCOL),
    ("packet id over 65535", PubAck(65536), MQTT_311, PROTOCOL),
    ("QoS 0 with packet id", Publish("t", packet_id=3), MQTT_311, PROTOCOL),
    ("DUP on QoS 0", Publish("t", dup=True), MQTT_5, PROTOCOL),
    ("wildcard topic", Publish("a/#"), MQTT_5, ReasonCode.TOPIC_NAME_INVALID),
    ("empty topic in 3.1.1", Publish(""), MQTT_311, ReasonCode.TOPIC_NAME_INVALID),
    ("empty topic without alias", Publish(""), MQTT_5, ReasonCode.TOPIC_NAME_INVALID),
    ("U+0000 in a topic", Publish("a\x00"), MQTT_311, MALFORMED),
    ("lone surrogate in a topic", Publish("a\ud800"), MQTT_5, MALFORMED),
    ("string over 65535 bytes", Publish("a" * 65536), MQTT_311, MALFORMED),
    ("properties in 3.1.1", Publish("t", properties=Properties(content_type="x")), MQTT_311, PROTOCOL),
    ("PUBACK reason in 3.1.1", PubAck(1, 0x10), MQTT_311, PROTOCOL),
    ("DISCONNECT reason in 3.1.1", Disconnect(0x04), MQTT_311, PROTOCOL),
    ("UNSUBACK error code in 3.1.1", UnsubAck(1, (0x80,)), MQTT_311, PROTOCOL),
    ("AUTH in 3.1.1", Auth(), MQTT_311, PROTOCOL),
    ("CONNACK code 6 in 3.1.1", ConnAck(False, 6), MQTT_311, PROTOCOL),
    ("SUBACK 0x8F in 3.1.1", SubAck(1, (0x8F,)), MQTT_311, PROTOCOL),
    ("PUBACK code meant for PUBREL", PubAck(1, 0x92), MQTT_5, PROTOCOL),
    ("CONNACK session present on refusal", ConnAck(True, 0x87), MQTT_5, PROTOCOL),
    ("topic alias on PUBACK", PubAck(1, properties=Properties(topic_alias=1)), MQTT_5, PROTOCOL),
    (
        "topic alias 0",
        Publish("t", properties=Properties(topic_alias=0)),
        MQTT_5,
        ReasonCode.TOPIC_ALIAS_INVALID,
    ),
    (
        "two subscription ids in SUBSCRIBE",
        Subscribe(1, (Subscription("a"),), Properties(subscription_identifiers=(1, 2))),
        MQTT_5,
        PROTOCOL,
    ),
    (
        "subscription id over the varint range",
        Publish("t", properties=Properties(subscription_identifiers=(1 << 28,))),
        MQTT_5,
        PROTOCOL,
    ),
    (
        "two-byte property over 65535",
        Connect("c", properties=Properties(receive_maximum=70000)),
        MQTT_5,
        PROTOCOL,
    ),
    ("receive maximum 0", Connect("c", properties=Properties(receive_maximum=0)), MQTT_5, PROTOCOL),
    (
        "authentication data without method",
        Auth(0x18, Properties(authentication_data=b"x")),
        MQTT_5,
        PROTOCOL,
    ),
    ("empty SUBSCRIBE", Subscribe(1, ()), MQTT_5, PROTOCOL),
    ("empty UNSUBSCRIBE", Unsubscribe(1, ()), MQTT_311, PROTOCOL),
    ("empty topic filter", Subscribe(1, (Subscription(""),)), MQTT_311, ReasonCode.TOPIC_FILTER_INVALID),
    ("retain handling 3", Subscribe(1, (Subscription("a", retain_handling=3),)), MQTT_5, PROTOCOL),
    (
        "no local on a shared subscription",
        Subscribe(1, (Subscription("$share/g/a", no_local=True),)),
        MQTT_5,
        PROTOCOL,
    ),
    ("v5 options in 3.1.1", Subscribe(1, (Subscription("a", no_local=True),)), MQTT_311, PROTOCOL),
    ("password without user name in 3.1.1", Connect("c", MQTT_311, password=b"p"), MQTT_311, PROTOCOL),
    (
        "will properties in 3.1.1",
        Connect("c", MQTT_311, will=Will("w", properties=Properties(will_delay_interval=1))),
        MQTT_311,
        PROTOCOL,
    ),
    ("will QoS 3", Connect("c", will=Will("w", qos=3)), MQTT_5, ReasonCode.QOS_NOT_SUPPORTED),
    ("CONNECT level differs from the encoding level", Connect("c", MQTT_5), MQTT_311, PROTOCOL),
    ("keep alive over 65535", Connect("c", keep_alive_s=70000), MQTT_5, PROTOCOL),
    ("v5 UNSUBACK without codes", UnsubAck(1), MQTT_5, PROTOCOL),
]


@pytest.mark.parametrize(
    ("packet", "level", "code"), [c[1:] for c in BAD_ENCODES], ids=[c[0] for c in BAD_ENCODES]
)
def test_packets_the_protocol_cannot_carry_are_refused_by_the_encoder(
    packet: Packet, level: int, code: int
) -> None:
    with pytest.raises(LocalProtocolError) as exc:
        encode(packet, level)
    assert exc.value.reason_code == code


def test_unsupported_levels_are_refused_by_the_encoder() -> None:
    with pytest.raises(LocalProtocolError) as exc:
        encode(PingReq(), 3)
    assert exc.value.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION


def test_success_only_unsuback_codes_are_dropped_in_3_1_1() -> None:
    assert encode(UnsubAck(10, (0, 0)), MQTT_311) == h("b0 02 000a")


def test_max_packet_size_is_checked_against_the_whole_packet() -> None:
    wire = encode(Publish("a/b", b"hi"), MQTT_311)
    assert encode(Publish("a/b", b"hi"), MQTT_311, max_packet_size=len(wire)) == wire
    with pytest.raises(LocalProtocolError) as exc:
        encode(Publish("a/b", b"hi"), MQTT_311, max_packet_size=len(wire) - 1)
    assert exc.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    with pytest.raises(LocalProtocolError):
        encode(PingReq(), MQTT_5, max_packet_size=1)


def test_encode_publish_takes_any_bytes_like_payload_without_changing_the_bytes() -> None:
    expected = h("30 08 0003 612f62 00 6869")
    assert encode_publish("a/b", b"hi", 0, False, False, None, MQTT_5) == expected
    assert encode_publish("a/b", bytearray(b"hi"), 0, False, False, None, MQTT_5) == expected
    assert encode_publish("a/b", memoryview(b"hi"), 0, False, False, None, MQTT_5) == expected


def test_a_large_payload_gets_a_multi_byte_length() -> None:
    payload = bytes(range(256)) * 1000
    wire = encode_publish("t", payload, 1, False, False, 9, MQTT_311)
    assert wire[:4] == h("32") + encode_varint(256_000 + 5)
    assert Decoder(MQTT_311).feed(wire) == [Publish("t", payload, 1, packet_id=9)]


def test_packets_before_a_violation_in_the_same_chunk_are_handed_over_with_the_error() -> None:
    from uplink.mqtt.codec import Decoder, encode
    from uplink.mqtt.errors import RemoteProtocolError
    from uplink.mqtt.packets import Connect, PingReq

    d = Decoder()
    chunk = encode(Connect("c1"), 5) + encode(PingReq(), 5) + b"\x00\x00"  # type 0 is reserved
    try:
        d.feed(chunk)
    except RemoteProtocolError as exc:
        assert [type(p).__name__ for p in exc.packets_before] == ["Connect", "PingReq"]
    else:
        raise AssertionError("a reserved packet type must be refused")
