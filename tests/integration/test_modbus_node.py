"""Interop: our Modbus driver against a Modbus TCP server on npm modbus-serial, a stack we did not write.

Needs `node` and the npm project in tests/interop/modbus_node. `./run setup` installs it with
`npm ci --prefix tests/interop/modbus_node --omit=optional` (the optional `serialport` native module is
not needed for ServerTCP); when node_modules is missing this module runs that once, under a file lock
so parallel sessions do not race, and fails under CI=true if it cannot.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.base import Quality, Reading
from drivers.modbus.config import ModbusDevice, ModbusPoint
from drivers.modbus.driver import ModbusDriver, poll_once
from hil.net import free_port, wait_tcp_listening
from tests.conftest import IN_CI, require_binary

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[1] / "interop" / "modbus_node"


def _ensure_node_modules() -> None:
    if (PROJECT / "node_modules" / "modbus-serial").is_dir():
        return
    npm = require_binary("npm")
    with open(PROJECT / ".npm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (PROJECT / "node_modules" / "modbus-serial").is_dir():
            return  # another session installed it while we waited
        done = subprocess.run(
            [npm, "ci", "--prefix", str(PROJECT), "--omit=optional", "--no-audit", "--no-fund"],
            capture_output=True, text=True, timeout=600, check=False,
        )
    if done.returncode != 0:
        msg = f"npm ci in {PROJECT} failed (./run setup installs it):\n{done.stderr[-2000:]}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def node_port() -> Iterator[int]:
    node = require_binary("node")
    _ensure_node_modules()
    port = free_port()
    proc = subprocess.Popen([node, str(PROJECT / "server.js"), str(port), "1"], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Checked to be our process before use: another program may share the host.
        wait_tcp_listening(port, pid=proc.pid, timeout_s=30.0)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hr(name: str, pdu: int, **kw: object) -> ModbusPoint:
    return ModbusPoint(name=name, table="holding", pdu_address=pdu, **kw)  # type: ignore[arg-type]


POINTS = (
    hr("f32", 100, type="f32"),
    hr("u32", 102, type="u32"),
    hr("i16", 104, type="i16"),
    hr("tag", 110, type="string", length=4),
    hr("bit0", 120, type="bits", bit=0),
    hr("bit1", 120, type="bits", bit=1),
    hr("bit7", 120, type="bits", bit=7, writable=True),
    hr("field", 120),
    hr("scaled", 104, type="i16", scale=0.5, offset=10.0),
    ModbusPoint(name="input_f32", table="input", pdu_address=0, type="f32"),
    ModbusPoint(name="coil3", table="coil", pdu_address=3, type="bool"),
    ModbusPoint(name="coil4", table="coil", pdu_address=4, type="bool", writable=True),
    ModbusPoint(name="discrete5", table="discrete_input", pdu_address=5, type="bool"),
    hr("setpoint", 200, type="f32", writable=True),
    hr("words", 210, type="u64", word_order="little", writable=True),
    hr("label", 220, type="string", length=3, writable=True),
)


def device(port: int, *points: ModbusPoint, unit_id: int = 1, **kw: object) -> ModbusDevice:
    return ModbusDevice(name="node", host="127.0.0.1", port=port, unit_id=unit_id,
                        points=points or POINTS, **kw)  # type: ignore[arg-type]


def by_point(items: list) -> dict[str, Reading]:
    return {r.point: r for r in items if isinstance(r, Reading)}


async def test_every_point_type_reads_from_the_node_server(node_port):
    got = by_point(await poll_once([device(node_port)]))
    assert all(r.quality == Quality.GOOD for r in got.values()), got
    assert got["f32"].value == 3.5 and got["u32"].value == 0x12345678 and got["i16"].value == -2
    assert got["tag"].value == "NODE-1" and got["field"].value == 0b10100101
    assert (got["bit0"].value, got["bit1"].value, got["bit7"].value) == (True, False, True)
    assert got["scaled"].value == 9.0 and got["input_f32"].value == -1.25
    assert got["coil3"].value is True and got["coil4"].value is False and got["discrete5"].value is True


async def test_writes_to_the_node_server_are_confirmed_by_read_back(node_port):
    driver = ModbusDriver([device(node_port)])
    try:
        results = [await driver.write("node/setpoint", -7.75), await driver.write("node/words", 2**48 + 5),
                   await driver.write("node/label", "ok!"), await driver.write("node/coil4", True),
                   await driver.write("node/bit7", False)]
    finally:
        driver.close()
    assert all(r.quality == Quality.GOOD for r in results), results
    got = by_point(await poll_once([device(node_port)]))
    assert got["setpoint"].value == -7.75 and got["words"].value == 2**48 + 5 and got["label"].value == "ok!"
    assert got["coil4"].value is True
    assert got["field"].value == 0b00100101  # only bit 7 changed: read-modify-write kept the others


async def test_a_read_past_the_servers_end_is_split_and_only_the_missing_point_is_bad(node_port):
    points = (hr("last", 999), hr("beyond", 1002))
    got = by_point(await poll_once([device(node_port, *points)]))
    assert got["last"].quality == Quality.GOOD
    assert (got["beyond"].quality, got["beyond"].reason) == (Quality.BAD, "exception 02 illegal data address")


async def test_a_unit_id_the_node_server_does_not_serve_times_out(node_port):
    got = by_point(await poll_once([device(node_port, hr("f32", 100, type="f32"), unit_id=9, timeout_s=0.3)]))
    assert (got["f32"].quality, got["f32"].reason) == (Quality.BAD, "timeout")
