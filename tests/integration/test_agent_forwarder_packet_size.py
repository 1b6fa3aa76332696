"""Forwarder against a real `cloud-broker run` with a small Maximum Packet Size, and PUBACK 0x10 handling.

Everything is real: the SQLite queue through the async facade, our Uplink over TCP, the broker process (on
a free loopback port, checked to be ours), and a subscriber (another Uplink) that sees what the cloud
sees. The broker's [limits] max_packet_size_bytes is small, so batches the lease hands out do not fit:
the forwarder must split them and keep delivering, and a record that can never fit is settled as
rejected and announced as a `too_large` gap notice rather than crashing or looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import pytest

from agent.app import LinkHolder
from agent.forwarder import TOO_LARGE, Forwarder
from hil.net import free_port, wait_tcp_listening
from store_forward.facade import AsyncQueue
from store_forward.model import Batch, NewRecord, Priority, QueueStats
from store_forward.sqlite import SqliteQueue
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.packets import NO_PROPERTIES, Properties, Publish, ReasonCode
from uplink.schema.records import (
    GAP_STREAM,
    EventRecord,
    GapNotice,
    decode_batch,
    decode_gap,
    encode_record,
)
from uplink.schema.topics import AgentTopics

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
AGENT = "pad-07"
TOPICS = AgentTopics(AGENT)
MAX_PACKET_BYTES = 16 * 1024
WAIT_S = 20.0


def start_broker(tmp_path: Path, port: int, limits: str = "") -> subprocess.Popen[bytes]:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        'allow_anonymous = true\nlog_level = "warning"\n'
        f'[[listeners]]\nkind = "tcp"\nhost = "127.0.0.1"\nport = {port}\n{limits}'
    )
    log = open(tmp_path / "broker.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [str(BIN / "cloud-broker"), "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )


@pytest.fixture(name="broker_port")
def broker_port_fixture(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start_broker(tmp_path, port, f"[limits]\nmax_packet_size_bytes = {MAX_PACKET_BYTES}\n")
    try:
        wait_tcp_listening(port, proc.pid, 20.0)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def event(i: int, size_bytes: int) -> NewRecord:
    e = EventRecord(source="test", code="tick", message=f"{i}:" + "x" * size_bytes, ts_ns=time.time_ns())
    return NewRecord("event", encode_record(e), e.ts_ns, Priority.EVENT)


class ObservedQueue(AsyncQueue):
    """The real facade; `settled` is set after every settle (so tests wait for events, not time)."""

    def __init__(self, path: Path) -> None:
        super().__init__(lambda: SqliteQueue(path))
        self.settled = asyncio.Event()

    async def settle(self, batch: Batch, acked: Iterable[int], rejected: Iterable[int] = ()) -> None:
        try:
            await super().settle(batch, acked, rejected)
        finally:
            self.settled.set()

    async def drained(self) -> QueueStats:
        async with asyncio.timeout(WAIT_S):
            while True:
                self.settled.clear()
                stats = await self.stats()
                if not stats.depth:
                    return stats
                await self.settled.wait()


class ObservedLink(LinkHolder):
    """The agent's LinkHolder; remembers every PUBACK reason code the forwarder got."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[int] = []
        self.answered = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      properties: Properties = NO_PROPERTIES) -> int:
        reason = await super().publish(topic, payload, qos, retain, properties)
        self.reasons.append(reason)
        self.answered.set()
        return reason

    async def until_reasons(self, reason: int, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.reasons.count(reason) < count:
                self.answered.clear()
                await self.answered.wait()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, port: int, **forwarder_kw: object
                  ) -> AsyncIterator[tuple[ObservedQueue, Forwarder, ObservedLink]]:
    """The queue, and a running forwarder over the agent's LinkHolder with an Uplink to the broker."""
    queue = ObservedQueue(tmp_path / "queue.db")
    await queue.start()
    uplink = Uplink(UplinkConfig("127.0.0.1", port, AGENT, reconnect_initial_s=0.05, reconnect_max_s=0.2))
    link = ObservedLink()
    link.set(uplink)
    forwarder = Forwarder(queue, link, TOPICS, idle_poll_s=0.05, refused_backoff_initial_s=0.05,
                          refused_backoff_max_s=0.2, **forwarder_kw)  # type: ignore[arg-type]
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            task = tg.create_task(forwarder.run(), name="forwarder")
            yield queue, forwarder, link
            assert not task.done(), "the forwarder ended"
            task.cancel()
            await uplink.close()
    finally:
        await queue.close()


