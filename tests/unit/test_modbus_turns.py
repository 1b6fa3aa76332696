"""Turn-taking on one Modbus/TCP connection (drivers.modbus.client._Turns): limit, one per unit, FIFO."""

from __future__ import annotations

import asyncio

from drivers.modbus.client import _Turns


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_free_unit_goes_at_once_and_a_busy_one_waits_its_turn() -> None:
    turns = _Turns(limit=2)
    assert turns.take(1)
    assert not turns.take(1)  # one request per unit id
    assert turns.take(2)
    assert not turns.take(3)  # both slots in use
    turns.give_back(2)
    assert turns.take(3)


async def test_waiters_are_served_in_arrival_order() -> None:
    turns = _Turns(limit=1)
    assert turns.take(9)
    order: list[int] = []

    async def request(unit: int) -> None:
        if not turns.take(unit):
            await turns.wait(unit)
        order.append(unit)
        await asyncio.sleep(0)
        turns.give_back(unit)

    tasks = [asyncio.create_task(request(u)) for u in (3, 1, 2, 1)]
    await _settle()
    assert order == []
    turns.give_back(9)
    await asyncio.gather(*tasks)
    assert order == [3, 1, 2, 1]
    assert turns.take(5)  # everything was given back


async def test_a_newcomer_does_not_overtake_a_waiter_that_could_go() -> None:
    turns = _Turns(limit=1)
    assert turns.take(1)
    waiter = asyncio.create_task(turns.wait(2))
    await _settle()
    turns.give_back(1)  # handed straight to unit 2
    assert not turns.take(3)
    await waiter
    turns.give_back(2)
    assert turns.take(3)


async def test_a_cancelled_waiter_neither_blocks_the_queue_nor_keeps_a_turn() -> None:
    turns = _Turns(limit=1)
    assert turns.take(1)
    gone = asyncio.create_task(turns.wait(2))
    after = asyncio.create_task(turns.wait(3))
    await _settle()
    gone.cancel()
    await _settle()
    turns.give_back(1)
    await asyncio.wait_for(after, 1.0)  # unit 3 got the turn the cancelled waiter would have had
    turns.give_back(3)
    assert turns.take(4)


async def test_a_waiter_cancelled_after_its_turn_was_handed_over_gives_it_back() -> None:
    turns = _Turns(limit=1)
    assert turns.take(1)
    waiter = asyncio.create_task(turns.wait(2))
    await _settle()
    turns.give_back(1)  # the turn is now unit 2's...
    waiter.cancel()  # ...but its task is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert turns.take(3)  # the turn did not leak
