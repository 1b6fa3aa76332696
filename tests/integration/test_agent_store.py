"""The agent honours the store's contract: foreign store refused, damaged store salvaged and reported,
evictions announced as gaps, a full store does not lose the pipeline's readings, CLI inspection."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.app import EX_IOERR, Agent
from agent.config import EX_CONFIG, parse_config
from agent.pipeline import Pipeline
from drivers.base import Quality, Reading
from store_forward.model import NewRecord, Priority, StoreCorrupt, StoreFull
from store_forward.policy import QueueBounds
from store_forward.sqlite import PAGE_SIZE, SqliteQueue
from tests.integration.commands_support import broker_process
from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.packets import Publish
from uplink.schema.records import EventRecord, decode_batch, decode_gap
from uplink.schema.topics import AgentTopics

pytestmark = pytest.mark.integration
AGENT_ID = "store-test-1"
WAIT_S = 15.0


@pytest.fixture(name="broker_port")
def _broker_port(tmp_path: Path) -> Iterator[int]:
    yield from broker_process(tmp_path)


def doc(tmp_path: Path, port: int = 1, **queue: Any) -> dict[str, Any]:
    return {
        "agent": {"id": AGENT_ID, "data_dir": str(tmp_path / "agent"), "drain_on_stop_s": 2.0},
        "uplink": {"host": "127.0.0.1", "port": port, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5},
        "queue": queue,
    }


async def test_a_queue_file_that_is_not_ours_stops_the_agent_with_the_config_error_status(
    tmp_path: Path,
) -> None:
    (tmp_path / "agent").mkdir()
    with sqlite3.connect(tmp_path / "agent" / "queue.db") as other:
        other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    agent = Agent(parse_config(doc(tmp_path)))
    async with asyncio.timeout(WAIT_S):
        await agent.run()
    assert agent.exit_code == EX_CONFIG
    with sqlite3.connect(tmp_path / "agent" / "queue.db") as other:  # left in place, untouched
        assert other.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]


def damaged_store(db: Path) -> str:
    """A store of 400 records with flipped bytes in b-tree pages (damage quick_check finds)."""
    db.parent.mkdir()
    with SqliteQueue(db) as q:
        q.append([NewRecord("telemetry", bytes(900), i, Priority.TELEMETRY) for i in range(400)])
        generation = q.stats().generation
    with open(db, "r+b") as f:
        for page in (20, 60):
            f.seek(page * PAGE_SIZE)
            flipped = bytes(b ^ 0xFF for b in f.read(16))
            f.seek(page * PAGE_SIZE)
            f.write(flipped)
    return generation


class Messages(list[Publish]):
    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


async def collect(broker_port: int, into: Messages, ready: asyncio.Event) -> None:
    link = Uplink(UplinkConfig(host="127.0.0.1", port=broker_port, client_id="cloud-sub", clean_start=True))
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(link.run(), name="subscriber-link")
        try:
            await link.wait_connected()
            await link.subscribe([(AgentTopics(AGENT_ID).data("#"), 1)])
            ready.set()
            async for msg in link.inbound():
                into.append(msg)
                into.changed.set()
        finally:
            await link.close()
            runner.cancel()


async def test_a_damaged_store_is_salvaged_at_start_and_the_cloud_hears_the_event_and_the_lost_gap(
    tmp_path: Path, broker_port: int
) -> None:
    db = tmp_path / "agent" / "queue.db"
    old_generation = damaged_store(db)
    got = Messages()
    ready = asyncio.Event()
    agent = Agent(parse_config(doc(tmp_path, broker_port)))
    async with asyncio.TaskGroup() as tg:
        sub = tg.create_task(collect(broker_port, got, ready), name="subscriber")
        await asyncio.wait_for(ready.wait(), WAIT_S)
        run = tg.create_task(agent.run(), name="agent-under-test")

        def heard() -> bool:
            return any(m.topic.endswith("/gap") for m in got) and any(m.topic.endswith("/event") for m in got)

        await got.wait_for(heard)
        agent.stop()
        await asyncio.wait_for(run, WAIT_S)
        sub.cancel()
    assert agent.exit_code == 0
    assert list(db.parent.glob("queue.db.corrupt-*"))
    events = [
        item.record
        for m in got
        if m.topic.endswith("/event")
        for item in decode_batch(m.payload, m.properties).items
    ]
    salvaged = [e for e in events if isinstance(e, EventRecord) and e.code == "store_salvaged"]
    assert len(salvaged) == 1 and salvaged[0].data is not None
    assert salvaged[0].data["old_generation"] == old_generation
    gaps = [decode_gap(m.payload) for m in got if m.topic.endswith("/gap")]
    assert any(g.gen == old_generation and g.reason == "lost" for g in gaps)


class FullOnce:
    """The pipeline's appender seam: refuses the first `n` appends with StoreFull, then stores."""

    def __init__(self, n: int, error: Exception | None = None) -> None:
        self.n = n
        self.error = error or StoreFull("disk full")
        self.stored: list[NewRecord] = []
        self.changed = asyncio.Event()

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        if self.n:
            self.n -= 1
            raise self.error
        self.stored.extend(records)
        self.changed.set()
        return list(range(len(self.stored) - len(records), len(self.stored)))


def reading(i: int) -> Reading:
    return Reading("dev", f"p{i}", float(i), Quality.GOOD, 1_700_000_000 * 10**9 + i)


async def test_readings_survive_a_full_store_and_are_stored_once_it_accepts_again() -> None:
    appender = FullOnce(2)
    pipeline = Pipeline(appender, flush_interval_s=0.01)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(pipeline.run(), name="pipeline-under-test")
        for i in range(5):
            pipeline.emit(reading(i))
        async with asyncio.timeout(WAIT_S):
            await appender.changed.wait()
        task.cancel()
    assert pipeline.stats.store_full == 2
    assert pipeline.stats.values_committed == 5 and pipeline.stats.dropped_overflow == 0


async def test_a_store_found_corrupt_at_runtime_ends_the_pipeline_with_the_error() -> None:
    pipeline = Pipeline(FullOnce(1, StoreCorrupt("database disk image is malformed")), flush_interval_s=0.01)
    pipeline.emit(reading(1))
    with pytest.raises(StoreCorrupt):
        async with asyncio.timeout(WAIT_S):
            await pipeline.run()
    assert EX_IOERR == 74  # what the agent exits with then (see agent.app)


def test_buffer_gaps_lists_the_evictions_and_stats_audit_checks_the_file(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    with SqliteQueue(db) as q:
        q.append([NewRecord("telemetry", b"x" * 10, i, Priority.TELEMETRY) for i in range(6)])
        assert q.evict(QueueBounds(max_records=2), now_s=0.0) == 4

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "buffer", *args, "--db", str(db)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    gaps = cli("gaps")
    assert gaps.returncode == 0, gaps.stderr
    (gap,) = [json.loads(line) for line in gaps.stdout.splitlines()]
    assert (gap["first_seq"], gap["last_seq"], gap["count"], gap["reason"], gap["detail"]) == (
        1,
        4,
        4,
        "evicted",
        "max_records",
    )
    stats = cli("stats", "--audit")
    assert stats.returncode == 0, stats.stderr
    out = json.loads(stats.stdout)
    assert out["audit"]["quick_check"] == ["ok"] and out["audit"]["counters_match_rows"]
    assert out["gaps_pending"] == 1 and out["depth"] == 2
