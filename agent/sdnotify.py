"""Tell systemd how the process is doing (READY, STATUS, WATCHDOG, STOPPING, RELOADING) over NOTIFY_SOCKET.

This is the sd_notify(3) protocol written out by hand so the agent needs no libsystemd binding: each
notification is one datagram of newline-separated `KEY=value` assignments sent to the AF_UNIX socket
named by `$NOTIFY_SOCKET` (a filesystem path, or an abstract name written with a leading `@`). The
service manager learns who sent it from the kernel-attached credentials, so with `NotifyAccess=main`
only the main process may notify; a helper process it starts must not inherit the variable (see
`from_env(unset_environment=True)`).

Outside systemd (no `$NOTIFY_SOCKET`) every method is a no-op that returns False, so the agent calls the
same code in a terminal, in tests and under the service manager. Sending never blocks the event loop:
the socket is non-blocking and a notification that cannot be queued right now is dropped and reported
as False (a dropped WATCHDOG=1 is what a hung process looks like anyway; the next one may pass).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | bytes | None:
    """The AF_UNIX address named by a NOTIFY_SOCKET value, or None if it is not one we can use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: the name starts with a NUL byte and is not NUL-terminated.
        return b"\0" + value[1:].encode()
    return None


def _one_line(text: str) -> str:
    # A notification is newline-separated assignments: a newline inside a value would start a new
    # (bogus) assignment, so status texts are folded onto one line.
    return " ".join(text.split())


class Notifier:
    """Sends sd_notify messages to one socket; disabled (every call a no-op) when address is None.

    `watchdog_usec` is the service's watchdog interval in microseconds (`$WATCHDOG_USEC`), None when
    the service has no watchdog or the watchdog is meant for another process (`$WATCHDOG_PID`).
    """

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """A notifier for the socket systemd passed us, or a disabled one when there is none.

        With `unset_environment`, the NOTIFY_SOCKET/WATCHDOG_* variables are removed from `environ`
        (default `os.environ`) after reading, so child processes do not notify in our name.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            # e.g. "vsock:..." (VM guests): not used on our hardware. Say so instead of failing: the
            # unit then times out waiting for READY=1, which points here.
            log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX path or @abstract name; notifications off", raw)
        watchdog_usec = _watchdog_usec(env, os.getpid())
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere (we run under a service manager)."""
        return self._address is not None

    def watchdog_interval_s(self) -> float | None:
        """The service watchdog interval (WatchdogSec=) in seconds, or None when there is no watchdog.

        systemd recommends pinging at half this interval.
        """
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments as one datagram; True if the socket accepted it."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            sock = self._socket()
            sock.sendto(message, self._address)
        except (BlockingIOError, InterruptedError):
            log.debug("notify socket busy; dropped %r", message)
            return False
        except OSError as exc:
            # The manager went away (daemon-reexec) or the socket is not ours to write: the service
            # still runs; systemd will judge it by the notifications that do arrive.
            log.warning("sd_notify to %r failed: %s", self._address, exc)
            self.close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: systemd moves the unit from 'activating' to 'active'."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """A one-line human status shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping: the service is healthy (only send it when it is)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """A clean shutdown has begun."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        """A configuration reload has begun; send `ready()` when it is done.

        MONOTONIC_USEC is what Type=notify-reload (systemd >= 253) requires to match the reload to its
        request; older managers ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def extend_timeout(self, timeout_s: float) -> bool:
        """Ask for timeout_s more before the start/stop timeout fires (e.g. a long drain on stop)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(timeout_s * 1_000_000))}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            self._sock = socket.socket(socket.AF_UNIX, kind)
        return self._sock


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (WATCHDOG_PID absent or ours), as sd_watchdog_enabled."""
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog off", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None  # the watchdog belongs to another process (e.g. our parent)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not an integer; watchdog off", raw_pid)
            return None
    return usec
