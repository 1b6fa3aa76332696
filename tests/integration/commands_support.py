"""Rig for the operations tests: our broker (process), a simulated wellsite, an in-process agent, an operator.

Test modules turn the fixture bodies into fixtures:
    broker_port = pytest.fixture(name="broker_port")(broker_process)
    site = pytest.fixture(name="site")(wellsite)
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import tomli_w

from agent.app import Agent
from agent.config import parse_toml
from agent.ops import resolve_startup_config
from cloud_broker.operator import OperatorClient, connect, new_command, request
from hil.net import free_port, wait_tcp_listening
from hil.wellsite import Wellsite
from uplink.schema.commands import Command, Response

BIN = Path(sys.executable).parent
AGENT_ID = "well-test-1"


def broker_process(tmp_path: Path) -> Iterator[int]:
    """Fixture body: our broker as a process on a free loopback port (checked to be ours)."""
    port = free_port()
    log = open(tmp_path / "broker.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "cloud-broker"), "run", "--tcp", f"127.0.0.1:{port}", "--allow-anonymous"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_tcp_listening(port, proc.pid, 20.0)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def wellsite() -> AsyncIterator[Wellsite]:
    """Fixture body: two simulated A11 wells on one Modbus TCP port."""
    ws = Wellsite(2, seed=5, card_interval_s=600.0)
    await ws.start()
    try:
        yield ws
    finally:
        await ws.stop()


def device(ws: Wellsite, index: int, **extra: Any) -> dict[str, Any]:
    name, host, port, unit = ws.endpoints[index]
    return {
        "name": name,
        "host": host,
        "port": port,
        "unit_id": unit,
        "profile": "a11",
        "card": False,
        "poll_interval_s": 0.3,
        "timeout_s": 0.5,
        "retries": 0,
        **extra,
    }


def config_doc(
    data_dir: Path,
    broker_port: int,
    devices: list[dict[str, Any]],
    *,
    version: str = "1",
    commands: dict[str, Any] | None = None,
    metrics_port: int | None = None,
    protocol_level: int = 5,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": version,
        "agent": {"id": AGENT_ID, "data_dir": str(data_dir), "drain_on_stop_s": 1.0},
        "uplink": {
            "host": "127.0.0.1",
            "port": broker_port,
            "keep_alive_s": 5,
            "protocol_level": protocol_level,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 0.5,
        },
        "pipeline": {"flush_interval_s": 0.02},
        "commands": {"health_gate_s": 5.0, **(commands or {})},
        "status": {"interval_s": 60.0},
        "modbus": devices,
    }
    if metrics_port is not None:
        doc["metrics"] = {"port": metrics_port}
    return doc


def toml(doc: dict[str, Any]) -> str:
    return tomli_w.dumps(doc)


@contextlib.asynccontextmanager
async def running_agent(doc: dict[str, Any]) -> AsyncIterator[Agent]:
    """The agent as `edge-agent run` would start it from this base config (a committed push wins)."""
    text = toml(doc)
    cfg, used_text, source = resolve_startup_config(parse_toml(text), text)
    agent = Agent(cfg, config_text=used_text, config_source=source)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(agent.run(), name="agent-under-test")
        try:
            async with asyncio.timeout(10):
                await agent.link.wait_connected()
            yield agent
        finally:
            agent.stop()
            async with asyncio.timeout(20):
                await asyncio.wait([task])


@contextlib.asynccontextmanager
async def operator(
    broker_port: int, name: str = "op", protocol_level: int = 5
) -> AsyncIterator[OperatorClient]:
    async with connect(
        "127.0.0.1", broker_port, client_id=f"operator-{name}", protocol_level=protocol_level
    ) as client:
        yield client


async def ask(
    client: OperatorClient,
    name: str,
    args: dict[str, Any] | None = None,
    *,
    cmd: Command | None = None,
    timeout_s: float = 30.0,
    **kw: Any,
) -> Response:
    cmd = cmd or new_command(name, args or {})
    resp = await request(client, AGENT_ID, cmd, timeout_s=timeout_s, **kw)
    assert resp is not None, f"no answer to {cmd.name} {cmd.id}"
    return resp


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        # Polls agent state that has no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
