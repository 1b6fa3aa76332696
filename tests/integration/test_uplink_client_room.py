"""Uplink inflight window: a publish the session refuses after it was granted a slot passes the slot on.

A scripted MQTT 5 server on loopback (tests.integration.test_uplink_client) announces Receive Maximum 1
and a small Maximum Packet Size, and holds the PUBACK of the first message until the test releases it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from tests.integration.test_uplink_client import STEP_TIMEOUT_S, Conn, config, scripted_server, swallow
from uplink.client import Uplink
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import ConnAck, Connect, Properties, PubAck, Publish, ReasonCode

pytestmark = pytest.mark.integration

MAX_PACKET_BYTES = 1024


async def refused(publish: Coroutine[Any, Any, int]) -> LocalProtocolError | None:
    """The publish's refusal, returned (raised, it would end the test's TaskGroup)."""
    try:
        await publish
    except LocalProtocolError as exc:
        return exc
    return None


async def test_a_too_large_publish_woken_for_a_slot_hands_it_to_the_next_waiter() -> None:
    release_first, first_received = asyncio.Event(), asyncio.Event()
    received: list[Publish] = []

    async def window_of_one(conn: Conn) -> None:
        assert isinstance(await conn.read(), Connect)
        await conn.send(
            ConnAck(properties=Properties(receive_maximum=1, maximum_packet_size=MAX_PACKET_BYTES))
        )
        while (packet := await conn.read()) is not None:
            if isinstance(packet, Publish) and packet.packet_id is not None:
                received.append(packet)
                if len(received) == 1:
                    first_received.set()
                    await release_first.wait()
                await conn.send(PubAck(packet.packet_id))
        await swallow(conn)

    async with scripted_server(window_of_one) as (port, _):
        uplink = Uplink(config(port))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await uplink.wait_connected()
                first = tg.create_task(uplink.publish("fg/a", b"first", qos=1), name="first")
                await first_received.wait()  # the first message holds the only slot
                assert uplink.session.inflight_free == 0
                too_large = tg.create_task(refused(uplink.publish("fg/b", bytes(2 * MAX_PACKET_BYTES))),
                                           name="too-large")
                await asyncio.sleep(0)  # queued for a slot before the small one: it is woken first
                small = tg.create_task(uplink.publish("fg/c", b"small", qos=1), name="small")
                await asyncio.sleep(0)
                release_first.set()
                assert await first == 0
                error = await too_large
                assert error is not None and error.reason_code == ReasonCode.PACKET_TOO_LARGE
                assert await small == 0  # without the hand-over this waits for an ack that never comes
            await uplink.close()
    assert [p.topic for p in received] == ["fg/a", "fg/c"]
