"""Resumable upload of the outbox's files over the Uplink (MQTT file transfer, EMQX-compatible).

`FileUploader` drives one `UploadMachine` (uplink.schema.filetransfer) per file: segments are read and
hashed on a thread, published QoS 1 and pipelined up to `max_inflight_segments` (the Uplink itself
also respects the broker's Receive Maximum). Only once the cloud confirmed the file (fin success) is
the row marked `confirmed`; then the file is deleted or archived and the row marked `done`. A crash
between the two repeats the (idempotent) disposal, never the upload. Responses on
`$file-response/{clientId}` reach it through `handle_message` (the agent's one inbound dispatcher) or
its own inbound reader (`consume_inbound=True`: a standalone `send-file`, or a QUIC data stream, where
responses arrive on the stream that subscribed; after a fallback to TCP they come through the Uplink's
inbound again and the agent's dispatcher hands them over - both paths stay open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from agent.files.config import FilesSection
from agent.files.outbox import FileOutbox, OutboxRow, dispose, read_segment, sha256_file
from uplink.client import UplinkConfig
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import MQTT_5, NO_PROPERTIES, Properties, Publish, Subscription
from uplink.mqtt.session import ClientSession
from uplink.schema.filetransfer import (
    FileMeta,
    FileTransferError,
    Mode,
    SendInit,
    SendSegment,
    UploadAction,
    UploadMachine,
    UploadPhase,
    UploadPlan,
    parse_response,
    response_topic,
    segment_topic,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PUBLISH_OVERHEAD_BYTES = 512  # fixed header, topic (fileId, offset, checksum), packet id, properties
MAX_NEW_FILE_IDS = 2  # A20: a fin that fails twice starts over under a fresh fileId, once


class FileChangedError(Exception):
    """The file changed or vanished during its upload: start over with its new content."""


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    row_id: int
    ok: bool
    file_id: str | None
    error: str | None = None


ProgressFn = Callable[[int, int], None]  # (bytes confirmed, total bytes)


class FilesLink(Protocol):
    """The link the uploader publishes on: an `Uplink`, or a `DataStreamUplink` (a QUIC data stream of
    the Uplink's connection, which has the same surface). `session` is the control session: the
    broker's CONNACK limits (maximum packet size) apply to every stream."""

    @property
    def config(self) -> UplinkConfig: ...

    @property
    def session(self) -> ClientSession: ...

    async def wait_connected(self) -> None: ...

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      properties: Properties = NO_PROPERTIES) -> int: ...

    async def subscribe(self, filters: Sequence[Subscription | tuple[str, int]],
                        properties: Properties = NO_PROPERTIES) -> tuple[int, ...]: ...

    def inbound(self) -> AsyncIterator[Publish]: ...


