"""Sensor files to the cloud over MQTT file transfer: durable outbox, resumable uploader, folder watcher.

Theory of operation
-------------------
`FileOutbox` is a small SQLite database (`<data_dir>/files.db`). A file enters it once (watcher or
`send-file`), with its class, priority and what to do with it afterwards; the row then carries the
upload plan (fileId, segment size, SHA-256, the exact init JSON) and the acknowledged segment
offsets, each committed as its PUBACK arrives. After a crash or power cut the uploader picks the
same row again and continues under the same fileId with the segments still missing (A13, A21).

`FileUploader` drives one `UploadMachine` (uplink.schema.filetransfer) per file over the `Uplink`:
segments are read and hashed on a thread, published QoS 1 and pipelined up to `max_inflight_segments`
(the Uplink itself also respects the broker's Receive Maximum). Only once the cloud confirmed the
file (fin success) is the row marked `confirmed`; then the file is deleted or archived and the row
marked `done`. A crash between the two repeats the (idempotent) disposal, never the upload.

`FolderWatcher` watches configured folders with watchdog and enqueues a file once it is complete:
closed after writing, or unchanged in size and mtime for `stable_s`. Files already there at start
are picked up too. Dot-files and dot-directories (where archived files go by default) are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import os
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypeVar

import msgspec

from uplink.client import Uplink, UplinkConfig
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import MQTT_5, Publish
from uplink.schema.filetransfer import (
    FileMeta,
    FileTransferError,
    Mode,
    RetryPolicy,
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

KIB = 1024
PUBLISH_OVERHEAD_BYTES = 512  # fixed header, topic (fileId, offset, checksum), packet id, properties
HASH_CHUNK_BYTES = 1 << 20
MAX_NEW_FILE_IDS = 2  # A20: a fin that fails twice starts over under a fresh fileId, once


# ------------------------------------------------------------------------------------------- config


class WatchFolder(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One watched folder. Lower `priority` uploads sooner; `glob` matches the file name."""

    path: str
    file_class: str = "file"
    priority: int = 5
    glob: str = "*"
    recursive: bool = False
    after_upload: Literal["delete", "archive"] = "archive"
    archive_dir: str | None = None  # default: `<path>/.uploaded` (ignored by the watcher)
    stable_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must not be empty")
        if not 0 <= self.priority <= 9:
            raise ValueError("priority must be within 0..9")
        if not 0 < self.stable_s <= 3600:
            raise ValueError("stable_s must be within 0..3600 s (exclusive of 0)")
        if not self.file_class:
            raise ValueError("file_class must not be empty")

    def archive_path(self) -> Path:
        return Path(self.archive_dir) if self.archive_dir else Path(self.path) / ".uploaded"


class FilesSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent's `[files]` section: transfer tuning and the watched folders."""

    mode: Literal["async", "sync"] = "async"  # async: fin verdict by response message (needed at 3.1.1)
    segment_size_bytes: int = 256 * KIB
    max_inflight_segments: int = 16
    max_attempts: int = 6
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    fin_response_timeout_s: float = 330.0
    segments_ttl_s: int | None = None
    folders: tuple[WatchFolder, ...] = ()

    def __post_init__(self) -> None:
        if not 1 * KIB <= self.segment_size_bytes <= 64 * 1024 * KIB:
            raise ValueError("segment_size_bytes must be within 1 KiB..64 MiB")
        if not 1 <= self.max_inflight_segments <= 1024:
            raise ValueError("max_inflight_segments must be within 1..1024")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("retry_initial_s must be > 0 and <= retry_max_s")
        if self.fin_response_timeout_s <= 0:
            raise ValueError("fin_response_timeout_s must be > 0")
        if self.segments_ttl_s is not None and self.segments_ttl_s < 1:
            raise ValueError("segments_ttl_s must be >= 1")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, initial_backoff_s=self.retry_initial_s,
                           max_backoff_s=self.retry_max_s, fin_response_timeout_s=self.fin_response_timeout_s)


