"""Bad input against the `cloud-broker` process over real sockets: random and mutated packets, idle and
slow connections. The offender gets its reason code or is closed; a healthy client keeps being served."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.net import free_port
from tests.integration.broker_raw_client import RawClient, start_broker
from uplink.mqtt.codec import encode
from uplink.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connect,
    Disconnect,
    PingReq,
    Properties,
    PubAck,
    Publish,
    PubRel,
    ReasonCode,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    cfg = tmp_path_factory.mktemp("bad") / "broker.toml"
    cfg.write_text("""
allow_anonymous = true
[limits]
connect_timeout_s = 0.5
max_packet_size_bytes = 4096
[backpressure]
high_water_bytes = 65536
low_water_bytes = 16384
slow_consumer_timeout_s = 1.0
[sys]
interval_s = 0.2
""")
    port = free_port()
    proc = start_broker(port, ["--config", str(cfg)])
    try:
        yield port, proc
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


def healthy_round_trip(port: int, tag: str) -> None:
    """A fresh subscriber and publisher still get a QoS 1 message through."""
    sub = RawClient(port, MQTT_5)
    sub.connect(f"healthy-sub-{tag}")
    sub.subscribe(f"healthy/{tag}", qos=1)
    pub = RawClient(port, MQTT_311)
    pub.connect(f"healthy-pub-{tag}")
    assert pub.publish_acked(f"healthy/{tag}", b"still-served", 1, pid=1) == PubAck(1)
    msg = sub.next()
    assert isinstance(msg, Publish) and msg.payload == b"still-served"
    sub.close()
    pub.close()


def _valid_streams() -> list[bytes]:
    """Well-formed conversations at both levels, to be mutated."""
    out = []
    for level in (MQTT_311, MQTT_5):
        props = Properties(session_expiry_interval=10) if level == MQTT_5 else Properties()
        if level == MQTT_311:
            from uplink.mqtt.packets import NO_PROPERTIES

            props = NO_PROPERTIES
        packets = [
            Connect("fuzz", protocol_level=level, keep_alive_s=5, properties=props,
                    will=Will("fuzz/will", b"w", 1)),
            Subscribe(1, (Subscription("fuzz/#", 2), Subscription("$share/g/fuzz/+", 1))),
            Publish("fuzz/a", b"x" * 20, qos=1, packet_id=2),
            Publish("fuzz/b", b"y", qos=2, packet_id=3, retain=True),
            PubRel(3),
            PingReq(),
            Unsubscribe(4, ("fuzz/#",)),
            Disconnect(),
        ]
        out.append(b"".join(encode(p, level) for p in packets))
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[pos] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and b:
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            b = b[:pos]
        else:
            b[pos:pos] = b[pos:pos + rng.randint(1, 40)]  # duplicate a slice
    return bytes(b)


def test_random_and_mutated_packets_never_stop_the_broker_from_serving_a_healthy_client(
        broker: tuple[int, subprocess.Popen[str]]) -> None:
    port, proc = broker
    rng = random.Random(20261126)
    streams = _valid_streams()
    healthy_sub = RawClient(port, MQTT_5)
    healthy_sub.connect("watch")
    healthy_sub.subscribe("tick", qos=1)
    healthy_pub = RawClient(port, MQTT_5)
    healthy_pub.connect("ticker")
    for i in range(300):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            data = rng.randbytes(rng.randint(1, 300)) if i % 4 == 0 else _mutate(rng, rng.choice(streams))
            try:
                s.sendall(data)
                if i % 3 == 0:
                    s.settimeout(0.05)
                    s.recv(4096)
            except OSError:
                pass  # the broker may close on us first: that is an allowed answer
        if i % 25 == 0:
            ack = healthy_pub.publish_acked("tick", str(i).encode(), 1, pid=i % 60000 + 1)
            assert ack.reason_code == 0  # type: ignore[union-attr]
            msg = healthy_sub.next()
            assert isinstance(msg, Publish) and msg.payload == str(i).encode()
            healthy_sub.send(PubAck(msg.packet_id or 0))
    assert proc.poll() is None
    healthy_round_trip(port, "after-fuzz")


def test_an_oversize_packet_gets_disconnect_0x95_and_a_malformed_one_0x81(
        broker: tuple[int, subprocess.Popen[str]]) -> None:
    port, _ = broker
    big = RawClient(port, MQTT_5)
    big.connect("big")
    big.send(Publish("t", b"z" * 5000, qos=0))
    assert big.next() == Disconnect(ReasonCode.PACKET_TOO_LARGE) and big.wait_closed()
    bad = RawClient(port, MQTT_5)
    bad.connect("bad")
    bad.send_raw(b"\x82\x04\x00\x01\x00\x00")  # SUBSCRIBE with a truncated property section / no filter
    packet = bad.next()
    assert isinstance(packet, Disconnect) and packet.reason_code in (ReasonCode.MALFORMED_PACKET,
                                                                     ReasonCode.PROTOCOL_ERROR)
    assert bad.wait_closed()
    healthy_round_trip(port, "after-oversize")


def test_a_connection_that_never_sends_connect_is_closed_after_the_connect_timeout(
        broker: tuple[int, subprocess.Popen[str]]) -> None:
    port, _ = broker
    idle = RawClient(port, MQTT_5)
    assert idle.wait_closed(timeout_s=3.0)


def test_a_subscriber_that_stops_reading_loses_qos0_and_is_disconnected_while_others_flow(
        broker: tuple[int, subprocess.Popen[str]]) -> None:
    port, _ = broker
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    stuck.sendall(encode(Connect("stuck", protocol_level=MQTT_5), MQTT_5)
                  + encode(Subscribe(1, (Subscription("flood", 0),)), MQTT_5))
    healthy = RawClient(port, MQTT_5)
    healthy.connect("flowing")
    healthy.subscribe("flood", qos=0)
    pub = RawClient(port, MQTT_5)
    pub.connect("flooder")
    stats = RawClient(port, MQTT_5)
    stats.connect("stats")
    stats.subscribe("$SYS/broker/slow_consumers_disconnected", "$SYS/broker/messages/dropped/qos0_congested",
                    qos=0)
    time.sleep(0.2)  # the stuck client's SUBSCRIBE is processed (it never reads the SUBACK)
    counters: dict[str, int] = {}
    payload = b"p" * 1000
    deadline = time.monotonic() + 20
    round_ = 0
    # Flood until the broker gives up on the stuck reader (the kernel's socket buffers absorb the first
    # few megabytes, so how much it takes depends on the host); the reader gets every message.
    while counters.get("$SYS/broker/slow_consumers_disconnected", 0) < 1:
        assert time.monotonic() < deadline, counters
        round_ += 1
        pub.send(*[Publish("flood", payload) for _ in range(100)], Publish("flood", b"end-%d" % round_))
        got = 0
        while True:
            msg = healthy.next()
            assert isinstance(msg, Publish)
            got += 1
            if msg.payload == b"end-%d" % round_:
                break
        assert got == 101
        for packet in stats.drain(quiet_s=0.01):
            if isinstance(packet, Publish):
                counters[packet.topic] = int(packet.payload)
    assert counters["$SYS/broker/messages/dropped/qos0_congested"] > 0
    stuck.settimeout(5)
    try:
        while stuck.recv(1 << 20):
            pass  # what it had been sent before it was cut
    except ConnectionError:
        pass  # cut with a reset: its unsent output was thrown away
    stuck.close()
    stats.close()
    healthy_round_trip(port, "after-slow-consumer")


def test_the_broker_still_runs(broker: tuple[int, subprocess.Popen[str]]) -> None:
    assert broker[1].poll() is None
    assert Path("/proc").exists()
