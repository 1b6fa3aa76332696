"""Our Uplink (session + TCP transport + supervisor) against a real Mosquitto broker on loopback."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest

from hil.net import free_port, wait_tcp_listening
from tests.conftest import require_binary
from uplink.client import Transport, Uplink, UplinkClosed, UplinkConfig, tcp_transport_factory
from uplink.mqtt.packets import MQTT_5, MQTT_311, Publish, ReasonCode

pytestmark = pytest.mark.integration

LEVELS = pytest.mark.parametrize("level", [MQTT_311, MQTT_5], ids=["v311", "v5"])
STEP_TIMEOUT_S = 20.0  # a generous ceiling so that a hang fails the test instead of stalling the suite


class Mosquitto:
    """A Mosquitto process of our own on a fixed loopback port, which the test can stop and restart."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_tcp_listening(self.port, pid=self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(require_binary("mosquitto"), tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def config(broker: Mosquitto, client_id: str, level: int = MQTT_5, **overrides: object) -> UplinkConfig:
    return UplinkConfig(
        host="127.0.0.1",
        port=broker.port,
        client_id=client_id,
        protocol_level=level,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        connect_timeout_s=5.0,
        **overrides,  # type: ignore[arg-type]
    )


async def next_message(messages: AsyncIterator[Publish]) -> Publish:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await anext(messages)


async def closed_outcome(operation: Awaitable[int]) -> int | UplinkClosed:
    """The operation's result, or the UplinkClosed it raised (a task must not fail its TaskGroup)."""
    try:
        return await operation
    except UplinkClosed as exc:
        return exc


@LEVELS
async def test_publishes_at_every_qos_come_back_on_our_own_subscription(
    mosquitto: Mosquitto, level: int
) -> None:
    uplink = Uplink(config(mosquitto, f"self-{level}", level))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.wait_connected()
            granted = await uplink.subscribe([("fg/self/#", 2)])
            assert granted == (2,)
            inbound = uplink.inbound()
            for qos in (0, 1, 2):
                topic, payload = f"fg/self/q{qos}", f"payload {qos}".encode()
                assert await uplink.publish(topic, payload, qos=qos) == 0
                message = await next_message(inbound)
                assert (message.topic, message.payload, message.qos) == (topic, payload, qos)
        await uplink.close()
    assert not uplink.connected


async def test_many_qos1_publishes_pipeline_within_the_brokers_receive_maximum(mosquitto: Mosquitto) -> None:
    uplink = Uplink(config(mosquitto, "pipeline"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.wait_connected()
            codes = await asyncio.gather(*(uplink.publish("fg/pipe", b"%d" % i, qos=1) for i in range(2000)))
        # Success with "no matching subscribers" (0x10): nobody listens on fg/pipe.
        assert codes == [ReasonCode.NO_MATCHING_SUBSCRIBERS] * 2000
        # Mosquitto announces a Receive Maximum (its max_inflight_messages); we never exceed it.
        assert uplink.session.inflight_window == uplink.session.server_receive_maximum < 65535
        await uplink.close()


async def test_unsubscribe_stops_delivery(mosquitto: Mosquitto) -> None:
    uplink = Uplink(config(mosquitto, "unsub"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.subscribe([("fg/a", 1), ("fg/b", 1)])
            assert await uplink.unsubscribe(["fg/a"]) == (0,)
            await uplink.publish("fg/a", b"dropped", qos=1)
            await uplink.publish("fg/b", b"kept", qos=1)
            message = await next_message(uplink.inbound())
            assert (message.topic, message.payload) == ("fg/b", b"kept")
        await uplink.close()


@LEVELS
async def test_after_a_broker_restart_the_uplink_reconnects_and_delivers_the_publishes_that_were_waiting(
    mosquitto: Mosquitto, level: int
) -> None:
    # The publisher's only path to the broker goes through this gate, so the test decides when it may
    # reconnect: after the observer has re-subscribed on the restarted (memory-only) broker.
    gate = asyncio.Event()
    gate.set()

    async def gated_transport(cfg: UplinkConfig) -> Transport:
        await gate.wait()
        return await tcp_transport_factory(cfg)

    publisher = Uplink(config(mosquitto, f"pub-{level}", level), transport_factory=gated_transport)
    observer = Uplink(config(mosquitto, f"obs-{level}", level))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(publisher.run(), name="publisher")
        tg.create_task(observer.run(), name="observer")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await observer.subscribe([("fg/restart/#", 1)])
            await publisher.wait_connected()
            assert await publisher.publish("fg/restart/before", b"before", qos=1) == 0
            observed = observer.inbound()
            assert (await next_message(observed)).payload == b"before"

            gate.clear()
            await asyncio.to_thread(mosquitto.stop)
            await publisher.wait_disconnected()
            await observer.wait_disconnected()
            waiting = [
                tg.create_task(publisher.publish("fg/restart/after", b"%d" % i, qos=qos), name=f"publish-{i}")
                for i, qos in enumerate([1, 2, 1, 2, 1, 1])
            ]
            await asyncio.sleep(0)
            assert not any(t.done() for t in waiting)

            await asyncio.to_thread(mosquitto.start)
            await observer.wait_connected()
            assert observer.reconnects == 1
            # The restarted broker kept nothing: the observer re-subscribed by itself. Prove it is live.
            await observer.publish("fg/restart/probe", b"probe", qos=1)
            assert (await next_message(observed)).payload == b"probe"

            gate.set()
            assert await asyncio.gather(*waiting) == [0] * len(waiting)
            payloads = sorted([(await next_message(observed)).payload for _ in waiting])
            assert payloads == sorted(b"%d" % i for i in range(len(waiting)))
        assert publisher.reconnects == 1
        await publisher.close()
        await observer.close()


async def test_close_fails_publishes_that_can_no_longer_complete(mosquitto: Mosquitto) -> None:
    uplink = Uplink(config(mosquitto, "closer"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        await asyncio.wait_for(uplink.wait_connected(), STEP_TIMEOUT_S)
        await asyncio.to_thread(mosquitto.stop)
        await uplink.wait_disconnected()
        pending = tg.create_task(closed_outcome(uplink.publish("fg/x", b"never", qos=1)), name="pending")
        await asyncio.sleep(0)
        await uplink.close()
        assert isinstance(await pending, UplinkClosed)
        with pytest.raises(UplinkClosed):
            await uplink.publish("fg/x", b"after close", qos=1)
