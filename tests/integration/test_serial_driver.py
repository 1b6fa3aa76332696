"""SerialDriver lifecycle without a simulator: absent ports, backoff reporting, configuration checks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.base import CardReading, Quality, Reading
from drivers.serial.config import NmeaProtocol, SerialPortConfig, SlcanProtocol
from drivers.serial.dbc import DbcError
from drivers.serial.driver import SerialDriver

pytestmark = pytest.mark.integration


def nmea(name: str, port: Path) -> SerialPortConfig:
    return SerialPortConfig(name=name, port=str(port), protocol=NmeaProtocol(), reopen_initial_s=0.01,
                            reopen_max_s=0.02)


async def test_an_absent_port_is_reported_bad_once_and_retried_without_stalling_the_others(
        tmp_path: Path) -> None:
    driver = SerialDriver([nmea("missing", tmp_path / "nope"), nmea("also-missing", tmp_path / "nada")])
    got: list[Reading | CardReading] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(driver.run(got.append), name="serial-driver")
        for _ in range(500):  # bounded wait for a few retries of both ports (a few ms each)
            if driver.stats("missing").open_failures >= 5 and driver.stats("also-missing").open_failures >= 5:
                break
            await asyncio.sleep(0.01)
        task.cancel()
    assert driver.stats("missing").open_failures >= 5
    assert driver.stats("also-missing").open_failures >= 5
    # One BAD status per port for the whole series of failed opens, not one per retry.
    assert sorted((r.device, r.point, r.quality) for r in got if isinstance(r, Reading)) == [
        ("also-missing", "link", Quality.BAD), ("missing", "link", Quality.BAD)]
    assert all(isinstance(r, Reading) and r.reason and "cannot open" in r.reason for r in got)


def test_duplicate_port_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SerialDriver([nmea("a", tmp_path / "x"), nmea("a", tmp_path / "y")])


def test_a_missing_dbc_file_fails_at_construction_not_at_run_time(tmp_path: Path) -> None:
    cfg = SerialPortConfig(name="can", port=str(tmp_path / "can"),
                           protocol=SlcanProtocol(dbc=str(tmp_path / "none.dbc")))
    with pytest.raises(DbcError):
        SerialDriver([cfg])


async def test_writes_are_refused_with_a_bad_reading(tmp_path: Path) -> None:
    driver = SerialDriver([nmea("gps", tmp_path / "gps")], clock_ns=lambda: 42)
    r = await driver.write("lat_deg", 1.0)
    assert r.quality is Quality.BAD and r.ts_ns == 42 and r.reason is not None and "read-only" in r.reason
