"""ModbusDriver over Modbus TCP against the wellsite simulator: bad answers, learned limits, writes."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from msgspec.structs import replace

from drivers.base import CardReading, Quality, Reading
from drivers.modbus.config import ModbusPoint, a11_points
from drivers.modbus.driver import ModbusDriver, poll_once
from hil.a11_map import A11Map, vendor_variant_map
from hil.net import free_port
from hil.wellsite import Wellsite, agent_devices_for

pytestmark = pytest.mark.integration

T0_S = 1_714_950_000.0


class FakeClock:
    def __init__(self, now_s: float = T0_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def readings(items: list[Reading | CardReading], device: str) -> dict[str, Reading]:
    return {r.point: r for r in items if isinstance(r, Reading) and r.device == device}


def card_of(items: list[Reading | CardReading], device: str) -> CardReading:
    (card,) = [c for c in items if isinstance(c, CardReading) and c.device == device]
    return card


@pytest.mark.parametrize(("fault", "reason"), [
    ("garbage", "garbage"),
    ("short", "short frame"),
    ("wrong_unit", "wrong unit id 3"),
    ("silent", "timeout"),
    ("disconnect", "disconnected"),
    ("busy", "exception 06 device busy"),
])
async def test_a_bad_answer_over_tcp_is_bad_for_that_unit_only(fault, reason):
    async with Wellsite(3, seed=2, clock=FakeClock()) as ws:
        ws.set_fault("well-002", fault)
        devices = agent_devices_for(ws, timeout_s=0.3, retries=1)
        items = await poll_once(devices)
        bad = readings(items, "well-002")
        assert bad and {r.reason for r in bad.values()} == {reason}
        assert all(r.quality == Quality.BAD for r in bad.values())
        for name in ("well-001", "well-003"):
            assert all(r.quality == Quality.GOOD for r in readings(items, name).values()), name
            assert card_of(items, name).quality == Quality.GOOD


async def test_a_strict_rtu_teaches_the_driver_its_map_once_and_every_value_reads_good():
    async with Wellsite(1, seed=3, strict=True, clock=FakeClock()) as ws:
        (device,) = agent_devices_for(ws)
        driver = ModbusDriver([device])
        seen: list[Reading | CardReading] = []
        try:
            await driver.acquire_once(device.name)
            learned = driver.limits(device.name)
            requests_first = driver.requests_sent()
            seen = await driver.acquire_once(device.name, card=False)
            requests_again = driver.requests_sent() - requests_first
            planned = len(driver.plan(device.name))
        finally:
            driver.close()
        assert learned.forbidden.get("holding")  # it learned which gaps the RTU refuses
        assert all(r.quality == Quality.GOOD for r in seen if isinstance(r, Reading))
        assert len(seen) == len(device.points)
        # with the learned plan, a poll costs exactly its planned requests: nothing is refused any more
        assert requests_again == planned


async def test_a_strict_rtu_card_is_captured_after_learning():
    async with Wellsite(1, seed=3, strict=True, clock=FakeClock()) as ws:
        items = await poll_once(agent_devices_for(ws))
        card = card_of(items, "well-001")
        assert card.quality == Quality.GOOD, card.reason
        assert card.load_kn == ws.well("well-001").cards()[-1].load_kn


async def test_a_device_refusing_long_reads_gets_shorter_ones_and_the_card_still_reads():
    async with Wellsite(1, seed=4, max_registers=60, clock=FakeClock()) as ws:
        (device,) = agent_devices_for(ws)
        driver = ModbusDriver([device])
        try:
            seen = await driver.acquire_once(device.name)
            cap = driver.limits(device.name).max_count["holding"]
        finally:
            driver.close()
        assert cap <= 60
        assert all(r.quality == Quality.GOOD for r in seen if isinstance(r, Reading))
        card = next(c for c in seen if isinstance(c, CardReading))
        assert card.quality == Quality.GOOD and card.n_points == 200


async def test_a_vendor_variant_decodes_the_same_card_to_the_same_metres():
    clock = FakeClock()
    async with Wellsite(1, seed=8, clock=clock) as plain, \
            Wellsite(1, seed=8, clock=clock, amap=vendor_variant_map()) as variant:
        a = card_of(await poll_once(agent_devices_for(plain)), "well-001")
        b_items = await poll_once(agent_devices_for(variant))
        b = card_of(b_items, "well-001")
    assert a.quality == b.quality == Quality.GOOD
    assert b.position_m == pytest.approx(a.position_m, abs=1e-9)
    # the variant's displacement registers hold millimetres, the default's centimetres
    raw_a = a.raw_registers[1000][:5]
    raw_b = next(words for start, words in b.raw_registers.items() if start == 1000)[:5]
    assert [10 * w for w in raw_a] == list(raw_b)
    extras = readings(b_items, "well-001")
    assert extras["vendor_status"].quality == Quality.GOOD and "vendor_b10" in extras


EXTRA_POINTS = (
    ModbusPoint(name="pump_enable", address=1, type="bool", writable=True),  # coil 0
    ModbusPoint(name="pump_lamp", address=2, type="bool", writable=True),  # coil 1
    ModbusPoint(name="flag_local", address=40050, type="bits", bit=0, writable=True),
    ModbusPoint(name="flag_alarm", address=40050, type="bits", bit=3, writable=True),
    ModbusPoint(name="flags", address=40050, type="u16"),
    ModbusPoint(name="tag", address=40060, type="string", length=4, writable=True),
    ModbusPoint(name="setpoint_cdab", address=40070, type="f32", word_order="little", writable=True),
    ModbusPoint(name="counter_i64", address=40080, type="i64", writable=True),
)


async def test_coils_bits_strings_and_word_orders_are_written_and_confirmed_end_to_end():
    amap = A11Map(points=a11_points() + EXTRA_POINTS)
    async with Wellsite(1, seed=9, amap=amap, clock=FakeClock()) as ws:
        driver = ModbusDriver(agent_devices_for(ws))
        try:
            results = {
                "coil": await driver.write("well-001/pump_lamp", True),
                "bit3": await driver.write("well-001/flag_alarm", True),
                "bit0": await driver.write("well-001/flag_local", True),
                "bit3_off": await driver.write("well-001/flag_alarm", False),
                "tag": await driver.write("well-001/tag", "WX-7"),
                "cdab": await driver.write("well-001/setpoint_cdab", -12.25),
                "i64": await driver.write("well-001/counter_i64", -(2**40) - 3),
            }
            after = readings(await poll_once(agent_devices_for(ws)), "well-001")
        finally:
            driver.close()
    assert all(r.quality == Quality.GOOD for r in results.values()), results
    assert ws.well("well-001").coils == [0, 1]
    # read-modify-write kept bit 0 while bit 3 went on and off again
    assert after["flags"].value == 0b0001
    assert after["flag_local"].value is True and after["flag_alarm"].value is False
    assert after["tag"].value == "WX-7" and after["pump_lamp"].value is True
    assert after["setpoint_cdab"].value == -12.25 and after["counter_i64"].value == -(2**40) - 3
    w = ws.well("well-001")
    low, high = w.image[69:71]  # Modicon 40070 is PDU address 69
    assert (high << 16 | low) == 0xC1440000  # -12.25 as f32, low word first on the wire


async def test_writing_an_input_only_point_or_an_unwritable_one_is_refused_before_the_wire():
    async with Wellsite(1, seed=9, clock=FakeClock()) as ws:
        driver = ModbusDriver(agent_devices_for(ws))
        try:
            with pytest.raises(PermissionError):
                await driver.write("well-001/spm", 3.0)
        finally:
            driver.close()
        assert driver.requests_sent() == 0


async def test_an_unexpected_error_in_one_device_is_contained_and_the_others_keep_polling(caplog):
    async with Wellsite(2, seed=6, clock=FakeClock()) as ws:
        devices = agent_devices_for(ws, poll_interval_s=0.05, card_interval_s=3600.0)
        driver = ModbusDriver(devices)
        seen: list[Reading | CardReading] = []
        enough = asyncio.Event()

        def emit(item: Reading | CardReading) -> None:
            if item.device == "well-001" and item.quality == Quality.GOOD:
                raise RuntimeError("a bug in processing well-001's values")
            seen.append(item)
            if sum(1 for r in seen if r.device == "well-002" and isinstance(r, Reading)
                   and r.point == "spm") >= 5:
                enough.set()

        async with asyncio.timeout(20):  # a guard against a hang, not a performance assertion
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(driver.run(emit), name="driver-under-test")
                await enough.wait()
                task.cancel()
    broken = [r for r in seen if r.device == "well-001"]
    assert broken and {r.reason for r in broken} == {"internal error: RuntimeError"}
    assert driver.status()["well-001"] == (Quality.BAD, "internal error: RuntimeError")
    assert "failed unexpectedly" in caplog.text, "logged"


class SteppedClock:
    """Monotonic seconds that only move when the driver sleeps (the driver's time seam)."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, delay_s: float) -> None:
        self.now_s += delay_s
        await asyncio.sleep(0)


async def test_quarantine_backs_off_doubling_up_to_the_maximum_on_a_fake_clock():
    clock = SteppedClock()
    dead = agent_devices_for([("dead", "127.0.0.1", free_port(), 1)], poll_interval_s=0.5,
                             card_interval_s=3600.0, timeout_s=0.2)[0]
    dead = replace(dead, quarantine_s=5.0, quarantine_max_s=30.0, card=None)
    driver = ModbusDriver([dead], monotonic=clock, sleep=clock.sleep)
    failures: list[float] = []
    enough = asyncio.Event()

    def emit(item: Reading | CardReading) -> None:
        if item.point == "spm":  # one reading per failure round
            failures.append(clock.now_s)
            if len(failures) >= 7:
                enough.set()

    async with asyncio.timeout(20):  # a guard against a hang, not a performance assertion
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(driver.run(emit), name="driver-under-test")
            await enough.wait()
            task.cancel()
    gaps = [b - a for a, b in itertools.pairwise(failures)][:6]
    # each wait is the back-off rounded up to the poll grid (0.5 s), doubling from 5 s, capped at 30 s
    for gap, expected in zip(gaps, [5.0, 10.0, 20.0, 30.0, 30.0, 30.0], strict=True):
        assert expected <= gap < expected + 0.5 + 1e-9, gaps