class FileUploader:
    """Uploads the outbox's files (or single files for `send-file`) over an Uplink, resumably."""

    def __init__(self, uplink: FilesLink, outbox_path: Path, settings: FilesSection, *,
                 owner: str = "agent", clock: Callable[[], float] = time.monotonic,
                 consume_inbound: bool = False,
                 on_outcome: Callable[[UploadOutcome], None] | None = None) -> None:
        self.uplink = uplink
        self._on_outcome = on_outcome  # told of every file `run` finished (done or failed)
        self.settings = settings
        self.owner = owner
        self._outbox_path = outbox_path
        self._clock = clock
        self._consume_inbound = consume_inbound
        self._outbox: FileOutbox | None = None
        # One thread for the database (sqlite3 objects stay on it), others read and hash files.
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="files-db")
        self._wake = asyncio.Event()
        self._active: UploadMachine | None = None
        self._changed = asyncio.Event()
        self._subscribed: bool | None = None  # None: not tried yet
        self.segments_sent = 0

    # -- public -----------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._outbox is None:
            self._outbox = await self._db(FileOutbox, self._outbox_path)

    async def close(self) -> None:
        if self._outbox is not None:
            await self._db(self._outbox.close)
            self._outbox = None
        # Joining the database thread blocks: not on the loop (a job may still be finishing).
        await asyncio.to_thread(self._db_thread.shutdown, True)

    def notify(self) -> None:
        """New work was enqueued."""
        self._wake.set()

    async def enqueue(self, path: Path, *, file_class: str = "file", priority: int = 5,
                      dispose: str = "keep", archive_dir: str | None = None) -> int | None:
        outbox = await self._require_outbox()
        row_id = await self._db(outbox.enqueue, path, file_class=file_class, priority=priority,
                                owner=self.owner, dispose=dispose, archive_dir=archive_dir,
                                now_ns=time.time_ns())
        if row_id is not None:
            log.info("files: queued %s (class %s, priority %d)", path, file_class, priority)
            self.notify()
        return row_id

    async def run(self) -> None:
        """Upload queued files one by one (lowest priority value first) until cancelled."""
        await self.open()
        async with asyncio.TaskGroup() as tg:
            if self._consume_inbound:
                tg.create_task(self._inbound_loop(), name="files-inbound")
            while True:
                self._wake.clear()
                outbox = await self._require_outbox()
                row = await self._db(outbox.next_for, self.owner)
                if row is None:
                    await self._wake.wait()
                    continue
                outcome = await self.process(row.id)
                if self._on_outcome is not None:
                    self._on_outcome(outcome)

    async def send(self, path: Path, *, file_class: str = "manual", progress: ProgressFn | None = None,
                   dispose: str = "keep") -> UploadOutcome:
        """Upload one file now (resuming an unfinished upload of the same file version)."""
        outbox = await self._require_outbox()
        existing = await self._db(outbox.find_active, path)
        row_id = existing.id if existing is not None else await self.enqueue(
            path, file_class=file_class, priority=0, dispose=dispose)
        if row_id is None:  # lost a race with another enqueue of the same version
            found = await self._db(outbox.find_active, path)
            assert found is not None
            row_id = found.id
        async with asyncio.TaskGroup() as tg:
            inbound = tg.create_task(self._inbound_loop(), name="files-inbound") if self._consume_inbound \
                else None
            try:
                return await self.process(row_id, progress)
            finally:
                if inbound is not None:
                    inbound.cancel()

    def handle_message(self, publish: Publish) -> bool:
        """Feed a message from the Uplink; True if it was a file-transfer response (consumed)."""
        if publish.topic != response_topic(self.uplink.config.client_id):
            return False
        try:
            response = parse_response(publish.payload)
        except ValueError as exc:
            log.warning("files: unreadable response ignored: %s", exc)
            return True
        if self._active is not None:
            self._active.response_received(response, self._clock())
            self._changed.set()
        return True

    # -- one file ---------------------------------------------------------------------------------

    async def process(self, row_id: int, progress: ProgressFn | None = None) -> UploadOutcome:
        """Take one outbox row to `done` or `failed` (or leave it for later if the link closed)."""
        outbox = await self._require_outbox()
        while True:
            row = await self._db(outbox.get, row_id)
            assert row is not None, f"outbox row {row_id} vanished"
            if row.state == "confirmed":
                await asyncio.to_thread(dispose, row)
                await self._db(outbox.set_state, row_id, "done", now_ns=time.time_ns())
                return UploadOutcome(row_id, True, row.file_id)
            if row.state in ("done", "failed"):
                return UploadOutcome(row_id, row.state == "done", row.file_id, row.error)
            try:
                machine = await self._prepare(row)
                await self._drive(row_id, machine, Path(row.path), progress)
            except FileChangedError as exc:
                log.warning("files: %s changed during upload (%s); starting over", row.path, exc)
                await self._restart_or_fail(row, f"file changed: {exc}")
                continue
            except FileNotFoundError:
                await self._db(outbox.set_state, row_id, "failed", error="file vanished before upload",
                               now_ns=time.time_ns())
                continue
            except LocalProtocolError as exc:
                await self._db(outbox.set_state, row_id, "failed", error=f"cannot publish: {exc}",
                               now_ns=time.time_ns())
                continue
            if machine.phase is UploadPhase.DONE:
                log.info("files: %s uploaded as %s (%d bytes)", row.path, machine.plan.file_id,
                         machine.plan.size)
                await self._db(outbox.set_state, row_id, "confirmed")
                continue
            reason = machine.failure or "failed"
            if machine.restart_with_new_id:
                await self._restart_or_fail(row, reason)
                continue
            log.error("files: upload of %s failed: %s", row.path, reason)
            await self._db(outbox.set_state, row_id, "failed", error=reason, now_ns=time.time_ns())

    async def _restart_or_fail(self, row: OutboxRow, reason: str) -> None:
        outbox = await self._require_outbox()
        if row.new_ids + 1 >= MAX_NEW_FILE_IDS + 1:
            await self._db(outbox.set_state, row.id, "failed", error=reason, now_ns=time.time_ns())
            return
        path = Path(row.path)
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            await self._db(outbox.set_state, row.id, "failed", error="file vanished", now_ns=time.time_ns())
            return
        await self._db(self._refresh_version, row.id, st.st_size, st.st_mtime_ns)
        await self._db(outbox.new_file_id, row.id)

    def _refresh_version(self, row_id: int, size: int, mtime_ns: int) -> None:
        assert self._outbox is not None
        self._outbox._db.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                                 (size, mtime_ns, row_id))

    async def _prepare(self, row: OutboxRow) -> UploadMachine:
        outbox = await self._require_outbox()
        path = Path(row.path)
        st = await asyncio.to_thread(path.stat)
        if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
            raise FileChangedError(f"size/mtime now {st.st_size}/{st.st_mtime_ns}")
        mode = await self._mode()
        if row.file_id is not None and row.init_json is not None and row.checksum and row.segment_size:
            plan = UploadPlan(row.file_id, Mode(row.mode) if row.mode else mode, row.size, row.segment_size,
                              row.checksum, row.init_json)
            acked = await self._db(outbox.acked_offsets, row.id)
            log.info("files: resuming %s as %s: %d of %d segment(s) already confirmed", row.path,
                     plan.file_id, len(acked), len(plan.offsets))
            return self._machine(plan, acked, row.init_acked)
        checksum = await asyncio.to_thread(sha256_file, path, row.size)
        meta = FileMeta(name=_safe_name(row.name), size=row.size, checksum=checksum,
                        segments_ttl=self.settings.segments_ttl_s,
                        user_data={"class": row.file_class})
        plan = UploadPlan(str(uuid.uuid4()), mode, row.size, self._segment_size(), checksum, meta.to_json())
        await self._db(outbox.start, row.id, plan)
        return self._machine(plan, set(), False)

    def _machine(self, plan: UploadPlan, acked: set[int], init_acked: bool) -> UploadMachine:
        return UploadMachine(plan, self.settings.retry_policy(), acked_offsets=acked, init_acked=init_acked,
                             max_in_flight=self.settings.max_inflight_segments,
                             puback_has_reason=self.uplink.config.protocol_level == MQTT_5)

    def _segment_size(self) -> int:
        limit = self.uplink.session.server_maximum_packet_size
        size = self.settings.segment_size_bytes
        if limit is not None:
            size = min(size, limit - PUBLISH_OVERHEAD_BYTES)
        if size < 1:
            raise LocalProtocolError(f"the broker's maximum packet size {limit} leaves no room for data")
        return size

    async def _mode(self) -> Mode:
        """async when configured and the response topic could be subscribed; sync otherwise."""
        if self.settings.mode == "sync":
            return Mode.SYNC
        if self._subscribed is None:
            codes = await self.uplink.subscribe([(response_topic(self.uplink.config.client_id), 1)])
            self._subscribed = codes[0] < 0x80
            if not self._subscribed:
                log.warning("files: subscribing to %s refused (0x%02X); using sync mode",
                            response_topic(self.uplink.config.client_id), codes[0])
        return Mode.ASYNC if self._subscribed else Mode.SYNC

    async def _drive(self, row_id: int, machine: UploadMachine, path: Path,
                     progress: ProgressFn | None) -> None:
        outbox = await self._require_outbox()
        await self.uplink.wait_connected()  # the segment size needs the broker's CONNACK limits
        self._active = machine
        resets = machine.resets
        if progress is not None:
            progress(machine.bytes_acked, machine.plan.size)
        try:
            async with asyncio.TaskGroup() as tg:
                while not machine.finished:
                    self._changed.clear()
                    now = self._clock()
                    machine.handle_deadline(now)
                    if machine.resets != resets:
                        resets = machine.resets
                        await self._db(outbox.forget_progress, row_id)
                    while (action := machine.next_action(now)) is not None:
                        tg.create_task(self._execute(row_id, machine, action, path, progress),
                                       name=f"files-{machine.plan.file_id}-{_label(action)}")
                    if machine.finished:
                        break
                    deadline = machine.next_deadline()
                    delay_s = None if deadline is None else max(0.0, deadline - self._clock())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay_s):
                            await self._changed.wait()
        except* FileChangedError as group:
            raise group.exceptions[0] from None
        except* LocalProtocolError as group:
            raise group.exceptions[0] from None
        finally:
            self._active = None

    async def _execute(self, row_id: int, machine: UploadMachine, action: UploadAction, path: Path,
                       progress: ProgressFn | None) -> None:
        outbox = await self._require_outbox()
        plan = machine.plan
        if isinstance(action, SendSegment):
            data, digest = await asyncio.to_thread(read_segment, path, action.offset, action.length)
            if len(data) != action.length:
                raise FileChangedError(f"short read at {action.offset}")
            self.segments_sent += 1
            code = await self.uplink.publish(segment_topic(plan.mode, plan.file_id, action.offset, digest),
                                             data, qos=1)
        elif isinstance(action, SendInit):
            code = await self.uplink.publish(action.topic, action.payload, qos=1)
        else:
            code = await self.uplink.publish(action.topic, b"", qos=1)
        machine.command_acked(action, code, self._clock())
        # The machine decides what counts as stored (0x10, for one, does not); persist exactly that.
        if isinstance(action, SendSegment) and action.offset in machine.acked:
            await self._db(outbox.ack_segment, row_id, action.offset)
            if progress is not None:
                progress(machine.bytes_acked, plan.size)
        elif isinstance(action, SendInit) and machine.init_acked:
            await self._db(outbox.ack_init, row_id)
        elif code:
            log.info("files: %s refused with 0x%02X", _label(action), code)
        self._changed.set()

    async def _inbound_loop(self) -> None:
        async for publish in self.uplink.inbound():
            self.handle_message(publish)

    # -- plumbing ---------------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: fn(*args, **kwargs))

    async def _require_outbox(self) -> FileOutbox:
        if self._outbox is None:
            await self.open()
        assert self._outbox is not None
        return self._outbox


def _label(action: UploadAction) -> str:
    if isinstance(action, SendSegment):
        return f"segment-{action.offset}"
    return "init" if isinstance(action, SendInit) else "fin"


def _safe_name(name: str) -> str:
    """The export name: the local name with characters the broker refuses replaced by '_'."""
    try:
        FileMeta(name=name)
        return name
    except FileTransferError:
        cleaned = "".join("_" if ch in "/\\:" or not ch.isprintable() else ch for ch in name)
        cleaned = cleaned.encode()[:240].decode(errors="ignore") or "file"
        return "file" if cleaned in (".", "..") else cleaned
