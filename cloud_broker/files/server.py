"""The broker's file-transfer server: takes `$file/` commands off the core's hot path and answers them.

Theory of operation. `FileTransferServer` is a `MessageHook`. The core calls `on_publish` after
authorization for every PUBLISH; the server claims `$file/...` and `$file-async/...` topics so they
are never routed to subscribers. QoS 0 is dropped (consumed, nothing done) and QoS 2 answered with
PUBREC 0x10 without processing (EMQX parity). A QoS 1 command becomes a job and the hook returns
`ACK_LATER`: the core holds the PUBACK (and that client's later acks) until the job settles it with
`CoreLink.complete_ack(ticket, code)`. Each job is a named task in the server's TaskGroup; disk
work and hashing run on the server's own I/O threads.

- init: validate the metadata, store it durably (same meta: ok; different: `filemeta_conflict`).
- segment: verify the SHA-256 from the topic, store `SEG.<offset>.<size>` atomically.
- fin: join the assembly running for (clientId, fileId); else succeed at once if the file was
  already exported (idempotent fin); else start one assembly task. A sync fin's PUBACK waits for the
  assembly or `assemble_timeout_s` (then 0x80 `timeout`; the assembly carries on for later fins);
  an async fin is acked 0x00 once the assembly started and learns the verdict from the response.
- abort: ack 0x00 and delete the fragments (EMQX does nothing) unless an assembly is running.

Every command gets a response message (QoS 1) on its Response-Topic with Correlation-Data copied, or
on `$file-response/{clientId}`; PUBACK codes are 0x00 or 0x80 only. A GC task deletes fragments of
transfers idle longer than their clamped `segments_ttl`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from cloud_broker.acl import AclRule
from cloud_broker.core.hooks import ACK_LATER
from cloud_broker.core.model import ClientInfo, Message
from cloud_broker.files.config import FileTransferConfig
from cloud_broker.files.storage import Exported, FsStorage, GcStats
from uplink.mqtt.packets import MQTT_5, NO_PROPERTIES, Properties
from uplink.schema.filetransfer import (
    RC_NO_MATCHING_SUBSCRIBERS,
    RC_SUCCESS,
    RC_UNSPECIFIED_ERROR,
    AbortCommand,
    FileCommand,
    FileResponse,
    FileTransferError,
    FinCommand,
    InitCommand,
    Mode,
    SegmentCommand,
    is_file_topic,
    parse_filemeta,
    parse_topic,
    response_topic,
)

if TYPE_CHECKING:
    from cloud_broker.server import BrokerHub

log = logging.getLogger("cloud_broker.files")
T = TypeVar("T")


class CoreLink(Protocol):
    """How the server reaches the broker core from its own tasks (never from inside `on_publish`)."""

    def complete_ack(self, ticket: int, reason_code: int) -> None: ...

    def publish(self, message: Message) -> None: ...


class HubLink:
    """CoreLink over a running `BrokerHub`: each call enters the core with loop time, then tells the hub
    (which schedules one flush for the iteration and re-arms the core's deadline timer: a published
    response may start a retry timer that a bare flush would leave unarmed)."""

    def __init__(self, hub: BrokerHub) -> None:
        self._hub = hub
        self._loop = asyncio.get_running_loop()

    def complete_ack(self, ticket: int, reason_code: int) -> None:
        self._hub.broker.complete_ack(ticket, reason_code, self._loop.time())
        self._hub.core_changed()

    def publish(self, message: Message) -> None:
        self._hub.broker.publish(message, self._loop.time())
        self._hub.core_changed()


@dataclass(frozen=True, slots=True)
class _Job:
    client: ClientInfo
    message: Message
    ticket: int
    packet_id: int


@dataclass(eq=False)
class _Waiter:
    """A fin waiting for an assembly: sync ones hold their PUBACK, async ones only want the response."""

    job: _Job
    mode: Mode
    settled: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Assembly:
    waiters: list[_Waiter] = field(default_factory=list)


@dataclass
class FileTransferStats:
    commands: int = 0
    segments_stored: int = 0
    bytes_stored: int = 0
    files_exported: int = 0
    errors: int = 0
    qos0_dropped: int = 0
    qos2_refused: int = 0


class FileTransferServer:
    """EMQX-compatible `$file` handling for one broker (see the module docstring)."""

    def __init__(self, config: FileTransferConfig, data_dir: str | Path, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.storage = FsStorage(config.segments_dir(data_dir), config.exports_dir(data_dir),
                                 fsync=config.fsync)
        self.stats = FileTransferStats()
        self._wall_clock = wall_clock
        self._pending: deque[_Job] = deque()  # arrived before `run` started
        self._tg: asyncio.TaskGroup | None = None
        self._link: CoreLink | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._assemblies: dict[tuple[str, str], _Assembly] = {}
        self._started = asyncio.Event()

    # -- the hook (called synchronously by the core) ---------------------------------------------

    def on_publish(self, client: ClientInfo, message: Message, ticket: int, packet_id: int) -> int | None:
        if not self.config.enable or not is_file_topic(message.topic):
            return None
        if message.qos == 0:
            self.stats.qos0_dropped += 1
            return RC_SUCCESS  # consumed: never routed, never processed
        if message.qos == 2:
            self.stats.qos2_refused += 1
            return RC_NO_MATCHING_SUBSCRIBERS
        self.stats.commands += 1
        job = _Job(client, message, ticket, packet_id)
        if self._tg is None:
            self._pending.append(job)
        else:
            self._spawn(job)
        return ACK_LATER

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, link: CoreLink) -> None:
        """Serve jobs and collect garbage until cancelled."""
        self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="ft-io")
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg, self._link = tg, link
                tg.create_task(self._gc_loop(), name="ft-gc")
                while self._pending:
                    self._spawn(self._pending.popleft())
                self._started.set()
                await asyncio.Event().wait()  # until cancelled; the TaskGroup owns every job
        finally:
            self._tg = None
            self._started.clear()
            for assembly in self._assemblies.values():
                for waiter in assembly.waiters:
                    if waiter.timer is not None:
                        waiter.timer.cancel()
            self._assemblies.clear()
            # Running I/O finishes in its thread; nothing new is queued after this point.
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_started(self) -> None:
        await self._started.wait()

    async def collect_garbage(self) -> GcStats:
        """One GC pass now (also runs every `gc_interval_s`)."""
        cfg = self.config
        busy = frozenset(self._assemblies)
        stats = await self._io(self.storage.gc, self._wall_clock(), cfg.min_segments_ttl_s,
                               cfg.max_segments_ttl_s, busy)
        if stats.transfers_removed:
            log.info("file transfer GC: removed %d stale transfer(s), %d file(s)",
                     stats.transfers_removed, stats.files_removed)
        return stats

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval_s)
            try:
                await self.collect_garbage()
            except OSError as exc:  # a full or failing disk: try again next round, say so now
                log.error("file transfer GC failed, retrying in %.0fs: %s", self.config.gc_interval_s, exc)

    def _spawn(self, job: _Job) -> None:
        assert self._tg is not None
        self._tg.create_task(self._handle(job), name=f"ft-{job.client.client_id}-{job.ticket}")

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- jobs -----------------------------------------------------------------------------------

    async def _handle(self, job: _Job) -> None:
        try:
            command = parse_topic(job.message.topic)
            await self._dispatch(job, command)
        except FileTransferError as exc:
            self._settle(job, RC_UNSPECIFIED_ERROR, exc.reason, exc.detail)
        except OSError as exc:
            # Storage trouble (disk full, permissions): refuse; the client retries the command.
            log.error("file transfer storage error for %s: %s", job.client.client_id, exc)
            self._settle(job, RC_UNSPECIFIED_ERROR, "storage_error", str(exc))

    async def _dispatch(self, job: _Job, command: FileCommand) -> None:
        cid, cfg = job.client.client_id, self.config
        payload = job.message.payload
        if isinstance(command, InitCommand):
            meta = parse_filemeta(payload)
            if meta.size is not None and meta.size > cfg.max_file_size_bytes:
                raise FileTransferError("file_too_large", f"size above {cfg.max_file_size_bytes} bytes")
            await self._io(self.storage.store_filemeta, cid, command.file_id, meta)
            self._settle(job, RC_SUCCESS)
        elif isinstance(command, SegmentCommand):
            if len(payload) > cfg.max_segment_size_bytes:
                raise FileTransferError("segment_too_large", f"above {cfg.max_segment_size_bytes} bytes")
            if command.offset + len(payload) > cfg.max_file_size_bytes:
                raise FileTransferError("file_too_large", f"ends past {cfg.max_file_size_bytes} bytes")
            await self._io(self.storage.store_segment, cid, command.file_id, command.offset, payload,
                           command.checksum)
            self.stats.segments_stored += 1
            self.stats.bytes_stored += len(payload)
            self._settle(job, RC_SUCCESS)
        elif isinstance(command, FinCommand):
            await self._fin(job, command)
        else:
            assert isinstance(command, AbortCommand)
            if (cid, command.file_id) not in self._assemblies:
                await self._io(self.storage.discard, cid, command.file_id)
            self._settle(job, RC_SUCCESS)

    async def _fin(self, job: _Job, command: FinCommand) -> None:
        key = (job.client.client_id, command.file_id)
        if command.size > self.config.max_file_size_bytes:
            raise FileTransferError("file_too_large", f"size above {self.config.max_file_size_bytes} bytes")
        assembly = self._assemblies.get(key)
        if assembly is None:
            exported = await self._io(self.storage.find_export, *key)
            assembly = self._assemblies.get(key)  # one may have started while we looked
            if assembly is None and exported is not None:
                await self._io(self.storage.discard, *key)  # fragments of a resent upload
                self._settle(job, RC_SUCCESS)
                return
        if assembly is None:
            assembly = self._assemblies[key] = _Assembly()
            assert self._tg is not None
            self._tg.create_task(self._assemble(key, assembly, command),
                                 name=f"ft-assemble-{key[0]}-{command.file_id}")
        waiter = _Waiter(job, command.mode)
        assembly.waiters.append(waiter)
        if command.mode is Mode.ASYNC:
            self._ack(job, RC_SUCCESS)  # "assembly started"; the verdict travels as a response
        else:
            loop = asyncio.get_running_loop()
            waiter.timer = loop.call_later(self.config.assemble_timeout_s, self._timed_out, waiter)

    async def _assemble(self, key: tuple[str, str], assembly: _Assembly, command: FinCommand) -> None:
        code, reason, detail = RC_SUCCESS, "success", ""
        try:
            exported: Exported = await self._io(self.storage.assemble, key[0], key[1], command.size,
                                                command.checksum)
            self.stats.files_exported += 1
            log.info("file transfer: exported %s (%d bytes, sha256 %s) from %s",
                     exported.path, exported.size, exported.checksum, key[0])
        except FileTransferError as exc:
            code, reason, detail = RC_UNSPECIFIED_ERROR, exc.reason, exc.detail
        except OSError as exc:
            log.error("file transfer assembly of %s/%s failed: %s", key[0], key[1], exc)
            code, reason, detail = RC_UNSPECIFIED_ERROR, "storage_error", str(exc)
        finally:
            self._assemblies.pop(key, None)
        for waiter in assembly.waiters:
            self._finish_waiter(waiter, code, reason, detail)

    def _timed_out(self, waiter: _Waiter) -> None:
        self._finish_waiter(waiter, RC_UNSPECIFIED_ERROR, "timeout", "assembly still running")

    def _finish_waiter(self, waiter: _Waiter, code: int, reason: str, detail: str) -> None:
        if waiter.settled:
            return
        waiter.settled = True
        if waiter.timer is not None:
            waiter.timer.cancel()
        if waiter.mode is Mode.SYNC:
            self._settle(waiter.job, code, reason, detail)
        else:
            self._respond(waiter.job, code, reason, detail)

    # -- answers --------------------------------------------------------------------------------

    def _settle(self, job: _Job, code: int, reason: str = "success", detail: str = "") -> None:
        self._ack(job, code)
        self._respond(job, code, reason, detail)

    def _ack(self, job: _Job, code: int) -> None:
        if code >= 0x80:
            self.stats.errors += 1
            log.info("file transfer: %s %s refused: %s", job.client.client_id, job.message.topic[:200],
                     code)
        assert self._link is not None
        self._link.complete_ack(job.ticket, code)

    def _respond(self, job: _Job, code: int, reason: str, detail: str) -> None:
        response = FileResponse(job.message.topic, job.packet_id, code, reason)
        props = job.message.properties
        topic = response_topic(job.client.client_id)
        out_props = NO_PROPERTIES
        if job.client.protocol_level == MQTT_5:
            if props.response_topic:
                topic = props.response_topic
                if props.correlation_data is not None:
                    out_props = Properties(correlation_data=props.correlation_data)
            if detail:
                out_props = Properties(correlation_data=out_props.correlation_data,
                                       user_properties=(("detail", detail[:500]),))
        assert self._link is not None
        self._link.publish(Message(topic, response.to_json(), 1, properties=out_props))


def acl_rules() -> tuple[AclRule, ...]:
    """ACL rules file transfer needs: '#' never matches `$` topics, so the defaults do not cover it.

    Any authenticated or anonymous client may publish file commands (transfers are keyed by its own
    client id) and subscribe to its own response topic only.
    """
    return (
        AclRule("*", "publish", "$file/#"),
        AclRule("*", "publish", "$file-async/#"),
        AclRule("*", "subscribe", "$file-response/${clientid}"),
    )
