"""Our broker, started in-process with `serve()`, against Mosquitto's command-line clients (v3.1.1 and v5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cloud_broker.config import parse_config
from cloud_broker.server import BrokerServer, serve
from tests.conftest import require_binary
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import MQTT_5, ConnAck, Connect, Disconnect, ReasonCode

pytestmark = pytest.mark.integration

WAIT_S = 5.0
VERSIONS = ["mqttv311", "mqttv5"]


@pytest.fixture
async def server() -> AsyncIterator[BrokerServer]:
    cfg = parse_config({"listeners": [{"kind": "tcp", "host": "127.0.0.1", "port": 0}],
                        "allow_anonymous": True})
    srv = await serve(cfg)
    try:
        yield srv
    finally:
        await srv.close()


_started: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def reap_clients() -> AsyncIterator[None]:
    """Kill and wait for client processes a failed test left behind (so no transport outlives its loop)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def run(*argv: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _started.append(proc)
    return proc


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    async with asyncio.timeout(WAIT_S * 2):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def subscriptions_reach(srv: BrokerServer, count: int) -> None:
    """Wait until the broker holds count subscriptions (so a publish cannot overtake the SUBSCRIBE)."""
    async with asyncio.timeout(WAIT_S):
        # The core has no subscription event to wait on (nor needs one): observe its state instead.
        while srv.broker.stats()["subscriptions"] < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("version", VERSIONS)
async def test_mosquitto_sub_receives_what_mosquitto_pub_sends(server: BrokerServer, version: str) -> None:
    sub_bin, pub_bin = require_binary("mosquitto_sub"), require_binary("mosquitto_pub")
    port = str(server.ports["tcp"][0])
    sub = await run(sub_bin, "-h", "127.0.0.1", "-p", port, "-V", version, "-q", "1", "-t", "well/+/card",
                    "-C", "2", "-W", "8", "-v")
    await subscriptions_reach(server, 1)
    for i in (1, 2):
        rc, _, err = await finish(await run(pub_bin, "-h", "127.0.0.1", "-p", port, "-V", version, "-q", "1",
                                            "-t", f"well/{i}/card", "-m", f"card-{i}"))
        assert rc == 0, err
    rc, out, err = await finish(sub)
    assert rc == 0, err
    assert out.splitlines() == ["well/1/card card-1", "well/2/card card-2"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_retained_message_from_mosquitto_pub_greets_a_later_mosquitto_sub(server: BrokerServer,
                                                                                  version: str) -> None:
    sub_bin, pub_bin = require_binary("mosquitto_sub"), require_binary("mosquitto_pub")
    port = str(server.ports["tcp"][0])
    rc, _, err = await finish(await run(pub_bin, "-h", "127.0.0.1", "-p", port, "-V", version, "-q", "1",
                                        "-r", "-t", "fleet/t1/config", "-m", "v7"))
    assert rc == 0, err
    rc, out, err = await finish(await run(sub_bin, "-h", "127.0.0.1", "-p", port, "-V", version,
                                          "-t", "fleet/#", "-C", "1", "-W", "5", "-v"))
    assert rc == 0, err
    assert out.strip() == "fleet/t1/config v7"


async def test_a_malformed_connection_does_not_disturb_a_healthy_client(server: BrokerServer) -> None:
    sub_bin, pub_bin = require_binary("mosquitto_sub"), require_binary("mosquitto_pub")
    port = server.ports["tcp"][0]
    healthy = await run(sub_bin, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-t", "t", "-C", "1",
                        "-W", "8")
    await subscriptions_reach(server, 1)

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder = Decoder(MQTT_5)
    writer.write(encode(Connect("vandal"), MQTT_5))
    async with asyncio.timeout(WAIT_S):
        [ack] = decoder.feed(await reader.read(64))
        assert isinstance(ack, ConnAck) and ack.reason_code == 0
        writer.write(b"\x30\x04\x00\x09ab")  # a PUBLISH whose topic runs past the end of the packet
        answer = await reader.read()  # until the broker closes the connection
    writer.close()
    assert decoder.feed(answer) == [Disconnect(ReasonCode.MALFORMED_PACKET)]

    rc, _, err = await finish(await run(pub_bin, "-h", "127.0.0.1", "-p", str(port), "-t", "t", "-m", "fine"))
    assert rc == 0, err
    rc, out, err = await finish(healthy)
    assert rc == 0, err
    assert out.strip() == "fine"


async def test_closing_the_server_sends_v5_clients_server_shutting_down(server: BrokerServer) -> None:
    port = server.ports["tcp"][0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(Connect("c", keep_alive_s=0), MQTT_5))
    await writer.drain()
    decoder = Decoder(MQTT_5)
    async with asyncio.timeout(WAIT_S):
        first = decoder.feed(await reader.read(64))
        assert isinstance(first[0], ConnAck)
        await server.close()
        rest = decoder.feed(await reader.read())
    writer.close()
    assert rest == [Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)]
