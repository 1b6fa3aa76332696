"""MQTT.js (npm `mqtt`, an independent client) against the `cloud-broker` process over TCP and WebSocket,
at MQTT 3.1.1 and 5.0: QoS 0/1/2, retained messages, wills, persistent sessions (with SQLite state)."""

from __future__ import annotations

import fcntl
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.net import free_port, wait_tcp_listening
from tests.conftest import require_binary
from tests.integration.broker_raw_client import CLI

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[1] / "interop" / "mqttjs"


def ensure_node_modules() -> str:
    """node's path, with the project's locked dependencies installed once (under a file lock)."""
    node = require_binary("node")
    npm = require_binary("npm")
    if (PROJECT / "node_modules" / "mqtt" / "package.json").exists():
        return node
    with open(PROJECT / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (PROJECT / "node_modules" / "mqtt" / "package.json").exists():
            result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(PROJECT)],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"npm ci failed: {result.stderr[-2000:]}"
    return node


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    ports = {"tcp": free_port(), "ws": free_port()}
    proc = subprocess.Popen([CLI, "run", "--tcp", f"127.0.0.1:{ports['tcp']}",
                             "--ws", f"127.0.0.1:{ports['ws']}", "--allow-anonymous",
                             "--data", str(tmp_path_factory.mktemp("state")), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for port in ports.values():
            wait_tcp_listening(port, pid=proc.pid)
        yield ports
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_mqttjs_pub_sub_retained_will_and_persistent_sessions_at_both_levels(
        broker: dict[str, int], transport: str) -> None:
    node = ensure_node_modules()
    args = [node, str(PROJECT / "interop.js"), str(broker[transport])]
    if transport == "ws":
        args.append("--ws")
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=PROJECT)
    checks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = [c for c in checks if not c["ok"]]
    assert not failed, failed
    assert result.returncode == 0, result.stderr
    assert len(checks) == 14  # 7 checks at each of the two protocol levels
