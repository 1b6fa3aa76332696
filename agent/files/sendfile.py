"""`edge-agent send-file`: upload one file now over its own connection, with a progress bar."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from agent.files.config import FilesSection
from agent.files.uploader import FileUploader, ProgressFn, UploadOutcome
from uplink.client import TransportFactory, Uplink, UplinkConfig


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
                    progress: ProgressFn | None = None,
                    transport_factory: TransportFactory | None = None) -> UploadOutcome:
    """`edge-agent send-file`: connect, upload one file (resuming an interrupted run), disconnect.

    transport_factory: how to reach the broker (None: TCP/TLS per uplink_config; the agent's QUIC
    failover for transport "quic"/"auto"). The file goes on the control stream: it has the
    connection to itself."""
    uplink = Uplink(uplink_config, transport_factory=transport_factory)
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
