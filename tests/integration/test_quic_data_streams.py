"""DataStreamUplink against our QUIC listener: files on a data stream never block telemetry; resets resend.

A real broker core behind the real QUIC listener on 127.0.0.1; the device is an Uplink over QUIC
with a DataStreamUplink beside it; a plain TCP subscriber on the same broker sees what arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.integration.quic_support import Pki, RunningBroker, eventually, make_pki, start_broker
from uplink.client import Uplink, UplinkConfig
from uplink.failover import FailoverConfig, FailoverTransportFactory
from uplink.mqtt.stream_session import DataStreamConfig
from uplink.quic import QuicLink, QuicSettings
from uplink.streams import DataStreamUplink

pytestmark = pytest.mark.integration

STEP_S = 15.0
SEGMENT = bytes(range(256)) * 256  # 64 KiB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def broker(pki: Pki) -> AsyncIterator[RunningBroker]:
    server = await start_broker(pki, tls=False)
    try:
        yield server
    finally:
        await server.close()


class Device:
    """An Uplink over QUIC (via the failover factory, QUIC only) and a data stream beside it."""

    def __init__(self, pki: Pki, broker: RunningBroker, client_id: str, max_inflight: int = 16) -> None:
        self.factory = FailoverTransportFactory(FailoverConfig(
            quic=QuicSettings(port=broker.quic_port, ca_file=pki.ca_file, handshake_timeout_s=3.0),
            tcp_enabled=False))
        self.uplink = Uplink(UplinkConfig(host="127.0.0.1", port=broker.tcp_port, client_id=client_id,
                                          clean_start=False, session_expiry_s=600, reconnect_initial_s=0.05,
                                          reconnect_max_s=0.2, max_inflight=1000),
                             transport_factory=self.factory)
        self.data = DataStreamUplink(self.uplink, lambda: self.factory.quic_link,
                                     DataStreamConfig(max_inflight=max_inflight), name="files")

    @property
    def link(self) -> QuicLink:
        assert self.factory.quic_link is not None
        return self.factory.quic_link


async def data_stream_of(broker: RunningBroker, link: QuicLink) -> int:
    """The id of the device's open data stream as the broker sees it."""
    ids: list[int] = []

    def found() -> bool:
        ids[:] = [sid for conn in broker.quic.connections for sid in conn._data]
        return bool(ids)

    await eventually(found, STEP_S, "a data stream at the broker")
    return ids[0]


async def test_a_file_flood_on_a_data_stream_does_not_hold_back_qos1_telemetry_on_the_control_stream(
        pki: Pki, broker: RunningBroker) -> None:
    device = Device(pki, broker, "well-1")
    segments = 240  # 15 MiB: far more than the stream's window and QUIC's send buffer
    file_acks: list[int] = []
    telemetry_done_after: list[int] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(device.uplink.run(), name="uplink")
        tg.create_task(device.data.run(), name="data")
        async with asyncio.timeout(STEP_S * 2):
            await device.data.wait_connected()

            async def one_segment(n: int) -> None:
                code = await device.data.publish(f"files/well-1/{n}", SEGMENT)
                assert code < 0x80
                file_acks.append(n)

            async def flood() -> None:
                async with asyncio.TaskGroup() as segs:
                    for n in range(segments):
                        segs.create_task(one_segment(n), name=f"segment-{n}")

            flooding = tg.create_task(flood(), name="flood")
            await eventually(lambda: len(file_acks) >= 2, STEP_S, "the file transfer under way")
            for n in range(10):
                code = await device.uplink.publish("telemetry/well-1", b"%d" % n)
                assert code < 0x80
                telemetry_done_after.append(len(file_acks))
            await flooding
        await device.data.close()
        await device.uplink.close()
    assert sorted(file_acks) == list(range(segments))
    # Each telemetry PUBACK came back while most of the file was still waiting for its acks: the
    # control stream did not queue behind the data stream's 15 MiB.
    assert telemetry_done_after[-1] < segments // 2, telemetry_done_after
    assert device.data.streams_opened == 1 and device.uplink.reconnects == 0


