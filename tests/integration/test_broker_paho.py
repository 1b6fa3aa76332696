"""Our broker (the `cloud-broker` process) against paho-mqtt 2.2, an independent client, at v3.1.1 and v5."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from hil.net import free_port, wait_tcp_listening

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
WAIT_S = 5.0
LEVELS = [pytest.param(mqtt.MQTTv311, id="v311"), pytest.param(mqtt.MQTTv5, id="v5")]


@pytest.fixture
def broker_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "cloud-broker"), "run", "--tcp", f"127.0.0.1:{port}", "--allow-anonymous"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_tcp_listening(port, pid=proc.pid)
        yield port
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()


class Peer:
    """A paho client running its network loop in a thread; what it receives lands in queues."""

    def __init__(self, port: int, client_id: str, protocol: MQTTProtocolVersion, *, clean: bool = True,
                 session_expiry_s: int | None = None, will: tuple[str, bytes] | None = None) -> None:
        self.protocol = protocol
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.connected = threading.Event()
        self.session_present = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            clean_session=clean if protocol == mqtt.MQTTv311 else None, reconnect_on_failure=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_disconnect = self._on_disconnect
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        kwargs: dict[str, Any] = {}
        if protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = clean
            if session_expiry_s is not None:
                props = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = session_expiry_s
                kwargs["properties"] = props
        self.client.connect("127.0.0.1", port, keepalive=30, **kwargs)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), f"{client_id} did not get a CONNACK"

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason_code: Any, _p: Any) -> None:
        self.session_present = bool(flags.session_present)
        if not reason_code.is_failure:
            self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        self.disconnects.put(reason_code.value)

    def subscribe(self, topic: str, qos: int = 0) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(WAIT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)

    def nothing_more(self) -> bool:
        # A QoS 1 round trip orders the check after everything the broker already sent us.
        self.publish("$sync/none", b"", qos=1)
        return self.messages.empty()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


@pytest.mark.parametrize("protocol", LEVELS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_publishes_reach_a_paho_subscriber(
        broker_port: int, peers: list[Peer], protocol: MQTTProtocolVersion, qos: int) -> None:
    sub = Peer(broker_port, "sub", protocol)
    pub = Peer(broker_port, "pub", protocol)
    peers += [sub, pub]
    sub.subscribe("well/1/pressure", qos)
    pub.publish("well/1/pressure", b"101.3", qos=qos)
    msg = sub.receive()
    assert (msg.topic, msg.payload, msg.qos) == ("well/1/pressure", b"101.3", qos)


@pytest.mark.parametrize("protocol", LEVELS)
def test_wildcard_subscriptions_match_like_the_spec_says(broker_port: int, peers: list[Peer],
                                                         protocol: MQTTProtocolVersion) -> None:
    sub = Peer(broker_port, "sub", protocol)
    pub = Peer(broker_port, "pub", protocol)
    peers += [sub, pub]
    sub.subscribe("site/+/temp", 1)
    sub.subscribe("fleet/#", 1)
    for topic in ("site/a/temp", "site/a/b/temp", "fleet", "fleet/t1/gps", "other/x"):
        pub.publish(topic, topic.encode(), qos=1)
    got = sorted(sub.receive().topic for _ in range(3))
    assert got == ["fleet", "fleet/t1/gps", "site/a/temp"]
    assert sub.nothing_more()


@pytest.mark.parametrize("protocol", LEVELS)
def test_a_retained_message_greets_new_subscribers_until_cleared(broker_port: int, peers: list[Peer],
                                                                 protocol: MQTTProtocolVersion) -> None:
    pub = Peer(broker_port, "pub", protocol)
    peers.append(pub)
    pub.publish("cfg/rate", b"5s", qos=1, retain=True)
    first = Peer(broker_port, "first", protocol)
    peers.append(first)
    first.subscribe("cfg/#", 1)
    msg = first.receive()
    assert (msg.topic, msg.payload, msg.retain) == ("cfg/rate", b"5s", True)
    pub.publish("cfg/rate", b"", qos=1, retain=True)
    assert first.receive().payload == b""  # the clearing message itself is routed live
    second = Peer(broker_port, "second", protocol)
    peers.append(second)
    second.subscribe("cfg/#", 1)
    assert second.nothing_more()


def test_a_second_connection_with_the_same_client_id_takes_over(broker_port: int, peers: list[Peer]) -> None:
    old = Peer(broker_port, "dev-7", mqtt.MQTTv5)
    peers.append(old)
    new = Peer(broker_port, "dev-7", mqtt.MQTTv5)
    peers.append(new)
    assert old.disconnects.get(timeout=WAIT_S) == 0x8E
    watcher = Peer(broker_port, "watcher", mqtt.MQTTv5)
    peers.append(watcher)
    watcher.subscribe("x", 0)
    new.publish("x", b"new-one-works", qos=1)
    assert watcher.receive().payload == b"new-one-works"


@pytest.mark.parametrize("protocol", LEVELS)
def test_a_will_is_published_when_a_client_vanishes(broker_port: int, peers: list[Peer],
                                                    protocol: MQTTProtocolVersion) -> None:
    watcher = Peer(broker_port, "watcher", protocol)
    peers.append(watcher)
    watcher.subscribe("status/#", 1)
    doomed = Peer(broker_port, "rtu-3", protocol, will=("status/rtu-3", b"offline"))
    doomed.client.loop_stop()
    sock = doomed.client.socket()
    assert isinstance(sock, socket.socket)
    sock.close()  # no DISCONNECT: an abnormal end, as when power fails
    msg = watcher.receive()
    assert (msg.topic, msg.payload) == ("status/rtu-3", b"offline")


@pytest.mark.parametrize("protocol", LEVELS)
def test_a_persistent_session_gets_qos1_messages_sent_while_it_was_offline(
        broker_port: int, peers: list[Peer], protocol: MQTTProtocolVersion) -> None:
    sub = Peer(broker_port, "collector", protocol, clean=False, session_expiry_s=600)
    sub.subscribe("data/#", 1)
    sub.close()
    pub = Peer(broker_port, "pub", protocol)
    peers.append(pub)
    for i in range(3):
        pub.publish(f"data/{i}", str(i).encode(), qos=1)
    back = Peer(broker_port, "collector", protocol, clean=False, session_expiry_s=600)
    peers.append(back)
    assert back.session_present
    assert [back.receive().payload for _ in range(3)] == [b"0", b"1", b"2"]
