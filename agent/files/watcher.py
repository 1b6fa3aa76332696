"""Watches folders for complete files and hands them to the uploader's outbox.

`FolderWatcher` watches configured folders with watchdog (inotify on Linux) and enqueues a file once it
is complete: closed after writing, or unchanged in size and mtime for `stable_s`. Files already there at
start are picked up too. Dot-files and dot-directories (where archived files go by default) are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.files.config import WatchFolder


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