async def test_a_data_stream_reset_mid_transfer_resends_on_a_new_stream_and_loses_nothing(
        pki: Pki, broker: RunningBroker) -> None:
    device = Device(pki, broker, "well-2", max_inflight=8)
    watcher = Uplink(UplinkConfig(host="127.0.0.1", port=broker.tcp_port, client_id="watcher-2"))
    received: set[bytes] = set()
    total = 120
    acks: list[int] = []

    async def collect() -> None:
        async for message in watcher.inbound():
            received.add(message.payload[:8])

    async with asyncio.TaskGroup() as tg:
        tg.create_task(watcher.run(), name="watcher")
        tg.create_task(device.uplink.run(), name="uplink")
        tg.create_task(device.data.run(), name="data")
        collector = tg.create_task(collect(), name="collect")
        async with asyncio.timeout(STEP_S * 2):
            await watcher.wait_connected()
            await watcher.subscribe([("files/well-2/#", 1)])
            await device.data.wait_connected()

            async def one(n: int) -> None:
                code = await device.data.publish("files/well-2/seg", b"%08d" % n + SEGMENT)
                assert code < 0x80
                acks.append(n)

            async def send_all() -> None:
                async with asyncio.TaskGroup() as pubs:
                    for n in range(total):
                        pubs.create_task(one(n), name=f"pub-{n}")

            sender = tg.create_task(send_all(), name="send-all")
            await eventually(lambda: len(acks) >= 20, STEP_S, "part of the transfer acknowledged")
            assert len(acks) < total
            stream_id = await data_stream_of(broker, device.link)
            [conn] = broker.quic.connections
            conn._kill_stream(stream_id, 0x80, "test: reset mid-transfer")
            await sender
            await eventually(lambda: len(received) == total, STEP_S, "every segment at the subscriber")
        collector.cancel()
        await device.data.close()
        await device.uplink.close()
        await watcher.close()
    assert sorted(acks) == list(range(total))
    assert received == {b"%08d" % n for n in range(total)}
    assert device.data.streams_opened == 2
    assert device.data.stream_session.resent > 0
    assert device.uplink.reconnects == 0  # only the stream was lost, never the MQTT connection


async def test_a_subscription_made_on_a_data_stream_is_remade_on_the_next_stream_and_connection(
        pki: Pki, broker: RunningBroker) -> None:
    device = Device(pki, broker, "well-3")
    sender = Uplink(UplinkConfig(host="127.0.0.1", port=broker.tcp_port, client_id="sender-3"))
    got: list[bytes] = []

    async def collect() -> None:
        async for message in device.data.inbound():
            got.append(message.payload)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(sender.run(), name="sender")
        tg.create_task(device.uplink.run(), name="uplink")
        tg.create_task(device.data.run(), name="data")
        collector = tg.create_task(collect(), name="collect")
        async with asyncio.timeout(STEP_S * 2):
            await sender.wait_connected()
            assert await device.data.subscribe([("down/well-3", 1)]) == (1,)
            await sender.publish("down/well-3", b"first")
            await eventually(lambda: got == [b"first"], STEP_S, "a delivery on the data stream")
            # The stream dies: the broker drops its subscription (B6), we make it again (A9).
            [conn] = broker.quic.connections
            conn._kill_stream(await data_stream_of(broker, device.link), 0x80, "test")
            await eventually(lambda: device.data.streams_opened == 2 and device.data.connected, STEP_S,
                             "a second data stream")
            await eventually(lambda: any("down/well-3" in c._owner for c in broker.quic.connections),
                             STEP_S, "the subscription remade")
            await sender.publish("down/well-3", b"second")
            await eventually(lambda: got == [b"first", b"second"], STEP_S, "a delivery on the new stream")
            # The whole connection dies: after the reconnect the subscription is remade too (A10).
            await device.link.close()
            await eventually(lambda: device.uplink.reconnects == 1 and device.data.streams_opened == 3,
                             STEP_S, "a new connection and data stream")
            await eventually(lambda: any("down/well-3" in c._owner for c in broker.quic.connections),
                             STEP_S, "the subscription remade after the reconnect")
            await sender.publish("down/well-3", b"third")
            await eventually(lambda: got[-1] == b"third", STEP_S, "a delivery after the reconnect")
        collector.cancel()
        await device.data.close()
        await device.uplink.close()
        await sender.close()


async def test_without_a_quic_link_the_data_streams_traffic_goes_over_the_control_connection(
        pki: Pki, broker: RunningBroker) -> None:
    uplink = Uplink(UplinkConfig(host="127.0.0.1", port=broker.tcp_port, client_id="well-4"))
    data = DataStreamUplink(uplink, lambda: None)  # TCP only: there is no QUIC link
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        tg.create_task(data.run(), name="data")
        async with asyncio.timeout(STEP_S):
            await data.wait_connected()
            assert data.mode == "control"
            assert await data.subscribe([("x/well-4", 1)]) == (1,)
            assert await data.publish("x/well-4", b"hello") == 0
            message = await anext(uplink.inbound())
            assert message.payload == b"hello"
        await data.close()
        await uplink.close()
    assert data.streams_opened == 0
