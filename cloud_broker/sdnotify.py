"""Tell systemd how the broker is doing (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) over $NOTIFY_SOCKET.

sd_notify(3) without libsystemd: one datagram of newline-separated `KEY=value` lines to the AF_UNIX
socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the Linux abstract namespace). systemd
identifies the sender by the kernel's credentials, so the unit's `NotifyAccess=main` accepts only
the broker process itself. `$WATCHDOG_USEC` is the unit's `WatchdogSec=`; it is meant for us
unless `$WATCHDOG_PID` names another process.

The broker cannot import the agent's notifier (the import contract keeps the two apart), so this is
its own, smaller one: `NotifySocket.from_environ()` is None outside systemd and the caller skips
notifying; `watchdog_pings` is the task that proves the event loop still turns. Sends never block:
the socket is non-blocking and a datagram the manager cannot take right now is dropped (a missed
WATCHDOG=1 is what a stuck process looks like anyway, and the next one may pass).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("cloud_broker.sdnotify")


@dataclass(frozen=True, slots=True)
class NotifySocket:
    """Where notifications go, and the watchdog interval systemd expects pings within (if any)."""

    address: str | bytes  # a filesystem path, or b"\0name" for an abstract socket
    watchdog_interval_s: float | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *,
                     pid: int | None = None) -> NotifySocket | None:
        """The service manager's socket from `environ` (default `os.environ`), or None when not under
        systemd or when `$NOTIFY_SOCKET` is no AF_UNIX address (e.g. `vsock:`), which is logged."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return None
        if raw.startswith("/"):
            address: str | bytes = raw
        elif raw.startswith("@") and len(raw) > 1:
            address = b"\0" + raw[1:].encode()  # abstract names start with NUL, no terminator
        else:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an @abstract name: not notifying", raw)
            return None
        return cls(address, _watchdog_interval_s(env, os.getpid() if pid is None else pid))

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram; False if it could not be delivered."""
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as sock:
                sock.sendto(message, self.address)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            # The manager restarted or the socket is gone: the broker serves on; systemd judges it by
            # the notifications that do arrive.
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True


def _watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    usec, owner = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # the watchdog belongs to another process of the unit
    return int(usec) / 1_000_000


def status_line(text: str) -> str:
    """`STATUS=text` with the text on one line: a newline would start a bogus assignment."""
    return "STATUS=" + " ".join(text.split())


async def watchdog_pings(target: NotifySocket, healthy: Callable[[], bool],
                         status: Callable[[], str] | None = None) -> None:
    """Until cancelled, send WATCHDOG=1 (with a fresh STATUS) every half watchdog interval while
    `healthy()`; returns at once when the unit has no watchdog.

    Running on the broker's event loop is the point: a loop blocked by a bug stops the pings and
    systemd restarts the service. An unhealthy broker stops pinging for the same reason.
    """
    interval_s = target.watchdog_interval_s
    if interval_s is None:
        return
    while True:
        if healthy():
            lines = ["WATCHDOG=1"]
            if status is not None:
                lines.append(status_line(status()))
            target.send(*lines)
        await asyncio.sleep(interval_s / 2)
