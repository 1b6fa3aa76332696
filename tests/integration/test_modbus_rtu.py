"""ModbusDriver over Modbus RTU: several unit ids on one paced socat pty line, bad answers, dead units."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.base import CardReading, Quality, Reading
from drivers.modbus.driver import ModbusDriver, poll_once
from hil.pty import pty_pair
from hil.wellsite import Wellsite, agent_devices_for
from tests.conftest import require_binary

pytestmark = pytest.mark.integration

T0_S = 1_714_950_000.0
BAUD = 115200  # fast enough to keep tests short; the card benchmark runs at 19200


class FakeClock:
    def __init__(self, now_s: float = T0_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def line(tmp_path: Path):
    require_binary("socat")
    clock = FakeClock()
    async with pty_pair(tmp_path / "sim", tmp_path / "agent") as pair:
        ws = Wellsite(3, seed=5, transport="rtu", serial_port=str(pair.a), agent_serial_port=str(pair.b),
                      baudrate=BAUD, card_interval_s=600.0, clock=clock, conditions={3: 1209})
        async with ws:
            yield ws, clock


def readings(items: list[Reading | CardReading], device: str) -> dict[str, Reading]:
    return {r.point: r for r in items if isinstance(r, Reading) and r.device == device}


async def test_three_units_on_one_line_read_their_own_registers(line):
    ws, _ = line
    devices = agent_devices_for(ws, timeout_s=0.5)
    items = await poll_once(devices)
    for d in devices:
        got = readings(items, d.name)
        assert len(got) == len(d.points)
        for r in got.values():
            assert r.quality == Quality.GOOD, r
            assert r.value == ws.well(d.name).value(r.point), r.point
        cards = [c for c in items if isinstance(c, CardReading) and c.device == d.name]
        assert len(cards) == 1 and cards[0].quality == Quality.GOOD
        assert cards[0].load_kn == ws.well(d.name).cards()[-1].load_kn
    assert ws.well("well-001").value("spm") != ws.well("well-002").value("spm")


@pytest.mark.parametrize(("fault", "reason"), [
    ("crc", "crc error"),
    ("garbage", "garbage"),
    ("short", "short frame"),
    ("wrong_unit", "wrong unit id 3"),
    ("silent", "timeout"),
    ("busy", "exception 06 device busy"),
])
async def test_a_bad_answer_makes_that_units_readings_bad_and_the_others_stay_good(line, fault, reason):
    ws, _ = line
    ws.set_fault("well-002", fault)
    devices = agent_devices_for(ws, timeout_s=0.3, retries=1)
    items = await poll_once(devices)
    bad = readings(items, "well-002")
    assert bad and all(r.quality == Quality.BAD and r.reason == reason for r in bad.values()), bad
    for name in ("well-001", "well-003"):
        good = readings(items, name)
        assert good and all(r.quality == Quality.GOOD for r in good.values()), name
    # the line recovers as soon as the unit answers properly again
    ws.set_fault("well-002", "none")
    again = readings(await poll_once(devices[1:2]), "well-002")
    assert all(r.quality == Quality.GOOD for r in again.values())


async def test_a_dead_unit_is_quarantined_and_does_not_stall_the_bus(line):
    ws, _ = line
    ws.set_fault("well-001", "silent")
    devices = agent_devices_for(ws, poll_interval_s=0.05, card_interval_s=3600.0, timeout_s=0.2, retries=1)
    driver = ModbusDriver(devices)
    seen: list[Reading | CardReading] = []
    enough = asyncio.Event()

    def emit(item: Reading | CardReading) -> None:
        seen.append(item)
        rounds = [sum(1 for r in seen if isinstance(r, Reading) and r.device == d and r.point == "spm"
                      and r.quality == Quality.GOOD) for d in ("well-002", "well-003")]
        if min(rounds) >= 5 and any(r.device == "well-001" for r in seen):
            enough.set()

    async with asyncio.timeout(20):  # a guard against a hang, not a performance assertion
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(driver.run(emit), name="driver-under-test")
            await enough.wait()
            task.cancel()
    dead = [r for r in seen if r.device == "well-001"]
    assert {r.reason for r in dead} == {"timeout"}
    assert len(dead) == len(devices[0].points)  # one failure round: quarantined, not retried every poll
    assert driver.status()["well-001"] == (Quality.BAD, "timeout")


async def test_writes_on_the_line_are_confirmed_by_read_back(line):
    ws, _ = line
    driver = ModbusDriver(agent_devices_for(ws, timeout_s=0.5))
    try:
        hz = await driver.write("well-002/vfd_set_frequency", 42.5)  # function 16, two registers
        minutes = await driver.write("well-002/card_interval", 15)  # function 06
        refused = await driver.write("well-002/card_set_points", 20)  # the RTU answers exception 03
    finally:
        driver.close()
    assert (hz.quality, hz.value) == (Quality.GOOD, 42.5)
    assert (minutes.quality, minutes.value) == (Quality.GOOD, 15)
    assert ws.well("well-002").value("vfd_set_frequency") == 42.5
    assert refused.quality == Quality.BAD and refused.reason == "exception 03 illegal data value"
    assert ws.well("well-002").value("card_set_points") == 200
