"""A socat pty pair: two linked pseudo-terminals standing in for a serial cable between device and agent.

`socat -d -d pty,raw,echo=0,link=A pty,raw,echo=0,link=B` creates two ptys and copies bytes both ways;
A and B are symlinks to the /dev/pts nodes. The simulator opens one end, the driver the other. Stopping
the pair removes both links, which looks like a USB adapter unplugged; starting it again with the same
paths looks like it was plugged back in (new /dev/pts nodes behind the same names).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0


class PtyPair:
    """A running socat pty pair; `a` and `b` are the link paths. Start with `await PtyPair.start(...)`."""

    def __init__(self, a: Path, b: Path, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.a = a
        self.b = b
        self.process = process
        self.log_path = log_path

    @classmethod
    async def start(cls, a: str | Path, b: str | Path, *, socat: str | None = None,
                    timeout_s: float = START_TIMEOUT_S) -> PtyPair:
        """Start socat and wait until both links exist; RuntimeError if socat fails or is too slow."""
        exe = socat or shutil.which("socat")
        if exe is None:
            raise RuntimeError("socat is not installed")
        a, b = Path(a), Path(b)
        for link in (a, b):
            if link.is_symlink() or link.exists():
                raise RuntimeError(f"{link} already exists (another pair running?)")
        # socat's -d -d notices go to a file beside the links: readable after a failure, and a log
        # file (unlike a pipe nobody reads) can never fill up and block socat.
        log_path = a.with_name(a.name + ".socat.log")
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                exe, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log_fd)
        finally:
            os.close(log_fd)  # socat holds its own copy
        pair = cls(a, b, proc, log_path)
        try:
            async with asyncio.timeout(timeout_s):
                while not (a.exists() and b.exists()):
                    if proc.returncode is not None:
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            await pair.stop()
            raise RuntimeError(f"socat did not create {a} and {b} within {timeout_s} s") from None
        if proc.returncode is not None:
            err = log_path.read_text(errors="replace")[-500:]
            raise RuntimeError(f"socat exited with {proc.returncode}: {err}")
        return pair

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def stop(self) -> None:
        """Terminate socat (kill after STOP_TIMEOUT_S) and make sure both links are gone."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                if link.is_symlink():
                    os.unlink(link)


@contextlib.asynccontextmanager
async def pty_pair(a: str | Path, b: str | Path) -> AsyncIterator[PtyPair]:
    """`async with pty_pair(a, b) as pair:` - a started pair, stopped on exit."""
    pair = await PtyPair.start(a, b)
    try:
        yield pair
    finally:
        await pair.stop()
