"""File transfer in the running agent: uploader and watcher across link swaps, `file.upload`, counters.

Theory of operation. The uploader is bound to one `Uplink` (it reads the broker's packet-size limit and
subscribes `$file-response/{clientId}` on it), while the agent's link can be replaced by a pushed config.
So `FileService.run` follows the agent's `LinkHolder`: for each current link it runs one `FileUploader`
(and, when folders are configured, one `FolderWatcher` feeding it) until the link is swapped or closed,
then closes the uploader and starts over on the next link. Nothing is lost in a swap: the outbox is
durable and an interrupted upload resumes under the same fileId with the segments still missing.

Over QUIC (`uplink.transport` "quic"/"auto") the uploader does not publish on the Uplink itself but on
`links.files_link(uplink)`: a `DataStreamUplink`, one per Uplink, run here beside the uploader, so
segments travel on their own QUIC data stream and never hold back telemetry. Responses delivered on that
stream are read by the uploader itself (`consume_inbound`); while the failover runs on TCP they arrive
through the Uplink's inbound instead.

Inbound messages of the Uplink are not read here: the agent has one reader of `uplink.inbound()`
(commands and file responses share it) which hands every message to `handle_message`; it returns False
for anything that is not a file-transfer response.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.commands import Handler, Outcome, Progress
from agent.files.config import FilesSection, WatchFolder
from agent.files.uploader import FilesLink, FileUploader, UploadOutcome
from agent.files.watcher import FolderWatcher
from uplink.client import Uplink, UplinkClosed
from uplink.mqtt.packets import Publish
from uplink.schema.commands import Command, CommandError, ResultCode
from uplink.streams import DataStreamUplink

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

DISPOSALS = ("keep", "delete", "archive")
MAX_WAIT_S = 3600.0


class Links(Protocol):
    """What the service needs from agent.app.LinkHolder."""

    current: Uplink | None

    async def wait_swap(self, seen: Uplink | None) -> None: ...

    def files_link(self, uplink: Uplink) -> FilesLink:
        """The link file transfer uses on `uplink`: itself, or a new DataStreamUplink (QUIC)."""
        ...


class FileService:
    """The agent's file transfer (see the module docstring). `stats` feeds the metrics."""

    def __init__(self, links: Links, outbox_path: Path, settings: FilesSection) -> None:
        self.links = links
        self.outbox_path = outbox_path
        self.settings = settings
        self.uploader: FileUploader | None = None
        self.stream: DataStreamUplink | None = None  # the QUIC data stream of the current link, if any
        self._ready = asyncio.Event()  # set while an uploader runs
        self._waiters: dict[int, asyncio.Future[UploadOutcome]] = {}
        self.stats: dict[str, int] = {"queued": 0, "uploaded": 0, "failed": 0}

    async def run(self) -> None:
        seen: Uplink | None = None
        while True:
            uplink = self.links.current
            if uplink is None or uplink is seen:
                await self.links.wait_swap(seen)
                continue
            seen = uplink
            link = self.links.files_link(uplink)
            stream = link if isinstance(link, DataStreamUplink) else None
            self.stream = stream
            uploader = FileUploader(link, self.outbox_path, self.settings, on_outcome=self._finished,
                                    consume_inbound=stream is not None)
            try:
                await uploader.open()
                self.uploader = uploader
                self._ready.set()
                await self._serve(uploader, uplink, stream)
            except* UplinkClosed:
                pass  # the link is being replaced or the agent stops: the next link takes over
            finally:
                self._ready.clear()
                self.uploader = None
                if stream is not None:
                    await stream.close()
                await uploader.close()

    async def _serve(self, uploader: FileUploader, uplink: Uplink, stream: DataStreamUplink | None) -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(uploader.run(), name="files-uploader")]
            if stream is not None:
                tasks.append(tg.create_task(stream.run(), name="files-stream"))
            if self.settings.folders:
                watcher = FolderWatcher(self.settings.folders, self._enqueue_watched)
                tasks.append(tg.create_task(watcher.run(), name="files-watcher"))
            await self.links.wait_swap(uplink)
            for t in tasks:
                t.cancel()

    async def _enqueue_watched(self, path: Path, folder: WatchFolder) -> None:
        await self.enqueue(path, file_class=folder.file_class, priority=folder.priority,
                           dispose=folder.after_upload, archive_dir=str(folder.archive_path()))

    async def enqueue(self, path: Path, *, file_class: str, priority: int, dispose: str,
                      archive_dir: str | None = None) -> int | None:
        """Put a file in the outbox (None: this version of it is already queued)."""
        await self._ready.wait()
        assert self.uploader is not None
        row_id = await self.uploader.enqueue(path, file_class=file_class, priority=priority,
                                             dispose=dispose, archive_dir=archive_dir)
        if row_id is not None:
            self.stats["queued"] += 1
        return row_id

    async def wait_for(self, row_id: int) -> UploadOutcome:
        """The outcome of a queued file once the uploader finished it (done or failed)."""
        fut = self._waiters.get(row_id)
        if fut is None:
            fut = self._waiters[row_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._waiters.pop(row_id, None)

    def _finished(self, outcome: UploadOutcome) -> None:
        self.stats["uploaded" if outcome.ok else "failed"] += 1
        fut = self._waiters.pop(outcome.row_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def handle_message(self, publish: Publish) -> bool:
        """A message from the agent's inbound reader; True when it was a file-transfer response."""
        uploader = self.uploader
        return uploader is not None and uploader.handle_message(publish)


def _arg(cmd: Command, key: str, kind: type, default: Any) -> Any:
    value = cmd.args.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandError(ResultCode.INVALID, f"args.{key}: expected {kind.__name__}")
    return value


def command_handlers(agent: Agent) -> dict[str, Handler]:
    """`file.upload` for agent.ops.Operations.

    args: `path` (absolute; under a watched folder or `files.upload_roots`), `file_class` ("manual"),
    `priority` (0..9, default 0: before watched files), `after_upload` ("keep" | "delete" | "archive",
    default "keep"), `wait` (false: answer once queued; true: answer with the upload's outcome, up to
    `wait_s`, default 300 s).
    """

    async def file_upload(cmd: Command, progress: Progress) -> Outcome:
        service = agent.file_service
        if service is None:
            return Outcome(ResultCode.UNSUPPORTED, "file transfer is not running in this agent")
        raw = _arg(cmd, "path", str, None) if "path" in cmd.args else None
        if raw is None:
            raise CommandError(ResultCode.INVALID, "args.path: required")
        if not Path(raw).is_absolute():
            raise CommandError(ResultCode.INVALID, "args.path: must be an absolute path")
        file_class = _arg(cmd, "file_class", str, "manual")
        priority = _arg(cmd, "priority", int, 0)
        dispose = _arg(cmd, "after_upload", str, "keep")
        wait = _arg(cmd, "wait", bool, False)
        wait_s = _arg(cmd, "wait_s", float, 300.0)
        if not file_class:
            raise CommandError(ResultCode.INVALID, "args.file_class: must not be empty")
        if not 0 <= priority <= 9:
            raise CommandError(ResultCode.INVALID, "args.priority: must be within 0..9")
        if dispose not in DISPOSALS:
            raise CommandError(ResultCode.INVALID, f"args.after_upload: one of {', '.join(DISPOSALS)}")
        if not 0 < wait_s <= MAX_WAIT_S:
            raise CommandError(ResultCode.INVALID, f"args.wait_s: must be within 0..{MAX_WAIT_S:g} s")
        try:
            path = await asyncio.to_thread(Path(raw).resolve)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise CommandError(ResultCode.INVALID, f"args.path: {exc}") from None
        if not service.settings.may_upload(path):
            raise CommandError(ResultCode.INVALID,
                               "args.path: not under a watched folder or files.upload_roots")
        if not await asyncio.to_thread(path.is_file):
            return Outcome(ResultCode.FAILED, f"{raw}: no such file")
        row_id = await service.enqueue(path, file_class=file_class, priority=priority, dispose=dispose)
        if row_id is None:
            return Outcome(ResultCode.OK, f"{raw} is already queued", {"path": str(path), "queued": False})
        result: dict[str, Any] = {"path": str(path), "queued": True, "row": row_id}
        if not wait:
            return Outcome(ResultCode.OK, f"{raw} queued for upload", result)
        await progress(f"{raw} queued for upload; waiting up to {wait_s:g} s")
        try:
            async with asyncio.timeout(wait_s):
                outcome = await service.wait_for(row_id)
        except TimeoutError:
            return Outcome(ResultCode.FAILED, f"{raw} not uploaded within {wait_s:g} s (still queued)",
                           result)
        result.update(file_id=outcome.file_id, error=outcome.error)
        if outcome.ok:
            return Outcome(ResultCode.OK, f"{raw} uploaded as {outcome.file_id}", result)
        return Outcome(ResultCode.FAILED, f"upload of {raw} failed: {outcome.error}", result)

    return {"file.upload": file_upload}

