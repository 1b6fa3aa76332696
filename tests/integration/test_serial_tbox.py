"""Serial driver vs the T-Box simulator over real socat pty pairs: NMEA, SLCAN+DBC, bad input, replug."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from drivers.base import CardReading, Quality, Reading
from drivers.serial.config import NmeaProtocol, SerialPortConfig, SlcanProtocol
from drivers.serial.driver import SerialDriver
from drivers.serial.port import SerialLink
from hil.pty import PtyPair, pty_pair
from hil.tbox import DEFAULT_DBC, DEFAULT_ROUTE, TboxSimulator
from tests.conftest import require_binary

pytestmark = pytest.mark.integration
SIGNALS = {"EngineSpeed", "VehicleSpeed", "CoolantTemp", "SOC", "PackVoltage", "PackCurrent", "ChargeState"}
WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _socat() -> None:
    require_binary("socat")


def gps_port(path: Path) -> SerialPortConfig:
    return SerialPortConfig(name="gps", port=str(path), protocol=NmeaProtocol(), baudrate=9600,
                            reopen_initial_s=0.05, reopen_max_s=0.2)


def can_port(path: Path, **extra: object) -> SerialPortConfig:
    return SerialPortConfig(name="can", port=str(path), protocol=SlcanProtocol(dbc=str(DEFAULT_DBC)),
                            baudrate=115200, reopen_initial_s=0.05, reopen_max_s=0.2, **extra)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(*runners: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run the given coroutine factories as owned tasks for the duration of the block."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(r(), name=f"test-runner-{i}") for i, r in enumerate(runners)]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()


class Readings(list[Reading]):
    """The emit callback of the tests: keeps every reading and wakes waiters on each one."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def emit(self, reading: Reading | CardReading) -> None:
        assert isinstance(reading, Reading)  # serial devices have no cards
        self.append(reading)
        self.changed.set()

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT_S):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


def good(readings: list[Reading], device: str) -> dict[str, Reading]:
    return {r.point: r for r in readings if r.device == device and r.quality is Quality.GOOD}


async def test_the_driver_reads_the_simulators_positions_and_decimated_can_signals(tmp_path: Path) -> None:
    async with (pty_pair(tmp_path / "gps.sim", tmp_path / "gps"),
                pty_pair(tmp_path / "can.sim", tmp_path / "can")):
        sim = TboxSimulator(str(tmp_path / "gps.sim"), str(tmp_path / "can.sim"))
        driver = SerialDriver([gps_port(tmp_path / "gps"), can_port(tmp_path / "can", report_interval_s=0.2)])
        got = Readings()
        async with running(sim.run, lambda: driver.run(got.emit)):
            await got.wait_for(lambda: {"lat_deg", "lon_deg", "satellites"} <= good(got, "gps").keys()
                           and good(got, "can").keys() >= SIGNALS, "positions and every CAN signal")
    gps = good(got, "gps")
    lats = [p[0] for p in DEFAULT_ROUTE]
    lons = [p[1] for p in DEFAULT_ROUTE]
    assert min(lats) - 1e-6 <= float(gps["lat_deg"].value) <= max(lats) + 1e-6  # type: ignore[arg-type]
    assert min(lons) - 1e-6 <= float(gps["lon_deg"].value) <= max(lons) + 1e-6  # type: ignore[arg-type]
    assert gps["lat_deg"].source_ts_ns is not None
    assert gps["satellites"].value == 9
    # Every reported CAN value is one the simulator put on the wire (decimation never invents values).
    for r in got:
        if r.device == "can" and r.point in SIGNALS:
            assert r.quality is Quality.GOOD
            assert float(r.value) in sim.sent[r.point], r  # type: ignore[arg-type]
    # 10-20 ms messages arrive far more often than they are reported.
    engine_reports = sum(1 for r in got if r.point == "EngineSpeed")
    assert driver.stats("can").frames > 5 * engine_reports
    assert driver.stats("can").frames_rejected == 0 and driver.stats("gps").frames_rejected == 0


