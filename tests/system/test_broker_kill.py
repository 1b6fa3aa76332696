"""kill -9 the cloud broker between PUBACK and delivery: after a restart every acknowledged QoS 1/2
message reaches every persistent subscriber (one offline, one online that never acknowledged)."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from hil.net import free_port
from tests.integration.broker_raw_client import RawClient, start_broker
from uplink.mqtt.packets import MQTT_5, MQTT_311, PubAck, Publish, PubRec, PubRel

pytestmark = pytest.mark.system


def received_payloads(client: RawClient, expected: set[bytes]) -> set[bytes]:
    """Payloads delivered to client (acknowledging each) until all expected arrived or it goes quiet."""
    got: set[bytes] = set()
    while not expected <= got:
        try:
            packet = client.next(timeout_s=3.0)
        except TimeoutError:
            break
        if isinstance(packet, Publish):
            got.add(packet.payload)
            if packet.qos == 1:
                client.send(PubAck(packet.packet_id or 0))
            elif packet.qos == 2:
                client.send(PubRec(packet.packet_id or 0))
        elif isinstance(packet, PubRel):
            from uplink.mqtt.packets import PubComp

            client.send(PubComp(packet.packet_id))
    return got


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_acknowledged_message_survives_a_sigkill_and_reaches_persistent_subscribers(
        tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = tmp_path / "state"
    port = free_port()
    args = ["--data", str(data), "--allow-anonymous"]
    proc = start_broker(port, args)
    try:
        offline = RawClient(port, MQTT_5)
        offline.connect("sub-offline", clean=False, expiry_s=3600)
        offline.subscribe("kill/#", qos=2)
        offline.close()  # detached: everything for it is queued
        online = RawClient(port, MQTT_311)
        online.connect("sub-online", clean=False)
        online.subscribe("kill/#", qos=1)  # stays connected and never acknowledges
        publisher = RawClient(port, MQTT_5)
        publisher.connect("pub")
        acked: set[bytes] = set()
        count = rng.randrange(20, 120)
        for i in range(count):
            payload = f"m{seed}-{i}".encode()
            qos = rng.choice([1, 2])
            ack = publisher.publish_acked(f"kill/{i % 7}", payload, qos, pid=i % 60000 + 1)
            assert getattr(ack, "reason_code", 0) < 0x80
            acked.add(payload)
        # Acked but not yet delivered to the offline subscriber, unacknowledged by the online one.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        online.close()
        publisher.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    proc = start_broker(port, args)
    try:
        back = RawClient(port, MQTT_5)
        assert back.connect("sub-offline", clean=False, expiry_s=3600).session_present
        assert received_payloads(back, acked) >= acked
        back2 = RawClient(port, MQTT_311)
        assert back2.connect("sub-online", clean=False).session_present
        assert received_payloads(back2, acked) >= acked
        back.close()
        back2.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
