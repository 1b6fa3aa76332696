"""The agent's TLS link presents a client certificate to a broker that demands mutual TLS.

A real broker core behind a TLS listener with `require_client_cert` (and a QUIC listener whose UDP
is blackholed, for the failover path) on 127.0.0.1; the device is our Uplink.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import AgentConfig, parse_toml
from agent.link import quic_settings, uplink_config
from cloud_broker.config import ListenerConfig
from cloud_broker.listeners import tcp
from hil.impair import ImpairmentProxy
from tests.integration.quic_support import Pki, eventually, make_pki, start_broker
from uplink.client import Transport, Uplink, UplinkConfig, tcp_transport_factory
from uplink.failover import FailoverConfig, FailoverTransportFactory
from uplink.quic import QuicSettings

pytestmark = pytest.mark.integration

STEP_S = 15.0


async def _mtls_listener(pki: Pki, hub: object) -> tuple[object, int]:
    listener = await tcp.start(hub, ListenerConfig(  # type: ignore[arg-type]
        kind="tls", host="127.0.0.1", port=0, cert_file=pki.cert_file, key_file=pki.key_file,
        ca_file=pki.ca_file, require_client_cert=True))
    return listener, listener.addresses[0][1]


async def test_the_tls_link_presents_the_configured_client_certificate_and_without_it_gets_nothing(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running = await start_broker(pki, tls=False)
    listener, port = await _mtls_listener(pki, running.hub)
    try:
        device = Uplink(UplinkConfig(host="127.0.0.1", port=port, client_id="well-0001", tls=True,
                                     ca_file=pki.ca_file, cert_file=pki.client_cert_file,
                                     key_file=pki.client_key_file))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(device.run(), name="device")
            async with asyncio.timeout(STEP_S):
                await device.wait_connected()
                assert await device.publish("data/well-0001", b"mtls") < 0x80
                # The broker verified the chain and took the certificate's name as the identity.
                assert [c.cert_identity for c in running.broker._conns.values()] == ["well-0001"]
                await device.close()

        attempts: list[UplinkConfig] = []

        async def counted(config: UplinkConfig) -> Transport:
            attempts.append(config)
            return await tcp_transport_factory(config)

        anonymous = Uplink(UplinkConfig(host="127.0.0.1", port=port, client_id="no-cert", tls=True,
                                        ca_file=pki.ca_file, reconnect_initial_s=0.05,
                                        reconnect_max_s=0.1), transport_factory=counted)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(anonymous.run(), name="anonymous")
            # Several attempts, each refused by the broker (no certificate): never connected.
            await eventually(lambda: len(attempts) >= 3, STEP_S, "three connection attempts")
            assert not anonymous.connected
            await anonymous.close()
            task.cancel()
    finally:
        listener.close()  # type: ignore[attr-defined]
        await listener.wait_closed()  # type: ignore[attr-defined]
        await running.close()


async def test_the_failover_to_tls_carries_the_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    running = await start_broker(pki, tls=False)
    listener, port = await _mtls_listener(pki, running.hub)
    try:
        async with ImpairmentProxy(("127.0.0.1", running.quic_port), kind="udp") as proxy:
            proxy.blackhole(None)  # UDP blocked: the link must land on TLS
            factory = FailoverTransportFactory(FailoverConfig(
                quic=QuicSettings(port=proxy.port, ca_file=pki.ca_file, handshake_timeout_s=0.5)))
            device = Uplink(UplinkConfig(host="127.0.0.1", port=port, client_id="well-0001", tls=True,
                                         ca_file=pki.ca_file, cert_file=pki.client_cert_file,
                                         key_file=pki.client_key_file),
                            transport_factory=factory)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(device.run(), name="device")
                async with asyncio.timeout(STEP_S):
                    await device.wait_connected()
                    assert factory.active == "tcp"
                    assert await device.publish("data/well-0001", b"fallback") < 0x80
                    await device.close()
    finally:
        listener.close()  # type: ignore[attr-defined]
        await listener.wait_closed()  # type: ignore[attr-defined]
        await running.close()


def _agent(text: str) -> AgentConfig:
    return parse_toml("[agent]\nid = \"well-0001\"\n" + text)


def test_the_agents_uplink_certificate_serves_tls_and_quic_unless_quic_names_its_own() -> None:
    cfg = _agent('[uplink]\nhost = "b"\ntransport = "auto"\ntls = true\n'
                 'cert_file = "/etc/d.pem"\nkey_file = "/etc/d.key"\n')
    link = uplink_config(cfg)
    assert (link.cert_file, link.key_file) == ("/etc/d.pem", "/etc/d.key")
    assert (quic_settings(cfg).cert_file, quic_settings(cfg).key_file) == ("/etc/d.pem", "/etc/d.key")
    own = _agent('[uplink]\nhost = "b"\ntransport = "quic"\n'
                 'cert_file = "/etc/d.pem"\nkey_file = "/etc/d.key"\n'
                 '[uplink.quic]\ncert_file = "/etc/q.pem"\nkey_file = "/etc/q.key"\n')
    assert (quic_settings(own).cert_file, quic_settings(own).key_file) == ("/etc/q.pem", "/etc/q.key")
    assert uplink_config(own).cert_file is None  # no TLS on the TCP side: nothing to present there


@pytest.mark.parametrize(("text", "message"), [
    ('[uplink]\nhost = "b"\ntls = true\ncert_file = "/etc/d.pem"\n', "go together"),
    ('[uplink]\nhost = "b"\ncert_file = "/etc/d.pem"\nkey_file = "/etc/d.key"\n', "needs tls"),
])
def test_a_client_certificate_without_its_key_or_without_tls_is_a_config_error(text: str,
                                                                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _agent(text)
