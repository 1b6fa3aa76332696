"""The edge process: wires drivers -> pipeline -> durable queue -> forwarder -> uplink, and stops cleanly.

Shutdown order (on `stop`): drivers first (no new readings), then the pipeline flushes what it holds
into the queue (committed), then the forwarder stops (unsettled records simply stay queued), then a
retained "offline" status is published and the uplink says DISCONNECT. Nothing is lost on a clean stop;
on a crash, only what was never committed (at most one flush interval of readings) is lost, and
everything committed but unacknowledged is sent again after restart.

Live reconfiguration (config.apply, agent.ops): the parts that a config can change run as separately
owned tasks in the agent's TaskGroup and are replaced one by one - one Modbus driver per bus (devices on
one TCP gateway or serial line share a connection), the uplink with its status and command tasks (behind
`LinkHolder`, so the forwarder and repliers keep one stable publisher across swaps), the metrics server.
The pipeline is reconfigured in place.

systemd: READY=1 once the parts run, STOPPING=1 (with EXTEND_TIMEOUT_USEC= for the drain) on stop, and
WATCHDOG=1 from `LoopWatchdog` while the loop is responsive and the pipeline and forwarder mark progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.clock import ClockMonitor, ClockStep
from agent.commands import CommandProcessor
from agent.config import AgentConfig
from agent.forwarder import Forwarder
from agent.metrics import AckHistogram, DeviceCounters, Snapshot, serve_metrics
from agent.ops import Operations, RingLog
from agent.pipeline import Pipeline
from agent.sdnotify import Notifier
from agent.status import STATUS_PROPERTIES, death, versions, will_for
from agent.watchdog import LoopWatchdog, Progress
from drivers.base import CardReading, Driver, Reading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from store_forward.facade import AsyncQueue
from store_forward.sqlite import SqliteQueue
from uplink.client import Uplink, UplinkClosed, UplinkConfig
from uplink.mqtt.packets import NO_PROPERTIES, Properties, Will
from uplink.schema.commands import AgentStatus, encode_json
from uplink.schema.topics import AgentTopics

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 10.0
CLOCK_CHECK_S = 1.0
EX_RESTART = 75  # EX_TEMPFAIL: agent.restart asked for it; the unit's Restart=on-failure starts us again
BusKey = tuple[str, str, int]


def bus_groups(devices: tuple[ModbusDevice, ...]) -> dict[BusKey, tuple[ModbusDevice, ...]]:
    """Devices by shared connection/line: the unit a driver restart affects."""
    out: dict[BusKey, list[ModbusDevice]] = {}
    for d in devices:
        out.setdefault(d.bus_key(), []).append(d)
    return {k: tuple(v) for k, v in out.items()}


def deadbands_of(cfg: AgentConfig) -> dict[tuple[str, str], float]:
    return {
        (dev.name, p.name): p.deadband for dev in cfg.modbus for p in dev.points if p.deadband is not None
    }


def uplink_config(cfg: AgentConfig, will: Will | None = None) -> UplinkConfig:
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
        will=will,
        reconnect_initial_s=u.reconnect_initial_s,
        reconnect_max_s=u.reconnect_max_s,
    )


class LinkHolder:
    """The current Uplink behind one stable publisher; a publish cut by a link swap is retried on the new one.

    A QoS 1 message interrupted by a swap may have reached the broker: sending it again is at-least-once,
    which the (generation, seq) keys make harmless.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.current: Uplink | None = None
        self.ack = AckHistogram()
        self._monotonic = monotonic
        self._changed = asyncio.Event()
        self._closing = False
        self.swaps = 0

    def set(self, uplink: Uplink | None) -> None:
        self.current = uplink
        self.swaps += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self._closing = True
        self.set(None)

    @property
    def connected(self) -> bool:
        return self.current is not None and self.current.connected

    async def _next(self, seen: Uplink | None) -> None:
        while self.current is seen:
            if self._closing:
                raise UplinkClosed("agent stopping")
            await self._changed.wait()

    async def wait_connected(self) -> None:
        while True:
            u = self.current
            if u is None:
                await self._next(None)
                continue
            try:
                await u.wait_connected()
                return
            except UplinkClosed:
                await self._next(u)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
    ) -> int:
        while True:
            u = self.current
            if u is None:
                await self._next(None)
                continue
            start_s = self._monotonic()
            try:
                code = await u.publish(topic, payload, qos, retain, properties)
            except UplinkClosed:
                await self._next(u)
                continue
            if qos:
                self.ack.observe(self._monotonic() - start_s)
            return code

    async def reply(self, topic: str, payload: bytes, properties: Properties) -> None:
        await self.publish(topic, payload, qos=1, properties=properties)


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        drivers: list[Driver] | None = None,
        config_text: str | None = None,
        config_source: str = "base",
        notifier: Notifier | None = None,
        clock: ClockMonitor | None = None,
        ring_log: RingLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_text = config_text
        self.config_source = config_source
        self._stop = asyncio.Event()
        self._static_drivers = drivers  # tests inject drivers; those are not reconfigurable
        self.notifier = notifier or Notifier(None)
        self.clock = clock or ClockMonitor(on_step=self._clock_stepped)
        self.ring_log = ring_log
        self.queue: AsyncQueue | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.link = LinkHolder()
        self.processor: CommandProcessor | None = None
        self.watchdog: LoopWatchdog | None = None
        self.ops: Operations | None = None
        self.metrics_port: int | None = None
        self.metrics_bound = asyncio.Event()
        self.exit_code = 0
        self.started_monotonic = time.monotonic()
        self.started_ns = time.time_ns()
        self.topics = AgentTopics(cfg.agent.id, cfg.uplink.topic_prefix)
        self.bus_drivers: dict[BusKey, tuple[ModbusDriver, asyncio.Task[None]]] = {}
        self._link_task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._emit_taps: list[Callable[[Reading | CardReading], None]] = []
        self._n = 0
        self.clock_steps = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, exit_code: int | None = None) -> None:
        if exit_code is not None:
            self.exit_code = exit_code
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

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
            self.notifier.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a task owned by the agent's TaskGroup (cancelled at stop if still running)."""
        assert self._tg is not None, "the agent is not running"
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_with(self, queue: AsyncQueue, on_ready: Callable[[], None] | None) -> None:
        cfg = self.cfg
        pipeline_progress, forwarder_progress = Progress(), Progress()
        forwarder = Forwarder(
            queue,
            self.link,
            self.topics,
            batch_max_records=cfg.uplink.batch_max_records,
            batch_max_bytes=cfg.uplink.batch_max_bytes,
            max_inflight_batches=cfg.uplink.max_inflight_batches,
            encoding=cfg.uplink.encoding,
            compression=cfg.uplink.compression,
            use_properties=cfg.uplink.protocol_level == 5,
            progress=forwarder_progress.mark,
        )
        pipeline = Pipeline(
            queue,
            deadbands=deadbands_of(cfg),
            flush_interval_s=cfg.pipeline.flush_interval_s,
            max_pending=cfg.pipeline.max_pending_readings,
            on_commit=forwarder.notify,
            clock=self.clock,
            progress=pipeline_progress.mark,
        )
        self.forwarder, self.pipeline = forwarder, pipeline
        self.ops = Operations(self)
        self.processor = CommandProcessor(
            self.topics,
            cfg.commands,
            self.ops.handlers(),
            self.link.reply,
            state_dir=Path(cfg.agent.data_dir) / "commands",
            use_properties=cfg.uplink.protocol_level == 5,
        )
        await asyncio.to_thread(self.processor.load_state)
        self.watchdog = LoopWatchdog(
            self.notifier,
            interval_s=self.notifier.watchdog_interval_s(),
            critical={"pipeline": pipeline_progress, "forwarder": forwarder_progress},
        )
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self.start_link(cfg)
            t_forwarder = self.spawn(forwarder.run(), "forwarder")
            t_pipeline = self.spawn(pipeline.run(), "pipeline")
            self.spawn(self.watchdog.run(), "watchdog")
            self.spawn(self._watch_clock(), "clock")
            self.spawn(self._log_stats(), "stats")
            self.start_metrics(cfg)
            t_static = [self.spawn(d.run(self.emit), f"driver-{d.name}") for d in self._static_drivers or ()]
            if self._static_drivers is None:
                self.start_buses(cfg, set(bus_groups(cfg.modbus)))
            if on_ready is not None:
                on_ready()
            self.notifier.ready(
                f"running: config {cfg.version or '(unversioned)'}, "
                f"{len(cfg.modbus)} device(s), uplink {cfg.uplink.host}:{cfg.uplink.port}"
            )
            log.info(
                "agent %s running: %d device(s), config %s (%s), queue %s, uplink %s:%d",
                cfg.agent.id,
                len(cfg.modbus),
                self.cfg.version or "(unversioned)",
                self.config_source,
                cfg.queue_path,
                cfg.uplink.host,
                cfg.uplink.port,
            )
            await self._stop.wait()
            await self._shutdown(queue, t_pipeline, t_forwarder, t_static)

    async def _shutdown(
        self,
        queue: AsyncQueue,
        t_pipeline: asyncio.Task[None],
        t_forwarder: asyncio.Task[None],
        t_static: list[asyncio.Task[None]],
    ) -> None:
        cfg = self.cfg
        log.info("agent %s stopping", cfg.agent.id)
        self.notifier.stopping("stopping: draining the queue")
        self.notifier.extend_timeout(cfg.agent.drain_on_stop_s + 10)
        drivers = [t for _, t in self.bus_drivers.values()] + t_static
        for t in drivers:
            t.cancel()
        if drivers:
            await asyncio.wait(drivers, timeout=5)
        t_pipeline.cancel()
        await asyncio.wait([t_pipeline])
        await self._drain(queue, cfg.agent.drain_on_stop_s)
        t_forwarder.cancel()
        await asyncio.wait([t_forwarder])
        await self._publish_offline("stopped")
        await self.stop_link()
        self.link.close()
        for t in list(self._tasks):
            t.cancel()

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

    # -- readings ----------------------------------------------------------------------------

    def emit(self, item: Reading | CardReading) -> None:
        """What drivers call: into the pipeline, and past any health-gate tap."""
        assert self.pipeline is not None
        self.pipeline.emit(item)
        for tap in self._emit_taps:
            tap(item)

    def add_tap(self, tap: Callable[[Reading | CardReading], None]) -> Callable[[], None]:
        self._emit_taps.append(tap)
        return lambda: self._emit_taps.remove(tap)

    def stamp_ns(self) -> int:
        """The drivers' wall clock: every stamp first checks for a clock step (agent.clock)."""
        return self.clock.stamp()[0]

    def _clock_stepped(self, step: ClockStep) -> None:
        self.clock_steps += 1
        if self.pipeline is not None:
            self.pipeline.clock_stepped(step)

    async def _watch_clock(self) -> None:
        while True:
            self.clock.check()
            await asyncio.sleep(CLOCK_CHECK_S)

    # -- replaceable parts -------------------------------------------------------------------

    def start_buses(self, cfg: AgentConfig, keys: set[BusKey]) -> None:
        groups = bus_groups(cfg.modbus)
        for key in sorted(keys):
            devices = groups.get(key)
            if not devices:
                continue
            driver = ModbusDriver(devices, clock_ns=self.stamp_ns)
            label = f"{key[0]}:{key[1]}" + (f":{key[2]}" if key[0] == "tcp" else "")
            task = self.spawn(driver.run(self.emit), f"driver-modbus-{label}")
            self.bus_drivers[key] = (driver, task)

    async def stop_buses(self, keys: set[BusKey]) -> None:
        tasks = []
        for key in keys:
            entry = self.bus_drivers.pop(key, None)
            if entry is not None:
                entry[1].cancel()
                tasks.append(entry[1])
        if tasks:
            await asyncio.wait(tasks)

    def driver_for(self, device: str) -> ModbusDriver | None:
        for driver, _ in self.bus_drivers.values():
            if any(d.name == device for d in driver.devices):
                return driver
        return None

    def start_link(self, cfg: AgentConfig) -> Uplink:
        use_props = cfg.uplink.protocol_level == 5
        topics = AgentTopics(cfg.agent.id, cfg.uplink.topic_prefix)
        will = will_for(cfg.agent.id, topics.status, use_properties=use_props, wall_ns=time.time_ns)
        uplink = Uplink(uplink_config(cfg, will))
        self.topics = topics
        self.link.set(uplink)
        self._link_task = self.spawn(self._run_link(uplink, cfg), "link")
        return uplink

    async def stop_link(self) -> None:
        uplink, task = self.link.current, self._link_task
        if uplink is not None:
            with contextlib.suppress(TimeoutError, OSError, ConnectionError):
                async with asyncio.timeout(2):
                    await uplink.close()
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._link_task = None

    async def _run_link(self, uplink: Uplink, cfg: AgentConfig) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(uplink.run(), name="uplink")
            tg.create_task(self._status_loop(uplink), name="status")
            if cfg.commands.enabled:
                tg.create_task(self._serve_commands(uplink), name="commands")

    async def _serve_commands(self, uplink: Uplink) -> None:
        assert self.processor is not None
        command_topic = self.topics.command
        try:
            codes = await uplink.subscribe([(command_topic, 1)])
        except UplinkClosed:
            return
        if codes[0] >= 0x80:
            log.error(
                "commands: the broker refused our subscription to %s (0x%02x); remote commands off",
                command_topic,
                codes[0],
            )
            return
        async for msg in uplink.inbound():
            if msg.topic != command_topic:
                continue
            self._n += 1
            self.spawn(self.processor.handle(msg), f"command-{self._n}")

    async def _status_loop(self, uplink: Uplink) -> None:
        try:
            while True:
                await uplink.wait_connected()
                await uplink.publish(
                    self.topics.status,
                    await self.birth(),
                    qos=1,
                    retain=True,
                    properties=self._status_props(),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.status.interval_s):
                        await uplink.wait_disconnected()
        except UplinkClosed:
            return

    def _status_props(self) -> Properties:
        return STATUS_PROPERTIES if self.cfg.uplink.protocol_level == 5 else NO_PROPERTIES

    async def birth(self) -> bytes:
        return encode_json(await self.status())

    async def status(self) -> AgentStatus:
        qs = await self.queue.stats() if self.queue is not None else None
        healthy = self.watchdog.policy.failed is None if self.watchdog is not None else True
        return AgentStatus(
            state="online",
            agent=self.cfg.agent.id,
            ts_ns=time.time_ns(),
            versions=versions(),
            config_version=self.cfg.version,
            started_at_ns=self.started_ns,
            uptime_s=round(time.monotonic() - self.started_monotonic, 3),
            transport=self.cfg.uplink.transport,
            link="up" if self.link.connected else "down",
            queue_depth=qs.depth if qs else None,
            queue_bytes=qs.bytes if qs else None,
            clock="synced" if self.clock.synced else "unsynced",
            health="healthy"
            if healthy
            else f"unhealthy: {self.watchdog.policy.failed if self.watchdog else ''}",
        )

    async def refresh_status(self) -> None:
        """Publish the birth now (e.g. after a config commit), if the link is up; never waits for it."""
        uplink = self.link.current
        if uplink is None or not uplink.connected:
            return
        with contextlib.suppress(TimeoutError, UplinkClosed):
            async with asyncio.timeout(2):
                await uplink.publish(
                    self.topics.status,
                    await self.birth(),
                    qos=1,
                    retain=True,
                    properties=self._status_props(),
                )

    async def _publish_offline(self, reason: str) -> None:
        uplink = self.link.current
        if uplink is None or not uplink.connected:
            return
        payload = death(
            self.cfg.agent.id, reason=reason, config_version=self.cfg.version, wall_ns=time.time_ns()
        )
        with contextlib.suppress(TimeoutError, UplinkClosed, ConnectionError):
            async with asyncio.timeout(2):
                await uplink.publish(
                    self.topics.status, payload, qos=1, retain=True, properties=self._status_props()
                )

    def start_metrics(self, cfg: AgentConfig) -> None:
        if cfg.metrics.port is None:
            return

        def bound(port: int) -> None:
            self.metrics_port = port
            self.metrics_bound.set()

        self._metrics_task = self.spawn(
            serve_metrics(cfg.metrics.host, cfg.metrics.port, self.snapshot, on_bound=bound), "metrics"
        )

    async def stop_metrics(self) -> None:
        task, self._metrics_task = self._metrics_task, None
        self.metrics_bound.clear()
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def snapshot(self) -> Snapshot:
        assert self.queue is not None and self.pipeline is not None and self.forwarder is not None
        qs = await self.queue.stats()
        p, f = self.pipeline.stats, self.forwarder.stats
        now_ns = time.time_ns()
        uplink = self.link.current
        files: dict[str, int] = {}
        if self.ops is not None:
            files = self.ops.file_transfer_stats()
        return Snapshot(
            agent_id=self.cfg.agent.id,
            config_version=self.cfg.version or "",
            uptime_s=time.monotonic() - self.started_monotonic,
            devices={
                n: DeviceCounters(d.good, d.uncertain, d.bad, d.last_good_monotonic_s)
                for n, d in p.devices.items()
            },
            now_monotonic_s=time.monotonic(),
            queue_depth=qs.depth,
            queue_bytes=qs.bytes,
            queue_oldest_age_s=None
            if qs.oldest_ts_ns is None
            else max(0.0, (now_ns - qs.oldest_ts_ns) / 1e9),
            queue_appended_total=qs.appended_total,
            queue_evicted_total=getattr(qs, "evicted_total", 0),
            link_up=self.link.connected,
            transport=self.cfg.uplink.transport,
            reconnects=(uplink.reconnects if uplink is not None else 0) + max(0, self.link.swaps - 1),
            publish_ack=self.link.ack,
            bytes_published=f.bytes_published,
            batches_published=f.batches_published,
            records_settled=f.records_settled,
            publishes_refused=f.publishes_refused,
            readings_in=p.readings_in,
            readings_dropped=p.dropped_overflow,
            commands_by_code=dict(self.processor.stats.by_code) if self.processor else {},
            clock_synced=self.clock.synced,
            clock_steps=self.clock_steps,
            healthy=self.watchdog.policy.failed is None if self.watchdog else True,
            file_transfers=files,
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
                self.link.connected,
            )
            self.notifier.status(
                f"running: config {self.cfg.version or '(unversioned)'}, queue {qs.depth}, "
                f"link {'up' if self.link.connected else 'down'}"
            )
