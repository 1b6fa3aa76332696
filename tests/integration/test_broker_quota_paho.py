"""Our broker (durable, `max_queued_messages = 2`) and paho-mqtt publishers when the only subscriber, a
persistent ingest session that is offline, has a full queue (issue 6, finding 5).

MQTT 5: the publisher reads PUBACK 0x97 Quota exceeded, so it keeps the message to retry.
MQTT 3.1.1 (no negative PUBACK): the broker closes the publisher's connection without acknowledging;
paho keeps the unacknowledged message and resends it after it reconnects, and once the subscriber has
drained its queue the message arrives.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from cloud_broker.config import parse_config
from cloud_broker.server import BrokerServer, serve

pytestmark = pytest.mark.integration

WAIT_S = 5.0
TOPIC = "fg/v1/pad-07/data/telemetry"
QUOTA_EXCEEDED = 0x97


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    server = await serve(parse_config({
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        "allow_anonymous": True,
        "data_dir": str(tmp_path / "data"),
        "limits": {"max_queued_messages": 2},
        "sys": {"interval_s": 0},
    }))
    try:
        yield server
    finally:
        await server.close()


class Paho:
    """A paho client on its own network thread; PUBACK reason codes and messages land in queues."""

    def __init__(self, port: int, client_id: str, protocol: MQTTProtocolVersion) -> None:
        self.port = port
        self.protocol = protocol
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()  # (mid, reason code)
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  clean_session=False if protocol == mqtt.MQTTv311 else None,
                                  reconnect_on_failure=False)
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, msg: self.messages.put(bytes(msg.payload))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        self.acks.put((mid, reason_code.value))

    def connect(self) -> None:
        self.connected.clear()
        self.disconnected.clear()
        kwargs: dict[str, Any] = {}
        if self.protocol == mqtt.MQTTv5:
            props = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect("127.0.0.1", self.port, keepalive=30, **kwargs)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"

    def reconnect(self) -> None:
        """After the broker closed the connection: a new one on the same session (paho resends)."""
        self.client.loop_stop()
        self.connected.clear()
        self.disconnected.clear()
        self.client.reconnect()
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK on reconnect"

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, 1)
        assert done.wait(WAIT_S), "no SUBACK"

    def publish(self, payload: bytes) -> int:
        return self.client.publish(TOPIC, payload, qos=1).mid

    def ack(self) -> tuple[int, int]:
        return self.acks.get(timeout=WAIT_S)

    def receive(self) -> bytes:
        return self.messages.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def offline_ingest(port: int) -> Paho:
    """The persistent ingest session: subscribed, then gone (its session and queue stay)."""
    ingest = Paho(port, "ingest", mqtt.MQTTv5)
    ingest.connect()
    ingest.subscribe("fg/v1/+/data/#")
    ingest.close()
    return ingest


async def test_a_v5_publisher_sees_0x97_when_the_only_persistent_subscribers_queue_is_full(
        broker: BrokerServer) -> None:
    port = broker.ports["tcp"][0]
    await asyncio.to_thread(offline_ingest, port)
    pub = Paho(port, "pad-07", mqtt.MQTTv5)
    await asyncio.to_thread(pub.connect)
    try:
        mids = [pub.publish(b"batch%d" % i) for i in (1, 2, 3)]
        acks = dict([await asyncio.to_thread(pub.ack) for _ in mids])
        assert [acks[m] for m in mids] == [0, 0, QUOTA_EXCEEDED]
        assert not pub.disconnected.is_set()
        assert broker.broker.counters.publish_quota_exceeded == 1
    finally:
        await asyncio.to_thread(pub.close)


async def test_a_v311_publisher_is_disconnected_instead_of_acked_and_its_resend_arrives_after_the_drain(
        broker: BrokerServer) -> None:
    port = broker.ports["tcp"][0]
    ingest = await asyncio.to_thread(offline_ingest, port)
    pub = Paho(port, "pad-07", mqtt.MQTTv311)
    await asyncio.to_thread(pub.connect)
    try:
        first = [pub.publish(b"batch%d" % i) for i in (1, 2)]
        assert sorted([(await asyncio.to_thread(pub.ack))[0] for _ in first]) == sorted(first)
        third = pub.publish(b"batch3")
        assert await asyncio.to_thread(pub.disconnected.wait, WAIT_S), "the broker must not ack batch3"
        assert pub.acks.empty()
        # The ingest session comes back and takes its two queued messages.
        await asyncio.to_thread(ingest.connect)
        assert {await asyncio.to_thread(ingest.receive) for _ in range(2)} == {b"batch1", b"batch2"}
        # The publisher resumes its session; paho resends batch3, which now has room.
        await asyncio.to_thread(pub.reconnect)
        assert (await asyncio.to_thread(pub.ack))[0] == third
        assert await asyncio.to_thread(ingest.receive) == b"batch3"
    finally:
        await asyncio.to_thread(pub.close)
        await asyncio.to_thread(ingest.close)
