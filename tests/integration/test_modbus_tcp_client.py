"""Our Modbus/TCP client against the wellsite simulator's TCP server: pipelining, cancel, writes, errors."""

from __future__ import annotations

import asyncio

import pytest

from drivers.modbus.client import ModbusError, ModbusTcpClient
from hil.wellsite import Wellsite

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self, now_s: float = 1_714_950_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


async def test_requests_to_several_units_behind_one_gateway_are_outstanding_together_and_answered_right():
    async with Wellsite(3, seed=5, clock=FakeClock()) as ws:
        port = ws.endpoints[0][2]
        client = ModbusTcpClient("127.0.0.1", port, max_in_flight=3)
        try:
            reads = [client.read("holding", 299, 74, unit_id=unit) for unit in (1, 2, 3) for _ in range(3)]
            got = await asyncio.gather(*reads)
        finally:
            client.close()
        for k, unit in enumerate(u for u in (1, 2, 3) for _ in range(3)):
            assert got[k] == ws.well(f"well-{unit:03d}").image[299:373], unit
        assert client.requests == 9


async def test_a_cancelled_request_does_not_hand_its_late_answer_to_the_next_one():
    async with Wellsite(1, seed=5, clock=FakeClock()) as ws:
        client = ModbusTcpClient("127.0.0.1", ws.endpoints[0][2], timeout_s=2.0)
        try:
            ws.set_fault("well-001", "silent")
            task = asyncio.create_task(client.read("holding", 299, 2, unit_id=1))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            ws.set_fault("well-001", "none")
            words = await client.read("holding", 1000, 5, unit_id=1)
        finally:
            client.close()
        assert words == ws.well("well-001").image[1000:1005]


async def test_writes_are_confirmed_by_their_echo_and_refusals_carry_the_exception_code():
    async with Wellsite(1, seed=5, clock=FakeClock()) as ws:
        client = ModbusTcpClient("127.0.0.1", ws.endpoints[0][2])
        try:
            await client.write_registers(980, [5], unit_id=1)  # 40981 card interval, minutes
            with pytest.raises(ModbusError) as err:
                await client.write_registers(10, [1, 2], unit_id=1)  # not writable
        finally:
            client.close()
        assert ws.well("well-001").image[980] == 5
        assert (err.value.kind, err.value.code, err.value.reason) == (
            "exception", 2, "exception 02 illegal data address")


async def test_a_port_nobody_listens_on_is_a_connection_error():
    from hil.net import free_port

    client = ModbusTcpClient("127.0.0.1", free_port(), timeout_s=0.5)
    with pytest.raises(ModbusError) as err:
        await client.read("holding", 0, 1, unit_id=1)
    assert err.value.kind == "connection" and not client.connected


async def test_an_idle_connection_keeps_no_deadline_timer_and_a_silent_unit_still_times_out():
    async with Wellsite(2, seed=5, clock=FakeClock()) as ws:
        port = ws.endpoints[0][2]
        client = ModbusTcpClient("127.0.0.1", port, timeout_s=0.3, max_in_flight=2)
        try:
            for start in (299, 980, 1000):  # back to back: the timer is not dropped between requests
                await client.read("holding", start, 5, unit_id=1)
                assert client._timer is not None
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # the woken caller runs, then the scheduled idle check
            assert client._timer is None  # idle: nothing would wake the loop in 0.3 s
            ws.set_fault("well-002", "silent")
            silent = asyncio.create_task(client.read("holding", 299, 2, unit_id=2))
            await client.read("holding", 299, 2, unit_id=1)  # answered while unit 2 is outstanding
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # the passes that dropped the idle timer above
            assert client._timer is not None  # unit 2's deadline is still watched
            with pytest.raises(ModbusError) as err:
                await silent
        finally:
            client.close()
        assert err.value.kind == "timeout"