async def test_garbled_and_truncated_lines_are_counted_reported_bad_and_the_stream_continues(
        tmp_path: Path) -> None:
    async with (pty_pair(tmp_path / "gps.sim", tmp_path / "gps"),
                pty_pair(tmp_path / "can.sim", tmp_path / "can")):
        sim = TboxSimulator(str(tmp_path / "gps.sim"), str(tmp_path / "can.sim"), corrupt_every=3,
                            nmea_interval_s=0.1)
        driver = SerialDriver([gps_port(tmp_path / "gps"), can_port(tmp_path / "can")])
        got = Readings()

        def recovered(device: str) -> bool:
            bad = [i for i, r in enumerate(got) if r.device == device and r.quality is Quality.BAD]
            return bool(bad) and any(r.device == device and r.quality is Quality.GOOD and r.point != "link"
                                     for r in got[bad[0]:])

        async with running(sim.run, lambda: driver.run(got.emit)):
            await got.wait_for(lambda: recovered("gps") and recovered("can"),
                               "BAD then GOOD readings on both ports")
    gps_bad = [r for r in got if r.device == "gps" and r.quality is Quality.BAD]
    can_bad = [r for r in got if r.device == "can" and r.quality is Quality.BAD]
    assert all(r.point == "link" for r in gps_bad + can_bad)
    assert any(r.reason and "bad checksum" in r.reason for r in gps_bad)
    assert any(r.reason and "truncated" in r.reason for r in can_bad)
    assert driver.stats("gps").frames_rejected >= 1
    assert driver.stats("can").frames_rejected >= 1
    assert sim.stats.corrupted >= 2


async def test_garbage_bytes_on_the_wire_do_not_stop_decoding(tmp_path: Path) -> None:
    garbage_then_frame = bytes(range(256)) * 8 + b"\r" + b"x" * 500 + b"\rt3C12A901\r"

    async def device() -> None:
        # Repeat until the test has seen the frame: bytes written before the driver opened its end
        # of the pty are lost, as on a real line.
        link = await SerialLink.open_path(str(tmp_path / "dev"))
        try:
            while True:
                link.write(garbage_then_frame)
                await asyncio.sleep(0.1)
        finally:
            await link.close()

    async with pty_pair(tmp_path / "dev", tmp_path / "agent"):
        driver = SerialDriver([can_port(tmp_path / "agent")])
        got = Readings()
        async with running(device, lambda: driver.run(got.emit)):
            await got.wait_for(lambda: "SOC" in good(got, "can"), "a frame after the garbage")
    stats = driver.stats("can")
    assert stats.frames_dropped >= 1  # the 2 KB line without CR is longer than any SLCAN line
    assert stats.bytes_dropped >= 1000
    assert good(got, "can")["SOC"].value == pytest.approx(84.5)


async def test_a_vanishing_pty_is_reported_and_reopened_when_it_returns(tmp_path: Path) -> None:
    a, b = tmp_path / "can.sim", tmp_path / "can"
    pair = await PtyPair.start(a, b)
    sim = TboxSimulator(None, str(a))
    driver = SerialDriver([can_port(b)])
    got = Readings()
    try:
        async with running(sim.run, lambda: driver.run(got.emit)):
            await got.wait_for(lambda: "EngineSpeed" in good(got, "can"), "CAN signals before the unplug")
            await pair.stop()  # the USB adapter is unplugged
            await got.wait_for(lambda: any(r.point == "link" and r.quality is Quality.BAD for r in got),
                           "the link to be reported BAD")
            lost_at = len(got)
            pair = await PtyPair.start(a, b)  # ... and plugged back in
            await got.wait_for(lambda: any(r.point == "EngineSpeed" for r in got[lost_at:]),
                           "CAN signals after the replug")
    finally:
        await pair.stop()
    stats = driver.stats("can")
    assert stats.losses >= 1 and stats.opens >= 2
    bad = next(r for r in got if r.point == "link" and r.quality is Quality.BAD)
    assert bad.reason is not None and "lost" in bad.reason
    assert any(r.point == "link" and r.quality is Quality.GOOD for r in got[lost_at:])
