"""The edge process: wires drivers -> pipeline -> durable queue -> forwarder -> uplink, and stops cleanly.

Shutdown order (on `stop`): drivers first (no new readings), then the pipeline flushes what it holds
into the queue (committed), then the forwarder stops (unsettled records simply stay queued), then the
uplink says DISCONNECT. Nothing is lost on a clean stop; on a crash, only what was never committed
(at most one flush interval of readings) is lost, and everything committed but unacknowledged is sent
again after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.forwarder import Forwarder
from agent.pipeline import Pipeline
from drivers.base import Driver
from drivers.modbus.driver import ModbusTcpDriver
from store_forward.facade import AsyncQueue
from store_forward.sqlite import SqliteQueue
from uplink.client import Uplink, UplinkConfig
from uplink.schema.topics import AgentTopics

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 10.0


def build_drivers(cfg: AgentConfig) -> list[Driver]:
    drivers: list[Driver] = []
    if cfg.modbus:
        drivers.append(ModbusTcpDriver(cfg.modbus))
    return drivers


def deadbands_of(cfg: AgentConfig) -> dict[tuple[str, str], float]:
    return {
        (dev.name, p.name): p.deadband for dev in cfg.modbus for p in dev.points if p.deadband is not None
    }


def uplink_config(cfg: AgentConfig) -> UplinkConfig:
    u = cfg.uplink
    return UplinkConfig(
        host=u.host,
        port=u.port,
        client_id=cfg.client_id,
        protocol_level=u.protocol_level,
        keep_alive_s=u.keep_alive_s,
        username=u.username,
        password=u.password.encode() if u.password is not None else None,
        tls=u.tls,
        ca_file=u.ca_file,
        reconnect_initial_s=u.reconnect_initial_s,
        reconnect_max_s=u.reconnect_max_s,
    )


class Agent:
    def __init__(self, cfg: AgentConfig, *, drivers: list[Driver] | None = None) -> None:
        self.cfg = cfg
        self._stop = asyncio.Event()
        self._drivers = build_drivers(cfg) if drivers is None else drivers
        self.queue: AsyncQueue | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.uplink: Uplink | None = None
        self.started_monotonic = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        cfg = self.cfg
        await asyncio.to_thread(Path(cfg.agent.data_dir).mkdir, parents=True, exist_ok=True)
        queue_path = cfg.queue_path
        queue = AsyncQueue(
            lambda: SqliteQueue(queue_path, synchronous=cfg.queue.synchronous),
            max_batch_records=cfg.queue.group_commit_max_records,
            max_batch_delay_s=cfg.queue.group_commit_max_delay_s,
        )
        await queue.start()
        self.queue = queue
        try:
            await self._run_with(queue, on_ready)
        finally:
            await queue.close()

    async def _run_with(self, queue: AsyncQueue, on_ready: Callable[[], None] | None) -> None:
        cfg = self.cfg
        uplink = Uplink(uplink_config(cfg))
        topics = AgentTopics(cfg.agent.id, cfg.uplink.topic_prefix)
        forwarder = Forwarder(
            queue,
            uplink,
            topics,
            batch_max_records=cfg.uplink.batch_max_records,
            batch_max_bytes=cfg.uplink.batch_max_bytes,
            max_inflight_batches=cfg.uplink.max_inflight_batches,
            encoding=cfg.uplink.encoding,
            compression=cfg.uplink.compression,
            use_properties=cfg.uplink.protocol_level == 5,
        )
        pipeline = Pipeline(
            queue,
            deadbands=deadbands_of(cfg),
            flush_interval_s=cfg.pipeline.flush_interval_s,
            max_pending=cfg.pipeline.max_pending_readings,
            on_commit=forwarder.notify,
        )
        self.uplink, self.forwarder, self.pipeline = uplink, forwarder, pipeline
        async with asyncio.TaskGroup() as tg:
            t_uplink = tg.create_task(uplink.run(), name="uplink")
            t_forwarder = tg.create_task(forwarder.run(), name="forwarder")
            t_pipeline = tg.create_task(pipeline.run(), name="pipeline")
            t_drivers = [tg.create_task(d.run(pipeline.emit), name=f"driver-{d.name}") for d in self._drivers]
            t_stats = tg.create_task(self._log_stats(), name="stats")
            if on_ready is not None:
                on_ready()
            log.info(
                "agent %s running: %d driver(s), queue %s, uplink %s:%d",
                cfg.agent.id,
                len(self._drivers),
                cfg.queue_path,
                cfg.uplink.host,
                cfg.uplink.port,
            )
            await self._stop.wait()
            log.info("agent %s stopping", cfg.agent.id)
            for t in t_drivers:
                t.cancel()
            await asyncio.wait([*t_drivers], timeout=5) if t_drivers else None
            t_pipeline.cancel()
            await asyncio.wait([t_pipeline])
            await self._drain(queue, cfg.agent.drain_on_stop_s)
            t_forwarder.cancel()
            t_stats.cancel()
            await asyncio.wait([t_forwarder, t_stats])
            with contextlib.suppress(TimeoutError, OSError, ConnectionError):
                async with asyncio.timeout(2):
                    await uplink.close()
            t_uplink.cancel()

    async def _drain(self, queue: AsyncQueue, timeout_s: float) -> None:
        """Give the forwarder up to timeout_s to empty the queue while the link is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = await queue.stats()
            if stats.depth == 0:
                log.info("queue drained")
                return
            await asyncio.sleep(0.05)
        stats = await queue.stats()
        if stats.depth:
            log.info(
                "stopping with %d record(s) queued durably; they go out after the next start", stats.depth
            )

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            assert self.queue is not None and self.pipeline is not None and self.forwarder is not None
            qs = await self.queue.stats()
            p, f = self.pipeline.stats, self.forwarder.stats
            log.info(
                "stats: values=%d cards=%d records=%d queue_depth=%d queue_bytes=%d settled=%d "
                "published_bytes=%d connected=%s",
                p.values_committed,
                p.cards_committed,
                p.records_committed,
                qs.depth,
                qs.bytes,
                f.records_settled,
                f.bytes_published,
                self.uplink.connected if self.uplink else False,
            )
