"""Link policy end to end: QUIC through the impairment proxy, TCP/TLS straight to the broker.

UDP is "blocked" by blackholing the UDP relay; the Uplink must land on TLS, keep its MQTT session,
and move back to QUIC (cleanly: no Will) once UDP passes again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hil.impair import ImpairmentProxy
from tests.integration.quic_support import Pki, RunningBroker, eventually, make_pki, start_broker
from uplink.client import Uplink, UplinkConfig
from uplink.failover import FailoverConfig, FailoverTransportFactory
from uplink.mqtt.packets import Will
from uplink.quic import QuicSettings

pytestmark = pytest.mark.integration

STEP_S = 15.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def broker(pki: Pki) -> AsyncIterator[RunningBroker]:
    server = await start_broker(pki, tls=True)
    try:
        yield server
    finally:
        await server.close()


def tls_config(pki: Pki, broker: RunningBroker, client_id: str, **kw: object) -> UplinkConfig:
    return UplinkConfig(host="127.0.0.1", port=broker.tls_port, client_id=client_id, tls=True,
                        ca_file=pki.ca_file, clean_start=False, session_expiry_s=600,
                        reconnect_initial_s=0.05, reconnect_max_s=0.5, **kw)  # type: ignore[arg-type]


async def test_blocked_udp_falls_back_to_tls_and_returns_to_quic_without_losing_the_session(
        pki: Pki, broker: RunningBroker) -> None:
    async with ImpairmentProxy(("127.0.0.1", broker.quic_port), kind="udp") as proxy:
        proxy.blackhole(None)  # UDP blocked
        factory = FailoverTransportFactory(FailoverConfig(
            quic=QuicSettings(port=proxy.port, ca_file=pki.ca_file, handshake_timeout_s=0.5),
            probe_initial_s=0.3, probe_max_s=1.0))
        device = Uplink(tls_config(pki, broker, "truck-7", will=Will("wills/truck-7", b"lost", 1, False)),
                        transport_factory=factory)
        watcher = Uplink(UplinkConfig(host="127.0.0.1", port=broker.tcp_port, client_id="watcher"))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(watcher.run(), name="watcher")
            tg.create_task(device.run(), name="device")
            prober = tg.create_task(factory.run_prober(), name="prober")
            async with asyncio.timeout(STEP_S):
                await watcher.wait_connected()
                await watcher.subscribe([("wills/#", 1)])
                await device.wait_connected()
                assert factory.active == "tcp" and factory.quic_failures >= 1
                assert await device.subscribe([("cmd/truck-7/#", 1)]) == (1,)
                assert await device.publish("data/truck-7", b"over tls") < 0x80

                proxy.end_blackhole()  # UDP passes again
                await eventually(lambda: factory.active == "quic" and device.connected, STEP_S,
                                 "back on QUIC")
                assert factory.switches_to_quic == 1
                assert await device.publish("data/truck-7", b"over quic") < 0x80
                # The session survived the switch: the subscription made over TLS still delivers.
                assert await watcher.publish("cmd/truck-7/reboot", b"now") < 0x80
                message = await anext(device.inbound())
                assert message.topic == "cmd/truck-7/reboot"
                await device.close()
                await watcher.close()
            prober.cancel()
        session = broker.broker.session("truck-7")
        assert session is not None
        assert watcher._inbound.empty()  # no Will: the TLS link was left with DISCONNECT 0


async def test_quic_is_used_first_when_udp_passes(pki: Pki, broker: RunningBroker) -> None:
    factory = FailoverTransportFactory(FailoverConfig(
        quic=QuicSettings(port=broker.quic_port, ca_file=pki.ca_file, handshake_timeout_s=2.0)))
    device = Uplink(tls_config(pki, broker, "well-9"), transport_factory=factory)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(device.run(), name="device")
        async with asyncio.timeout(STEP_S):
            await device.wait_connected()
            assert factory.active == "quic" and factory.quic_link is not None
            assert factory.quic_failures == 0
            await device.close()


async def test_an_overloaded_quic_listener_is_not_dodged_over_tls(pki: Pki) -> None:
    server = await start_broker(pki, tls=True, max_connections=1)
    try:
        hog_factory = FailoverTransportFactory(FailoverConfig(
            quic=QuicSettings(port=server.quic_port, ca_file=pki.ca_file, handshake_timeout_s=2.0)))
        hog = Uplink(tls_config(pki, server, "hog"), transport_factory=hog_factory)
        factory = FailoverTransportFactory(FailoverConfig(
            quic=QuicSettings(port=server.quic_port, ca_file=pki.ca_file, handshake_timeout_s=2.0)))
        device = Uplink(tls_config(pki, server, "late"), transport_factory=factory)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hog.run(), name="hog")
            async with asyncio.timeout(STEP_S):
                await hog.wait_connected()
            tg.create_task(device.run(), name="device")
            await asyncio.sleep(0.5)  # several attempts: each refused as overloaded
            assert not device.connected and factory.active is None and factory.quic_failures == 0
            await device.close()
            await hog.close()
    finally:
        await server.close()
