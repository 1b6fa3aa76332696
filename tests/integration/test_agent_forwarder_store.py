"""Forwarder over the real store (SQLite through the async facade): lanes, historical batches, gap notices.

The store is real; the publisher is our own seam (agent.forwarder.Publisher), recording what would go to
the broker and answering with the PUBACK reason code the test chooses. The store's wall clock is a fake
the test moves, so records can be made older than the live window without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.forwarder import Forwarder
from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord, Priority
from store_forward.policy import QueueBounds
from store_forward.sqlite import SqliteQueue
from uplink.mqtt.packets import NO_PROPERTIES, Properties
from uplink.schema.records import EventRecord, decode_batch, decode_gap, encode_record
from uplink.schema.topics import AgentTopics

WAIT_S = 10.0
TOPICS = AgentTopics("fwd-1")
T0_NS = 1_700_000_000 * 10**9


@dataclass
class Sent:
    topic: str
    payload: bytes
    properties: Properties


@dataclass
class Broker:
    """The publisher seam: keeps every publish and answers `reason(topic)`."""

    reason: Callable[[str], int] = lambda topic: 0
    sent: list[Sent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_connected(self) -> None:
        return None

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
    ) -> int:
        self.sent.append(Sent(topic, payload, properties))
        self.changed.set()
        return self.reason(topic)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def record(i: int) -> NewRecord:
    event = EventRecord(source="test", code="tick", message=str(i), ts_ns=T0_NS + i)
    return NewRecord("event", encode_record(event), T0_NS + i, Priority.TELEMETRY)


@contextlib.asynccontextmanager
async def store(tmp_path: Path, clock: list[int], **kw: object) -> AsyncIterator[AsyncQueue]:
    q = AsyncQueue(lambda: SqliteQueue(tmp_path / "queue.db", clock_ns=lambda: clock[0]), **kw)  # type: ignore[arg-type]
    await q.start()
    try:
        yield q
    finally:
        await q.close()


@contextlib.asynccontextmanager
async def forwarding(queue: AsyncQueue, broker: Broker) -> AsyncIterator[Forwarder]:
    fwd = Forwarder(queue, broker, TOPICS, batch_max_records=10, idle_poll_s=0.05, gap_poll_s=0.05)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(fwd.run(), name="forwarder-under-test")
        try:
            yield fwd
        finally:
            task.cancel()


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """The store has no change event for the loop side: look again until `check` holds (bounded)."""
    async with asyncio.timeout(WAIT_S):
        for _ in itertools.count():
            if await check():
                return
            await asyncio.sleep(0.02)


async def wait_drained(queue: AsyncQueue) -> None:
    async def empty() -> bool:
        return (await queue.stats()).depth == 0

    await eventually(empty)


async def test_records_older_than_the_live_window_go_out_as_historical_and_live_ones_do_not(
    tmp_path: Path,
) -> None:
    clock = [T0_NS]
    broker = Broker()
    async with store(tmp_path, clock) as queue:
        old = await queue.append([record(i) for i in range(3)])
        clock[0] += 120 * 10**9  # the first three are now two minutes old: backlog
        new = await queue.append([record(i) for i in range(3, 5)])
        async with forwarding(queue, broker):
            await wait_drained(queue)
    by_seqs = {}
    for s in broker.sent:
        batch = decode_batch(s.payload, s.properties)
        by_seqs[tuple(i.seq for i in batch.items)] = (
            batch.historical,
            ("hist", "1") in s.properties.user_properties,
        )
    assert by_seqs == {tuple(new): (False, False), tuple(old): (True, True)}
    # Live first: the backlog waited behind the records of the live window.
    assert decode_batch(broker.sent[0].payload).items[0].seq == new[0]


async def test_evicted_records_are_announced_as_one_gap_notice_and_settled_on_puback(tmp_path: Path) -> None:
    clock = [T0_NS]
    broker = Broker()
    bounds = QueueBounds(max_records=2)
    async with store(tmp_path, clock) as queue:
        seqs = await queue.append([record(i) for i in range(5)])
        assert await queue.evict(bounds, 0.0) == 3
        async with forwarding(queue, broker) as fwd:
            await broker.wait_for(lambda: any(s.topic == TOPICS.data("gap") for s in broker.sent))
            await wait_drained(queue)

            async def settled() -> bool:
                return not await queue.pending_gaps()

            await eventually(settled)
        generation = (await queue.stats()).generation
    notices = [decode_gap(s.payload) for s in broker.sent if s.topic == TOPICS.data("gap")]
    assert len(notices) == 1
    gap = notices[0]
    assert (gap.gen, gap.first_seq, gap.last_seq, gap.count) == (generation, seqs[0], seqs[2], 3)
    assert (gap.reason, gap.detail, gap.record_class, gap.agent) == (
        "evicted",
        "max_records",
        "telemetry",
        "fwd-1",
    )
    assert fwd.stats.gaps_announced == 1
    # The records the eviction kept were delivered; the evicted ones never were.
    delivered = {
        i.seq for s in broker.sent if s.topic != TOPICS.data("gap") for i in decode_batch(s.payload).items
    }
    assert delivered == set(seqs[3:])


async def test_a_gap_notice_the_broker_refuses_stays_pending_and_is_sent_again(tmp_path: Path) -> None:
    clock = [T0_NS]
    broker = Broker(reason=lambda topic: 0x87 if topic.endswith("/gap") else 0)
    async with store(tmp_path, clock) as queue:
        await queue.append([record(i) for i in range(3)])
        await queue.evict(QueueBounds(max_records=1), 0.0)
        async with forwarding(queue, broker) as fwd:
            await broker.wait_for(lambda: sum(s.topic.endswith("/gap") for s in broker.sent) >= 2)
        assert len(await queue.pending_gaps()) == 1
    assert fwd.stats.gaps_announced == 0
