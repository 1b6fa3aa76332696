"""The edge process: wires drivers -> pipeline -> durable queue -> forwarder -> uplink, and stops cleanly.

Shutdown order (on `stop`): drivers first (no new readings), then the pipeline flushes what it holds
into the queue (committed), then the forwarder stops (unsettled records simply stay queued), then a
retained "offline" status is published and the uplink says DISCONNECT. Nothing is lost on a clean stop;
on a crash, only what was never committed (at most one flush interval of readings) is lost, and
everything committed but unacknowledged is sent again after restart.

Live reconfiguration (config.apply, agent.ops): the parts that a config can change run as separately
owned tasks in the agent's TaskGroup and are replaced one by one - one Modbus driver per bus (devices on
one TCP gateway or serial line share a connection), one OPC UA driver per server, one serial driver per
port, the uplink with its status task and its one inbound reader (behind `LinkHolder`, so the forwarder,
repliers and file uploader keep one stable view across swaps), the file service, the metrics server.
The pipeline is reconfigured in place.

The store (README.md, durability contract): opened through `StoreOpener`, which quarantines and salvages
a damaged file; a salvage is logged as an error and forwarded as a "store_salvaged" event record. A file
that is not ours (`StoreForeign`) stops the agent with EX_CONFIG (no restart loop: fix the path); any
other store error at start, and any `StoreError` escaping a part at runtime (`StoreCorrupt`: damage
found while running), stops it with EX_IOERR, and the service manager's restart salvages at start.

Inbound: one reader of `uplink.inbound()` per link hands command-topic messages to the command
processor and `$file-response/...` messages to the file uploader; nothing else reads the link.

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
from agent.config import EX_CONFIG, AgentConfig, QueueSection
from agent.files.service import FileService
from agent.files.uploader import FilesLink
from agent.forwarder import Forwarder
from agent.link import ActiveTransport, AgentLink, build_link
from agent.metrics import AckHistogram, DeviceCounters, PollStats, Snapshot, serve_metrics
from agent.ops import Operations, RingLog
from agent.pipeline import Pipeline
from agent.runtime import settle_gc
from agent.sdnotify import Notifier
from agent.status import STATUS_PROPERTIES, death, versions, will_for
from agent.watchdog import LoopWatchdog, Progress
from drivers.base import CardReading, Driver, Quality, Reading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.opcua.driver import OpcUaDriver
from drivers.serial.dbc import DbcError
from drivers.serial.driver import SerialDriver
from store_forward.facade import AsyncQueue
from store_forward.model import NewRecord, Priority, StoreError, StoreForeign
from store_forward.policy import LanePolicy, QueueBounds
from store_forward.salvage import SalvageReport, StoreOpener
from uplink.client import Uplink, UplinkClosed
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import NO_PROPERTIES, Properties, Publish
from uplink.schema.commands import AgentStatus, encode_json
from uplink.schema.records import EventRecord, encode_record
from uplink.schema.topics import AgentTopics

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 10.0
CLOCK_CHECK_S = 1.0
EX_RESTART = 75  # EX_TEMPFAIL: agent.restart asked for it; the unit's Restart=on-failure starts us again
EX_IOERR = 74  # the store failed (damage found at runtime, busy, I/O): restart; start-up salvages
BusKey = tuple[str, str, int]


def bus_groups(devices: tuple[ModbusDevice, ...]) -> dict[BusKey, tuple[ModbusDevice, ...]]:
    """Devices by shared connection/line: the unit a driver restart affects."""
    out: dict[BusKey, list[ModbusDevice]] = {}
    for d in devices:
        out.setdefault(d.bus_key(), []).append(d)
    return {k: tuple(v) for k, v in out.items()}


def deadbands_of(cfg: AgentConfig) -> dict[tuple[str, str], float]:
    """The pipeline's report-by-exception deadbands: Modbus points only. OPC UA deadbands are applied by
    the server (or its driver) and serial points are decimated by their driver: not twice."""
    return {
        (dev.name, p.name): p.deadband for dev in cfg.modbus for p in dev.points if p.deadband is not None
    }


def queue_bounds(q: QueueSection) -> QueueBounds:
    return QueueBounds(
        max_records=q.max_records,
        max_bytes=q.max_bytes,
        max_age_s=q.max_age_s,
        min_free_disk_bytes=q.min_free_disk_bytes,
        protected=frozenset() if q.evict_alarms else frozenset({Priority.ALARM}),
        thin=frozenset(Priority[c.upper()] for c in q.thin),
    )


def lane_policy(q: QueueSection) -> LanePolicy:
    return LanePolicy(
        live_window_s=q.live_window_s,
        backlog_bytes_per_s=q.backlog_bytes_per_s,
        backlog_burst_bytes=q.backlog_burst_bytes,
    )


def open_queue(cfg: AgentConfig) -> tuple[AsyncQueue, StoreOpener]:
    """The durable queue as the config describes it (not started): salvaging opener, bounds, lanes."""
    q = cfg.queue
    opener = StoreOpener(
        cfg.queue_path, synchronous=q.synchronous, integrity=q.integrity, reserve_bytes=q.reserve_bytes
    )
    queue = AsyncQueue(
        opener,
        max_batch_records=q.group_commit_max_records,
        max_batch_delay_s=q.group_commit_max_delay_s,
        bounds=queue_bounds(q),
        evict_interval_s=q.evict_interval_s,
        lanes=lane_policy(q),
    )
    return queue, opener


def salvage_event(report: SalvageReport) -> NewRecord:
    """The event record that tells the cloud a damaged store was quarantined and salvaged."""
    lost = "an unknown number of" if report.rows_lost is None else str(report.rows_lost)
    event = EventRecord(
        source="store",
        code="store_salvaged",
        severity="error",
        ts_ns=report.detected_ns,
        message=(
            f"queue store damaged ({report.problem}); moved to {report.quarantined_path}; "
            f"{report.rows_salvaged} record(s) salvaged into generation {report.new_generation}, "
            f"{lost} lost"
        ),
        data=report.as_event(),
    )
    return NewRecord("event", encode_record(event), report.detected_ns, Priority.EVENT)


class LinkHolder:
    """The current Uplink behind one stable publisher; a publish cut by a link swap is retried on the new one.

    A QoS 1 message interrupted by a swap may have reached the broker: sending it again is at-least-once,
    which the (generation, seq) keys make harmless.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.current: Uplink | None = None
        self.agent_link: AgentLink | None = None  # what `current` belongs to (transport, failover)
        self.quic_migrations = 0  # of links already replaced; the current one's are added on read
        self.ack = AckHistogram()
        self._monotonic = monotonic
        self._changed = asyncio.Event()
        self._closing = False
        self.swaps = 0

    def set(self, uplink: Uplink | None, agent_link: AgentLink | None = None) -> None:
        if self.agent_link is not None:
            self.quic_migrations += self.agent_link.quic_migrations
        self.current = uplink
        self.agent_link = agent_link if agent_link is not None and agent_link.uplink is uplink else None
        self.swaps += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self._closing = True
        self.set(None)

    @property
    def connected(self) -> bool:
        return self.current is not None and self.current.connected

    @property
    def transport(self) -> ActiveTransport | None:
        """The transport carrying the session now ("quic" or "tcp"); None while down."""
        if self.agent_link is not None:
            return self.agent_link.transport
        return "tcp" if self.connected else None

    @property
    def migrations(self) -> int:
        """QUIC connection migrations over the agent's lifetime (all links)."""
        current = self.agent_link.quic_migrations if self.agent_link is not None else 0
        return self.quic_migrations + current

    def files_link(self, uplink: Uplink) -> FilesLink:
        """For the file service: a QUIC data stream beside `uplink` when it runs over QUIC, else itself."""
        if self.agent_link is not None and self.agent_link.uplink is uplink:
            return self.agent_link.files_link()
        return uplink

    async def _next(self, seen: Uplink | None) -> None:
        while self.current is seen:
            if self._closing:
                raise UplinkClosed("agent stopping")
            await self._changed.wait()

    async def wait_swap(self, seen: Uplink | None) -> None:
        """Return once the current link is no longer `seen`; UplinkClosed when the agent stops."""
        await self._next(seen)

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
        self.opcua_drivers: dict[str, tuple[OpcUaDriver, asyncio.Task[None]]] = {}
        self.serial_drivers: dict[str, tuple[SerialDriver, asyncio.Task[None]]] = {}
        self.file_service: FileService | None = None
        self._files_task: asyncio.Task[None] | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._emit_taps: list[Callable[[Reading | CardReading], None]] = []
        self._n = 0
        self.clock_steps = 0
        self.device_polls: dict[str, PollStats] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, exit_code: int | None = None) -> None:
        if exit_code is not None:
            self.exit_code = exit_code
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Run until `stop`; sets `exit_code` (EX_CONFIG / EX_IOERR) when the store cannot be used."""
        cfg = self.cfg
        await asyncio.to_thread(Path(cfg.agent.data_dir).mkdir, parents=True, exist_ok=True)
        queue, opener = open_queue(cfg)
        try:
            try:
                await queue.start()
            except StoreForeign as exc:
                log.error("queue %s is not a fieldgate queue or is newer than this agent: %s; "
                          "fix agent.data_dir or upgrade (the file is left untouched)", cfg.queue_path, exc)
                self.exit_code = EX_CONFIG
                return
            except StoreError as exc:
                log.error("cannot open the queue %s: %s", cfg.queue_path, exc)
                self.exit_code = EX_IOERR
                return
            self.queue = queue
            try:
                if opener.salvage is not None:
                    await self._report_salvage(queue, opener.salvage)
                await self._run_with(queue, on_ready)
            except* StoreError as group:
                # Damage found while running (or a store that keeps failing): stop; the restart salvages.
                log.critical("store failure, stopping: %s", "; ".join(str(e) for e in group.exceptions))
                self.exit_code = EX_IOERR
            finally:
                try:
                    await queue.close()
                except StoreError as exc:
                    log.error("closing the queue failed: %s", exc)
                    self.exit_code = self.exit_code or EX_IOERR
        finally:
            self.notifier.close()

    async def _report_salvage(self, queue: AsyncQueue, report: SalvageReport) -> None:
        log.error(
            "queue store was damaged (%s): quarantined as %s; %d record(s) salvaged into generation %s "
            "(seq %s-%s), %s lost, %d unannounced gap(s) carried",
            report.problem,
            report.quarantined_path,
            report.rows_salvaged,
            report.new_generation,
            report.first_new_seq,
            report.last_new_seq,
            "unknown" if report.rows_lost is None else report.rows_lost,
            report.gaps_carried,
        )
        await queue.append([salvage_event(report)])

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
            settle_on_no_subscribers=cfg.uplink.settle_on_no_subscribers,
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
            self.start_files(cfg)
            t_static = [self.spawn(d.run(self.emit), f"driver-{d.name}") for d in self._static_drivers or ()]
            if self._static_drivers is None:
                self.start_buses(cfg, set(bus_groups(cfg.modbus)))
                self.start_opcua(cfg, {s.name for s in cfg.opcua})
                self.start_serial(cfg, {p.name for p in cfg.serial})
            settle_gc()  # what exists now lives as long as the agent (agent.runtime)
            if on_ready is not None:
                on_ready()
            n_devices = len(cfg.device_names)
            self.notifier.ready(
                f"running: config {cfg.version or '(unversioned)'}, "
                f"{n_devices} device(s), uplink {cfg.uplink.host}:{cfg.uplink.port}"
            )
            log.info(
                "agent %s running: %d device(s), config %s (%s), queue %s, uplink %s:%d",
                cfg.agent.id,
                n_devices,
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
        drivers += [t for _, t in self.opcua_drivers.values()] + [t for _, t in self.serial_drivers.values()]
        for t in drivers:
            t.cancel()
        if drivers:
            await asyncio.wait(drivers, timeout=5)
        t_pipeline.cancel()
        await asyncio.wait([t_pipeline])
        await self._drain(queue, cfg.agent.drain_on_stop_s)
        t_forwarder.cancel()
        await asyncio.wait([t_forwarder])
        await self.stop_files()
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

    def _poll_done(self, device: str, job: str, duration_s: float, ok: bool) -> None:
        """A driver finished one poll (a group read or a card capture): per-device latency metrics."""
        stats = self.device_polls.get(device)
        if stats is None:
            stats = self.device_polls[device] = PollStats()
        stats.observe(duration_s, ok)

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
            driver = ModbusDriver(devices, clock_ns=self.stamp_ns, on_job=self._poll_done)
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

    def start_opcua(self, cfg: AgentConfig, names: set[str]) -> None:
        """One driver per server, so a config change restarts only the servers that changed."""
        for server in cfg.opcua:
            if server.name not in names:
                continue
            driver = OpcUaDriver((server,), clock_ns=self.stamp_ns, monotonic=time.monotonic)
            task = self.spawn(driver.run(self.emit), f"driver-opcua-{server.name}")
            self.opcua_drivers[server.name] = (driver, task)

    def start_serial(self, cfg: AgentConfig, names: set[str]) -> None:
        """One driver per port (a DBC file is loaded here: a missing one fails at config apply/start)."""
        for port in cfg.serial:
            if port.name not in names:
                continue
            try:
                driver = SerialDriver(
                    (port,), clock_ns=self.stamp_ns, monotonic=time.monotonic, name=port.name
                )
            except DbcError as exc:
                # The port cannot be decoded: say so on its status point (a health gate sees it) and
                # keep the other parts running; the next config (or a restart) tries again.
                log.error("serial %s: %s; port not started", port.name, exc)
                self.emit(
                    Reading(port.name, port.status_point, None, Quality.BAD, self.stamp_ns(), reason=str(exc))
                )
                continue
            task = self.spawn(driver.run(self.emit), f"driver-serial-{port.name}")
            self.serial_drivers[port.name] = (driver, task)

    async def stop_named(self, kind: str, names: set[str]) -> None:
        """Stop the OPC UA ("opcua") or serial ("serial") drivers of these names."""
        drivers: dict[str, Any] = self.opcua_drivers if kind == "opcua" else self.serial_drivers
        tasks = []
        for name in names:
            entry = drivers.pop(name, None)
            if entry is not None:
                entry[1].cancel()
                tasks.append(entry[1])
        if tasks:
            await asyncio.wait(tasks)

    def driver_for(self, device: str) -> ModbusDriver | OpcUaDriver | SerialDriver | None:
        """The running driver that owns a device (Modbus device, OPC UA server or serial port name)."""
        for driver, _ in self.bus_drivers.values():
            if any(d.name == device for d in driver.devices):
                return driver
        if device in self.opcua_drivers:
            return self.opcua_drivers[device][0]
        if device in self.serial_drivers:
            return self.serial_drivers[device][0]
        return None

    # The file service follows the link (see agent.files.service); it is replaced when [files] changes.

    def start_files(self, cfg: AgentConfig) -> None:
        service = FileService(self.link, Path(cfg.agent.data_dir) / "files.db", cfg.files)
        self.file_service = service
        self._files_task = self.spawn(service.run(), "files")

    async def stop_files(self) -> None:
        task, self._files_task = self._files_task, None
        self.file_service = None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    @property
    def file_stats(self) -> dict[str, int]:
        return dict(self.file_service.stats) if self.file_service is not None else {}

    def start_link(self, cfg: AgentConfig) -> Uplink:
        use_props = cfg.uplink.protocol_level == 5
        topics = AgentTopics(cfg.agent.id, cfg.uplink.topic_prefix)
        will = will_for(cfg.agent.id, topics.status, use_properties=use_props, wall_ns=time.time_ns)
        link = build_link(cfg, will)
        uplink = link.uplink
        self.topics = topics
        self.link.set(uplink, link)
        self._link_task = self.spawn(self._run_link(link, cfg), "link")
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

    async def _run_link(self, link: AgentLink, cfg: AgentConfig) -> None:
        uplink = link.uplink
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run(), name="uplink")
            tg.create_task(self._status_loop(uplink), name="status")
            tg.create_task(self._inbound(uplink, commands=cfg.commands.enabled), name="inbound")

    async def _inbound(self, uplink: Uplink, *, commands: bool) -> None:
        """The link's one inbound reader: commands to the processor, file responses to the uploader."""
        assert self.processor is not None
        command_topic = self.topics.command
        if commands:
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
                commands = False
        async for msg in uplink.inbound():
            if commands and msg.topic == command_topic:
                self._n += 1
                # CommandProcessor.handle is a supervisor boundary: nothing a message carries (a bad
                # reply topic, an answer the link cannot carry) ends this task or the agent's TaskGroup.
                self.spawn(self.processor.handle(msg), f"command-{self._n}")
            elif not self._file_response(msg):
                log.debug("inbound: no reader for a message on %s", msg.topic)

    def _file_response(self, msg: Publish) -> bool:
        service = self.file_service
        return service is not None and service.handle_message(msg)

    async def _status_loop(self, uplink: Uplink) -> None:
        try:
            while True:
                await uplink.wait_connected()
                await self._publish_status(uplink, await self.birth())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.status.interval_s):
                        await uplink.wait_disconnected()
        except UplinkClosed:
            return

    def _status_props(self) -> Properties:
        return STATUS_PROPERTIES if self.cfg.uplink.protocol_level == 5 else NO_PROPERTIES

    async def _publish_status(self, uplink: Uplink, payload: bytes) -> None:
        """Publish a status message, retained where the broker keeps retained messages.

        A broker announcing Retain Available = 0 gets it non-retained (the latest status is then seen
        only by whoever is subscribed); one whose limits refuse it altogether (Maximum QoS 0, a tiny
        Maximum Packet Size) gets nothing, with an error in the log: a status is never worth the agent.
        """
        session = uplink.session
        try:
            await uplink.publish(
                self.topics.status,
                payload,
                qos=min(1, session.server_maximum_qos),
                retain=session.server_retain_available,
                properties=self._status_props(),
            )
        except UplinkClosed:
            raise
        except LocalProtocolError as exc:
            log.error("status: the broker's limits refuse the status message: %s", exc)
        except ConnectionError as exc:  # a QoS 0 write on a link that just failed: the next birth follows
            log.warning("status: not sent, the link failed: %s", exc)

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
            transport=self.link.transport or self.cfg.uplink.transport,
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
                await self._publish_status(uplink, await self.birth())

    async def _publish_offline(self, reason: str) -> None:
        uplink = self.link.current
        if uplink is None or not uplink.connected:
            return
        payload = death(
            self.cfg.agent.id, reason=reason, config_version=self.cfg.version, wall_ns=time.time_ns()
        )
        with contextlib.suppress(TimeoutError, UplinkClosed, ConnectionError):
            async with asyncio.timeout(2):
                await self._publish_status(uplink, payload)

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
        files = self.file_stats
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
            queue_evicted_total=qs.evicted_total,
            queue_gaps_pending=qs.gaps_pending,
            queue_written_bytes=qs.written_bytes,
            queue_write_amplification=qs.write_amplification,
            queue_written_bytes_per_hour=qs.written_bytes_per_hour,
            gaps_announced=f.gaps_announced,
            historical_batches=f.historical_batches,
            link_up=self.link.connected,
            transport=self.link.transport or "none",
            configured_transport=self.cfg.uplink.transport,
            quic_migrations=self.link.migrations,
            quic_fallbacks=self._quic_fallbacks(),
            file_stream=self._file_stream_mode(),
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
            device_polls=dict(self.device_polls),
        )

    def _quic_fallbacks(self) -> int:
        agent_link = self.link.agent_link
        failover = agent_link.failover if agent_link is not None else None
        return failover.quic_failures if failover is not None else 0

    def _file_stream_mode(self) -> str:
        """Where file segments go now: "stream" (a QUIC data stream), "control" or "none"."""
        service = self.file_service
        stream = service.stream if service is not None else None
        if stream is None:
            return "control" if service is not None and service.uploader is not None else "none"
        return stream.mode or "none"

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            assert self.queue is not None and self.pipeline is not None and self.forwarder is not None
            qs = await self.queue.stats()
            p, f = self.pipeline.stats, self.forwarder.stats
            log.info(
                "stats: values=%d cards=%d records=%d queue_depth=%d queue_bytes=%d settled=%d "
                "published_bytes=%d connected=%s transport=%s evicted=%d gaps_pending=%d "
                "write_amplification=%s written_bytes_per_hour=%s",
                p.values_committed,
                p.cards_committed,
                p.records_committed,
                qs.depth,
                qs.bytes,
                f.records_settled,
                f.bytes_published,
                self.link.connected,
                self.link.transport or "none",
                qs.evicted_total,
                qs.gaps_pending,
                "n/a" if qs.write_amplification is None else f"{qs.write_amplification:.2f}",
                "n/a" if qs.written_bytes_per_hour is None else f"{qs.written_bytes_per_hour:.0f}",
            )
            self.notifier.status(
                f"running: config {self.cfg.version or '(unversioned)'}, queue {qs.depth}, "
                f"link {'up over ' + str(self.link.transport) if self.link.connected else 'down'}"
            )
