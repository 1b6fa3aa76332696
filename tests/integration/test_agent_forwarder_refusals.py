"""Forwarder over the real store when the broker refuses: records are kept, the forwarder backs off and
retries, and nothing a refusal or the link's limits say ends the forwarder.

The publisher is our own seam (agent.forwarder.Publisher) answering with the reason codes a test scripts,
or refusing the way the Uplink refuses a message the broker's CONNACK limits forbid (LocalProtocolError).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.forwarder import Forwarder
from store_forward.facade import AsyncQueue
from store_forward.sqlite import SqliteQueue
from tests.integration.test_agent_forwarder_store import TOPICS, WAIT_S, record, wait_drained
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import NO_PROPERTIES, Properties, ReasonCode
from uplink.schema.records import decode_batch


@dataclass
class ScriptedBroker:
    """Answers publishes from `script` (a reason code, or an exception to raise), then with success."""

    script: list[int | Exception]
    answered: list[int | Exception] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)  # seqs of batches answered with success
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_connected(self) -> None:
        return None

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      properties: Properties = NO_PROPERTIES) -> int:
        answer: int | Exception = self.script.pop(0) if self.script else ReasonCode.SUCCESS
        self.answered.append(answer)
        self.changed.set()
        if isinstance(answer, Exception):
            raise answer
        if answer < 0x80:
            self.delivered.extend(i.seq for i in decode_batch(payload, properties).items)
        return answer

    async def until_answered(self, n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.answered) < n:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def forwarding(tmp_path: Path, broker: ScriptedBroker) -> AsyncIterator[tuple[AsyncQueue, Forwarder]]:
    queue = AsyncQueue(lambda: SqliteQueue(tmp_path / "queue.db"))
    await queue.start()
    fwd = Forwarder(queue, broker, TOPICS, batch_max_records=10, idle_poll_s=0.05, gap_poll_s=60.0,
                    refused_backoff_initial_s=0.01, refused_backoff_max_s=0.05)
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(fwd.run(), name="forwarder-under-test")
            yield queue, fwd
            assert not task.done(), "the forwarder ended"
            task.cancel()
    finally:
        await queue.close()


async def test_a_batch_refused_with_quota_exceeded_is_kept_and_delivered_once_the_broker_takes_it(
    tmp_path: Path,
) -> None:
    quota = ReasonCode.QUOTA_EXCEEDED  # 0x97: every subscriber's queue was full, the broker dropped it
    broker = ScriptedBroker([quota, quota, quota])
    async with forwarding(tmp_path, broker) as (queue, fwd):
        seqs = await queue.append([record(i) for i in range(5)])
        fwd.notify()
        await wait_drained(queue)
        stats = await queue.stats()
    assert broker.answered[:3] == [quota] * 3
    assert sorted(broker.delivered) == seqs
    assert fwd.stats.publishes_refused == 3
    assert (stats.acked_total, stats.rejected_total) == (5, 0)


async def test_a_link_that_cannot_carry_qos_1_refuses_without_ending_the_forwarder(tmp_path: Path) -> None:
    # What Uplink.publish raises when the broker's CONNACK announced Maximum QoS 0.
    no_qos1 = LocalProtocolError("qos 1 exceeds the server's Maximum QoS 0", ReasonCode.QOS_NOT_SUPPORTED)
    broker = ScriptedBroker([no_qos1, no_qos1])
    async with forwarding(tmp_path, broker) as (queue, fwd):
        seqs = await queue.append([record(i) for i in range(3)])
        fwd.notify()
        await broker.until_answered(3)  # refused twice, kept, offered again and taken
        await wait_drained(queue)
    assert sorted(broker.delivered) == seqs
    assert fwd.stats.publishes_refused == 2


async def test_no_matching_subscribers_settles_by_default(tmp_path: Path) -> None:
    broker = ScriptedBroker([ReasonCode.NO_MATCHING_SUBSCRIBERS])
    async with forwarding(tmp_path, broker) as (queue, fwd):
        await queue.append([record(i) for i in range(3)])
        fwd.notify()
        await wait_drained(queue)
    assert broker.answered == [ReasonCode.NO_MATCHING_SUBSCRIBERS]
    assert fwd.stats.publishes_refused == 0
