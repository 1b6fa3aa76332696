"""Cards on demand (trigger register 40982) and cards the agent already has, against the wellsite sim."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from drivers.base import CardReading, Quality
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import TRIGGER_POLL_S, ModbusDriver
from hil.wellsite import Wellsite, agent_devices_for

pytestmark = pytest.mark.integration

T0_S = 1_714_950_000.0


class FakeTime:
    """The simulator's clock and the driver's monotonic clock and sleep: a sleep moves both on."""

    def __init__(self) -> None:
        self.now_s = T0_S
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now_s += delay_s
        await asyncio.sleep(0)


async def _site(trigger_delay_s: float) -> AsyncIterator[tuple[Wellsite, FakeTime]]:
    clock = FakeTime()
    ws = Wellsite(1, seed=3, card_interval_s=600.0, trigger_delay_s=trigger_delay_s, clock=clock)
    await ws.start()
    try:
        yield ws, clock
    finally:
        await ws.stop()


@pytest.fixture
async def site() -> AsyncIterator[tuple[Wellsite, FakeTime]]:
    async for s in _site(trigger_delay_s=2.0):
        yield s


@pytest.fixture
async def deaf_site() -> AsyncIterator[tuple[Wellsite, FakeTime]]:
    """An RTU that takes an hour to answer a trigger."""
    async for s in _site(trigger_delay_s=3600.0):
        yield s


def _driver(ws: Wellsite, clock: FakeTime, **card: object) -> tuple[ModbusDriver, ModbusDevice]:
    (device,) = agent_devices_for(ws, timeout_s=1.0)
    if card:
        assert device.card is not None
        device = msgspec.structs.replace(device, card=msgspec.structs.replace(device.card, **card))
    return ModbusDriver([device], monotonic=clock, sleep=clock.sleep), device


async def test_a_triggered_card_is_the_rtus_next_one(site: tuple[Wellsite, FakeTime]) -> None:
    ws, clock = site
    driver, device = _driver(ws, clock)
    well = ws.well(device.name)
    try:
        held, new = await driver.card_now(device.name, trigger=False)
        assert held is not None and new and held.quality == Quality.GOOD
        cards_before = len(well.cards())
        card, new = await driver.card_now(device.name)
    finally:
        driver.close()
    assert card is not None and card.quality == Quality.GOOD, card
    assert new
    assert len(well.cards()) == cards_before + 1  # the trigger made exactly one card
    assert card.acquired_at_ns == well.cards()[-1].ts_ns > held.acquired_at_ns
    assert card.load_kn == well.cards()[-1].load_kn
    assert well.value("card_trigger") == 0  # the RTU finished its card
    # it waited by polling the acquisition time, about the RTU's 2 s, not the 60 s limit
    assert clock.sleeps and set(clock.sleeps) == {TRIGGER_POLL_S}
    assert 2.0 <= sum(clock.sleeps) <= 2.0 + TRIGGER_POLL_S


async def test_a_card_already_emitted_costs_only_its_header_and_is_not_emitted_again(
    site: tuple[Wellsite, FakeTime],
) -> None:
    ws, clock = site
    driver, device = _driver(ws, clock)
    try:
        card, new = await driver.card_now(device.name, trigger=False)
        assert card is not None and new
        before = driver.requests_sent()
        again = await driver.acquire_once(device.name)  # the schedule's job: groups, then the card
        card_requests = driver.requests_sent() - before - len(driver.plan(device.name))
        same, new_again = await driver.card_now(device.name, trigger=False)
    finally:
        driver.close()
    assert not [i for i in again if isinstance(i, CardReading)]  # not emitted a second time
    assert card_requests == 2  # the header (time, count, scalars); the 800 curve registers stay unread
    assert same is not None and same.acquired_at_ns == card.acquired_at_ns and not new_again


async def test_a_trigger_the_rtu_never_answers_times_out_with_the_reason(
    deaf_site: tuple[Wellsite, FakeTime],
) -> None:
    ws, clock = deaf_site
    driver, device = _driver(ws, clock, trigger_timeout_s=5.0)
    try:
        card, new = await driver.card_now(device.name)
    finally:
        driver.close()
    assert card is not None and card.quality == Quality.BAD and not new
    assert card.reason == "card: no new card within 5 s of the trigger"
    assert 5.0 <= sum(clock.sleeps) <= 5.0 + TRIGGER_POLL_S


async def test_a_trigger_the_device_refuses_is_reported_and_the_bus_goes_on(
    site: tuple[Wellsite, FakeTime],
) -> None:
    ws, clock = site
    # a vendor variant whose "trigger" points at a read-only register: the RTU answers exception 02
    driver, device = _driver(ws, clock, trigger_register=40300)
    try:
        card, new = await driver.card_now(device.name)
        held, _ = await driver.card_now(device.name, trigger=False)
    finally:
        driver.close()
    assert card is not None and card.quality == Quality.BAD and not new
    assert card.reason == "card: trigger refused: exception 02 illegal data address"
    assert held is not None and held.quality == Quality.GOOD


async def test_card_now_refuses_unknown_devices_and_cards_without_a_trigger(
    site: tuple[Wellsite, FakeTime],
) -> None:
    ws, clock = site
    driver, device = _driver(ws, clock, trigger_register=None)
    try:
        with pytest.raises(KeyError):
            await driver.card_now("no-such-well")
        with pytest.raises(ValueError, match="no trigger register"):
            await driver.card_now(device.name)
    finally:
        driver.close()
