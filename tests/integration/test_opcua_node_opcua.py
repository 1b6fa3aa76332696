"""Interop: our OPC UA driver against a server built on node-opcua, an implementation we did not write.

Needs `node` and the npm project in tests/interop/node_opcua. `./run setup` installs it with
`npm ci --prefix tests/interop/node_opcua`; when node_modules is missing this module runs that once,
under a file lock so parallel sessions do not race, and fails under CI=true if it cannot.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.base import Quality
from drivers.opcua.config import OpcUaPoint, OpcUaServer
from hil.net import free_port, wait_tcp_listening
from tests.conftest import IN_CI, require_binary
from tests.integration.opcua_support import running

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROJECT = Path(__file__).resolve().parents[1] / "interop" / "node_opcua"
WELL = "1:Wellsite/1:Well01"


def _ensure_node_modules() -> None:
    if (PROJECT / "node_modules" / "node-opcua-server").is_dir():
        return
    npm = require_binary("npm")
    with open(PROJECT / ".npm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (PROJECT / "node_modules" / "node-opcua-server").is_dir():
            return  # another session installed it while we waited
        done = subprocess.run(
            [npm, "ci", "--prefix", str(PROJECT), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        msg = f"npm ci in {PROJECT} failed (./run setup installs it):\n{done.stderr[-2000:]}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    node = require_binary("node")
    _ensure_node_modules()
    port = free_port()
    proc = subprocess.Popen(
        [node, str(PROJECT / "server.js"), str(port)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Checked to be our process before use: another program may share the host.
        wait_tcp_listening(port, pid=proc.pid, timeout_s=60.0)
        yield f"opc.tcp://127.0.0.1:{port}/fieldgate/interop"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def config(endpoint: str, *points: OpcUaPoint, **kw: object) -> OpcUaServer:
    base: dict[str, object] = {
        "name": "node",
        "endpoint": endpoint,
        "points": points,
        "publishing_interval_s": 0.1,
        "poll_interval_s": 0.1,
        "keepalive_s": 1.0,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    base.update(kw)
    return OpcUaServer(**base)  # type: ignore[arg-type]


async def test_our_driver_subscribes_to_a_node_opcua_server_by_node_id_and_browse_path(endpoint: str) -> None:
    points = (
        OpcUaPoint(name="tubing", node_id="ns=1;s=Well01.TubingPressure"),
        OpcUaPoint(name="temperature", browse_path=f"{WELL}/1:Temperature"),
        OpcUaPoint(name="run", browse_path=f"{WELL}/1:RunStatus"),
        OpcUaPoint(name="faulty", node_id="ns=1;s=Well01.Faulty"),
    )
    async with running(config(endpoint, *points)) as (_, got):
        await got.value("temperature", 42.5)
        await got.value("run", True)
        faulty = await got.wait_for(lambda r: r.point == "faulty")
        assert (faulty.quality, faulty.reason, faulty.value) == (Quality.BAD, "BadSensorFailure", None)
        await got.count("tubing", 3, since=0)  # node-opcua bumps it every 200 ms
        tubing = got.of("tubing")
        assert all(r.quality is Quality.GOOD and isinstance(r.value, float) for r in tubing)
        assert all(r.source_ts_ns is not None for r in tubing)
        assert len({r.value for r in tubing}) == len(tubing)


async def test_node_opcua_applies_our_absolute_deadband_filter(endpoint: str) -> None:
    point = OpcUaPoint(
        name="tubing", node_id="ns=1;s=Well01.TubingPressure", deadband_abs=0.025, queue_size=10
    )
    async with running(config(endpoint, point)) as (_, got):
        await got.count("tubing", 3, since=0)
        values = [r.value for r in got.of("tubing") if isinstance(r.value, float)]
        steps = [abs(b - a) for a, b in itertools.pairwise(values)]
        assert steps and min(steps) > 0.025, values  # the server steps by 0.01: most changes were held back


async def test_a_deadband_the_server_refuses_for_a_boolean_is_applied_by_the_driver_instead(
    endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Part 4 §7.22.2: an absolute deadband on a non-numeric variable is BadFilterNotAllowed; the
    # item is then created without the filter (still monitored, not polled).
    point = OpcUaPoint(name="run", node_id="ns=1;s=Well01.RunStatus", deadband_abs=0.5)
    caplog.set_level(logging.WARNING, logger="drivers.opcua.driver")
    async with running(config(endpoint, point)) as (_, got):
        await got.value("run", True)
    assert "polling it" not in caplog.text


async def test_our_driver_polls_a_node_opcua_server(endpoint: str) -> None:
    points = (
        OpcUaPoint(name="temperature", node_id="ns=1;s=Well01.Temperature"),
        OpcUaPoint(name="faulty", browse_path=f"{WELL}/1:Faulty"),
    )
    async with running(config(endpoint, *points, mode="poll")) as (_, got):
        await got.count("temperature", 3, since=0)
        assert {r.value for r in got.of("temperature")} == {42.5}
        assert {r.reason for r in got.of("faulty")} == {"BadSensorFailure"}


async def test_a_write_to_a_node_opcua_server_is_read_back(endpoint: str) -> None:
    points = (
        OpcUaPoint(name="setpoint", browse_path=f"{WELL}/1:Setpoint", writable=True),
        OpcUaPoint(name="temperature", node_id="ns=1;s=Well01.Temperature", writable=True),
    )
    async with running(config(endpoint, *points)) as (driver, got):
        await got.wait_for(lambda r: r.point == "setpoint" and r.quality is Quality.GOOD)
        done = await driver.write("setpoint", 12.5)
        assert (done.quality, done.value, done.reason) == (Quality.GOOD, 12.5, None)
        await got.value("setpoint", 12.5)  # and the subscription saw the change too
        refused = await driver.write("temperature", 1.0)  # read-only on the server
        assert (refused.quality, refused.reason) == (Quality.BAD, "BadNotWritable")
