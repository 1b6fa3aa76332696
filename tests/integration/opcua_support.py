"""Helpers for the OPC UA integration tests: collect emitted readings and wait for one that matters."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from drivers.base import CardReading, Quality, Reading
from drivers.opcua.config import OpcUaServer
from drivers.opcua.driver import OpcUaDriver

# How long a test waits for something that should happen within a few publishing intervals. A guard
# against hanging, not a performance assertion: the tests never check how long anything took.
WAIT_S = 15.0


class Collector:
    """The driver's `emit`: keeps every reading and wakes waiters."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self._changed = asyncio.Event()

    def __call__(self, reading: Reading | CardReading) -> None:
        assert isinstance(reading, Reading)
        self.readings.append(reading)
        self._changed.set()

    def mark(self) -> int:
        """Position to wait from: only readings emitted after this count."""
        return len(self.readings)

    def of(self, point: str, since: int = 0) -> list[Reading]:
        return [r for r in self.readings[since:] if r.point == point]

    async def wait_for(
        self, predicate: Callable[[Reading], bool], *, since: int = 0, what: str = "reading"
    ) -> Reading:
        async with asyncio.timeout(WAIT_S):
            while True:
                for r in self.readings[since:]:
                    if predicate(r):
                        return r
                self._changed.clear()
                await self._changed.wait()
        raise AssertionError(f"no {what}")  # pragma: no cover - timeout raises first

    async def value(self, point: str, value: object, *, since: int = 0) -> Reading:
        return await self.wait_for(
            lambda r: r.point == point and r.value == value and r.quality is Quality.GOOD,
            since=since,
            what=f"{point}={value}",
        )

    async def count(self, point: str, n: int, *, since: int) -> None:
        """Wait until `point` has had n more readings since the mark."""
        async with asyncio.timeout(WAIT_S):
            while len(self.of(point, since)) < n:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running(*servers: OpcUaServer) -> AsyncIterator[tuple[OpcUaDriver, Collector]]:
    """Run a driver for the servers while the block runs; a crash of the driver fails the test."""
    driver = OpcUaDriver(servers, clock_ns=time.time_ns, monotonic=time.monotonic)
    collector = Collector()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(driver.run(collector), name="test:opcua-driver")
        try:
            yield driver, collector
        finally:
            assert not task.done(), "the driver must run until cancelled"
            task.cancel()
