"""ModbusTcpDriver and card capture against a real pymodbus wellsite simulator on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from drivers.base import CardReading, Quality, Reading
from drivers.modbus.card import capture_card
from drivers.modbus.client import ModbusError, ModbusTcpClient
from drivers.modbus.config import ModbusDevice, ModbusPoint, Table, a11_device
from drivers.modbus.driver import ModbusTcpDriver, poll_once
from hil.net import free_port
from hil.wellsite import Wellsite, agent_devices_for, endpoints_for

pytestmark = pytest.mark.integration

T0_S = 1_714_950_000.0


class FakeClock:
    def __init__(self, now_s: float = T0_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def site():
    clock = FakeClock()
    ws = Wellsite(2, seed=11, card_interval_s=600.0, trigger_delay_s=1.0, clock=clock,
                  conditions={2: 1203})
    await ws.start()
    try:
        yield ws, clock
    finally:
        await ws.stop()


def reader_for(client: ModbusTcpClient, unit_id: int):
    async def read(table: Table, start: int, count: int) -> Sequence[int]:
        return [int(w) for w in await client.read(table, start, count, unit_id=unit_id)]

    return read


async def test_polled_scalars_decode_to_the_simulators_values(site):
    ws, _ = site
    devices = agent_devices_for(ws)
    items = await poll_once(devices)
    readings = [r for r in items if isinstance(r, Reading)]
    assert len(readings) == sum(len(d.points) for d in devices)
    for r in readings:
        assert r.quality == Quality.GOOD, r
        assert r.value == ws.well(r.device).value(r.point), r.point
    by_point = {(r.device, r.point): r.value for r in readings}
    assert by_point[("well-001", "card_measured_points")] == 200
    assert by_point[("well-001", "run_status")] == 1


async def test_a_card_is_captured_atomically_with_eleven_requests(site):
    ws, _ = site
    device = agent_devices_for(ws)[1]
    client = ModbusTcpClient("127.0.0.1", ws.endpoints[1][2], timeout_s=1.0)
    try:
        card = await capture_card(reader_for(client, 2), device, clock_ns=time.time_ns)
    finally:
        client.close()
    assert client.requests == 11
    assert card is not None and card.quality == Quality.GOOD
    expected = ws.well("well-002").cards()[-1]
    assert card.acquired_at_ns == expected.ts_ns
    assert card.n_points == 200
    assert card.position_m == expected.position_m
    assert card.load_kn == expected.load_kn
    assert card.current_a == expected.current_a and card.power_kw == expected.power_kw
    assert card.scalars["spm"] == pytest.approx(expected.spm, abs=1e-6)
    assert card.scalars["card_measured_points"] == 200
    assert sum(len(words) for words in card.raw_registers.values()) == 106 + 14 + 800 + 6


async def test_a_card_that_changes_during_capture_is_read_again(site):
    ws, clock = site
    device = agent_devices_for(ws)[0]
    client = ModbusTcpClient("127.0.0.1", ws.endpoints[0][2])
    plain = reader_for(client, 1)
    calls = 0

    async def read_while_the_rtu_publishes(table: Table, start: int, count: int) -> Sequence[int]:
        nonlocal calls
        calls += 1
        if calls == 4:  # mid-curves: the RTU's card interval elapses
            clock.now_s += 601.0
        return await plain(table, start, count)

    try:
        card = await capture_card(read_while_the_rtu_publishes, device, clock_ns=time.time_ns)
    finally:
        client.close()
    assert card is not None and card.quality == Quality.GOOD
    assert card.reason == "consistent after 2 attempts"
    newest = ws.well("well-001").cards()[-1]
    assert card.acquired_at_ns == newest.ts_ns
    assert card.load_kn == newest.load_kn


async def test_a_trigger_write_yields_a_new_card(site):
    ws, clock = site
    devices = agent_devices_for(ws)
    driver = ModbusTcpDriver(devices)
    before = next(c for c in await poll_once(devices[:1]) if isinstance(c, CardReading))
    back = await driver.write("well-001/card_trigger", 1)
    assert back.quality == Quality.GOOD and back.value == 1  # reads back "acquiring"
    clock.now_s += 1.5  # one trigger delay later the RTU has published
    after = next(c for c in await poll_once(devices[:1]) if isinstance(c, CardReading))
    assert after.acquired_at_ns > before.acquired_at_ns
    assert after.acquired_at_ns == ws.well("well-001").cards()[-1].ts_ns


async def test_writing_a_read_only_register_is_refused_by_the_device(site):
    ws, _ = site
    client = ModbusTcpClient("127.0.0.1", ws.endpoints[0][2])
    try:
        with pytest.raises(ModbusError) as err:
            await client.write_registers(ws.wells[0].map.pdu("spm"), [1, 2], unit_id=1)
    finally:
        client.close()
    assert err.value.kind == "exception" and err.value.code == 2


async def test_a_dead_device_is_bad_and_does_not_stall_a_healthy_one(site):
    ws, _ = site
    healthy = a11_device("healthy", "127.0.0.1", ws.endpoints[0][2], 1, poll_interval_s=0.05,
                         card_interval_s=0.05, timeout_s=0.5)
    dead = a11_device("dead", "127.0.0.1", free_port(), 1, poll_interval_s=0.05, timeout_s=0.5)
    driver = ModbusTcpDriver([dead, healthy])
    seen: list[Reading | CardReading] = []
    enough = asyncio.Event()

    def emit(item: Reading | CardReading) -> None:
        seen.append(item)
        good_rounds = sum(1 for r in seen if isinstance(r, Reading) and r.device == "healthy"
                          and r.point == "spm" and r.quality == Quality.GOOD)
        cards = sum(1 for r in seen if isinstance(r, CardReading) and r.device == "healthy")
        if good_rounds >= 3 and cards >= 1 and any(r.device == "dead" for r in seen):
            enough.set()

    task = asyncio.create_task(driver.run(emit), name="driver-under-test")
    try:
        async with asyncio.timeout(20):  # a guard against a hang, not a performance assertion
            await enough.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    dead_items = [r for r in seen if r.device == "dead"]
    assert dead_items and all(isinstance(r, Reading) and r.quality == Quality.BAD for r in dead_items)
    assert {r.reason for r in dead_items} == {"connection"}
    # quarantined: one failure round, not one per poll interval
    assert len(dead_items) == len(dead.points)
    assert driver.status()["dead"] == (Quality.BAD, "connection")
    assert driver.status()["healthy"] == (Quality.GOOD, None)
    healthy_cards = [r for r in seen if isinstance(r, CardReading) and r.device == "healthy"]
    assert len(healthy_cards) == 1  # the RTU holds one card: it is emitted once, not per capture


async def test_a_read_refused_with_exception_02_is_split_and_the_good_points_still_read(site):
    ws, _ = site
    # The simulator maps holding registers up to 42000 (PDU 1999). One planned read of 42000..42003
    # fails with exception 02; the driver learns the gap, re-plans, and only the unmapped point is BAD.
    port = ws.endpoints[0][2]
    points = (ModbusPoint(name="last_slot", address=42000), ModbusPoint(name="unmapped", address=42003))
    device = ModbusDevice(name="w", host="127.0.0.1", port=port, unit_id=1, points=points)
    items = await poll_once([device])
    by_point = {r.point: r for r in items if isinstance(r, Reading)}
    assert by_point["last_slot"].quality == Quality.GOOD
    assert by_point["last_slot"].value == 0
    assert by_point["unmapped"].quality == Quality.BAD
    assert by_point["unmapped"].reason == "exception 02 illegal data address"


def test_endpoints_follow_247_units_per_port():
    eps = endpoints_for(250, "127.0.0.1", 5020)
    assert eps[0] == ("well-001", "127.0.0.1", 5020, 1)
    assert eps[246] == ("well-247", "127.0.0.1", 5020, 247)
    assert eps[247] == ("well-248", "127.0.0.1", 5021, 1)