# ------------------------------------------------------------------------------------------- outbox

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    file_class TEXT NOT NULL,
    priority INTEGER NOT NULL,
    owner TEXT NOT NULL,                 -- 'agent', or 'cli' for send-file
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    dispose TEXT NOT NULL,               -- keep | delete | archive
    archive_dir TEXT,
    state TEXT NOT NULL,                 -- queued | uploading | confirmed | done | failed
    file_id TEXT,
    mode TEXT,
    segment_size INTEGER,
    checksum TEXT,
    init_json BLOB,
    init_acked INTEGER NOT NULL DEFAULT 0,
    new_ids INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    enqueued_ns INTEGER NOT NULL,
    finished_ns INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS files_active ON files(path, size, mtime_ns)
    WHERE state IN ('queued', 'uploading', 'confirmed');
CREATE TABLE IF NOT EXISTS acked (
    file INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (file, offset)
) WITHOUT ROWID;
"""


_COLUMNS = ("id, path, name, file_class, priority, owner, size, mtime_ns, dispose, archive_dir, state, "
            "file_id, mode, segment_size, checksum, init_json, init_acked, new_ids, error")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    path: str
    name: str
    file_class: str
    priority: int
    owner: str
    size: int
    mtime_ns: int
    dispose: str
    archive_dir: str | None
    state: str
    file_id: str | None
    mode: str | None
    segment_size: int | None
    checksum: str | None
    init_json: bytes | None
    init_acked: bool
    new_ids: int
    error: str | None


class FileOutbox:
    """The durable list of files to upload and their progress. Blocking: call from one thread."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")  # the agent and `send-file` may share the file
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _row(self, where: str, args: Sequence[object]) -> OutboxRow | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE {where}", args)
        r = cur.fetchone()
        if r is None:
            return None
        return OutboxRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12],
                         r[13], r[14], r[15], bool(r[16]), r[17], r[18])

    def enqueue(self, path: Path, *, file_class: str, priority: int, owner: str, dispose: str,
                archive_dir: str | None, now_ns: int) -> int | None:
        """Add a file (as it is now: size, mtime); None if the same version is already queued."""
        st = path.stat()
        try:
            cur = self._db.execute(
                "INSERT INTO files (path, name, file_class, priority, owner, size, mtime_ns, dispose, "
                "archive_dir, state, enqueued_ns) VALUES (?,?,?,?,?,?,?,?,?, 'queued', ?)",
                (str(path), path.name, file_class, priority, owner, st.st_size, st.st_mtime_ns, dispose,
                 archive_dir, now_ns))
        except sqlite3.IntegrityError:
            return None
        return cur.lastrowid

    def find_active(self, path: Path) -> OutboxRow | None:
        st = path.stat()
        return self._row("path = ? AND size = ? AND mtime_ns = ? AND state IN ('queued','uploading',"
                         "'confirmed') ORDER BY id LIMIT 1", (str(path), st.st_size, st.st_mtime_ns))

    def get(self, row_id: int) -> OutboxRow | None:
        return self._row("id = ?", (row_id,))

    def next_for(self, owner: str) -> OutboxRow | None:
        """The next file to work on: confirmed ones (only disposal left) first, then by priority."""
        return self._row("owner = ? AND state IN ('queued','uploading','confirmed') ORDER BY "
                         "state != 'confirmed', priority, id LIMIT 1", (owner,))

    def start(self, row_id: int, plan: UploadPlan) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))
            self._db.execute("UPDATE files SET state='uploading', file_id=?, mode=?, segment_size=?, "
                             "checksum=?, init_json=?, init_acked=0 WHERE id=?",
                             (plan.file_id, plan.mode.value, plan.segment_size, plan.checksum,
                              plan.init_payload, row_id))

    def acked_offsets(self, row_id: int) -> set[int]:
        return {o for (o,) in self._db.execute("SELECT offset FROM acked WHERE file = ?", (row_id,))}

    def ack_init(self, row_id: int) -> None:
        self._db.execute("UPDATE files SET init_acked = 1 WHERE id = ?", (row_id,))

    def ack_segment(self, row_id: int, offset: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO acked (file, offset) VALUES (?, ?)", (row_id, offset))

    def forget_progress(self, row_id: int) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))
            self._db.execute("UPDATE files SET init_acked = 0 WHERE id = ?", (row_id,))

    def new_file_id(self, row_id: int) -> None:
        """Start over: the next attempt gets a fresh fileId (never reuse one, A13/A20)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))
            self._db.execute("UPDATE files SET file_id = NULL, init_acked = 0, new_ids = new_ids + 1, "
                             "state = 'queued' WHERE id = ?", (row_id,))

    def set_state(self, row_id: int, state: str, *, error: str | None = None,
                  now_ns: int | None = None) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE files SET state = ?, error = ?, finished_ns = ? WHERE id = ?",
                             (state, error, now_ns, row_id))
            if state in ("done", "failed"):
                self._db.execute("DELETE FROM acked WHERE file = ?", (row_id,))

    def rows(self) -> list[OutboxRow]:
        ids = [i for (i,) in self._db.execute("SELECT id FROM files ORDER BY id")]
        return [r for i in ids if (r := self.get(i)) is not None]


# ------------------------------------------------------------------------------ blocking file helpers


def _sha256_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining > 0 and (chunk := f.read(min(HASH_CHUNK_BYTES, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _read_segment(path: Path, offset: int, length: int) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data, hashlib.sha256(data).hexdigest()


def _dispose(row: OutboxRow) -> None:
    """Delete or archive an uploaded file; a missing file means a previous run already did it."""
    path = Path(row.path)
    if row.dispose == "delete":
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif row.dispose == "archive":
        folder = Path(row.archive_dir or path.parent / ".uploaded")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        n = 1
        while target.exists():  # keep earlier uploads of the same name
            target = folder / f"{path.stem}.{n}{path.suffix}"
            n += 1
        with contextlib.suppress(FileNotFoundError):
            shutil.move(path, target)


class FileChangedError(Exception):
    """The file changed or vanished during its upload: start over with its new content."""


# ------------------------------------------------------------------------------------------ uploader


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    row_id: int
    ok: bool
    file_id: str | None
    error: str | None = None


ProgressFn = Callable[[int, int], None]  # (bytes confirmed, total bytes)


class FileUploader:
    """Uploads the outbox's files (or single files for `send-file`) over an Uplink, resumably."""

    def __init__(self, uplink: Uplink, outbox_path: Path, settings: FilesSection, *,
                 owner: str = "agent", clock: Callable[[], float] = time.monotonic,
                 consume_inbound: bool = False) -> None:
        self.uplink = uplink
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
        self._db_thread.shutdown(wait=True)

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
                await self.process(row.id)

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
                await asyncio.to_thread(_dispose, row)
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
        checksum = await asyncio.to_thread(_sha256_file, path, row.size)
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
            data, digest = await asyncio.to_thread(_read_segment, path, action.offset, action.length)
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


