"""Card scalars decoded by the compiled header decoders are exactly the per-point values, in spec order."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from drivers.base import Value
from drivers.modbus.card import capture_card
from drivers.modbus.config import Table
from drivers.modbus.decode import decode
from drivers.modbus.planner import DeviceLimits
from hil.wellsite import WellSim, agent_devices_for


def _same(a: Value, b: Value) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("limits", [None, DeviceLimits(max_count={"holding": 7})],
                         ids=["whole-header", "header-in-7-register-reads"])
def test_card_scalars_are_the_values_decode_gives_point_by_point(limits: DeviceLimits | None) -> None:
    well = WellSim("well-007", 3, now_s=0.0, card_interval_s=20.0)
    (device,) = agent_devices_for([("well-007", "127.0.0.1", 502, 1)], card_interval_s=20.0)
    image = well.image
    requests: list[tuple[int, int]] = []

    async def reader(table: Table, start: int, count: int) -> Sequence[int]:
        requests.append((start, count))
        return image[start:start + count]

    card = asyncio.run(capture_card(reader, device, clock_ns=lambda: 1, limits=limits))
    assert card is not None
    assert device.card is not None
    assert list(card.scalars) == list(device.card.scalars)
    for name in device.card.scalars:
        p = device.point(name)
        start = p.location()[1]
        assert _same(card.scalars[name], decode(p, image[start:start + p.register_count()])), name
    if limits is not None:
        assert max(count for _, count in requests) <= 7
