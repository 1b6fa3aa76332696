"""The running agent talks to systemd: READY, STATUS and WATCHDOG while it runs, STOPPING on stop."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import parse_toml
from agent.sdnotify import Notifier
from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    broker_process,
    config_doc,
    device,
    toml,
    wait_for,
    wellsite,
)

pytestmark = pytest.mark.integration
broker_port = pytest.fixture(name="broker_port")(broker_process)
site = pytest.fixture(name="site")(wellsite)


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        try:
            yield path, sock
        finally:
            sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.extend(sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


async def test_the_agent_notifies_ready_pings_the_watchdog_and_asks_for_time_to_drain(
    tmp_path: Path, broker_port: int, site: Wellsite, notify_socket: tuple[str, socket.socket]
) -> None:
    path, sock = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    notifier = Notifier.from_env(env, unset_environment=True)
    assert env == {}
    doc = config_doc(tmp_path / "agent", broker_port, [device(site, 0)], version="3")
    agent = Agent(parse_toml(toml(doc)), notifier=notifier)
    seen: list[str] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(agent.run(), name="agent-under-test")
        await wait_for(lambda: seen.extend(drain(sock)) or seen.count("WATCHDOG=1") >= 2, timeout_s=10)
        agent.stop()
        await asyncio.wait([task])
    seen.extend(drain(sock))
    assert "READY=1" in seen and any(s.startswith("STATUS=running: config 3") for s in seen)
    assert seen.index("READY=1") < seen.index("STOPPING=1")
    extend = [s for s in seen if s.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend and int(extend[0].split("=")[1]) == int((1.0 + 10) * 1_000_000)
    assert agent.watchdog is not None and agent.watchdog.policy.failed is None