# ------------------------------------------------------------------------------------------- watcher


@dataclass
class _Candidate:
    folder: WatchFolder
    size: int
    mtime_ns: int
    since: float
    closed: bool = False


EnqueueFn = Callable[[Path, WatchFolder], Awaitable[None]]


class FolderWatcher:
    """Watches folders (watchdog, inotify on Linux) and hands complete files to `enqueue`."""

    def __init__(self, folders: Sequence[WatchFolder], enqueue: EnqueueFn, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folders = tuple(folders)
        self._enqueue = enqueue
        self._clock = clock
        self._candidates: dict[Path, _Candidate] = {}
        self._poke = asyncio.Event()

    def matches(self, path: Path, folder: WatchFolder) -> bool:
        root = Path(folder.path)
        try:
            rel = path.relative_to(root)
        except ValueError:
            return False
        if any(part.startswith(".") for part in rel.parts):
            return False  # dot-files (editors' temp files) and the default archive folder
        if len(rel.parts) > 1 and not folder.recursive:
            return False
        return fnmatch.fnmatchcase(path.name, folder.glob)

    def _seen(self, path: Path, closed: bool) -> None:
        for folder in self.folders:
            if self.matches(path, folder):
                cand = self._candidates.get(path)
                if cand is None:
                    self._candidates[path] = _Candidate(folder, -1, -1, self._clock(), closed)
                else:
                    cand.closed = closed
                    if not closed:
                        cand.since = self._clock()
                self._poke.set()
                return

    async def run(self) -> None:
        from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        seen = self._seen

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory or event.event_type in ("deleted", "opened", "closed_no_write"):
                    return
                raw = event.dest_path if event.event_type == "moved" else event.src_path
                path = Path(os.fsdecode(raw))
                loop.call_soon_threadsafe(seen, path, isinstance(event, FileClosedEvent))

        observer = Observer()
        for folder in self.folders:
            await asyncio.to_thread(Path(folder.path).mkdir, parents=True, exist_ok=True)
            observer.schedule(Handler(), folder.path, recursive=folder.recursive)
        await asyncio.to_thread(observer.start)
        try:
            for path in await asyncio.to_thread(self._scan):
                self._seen(path, False)
            interval_s = max(0.05, min(1.0, min((f.stable_s for f in self.folders), default=1.0) / 2))
            while True:
                await self._check()
                self._poke.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await self._poke.wait()
        finally:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)

    def _scan(self) -> list[Path]:
        out: list[Path] = []
        for folder in self.folders:
            root = Path(folder.path)
            walker = root.rglob("*") if folder.recursive else root.glob("*")
            out.extend(p for p in walker if p.is_file() and self.matches(p, folder))
        return out

    async def _check(self) -> None:
        now = self._clock()
        for path, cand in list(self._candidates.items()):
            try:
                st = await asyncio.to_thread(path.stat)
            except FileNotFoundError:
                del self._candidates[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                first = cand.size < 0
                cand.size, cand.mtime_ns = st.st_size, st.st_mtime_ns
                if not (first and cand.closed):
                    cand.since = now
                    continue
            if cand.closed or now - cand.since >= cand.folder.stable_s:
                del self._candidates[path]
                await self._enqueue(path, cand.folder)


# ---------------------------------------------------------------------------------- send-file (CLI)


class ProgressBar:
    """`[#####.....]  50%  50.0/100.0 MB  12.3 MB/s` on a terminal; every 10 % otherwise."""

    def __init__(self, label: str, stream: IO[str] = sys.stderr, *,
                 clock: Callable[[], float] = time.monotonic, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self._clock = clock
        self._width = width
        self._start = clock()
        self._last_draw = -1.0
        self._last_decile = -1
        self._tty = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        fraction = 1.0 if total == 0 else done / total
        if self._tty:
            if now - self._last_draw < 0.1 and done < total:
                return
            self._last_draw = now
            filled = int(fraction * self._width)
            rate = done / max(1e-6, now - self._start) / 1e6
            bar = "#" * filled + "." * (self._width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {fraction * 100:5.1f}%  "
                              f"{done / 1e6:.1f}/{total / 1e6:.1f} MB  {rate:.1f} MB/s")
            if done >= total:
                self.stream.write("\n")
        else:
            decile = int(fraction * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(f"{self.label}: {fraction * 100:.0f}% ({done}/{total} bytes)\n")
        self.stream.flush()


async def send_file(uplink_config: UplinkConfig, settings: FilesSection, outbox_path: Path, path: Path, *,
                    progress: ProgressFn | None = None) -> UploadOutcome:
    """`edge-agent send-file`: connect, upload one file (resuming an interrupted run), disconnect."""
    uplink = Uplink(uplink_config)
    uploader = FileUploader(uplink, outbox_path, settings, owner="cli", consume_inbound=True)
    async with asyncio.TaskGroup() as tg:
        link = tg.create_task(uplink.run(), name="uplink")
        try:
            return await uploader.send(path, progress=progress)
        finally:
            await uploader.close()
            with contextlib.suppress(OSError, ConnectionError):
                async with asyncio.timeout(2):
                    await uplink.close()
            link.cancel()