@contextlib.asynccontextmanager
async def cloud(port: int) -> AsyncIterator[asyncio.Queue[Publish]]:
    """A subscriber on the agent's data streams; yields the queue of what it received."""
    sub = Uplink(UplinkConfig("127.0.0.1", port, "cloud-ingest", clean_start=True))
    received: asyncio.Queue[Publish] = asyncio.Queue()

    async def pump() -> None:
        async for msg in sub.inbound():
            received.put_nowait(msg)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(sub.run(), name="cloud-uplink")
        reader = tg.create_task(pump(), name="cloud-inbound")
        async with asyncio.timeout(WAIT_S):
            await sub.wait_connected()
            codes = await sub.subscribe([(TOPICS.data("#"), 1)])
        assert codes[0] < 0x80
        yield received
        reader.cancel()
        await sub.close()


async def collect(received: asyncio.Queue[Publish], want_seqs: set[int], want_gaps: int
                  ) -> tuple[list[int], list[GapNotice]]:
    seqs: list[int] = []
    gaps: list[GapNotice] = []
    async with asyncio.timeout(WAIT_S):
        while not (want_seqs <= set(seqs) and len(gaps) >= want_gaps):
            msg = await received.get()
            if msg.topic == TOPICS.data(GAP_STREAM):
                gaps.append(decode_gap(msg.payload))
            else:
                assert len(msg.payload) < MAX_PACKET_BYTES
                seqs.extend(item.seq for item in decode_batch(msg.payload, msg.properties).items)
    return seqs, gaps


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_batches_over_the_maximum_packet_size_are_split_and_a_record_that_never_fits_is_announced(
    tmp_path: Path, broker_port: int, encoding: str
) -> None:
    async with (
        cloud(broker_port) as received,
        running(tmp_path, broker_port, encoding=encoding) as (q, fwd, _),
    ):
        # ~60 KiB of 1 KiB records: every lease (256 KiB by default) is several packets' worth; one
        # 40 KiB record in the middle can never fit a 16 KiB packet whatever the split.
        small = await q.append([event(i, 1000) for i in range(30)])
        [huge] = await q.append([event(999, 40_000)])
        rest = await q.append([event(i, 1000) for i in range(30, 60)])
        fwd.notify()
        seqs, gaps = await collect(received, set(small + rest), 1)
        stats = await q.drained()
    assert sorted(set(seqs)) == sorted(small + rest)
    assert huge not in seqs
    [gap] = gaps
    assert (gap.reason, gap.first_seq, gap.last_seq, gap.count) == (TOO_LARGE, huge, huge, 1)
    assert gap.gap_id == -huge and gap.record_class == "event" and gap.agent == AGENT
    assert stats.rejected_total == 1 and stats.acked_total == 60
    assert fwd.stats.records_too_large == 1
    assert fwd.stats.batches_split >= 1


async def test_with_settle_on_no_subscribers_off_records_wait_for_a_subscriber(
    tmp_path: Path, broker_port: int
) -> None:
    async with running(tmp_path, broker_port, settle_on_no_subscribers=False) as (q, fwd, link):
        seqs = await q.append([event(i, 10) for i in range(5)])
        fwd.notify()
        await link.until_reasons(ReasonCode.NO_MATCHING_SUBSCRIBERS, 2)  # kept, backed off, offered again
        assert (await q.stats()).depth == 5
        assert fwd.stats.publishes_refused >= 2
        async with cloud(broker_port) as received:
            got, _ = await collect(received, set(seqs), 0)
            await q.drained()
    assert set(got) == set(seqs)


async def test_by_default_no_matching_subscribers_settles_the_records(
    tmp_path: Path, broker_port: int
) -> None:
    async with running(tmp_path, broker_port) as (q, fwd, link):
        await q.append([event(i, 10) for i in range(5)])
        fwd.notify()
        stats = await q.drained()
    assert stats.acked_total == 5
    assert ReasonCode.NO_MATCHING_SUBSCRIBERS in link.reasons
    assert fwd.stats.publishes_refused == 0
