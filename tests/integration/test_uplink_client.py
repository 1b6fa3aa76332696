"""The Uplink supervisor against a scripted MQTT server on loopback: dead links, timeouts, resends.

Mosquitto cannot be told to swallow a PINGREQ or drop a link right after a PUBLISH, so these cases
use a tiny real TCP server whose per-connection behaviour each test writes with the real codec.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from hil.net import free_port
from uplink.client import Uplink, UplinkClosed, UplinkConfig
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.packets import MQTT_5, ConnAck, Connect, Packet, PingReq, PubAck, Publish

pytestmark = pytest.mark.integration

STEP_TIMEOUT_S = 10.0


class Conn:
    """One accepted client connection, seen from the server."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self._reader = reader
        self._writer = writer
        self._decoder = Decoder()
        self._packets: list[Packet] = []

    async def read(self) -> Packet | None:
        """The next packet from the client, or None at EOF."""
        while not self._packets:
            data = await self._reader.read(65536)
            if not data:
                return None
            self._packets.extend(self._decoder.feed(data))
        return self._packets.pop(0)

    async def send(self, packet: Packet) -> None:
        self._writer.write(encode(packet, MQTT_5))
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


Script = Callable[[Conn], Awaitable[object]]


@contextlib.asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[int, asyncio.Queue[Conn]]]:
    accepted: asyncio.Queue[Conn] = asyncio.Queue()
    count = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        conn = Conn(count, reader, writer)
        accepted.put_nowait(conn)
        try:
            await script(conn)
        finally:
            await conn.close()

    port = free_port()
    server = await asyncio.start_server(on_connect, "127.0.0.1", port)
    async with server:
        yield port, accepted


def config(port: int, **overrides: object) -> UplinkConfig:
    return UplinkConfig(
        host="127.0.0.1", port=port, client_id="scripted", clean_start=False,
        reconnect_initial_s=0.05, reconnect_max_s=0.1, **overrides,  # type: ignore[arg-type]
    )


async def swallow(conn: Conn) -> list[Packet]:
    seen = []
    while (packet := await conn.read()) is not None:
        seen.append(packet)
    return seen


async def test_a_broker_that_stops_answering_pings_is_dropped_and_the_uplink_reconnects() -> None:
    pings: list[int] = []

    async def connack_then_silence(conn: Conn) -> None:
        assert isinstance(await conn.read(), Connect)
        await conn.send(ConnAck())
        while (packet := await conn.read()) is not None:
            if isinstance(packet, PingReq):
                pings.append(conn.index)  # never answered

    async with scripted_server(connack_then_silence) as (port, accepted):
        uplink = Uplink(config(port, keep_alive_s=1, ping_timeout_s=0.2))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await accepted.get()
                second = await accepted.get()
                assert second.index == 2
                await uplink.wait_connected()
            assert pings[0] == 1
            assert uplink.reconnects == 1
            await uplink.close()


async def test_a_broker_that_never_sends_connack_is_retried_after_the_connect_timeout() -> None:
    async with scripted_server(swallow) as (port, accepted):
        uplink = Uplink(config(port, connect_timeout_s=0.2))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                for expected in (1, 2, 3):
                    assert (await accepted.get()).index == expected
            assert not uplink.connected
            assert uplink.reconnects == 0
            await uplink.close()


async def test_a_publish_cut_off_before_its_puback_is_resent_with_dup_and_the_caller_gets_the_ack() -> None:
    first_publish: list[Publish] = []
    resent: list[Publish] = []

    async def drop_then_ack(conn: Conn) -> None:
        assert isinstance(await conn.read(), Connect)
        if conn.index == 1:
            await conn.send(ConnAck())
            packet = await conn.read()
            assert isinstance(packet, Publish)
            first_publish.append(packet)
            return  # the link dies with the PUBLISH unacknowledged
        await conn.send(ConnAck(session_present=True))
        packet = await conn.read()
        assert isinstance(packet, Publish) and packet.packet_id is not None
        resent.append(packet)
        await conn.send(PubAck(packet.packet_id))
        await swallow(conn)

    async with scripted_server(drop_then_ack) as (port, _):
        uplink = Uplink(config(port))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                assert await uplink.publish("fg/data", b"reading", qos=1) == 0
            await uplink.close()
    [original] = first_publish
    [again] = resent
    assert (original.dup, again.dup) == (False, True)
    assert (again.packet_id, again.topic, again.payload) == (original.packet_id, "fg/data", b"reading")
    assert uplink.reconnects == 1


async def test_a_refused_connection_is_retried_and_not_counted_as_connected() -> None:
    async def refuse(conn: Conn) -> None:
        assert isinstance(await conn.read(), Connect)
        await conn.send(ConnAck(reason_code=0x87))

    async with scripted_server(refuse) as (port, accepted):
        uplink = Uplink(config(port))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                for expected in (1, 2):
                    assert (await accepted.get()).index == expected
            assert not uplink.connected
            await uplink.close()


async def test_a_link_whose_writes_block_forever_still_times_out_on_the_missing_pingresp() -> None:
    stop = asyncio.Event()

    async def connack_then_never_read(conn: Conn) -> None:
        assert isinstance(await conn.read(), Connect)
        await conn.send(ConnAck())
        await stop.wait()  # the socket buffers fill up and the client's writes stall

    async with scripted_server(connack_then_never_read) as (port, accepted):
        uplink = Uplink(config(port, keep_alive_s=1, ping_timeout_s=0.2, max_inflight=8))

        async def publish_big(i: int) -> object:
            try:
                return await uplink.publish("fg/big", bytes(2_000_000), qos=1)
            except UplinkClosed as exc:
                return exc

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(uplink.run(), name="uplink")
                publishes = [tg.create_task(publish_big(i), name=f"big-{i}") for i in range(8)]
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    await accepted.get()
                    assert (await accepted.get()).index == 2
                await uplink.close()
        finally:
            stop.set()
        assert all(isinstance(p.result(), UplinkClosed) for p in publishes)
