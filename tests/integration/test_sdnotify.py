"""sd_notify over a real NOTIFY_SOCKET: messages, watchdog pings, and their end when the loop is blocked."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier
from agent.watchdog import LoopWatchdog, Progress

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time

    from agent.sdnotify import Notifier
    from agent.watchdog import LoopWatchdog


    async def main() -> None:
        notifier = Notifier.from_env(unset_environment=True)
        watchdog = LoopWatchdog(notifier, interval_s=notifier.watchdog_interval_s())
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with asyncio.TaskGroup() as tg:
            pinger = tg.create_task(watchdog.run(), name="watchdog")
            notifier.ready(status="child: running")
            while line := await reader.readline():
                command, arg = line.decode().split()
                if command == "block":
                    time.sleep(float(arg))  # the bug under test: blocking work on the event loop
            notifier.stopping()
            pinger.cancel()


    asyncio.run(main())
    """
)


class NotifyListener:
    """The service manager's end: a bound AF_UNIX datagram socket that records who sent what."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        # Like systemd: have the kernel attach the sender's credentials, so NotifyAccess=main can be judged.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout_s: float) -> tuple[int, list[str]] | None:
        """(sender pid, assignments) of the next datagram, or None if none came within timeout_s."""
        self.sock.settimeout(timeout_s)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDS.unpack(payload[: _CREDS.size])[0]
        return pid, data.decode().split("\n")

    def receive_until(self, wanted: str, timeout_s: float) -> list[tuple[int, list[str]]]:
        """Every datagram up to and including the first containing an assignment starting with `wanted`."""
        seen: list[tuple[int, list[str]]] = []
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is None:
                break
            seen.append(got)
            if any(a.startswith(wanted) for a in got[1]):
                return seen
        raise AssertionError(f"no {wanted!r} within {timeout_s} s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path (named after these long test names) may not fit.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def listener(short_dir: Path) -> Iterator[tuple[NotifyListener, str]]:
    path = str(short_dir / "notify")
    lst = NotifyListener(path)
    yield lst, path
    lst.close()


def test_each_notification_arrives_as_one_datagram_of_assignments(
    listener: tuple[NotifyListener, str],
) -> None:
    lst, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="polling 3 devices")
    assert notifier.status("link down\nretrying")
    assert notifier.watchdog()
    assert notifier.extend_timeout(12.5)
    assert notifier.reloading()
    assert notifier.stopping()
    got = [lst.receive(2.0) for _ in range(6)]
    assert all(g is not None and g[0] == os.getpid() for g in got)
    messages = [g[1] for g in got if g is not None]
    assert messages[0] == ["READY=1", "STATUS=polling 3 devices"]
    assert messages[1] == ["STATUS=link down retrying"]  # one line: a newline would start a bogus assignment
    assert messages[2] == ["WATCHDOG=1"]
    assert messages[3] == ["EXTEND_TIMEOUT_USEC=12500000"]
    assert messages[4][0] == "RELOADING=1" and messages[4][1].startswith("MONOTONIC_USEC=")
    assert int(messages[4][1].split("=")[1]) > 0
    assert messages[5] == ["STOPPING=1"]
    notifier.close()


def test_an_abstract_notify_socket_is_reached() -> None:
    name = f"fieldgate-test-{uuid.uuid4().hex}"
    lst = NotifyListener(b"\0" + name.encode())
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        got = lst.receive(2.0)
        assert got is not None and got[1] == ["READY=1"]
        notifier.close()
    finally:
        lst.close()


def test_outside_systemd_every_notification_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready(status="x")
    assert not notifier.watchdog()
    assert notifier.watchdog_interval_s() is None
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_the_watchdog_interval_is_ours_only_when_watchdog_pid_is_absent_or_our_pid() -> None:
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s() == 30.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval_s() == 4.0
    other = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval_s() is None
    assert Notifier.from_env({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None
    assert Notifier.from_env({"WATCHDOG_USEC": "soon"}).watchdog_interval_s() is None


def test_unset_environment_keeps_child_processes_from_notifying_in_our_name() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()),
           "PATH": "/bin"}
    notifier = Notifier.from_env(env, unset_environment=True)
    assert notifier.enabled and notifier.watchdog_interval_s() == 1.0
    assert env == {"PATH": "/bin"}


def test_a_notify_socket_that_went_away_is_reported_not_raised(short_dir: Path) -> None:
    path = str(short_dir / "gone")
    lst = NotifyListener(path)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.watchdog()
    lst.close()
    os.unlink(path)
    assert not notifier.watchdog()
    notifier.close()


async def test_a_stalled_critical_task_stops_the_pings_and_is_named_in_the_status(
    listener: tuple[NotifyListener, str],
) -> None:
    lst, path = listener
    lst.sock.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    healthy, stuck = Progress(), Progress()
    watchdog = LoopWatchdog(notifier, interval_s=1.0, critical={"pipeline": healthy, "forwarder": stuck},
                            stall_after_s=1.5, max_lag_s=5.0)  # a busy CI host must not trip the lag check
    received: list[str] = []

    async def keep_pipeline_alive() -> None:
        while True:
            healthy.mark()
            await asyncio.sleep(0.05)

    async def collect_until_status() -> None:
        while not any(m.startswith("STATUS=") for m in received):
            received.extend((await loop.sock_recv(lst.sock, 4096)).decode().split("\n"))

    async with asyncio.TaskGroup() as tg:
        pinger = tg.create_task(watchdog.run(), name="watchdog")
        alive = tg.create_task(keep_pipeline_alive(), name="pipeline")
        async with asyncio.timeout(10):
            await collect_until_status()
        pings_before = received.count("WATCHDOG=1")
        # Three more ping periods: the verdict latched, so no ping may follow the STATUS.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await loop.sock_recv(lst.sock, 4096)
        pinger.cancel()
        alive.cancel()
    assert pings_before >= 2
    status = next(m for m in received if m.startswith("STATUS="))
    assert "critical task forwarder made no progress" in status
    assert "pipeline" not in status
    assert received[-1] == status
    notifier.close()


@pytest.mark.timeout(30)
def test_watchdog_pings_flow_while_healthy_and_stop_for_good_once_the_child_blocks_its_loop(
    listener: tuple[NotifyListener, str],
) -> None:
    lst, path = listener
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1500000",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert child.stdin is not None
        ready = lst.receive_until("READY=1", timeout_s=15)
        assert ready[-1] == (child.pid, ["READY=1", "STATUS=child: running"])
        pings = lst.receive_until("WATCHDOG=1", 5) + lst.receive_until("WATCHDOG=1", 5)
        pings += lst.receive_until("WATCHDOG=1", 5)
        assert {pid for pid, _ in pings} == {child.pid}  # NotifyAccess=main would accept them

        child.stdin.write(b"block 1.6\n")  # longer than WatchdogSec and than the 0.5 s lag limit
        child.stdin.flush()
        # While blocked the heartbeat cannot run; afterwards it sees the lag, reports it, and stays silent.
        after_block = lst.receive_until("STATUS=", timeout_s=10)
        status = after_block[-1][1]
        assert status[0].startswith("STATUS=unhealthy: event loop lagged"), status
        assert sum(m == ["WATCHDOG=1"] for _, m in after_block) <= 1  # at most one already in flight
        assert lst.receive(timeout_s=2.5) is None  # over three ping periods: pings never resume
        assert child.poll() is None  # still running: it is systemd's job to kill it

        child.stdin.close()
        assert child.wait(timeout=10) == 0
        assert lst.receive_until("STOPPING=1", 2)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
