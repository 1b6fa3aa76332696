"""Property tests: every valid packet survives encode -> any split of the stream -> decode, and no byte
sequence makes the decoder raise anything but RemoteProtocolError."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.property import mqtt_strategies as ms
from uplink.mqtt.codec import Decoder, decode_varint, encode, encode_publish, encode_varint
from uplink.mqtt.errors import LocalProtocolError, RemoteProtocolError
from uplink.mqtt.packets import MAX_VARINT, MQTT_5, MQTT_311, Packet, Publish

LEVELS = st.sampled_from([MQTT_311, MQTT_5])
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_in_pieces(decoder: Decoder, data: bytes, cuts: list[int]) -> list[Packet]:
    out: list[Packet] = []
    prev = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        out += decoder.feed(data[prev:cut])
        prev = cut
    out += decoder.feed(data[prev:])
    return out


@SETTINGS
@given(data=st.data(), level=LEVELS, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_a_client_stream_decodes_to_the_same_packets_however_it_is_split(
    data: st.DataObject, level: int, cuts: list[int]
) -> None:
    stream = data.draw(ms.packet_streams(level))
    wire = b"".join(encode(p, level) for p in stream)
    decoder = Decoder()  # server side: learns the level from CONNECT
    assert _feed_in_pieces(decoder, wire, cuts) == stream
    assert decoder.protocol_level == level
    assert decoder.buffered_bytes() == 0


@SETTINGS
@given(data=st.data(), level=LEVELS, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_every_packet_type_round_trips_at_a_known_level(
    data: st.DataObject, level: int, cuts: list[int]
) -> None:
    packets = data.draw(st.lists(ms.packets(level, include_connect=False), min_size=1, max_size=6))
    wire = b"".join(encode(p, level) for p in packets)
    assert _feed_in_pieces(Decoder(level), wire, cuts) == packets


@settings(max_examples=80, deadline=None)
@given(data=st.data(), level=LEVELS)
def test_byte_at_a_time_feeding_gives_the_same_packet(data: st.DataObject, level: int) -> None:
    packet = data.draw(ms.packets(level, include_connect=False))
    wire = encode(packet, level)
    decoder = Decoder(level)
    out: list[Packet] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
        assert decoder.buffered_bytes() == (0 if out else i + 1)
    assert out == [packet]


@SETTINGS
@given(data=st.data(), level=LEVELS)
def test_the_publish_fast_path_writes_the_same_bytes_as_encode(data: st.DataObject, level: int) -> None:
    p: Publish = data.draw(ms.publishes(level))
    fast = encode_publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, level, p.properties)
    assert fast == encode(p, level)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), level=LEVELS)
def test_max_packet_size_refuses_exactly_the_packets_that_are_too_big(
    data: st.DataObject, level: int
) -> None:
    packet = data.draw(ms.packets(level, include_connect=False))
    size = len(encode(packet, level))
    assert encode(packet, level, max_packet_size=size) == encode(packet, level)
    try:
        encode(packet, level, max_packet_size=size - 1)
    except LocalProtocolError as exc:
        assert exc.reason_code == 0x95
    else:
        raise AssertionError("a packet one byte over the limit was encoded")
    decoder = Decoder(level, max_packet_size=size - 1)
    try:
        decoder.feed(encode(packet, level))
    except RemoteProtocolError as exc:
        assert exc.reason_code == 0x95
    else:
        raise AssertionError("a packet one byte over the limit was decoded")


@given(n=st.integers(0, MAX_VARINT))
def test_varints_round_trip_and_are_minimal(n: int) -> None:
    raw = encode_varint(n)
    assert decode_varint(raw, 0) == (n, len(raw))
    assert len(raw) == 1 or raw[-1] != 0
    assert len(raw) == next(i for i, limit in enumerate((128, 16384, 2097152, 268435456), 1) if n < limit)


def _decode_only_protocol_errors(decoder: Decoder, data: bytes, cut: int | None = None) -> list[Packet]:
    try:
        if cut is None:
            return decoder.feed(data)
        # Two feeds: errors must also surface cleanly while earlier bytes sit in the decoder's buffer.
        return decoder.feed(data[:cut]) + decoder.feed(data[cut:])
    except RemoteProtocolError:
        # A failed decoder stays failed: the stream cannot be trusted any more.
        try:
            decoder.feed(b"\xc0\x00")
        except RemoteProtocolError:
            return []
        raise AssertionError("decoder accepted data after an error") from None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), level=st.sampled_from([None, MQTT_311, MQTT_5]))
def test_random_bytes_raise_nothing_but_remote_protocol_errors(data: bytes, level: int | None) -> None:
    _decode_only_protocol_errors(Decoder(level), data)


_VALID_FIRST_BYTES = [0x10, 0x20, 0x40, 0x50, 0x62, 0x70, 0x82, 0x90, 0xA2, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0]
_VALID_FIRST_BYTES += list(range(0x30, 0x3E))


@settings(max_examples=1000, deadline=None)
@given(
    first=st.sampled_from(_VALID_FIRST_BYTES),
    body=st.binary(max_size=60),
    level=st.sampled_from([MQTT_311, MQTT_5]),
)
def test_random_bodies_behind_valid_headers_raise_nothing_but_remote_protocol_errors(
    first: int, body: bytes, level: int
) -> None:
    wire = bytes((first,)) + encode_varint(len(body)) + body
    _decode_only_protocol_errors(Decoder(level), wire, cut=len(wire) // 2)


@st.composite
def _mutations(draw: st.DrawFn, wire: bytes) -> bytes:
    buf = bytearray(wire)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(i, draw(st.integers(0, 255)))
        elif op == "delete" and buf:
            del buf[i]
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


@SETTINGS
@given(data=st.data(), level=LEVELS)
def test_mutated_packets_decode_or_raise_remote_protocol_errors_only(data: st.DataObject, level: int) -> None:
    stream = data.draw(ms.packet_streams(level, max_size=3))
    wire = b"".join(encode(p, level) for p in stream)
    mutated = data.draw(_mutations(wire))
    cut = data.draw(st.none() | st.integers(0, len(mutated)))
    for packet in _decode_only_protocol_errors(Decoder(), mutated, cut):
        # Whatever was accepted and can be re-encoded must decode to itself again.
        try:
            again = encode(packet, level)
        except LocalProtocolError:
            continue  # e.g. a reason code the decoder carries but our encoder will not send
        decoder = Decoder(level)
        if packet.type.name == "CONNECT":
            decoder = Decoder()
        assert decoder.feed(again) == [packet]
