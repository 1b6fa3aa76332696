"""Connection migration: the client's address changes mid-stream and the MQTT connection carries on.

The UDP impairment proxy rebinds (new outbound port, alternating 127.0.0.1 / 127.0.0.2), exactly
what a NAT rebinding or a cellular handover does to the broker's view of the client, while QoS 1
publishes are in flight. No MQTT reconnect, no loss, order kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hil.impair import ImpairmentProxy, lossy
from tests.integration.quic_support import Pki, RunningBroker, eventually, make_pki, start_broker
from uplink.client import Uplink, UplinkConfig
from uplink.quic import QuicLink, QuicSettings, QuicStream, open_quic

pytestmark = pytest.mark.integration

STEP_S = 20.0
MESSAGES = 300
REBINDS = 6


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


async def test_rebinding_mid_stream_keeps_the_mqtt_connection_and_loses_nothing(
        pki: Pki, broker: RunningBroker) -> None:
    links: list[QuicLink] = []
    async with ImpairmentProxy(("127.0.0.1", broker.quic_port), kind="udp",
                               profile=lossy(0.0, rtt_ms=10.0)) as proxy:
        settings = QuicSettings(port=proxy.port, ca_file=pki.ca_file)

        async def factory(config: UplinkConfig) -> QuicStream:
            link = await open_quic(config.host, settings, keep_alive_s=config.keep_alive_s)
            links.append(link)
            return link.control

        sender = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="truck-1"),
                        transport_factory=factory)
        receiver = Uplink(UplinkConfig(host="127.0.0.1", port=broker.tcp_port, client_id="cloud-app"))
        got: list[bytes] = []
        all_in = asyncio.Event()

        async def collect() -> None:
            async for message in receiver.inbound():
                got.append(message.payload)
                if len(got) == MESSAGES:
                    all_in.set()

        async def send_all() -> None:
            for start in range(0, MESSAGES, 10):  # pipelined: 10 QoS 1 publishes in flight at a time
                codes = await asyncio.gather(*(sender.publish("fleet/truck-1", b"%04d" % i)
                                               for i in range(start, start + 10)))
                assert all(code < 0x80 for code in codes)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(receiver.run(), name="receiver")
            tg.create_task(sender.run(), name="sender")
            collector = tg.create_task(collect(), name="collector")
            async with asyncio.timeout(STEP_S):
                await receiver.wait_connected()
                await receiver.subscribe([("fleet/#", 1)])
                await sender.wait_connected()
                seen = set()
                publishing = tg.create_task(send_all(), name="send-all")
                for n in range(REBINDS):
                    # Mid-stream: rebind only after more messages came through since the last move.
                    wanted = (n + 1) * 40
                    await eventually(lambda: len(got) >= wanted, what="progress")  # noqa: B023
                    proxy.rebind("127.0.0.2" if n % 2 == 0 else "127.0.0.1")
                    seen.update(proxy.outbound_addresses())
                await publishing
                await all_in.wait()
            server_side = broker.quic.connections[0]
            server_peer = server_side._quic.get_peer_address()
            collector.cancel()
            await sender.close()
            await receiver.close()

    assert got == [b"%04d" % i for i in range(MESSAGES)]  # nothing lost, nothing reordered
    assert sender.reconnects == 0 and len(links) == 1  # one QUIC connection, one MQTT connection
    assert proxy.stats().rebinds == REBINDS and len(seen) == REBINDS
    assert server_peer is not None and tuple(server_peer[:2]) in seen  # the broker followed the move


async def test_the_broker_keeps_the_session_of_a_client_that_rebinds_its_own_socket(
        pki: Pki, broker: RunningBroker) -> None:
    link = await open_quic("127.0.0.1", QuicSettings(port=broker.quic_port, ca_file=pki.ca_file))
    sender = Uplink(UplinkConfig(host="127.0.0.1", port=1, client_id="self-mover"),
                    transport_factory=lambda config: _once(link))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sender.run(), name="sender")
        async with asyncio.timeout(STEP_S):
            await sender.wait_connected()
            before = broker.quic.connections[0]._quic.get_peer_address()
            new_port = await link.rebind()
            assert await sender.publish("t/after-move", b"x") < 0x80
            after = broker.quic.connections[0]._quic.get_peer_address()
        await sender.close()
    assert before is not None and after is not None
    assert after[1] == new_port != before[1] and sender.reconnects == 0


async def _once(link: QuicLink) -> QuicStream:
    return link.control
