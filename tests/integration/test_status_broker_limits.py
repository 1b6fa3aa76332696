"""The agent's status message on a broker whose CONNACK limits retain or QoS: sent as the broker allows,
or dropped with a log line, never an exception that would end the link's tasks (and the agent).

A scripted MQTT 5 server on loopback (tests.integration.test_uplink_client) announces the limits.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import parse_toml
from tests.integration.test_uplink_client import STEP_TIMEOUT_S, Conn, config, scripted_server, swallow
from uplink.client import Uplink
from uplink.mqtt.packets import ConnAck, Connect, Properties, PubAck, Publish

pytestmark = pytest.mark.integration


def agent(tmp_path: Path) -> Agent:
    text = f'[agent]\nid = "pad-07"\ndata_dir = "{tmp_path}"\n[uplink]\nhost = "127.0.0.1"\n'
    return Agent(parse_toml(text))


async def status_publishes(tmp_path: Path, limits: Properties) -> list[Publish]:
    received: list[Publish] = []
    got = asyncio.Event()

    async def limited(conn: Conn) -> None:
        assert isinstance(await conn.read(), Connect)
        await conn.send(ConnAck(properties=limits))
        while (packet := await conn.read()) is not None:
            if isinstance(packet, Publish):
                received.append(packet)
                if packet.packet_id is not None:
                    await conn.send(PubAck(packet.packet_id))
                got.set()
        await swallow(conn)

    async with scripted_server(limited) as (port, _):
        uplink = Uplink(config(port))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await uplink.wait_connected()
                a = agent(tmp_path)
                await a._publish_status(uplink, b'{"state":"online"}')  # must not raise
                if limits.maximum_packet_size is None:
                    await got.wait()
            await uplink.close()
    return received


async def test_a_broker_without_retain_gets_the_status_unretained(tmp_path: Path) -> None:
    [status] = await status_publishes(tmp_path, Properties(retain_available=0))
    assert (status.topic, status.retain, status.qos) == ("fg/v1/pad-07/status", False, 1)


async def test_a_broker_with_maximum_qos_0_gets_the_status_at_qos_0(tmp_path: Path) -> None:
    [status] = await status_publishes(tmp_path, Properties(maximum_qos=0))
    assert (status.retain, status.qos) == (True, 0)


async def test_a_status_over_the_maximum_packet_size_is_dropped_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert await status_publishes(tmp_path, Properties(maximum_packet_size=20)) == []
    assert "refuse the status message" in caplog.text
