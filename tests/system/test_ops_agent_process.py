"""System: `edge-agent run` as a process: the will on SIGKILL, agent.restart's exit 75, the operator CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_broker.operator import connect, fleet
from hil.net import free_port
from hil.wellsite import Wellsite
from tests.integration.commands_support import (
    AGENT_ID,
    broker_process,
    config_doc,
    device,
    toml,
    wellsite,
)
from uplink.schema.commands import AgentStatus

pytestmark = pytest.mark.system
broker_port = pytest.fixture(name="broker_port")(broker_process)
site = pytest.fixture(name="site")(wellsite)
BIN = Path(sys.executable).parent


def start_agent(tmp_path: Path, text: str) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - owned by the child
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env
    )


def operator_cli(broker: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud_broker.operator",
            *args,
            "--broker",
            f"127.0.0.1:{broker}",
            "--timeout-s",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def status_of(broker: int, want: str, timeout_s: float = 15.0) -> AgentStatus:
    async with asyncio.timeout(timeout_s):
        while True:
            async with connect("127.0.0.1", broker, client_id="op-status") as op:
                got = (await fleet(op, quiet_s=0.3, max_wait_s=2)).get(AGENT_ID)
            if got is not None and got.state == want:
                return got
            await asyncio.sleep(0.2)


def tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""


@pytest.mark.timeout(90)
async def test_a_killed_agent_leaves_its_will_and_a_restart_command_restarts_with_exit_75(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    text = toml(
        config_doc(tmp_path / "data", broker_port, [device(site, 0)], version="v1", metrics_port=free_port())
    )
    proc = start_agent(tmp_path, text)
    try:
        born = await status_of(broker_port, "online")
        assert born.config_version == "v1"
        table = await asyncio.to_thread(operator_cli, broker_port, "agents")
        assert table.returncode == 0 and AGENT_ID in table.stdout and "online" in table.stdout, table
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        will = await status_of(broker_port, "offline")
        assert will.reason == "connection lost"

        proc = start_agent(tmp_path, text)
        await status_of(broker_port, "online")
        done = await asyncio.to_thread(operator_cli, broker_port, "cmd", AGENT_ID, "agent.restart")
        assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("ok:"), done
        rc = await asyncio.to_thread(proc.wait, 30)
        assert rc == 75, tail(tmp_path / "agent.log")
        stopped = await status_of(broker_port, "offline")
        assert stopped.reason == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
async def test_config_push_from_the_operator_cli_shows_progress_and_the_verdict(
    tmp_path: Path, broker_port: int, site: Wellsite
) -> None:
    data = tmp_path / "data"
    proc = start_agent(tmp_path, toml(config_doc(data, broker_port, [device(site, 0)], version="v1")))
    try:
        await status_of(broker_port, "online")
        new = tmp_path / "v2.toml"
        new.write_text(toml(config_doc(data, broker_port, [device(site, 0), device(site, 1)], version="v2")))
        pushed = await asyncio.to_thread(operator_cli, broker_port, "config", "push", AGENT_ID, str(new))
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert "  ... " in pushed.stdout and "ok: applied version v2" in pushed.stdout
        bad = tmp_path / "v3.toml"
        bad.write_text(
            new.read_text()
            .replace('version = "v2"', 'version = "v3"')
            .replace("keep_alive_s = 5", 'keep_alive_s = "5"')
        )
        refused = await asyncio.to_thread(operator_cli, broker_port, "config", "push", AGENT_ID, str(bad))
        assert (
            refused.returncode == 1
            and "invalid" in refused.stdout
            and "uplink.keep_alive_s" in refused.stdout
        )
        got = await asyncio.to_thread(operator_cli, broker_port, "cmd", AGENT_ID, "config.get")
        assert '"version": "v2"' in got.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
