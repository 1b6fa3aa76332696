"""Modbus TCP driver: polls groups and captures cards per device on schedule, quarantines failing devices.

Theory of operation. Every device gets one task (named `modbus-<device>`) in the driver's TaskGroup.
The task keeps a `Schedule` of its poll groups plus its card, sleeps until the next deadline
(monotonic seconds), and runs the due jobs. Devices that share host:port share one connection, and the
connection serialises requests, so there is one request in flight per connection at any time.

Failure policy per request: a timeout is retried `device.retries` times; an exception 02 on a
multi-point block teaches the planner a device limit (see planner.learn_illegal_address) and the
block's points are re-read with the new plan; an exception on a one-point block marks that point BAD.
A timeout after retries, or a lost connection, fails the device: all its points are emitted BAD with
the reason, the connection is dropped, and the device is quarantined (no requests) for a back-off
that doubles from `quarantine_s` to `quarantine_max_s` and resets on the next success. One device's
failure never blocks another device's task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from drivers.base import CardReading, Emit, Quality, Reading, Value
from drivers.modbus.card import capture_card
from drivers.modbus.client import ModbusError, ModbusTcpClient
from drivers.modbus.config import ModbusDevice, ModbusPoint, Table
from drivers.modbus.decode import decode, encode
from drivers.modbus.planner import DeviceLimits, ReadBlock, learn_illegal_address, plan_reads
from drivers.scheduling import Schedule

CARD_JOB = "__card__"


class DeviceFailed(Exception):
    """The device did not answer (after retries) or the connection is gone: quarantine it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _DeviceState:
    device: ModbusDevice
    client: ModbusTcpClient
    limits: DeviceLimits = field(default_factory=DeviceLimits)
    plans: dict[str, tuple[ReadBlock, ...]] = field(default_factory=dict)
    backoff_s: float = 0.0
    last_card_at_ns: int | None = None
    status: Quality = Quality.UNCERTAIN
    reason: str | None = "not polled yet"

    def groups(self) -> dict[str, list[ModbusPoint]]:
        out: dict[str, list[ModbusPoint]] = {}
        for p in self.device.points:
            out.setdefault(p.group, []).append(p)
        return out

    def replan(self) -> None:
        d = self.device
        self.plans = {
            g: plan_reads(pts, max_registers=d.max_registers_per_read, max_bits=d.max_bits_per_read,
                          max_gap=d.max_gap, limits=self.limits)
            for g, pts in self.groups().items()
        }


class _Session:
    """Clients per host:port and device state, shared by the driver and poll_once."""

    def __init__(self, devices: Sequence[ModbusDevice], clock_ns: Callable[[], int]) -> None:
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        self.clock_ns = clock_ns
        self.clients: dict[tuple[str, int], ModbusTcpClient] = {}
        self.states: dict[str, _DeviceState] = {}
        for d in devices:
            key = (d.host, d.port)
            if key not in self.clients:
                self.clients[key] = ModbusTcpClient(d.host, d.port, timeout_s=d.timeout_s)
            st = _DeviceState(device=d, client=self.clients[key])
            st.replan()
            self.states[d.name] = st

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    async def read(self, st: _DeviceState, table: Table, start: int, count: int) -> list[int] | list[bool]:
        """One request with the device's retry policy; DeviceFailed when the device is unreachable."""
        d = st.device
        for attempt in range(d.retries + 1):
            try:
                return await st.client.read(table, start, count, unit_id=d.unit_id)
            except ModbusError as exc:
                if exc.kind == "exception":
                    raise
                if exc.kind == "timeout" and attempt < d.retries:
                    continue
                st.client.close()  # resynchronise: a late answer must not be taken for the next one
                raise DeviceFailed(exc.reason) from exc
        raise AssertionError("unreachable")

    async def read_points(self, st: _DeviceState, blocks: Sequence[ReadBlock]) -> list[Reading]:
        """Readings for every point of the blocks; learns device limits on exception 02."""
        out: list[Reading] = []
        pending = list(blocks)
        while pending:
            block = pending.pop(0)
            try:
                words = await self.read(st, block.table, block.start, block.count)
            except ModbusError as exc:
                learned = learn_illegal_address(block, st.limits) if exc.code == 2 else None
                if learned is not None:
                    st.limits = learned
                    st.replan()
                    d = st.device
                    pending[:0] = plan_reads(block.points, max_registers=d.max_registers_per_read,
                                             max_bits=d.max_bits_per_read, max_gap=d.max_gap, limits=learned)
                    continue
                now = self.clock_ns()
                out += [Reading(st.device.name, p.name, None, Quality.BAD, now, reason=exc.reason)
                        for p in block.points]
                continue
            now = self.clock_ns()
            for p in block.points:
                out.append(_decoded(st.device.name, p, words[block.slice_of(p)], now))
        return out

    async def capture(self, st: _DeviceState) -> CardReading | None:
        async def reader(table: Table, start: int, count: int) -> list[int]:
            return [int(w) for w in await self.read(st, table, start, count)]

        try:
            return await capture_card(reader, st.device, clock_ns=self.clock_ns, limits=st.limits)
        except ModbusError as exc:  # the device answered, but refused part of the card
            return CardReading(device=st.device.name, acquired_at_ns=0, n_points=0, position_m=(), load_kn=(),
                               current_a=None, power_kw=None, quality=Quality.BAD, ts_ns=self.clock_ns(),
                               reason=f"card: {exc.reason}")

    def failed(self, st: _DeviceState, reason: str) -> list[Reading]:
        st.status, st.reason = Quality.BAD, reason
        now = self.clock_ns()
        return [Reading(st.device.name, p.name, None, Quality.BAD, now, reason=reason)
                for p in st.device.points]


def _decoded(device: str, p: ModbusPoint, words: Sequence[int] | Sequence[bool], now_ns: int) -> Reading:
    try:
        value = decode(p, words)
    except (ValueError, UnicodeDecodeError) as exc:
        return Reading(device, p.name, None, Quality.BAD, now_ns, reason=f"decode: {exc}")
    return Reading(device, p.name, value, Quality.GOOD, now_ns)


class ModbusTcpDriver:
    """Acquires every configured device until cancelled; see the module docstring for the policy."""

    name = "modbus"

    def __init__(self, devices: Sequence[ModbusDevice], *, clock_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.devices = tuple(devices)
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._session = _Session(self.devices, clock_ns)

    def status(self) -> dict[str, tuple[Quality, str | None]]:
        """Device name -> (quality, reason) as of the last job."""
        return {n: (st.status, st.reason) for n, st in self._session.states.items()}

    def requests_sent(self) -> int:
        return sum(c.requests for c in self._session.clients.values())

    async def run(self, emit: Emit) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for slot, st in enumerate(self._session.states.values()):
                    tg.create_task(self._run_device(st, emit, slot), name=f"modbus-{st.device.name}")
        finally:
            self._session.close()

    async def _run_device(self, st: _DeviceState, emit: Emit, slot: int) -> None:
        d = st.device
        jobs = [(g, d.interval_of(g)) for g in st.groups()]
        if d.card is not None:
            jobs.append((CARD_JOB, d.card.interval_s))
        if not jobs:
            return
        schedule = Schedule(jobs, now_s=self._monotonic(), first_slot=slot * len(jobs))
        while True:
            delay = schedule.next_deadline() - self._monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for key in schedule.pop_due(self._monotonic()):
                try:
                    await self._run_job(st, key, emit)
                except DeviceFailed as exc:
                    for r in self._session.failed(st, exc.reason):
                        emit(r)
                    doubled = st.backoff_s * 2 if st.backoff_s else d.quarantine_s
                    st.backoff_s = min(d.quarantine_max_s, doubled)
                    schedule.postpone_all(self._monotonic() + st.backoff_s)
                    break
                st.backoff_s = 0.0

    async def _run_job(self, st: _DeviceState, key: str, emit: Emit) -> None:
        if key == CARD_JOB:
            card = await self._session.capture(st)
            # A card is emitted once: the schedule may find the same card again before the RTU has a new one.
            repeated = card is not None and card.acquired_at_ns == st.last_card_at_ns
            if card is not None and (card.quality != Quality.GOOD or not repeated):
                if card.quality == Quality.GOOD:
                    st.last_card_at_ns = card.acquired_at_ns
                emit(card)
        else:
            for r in await self._session.read_points(st, st.plans.get(key, ())):
                emit(r)
        st.status, st.reason = Quality.GOOD, None

    def _resolve(self, point: str) -> tuple[_DeviceState, ModbusPoint]:
        """"device/point", or a bare point name that exactly one device has."""
        if "/" in point:
            dev, name = point.split("/", 1)
            st = self._session.states.get(dev)
            if st is None:
                raise KeyError(f"no device {dev!r}")
            return st, st.device.point(name)
        hits = [(st, p) for st in self._session.states.values() for p in st.device.points if p.name == point]
        if len(hits) != 1:
            raise KeyError(f"point {point!r} matches {len(hits)} devices; use 'device/point'")
        return hits[0]

    async def write(self, point: str, value: Value) -> Reading:
        """Write a writable point and confirm by reading it back (GOOD if equal within one scale step)."""
        st, p = self._resolve(point)
        if not p.writable:
            raise PermissionError(f"{st.device.name}/{p.name} is not writable")
        table, start = p.location()
        unit = st.device.unit_id
        try:
            if table == "coil":
                await st.client.write_coil(start, bool(value), unit_id=unit)
            elif table == "holding":
                words = encode(p, value)
                if p.type == "bits":
                    # read-modify-write: the other 15 bits of the register must survive
                    (current,) = await st.client.read("holding", start, 1, unit_id=unit)
                    assert p.bit is not None
                    words = [(int(current) & ~(1 << p.bit)) | words[0]]
                await st.client.write_registers(start, words, unit_id=unit)
            else:
                raise PermissionError(f"{table} is read-only in Modbus")
            (back,) = await self._session.read_points(st, plan_reads([p]))
        except ModbusError as exc:
            return Reading(st.device.name, p.name, None, Quality.BAD, self._clock_ns(), reason=exc.reason)
        except DeviceFailed as exc:
            return Reading(st.device.name, p.name, None, Quality.BAD, self._clock_ns(), reason=exc.reason)
        if back.quality == Quality.GOOD and not _same(p, back.value, value):
            return Reading(back.device, back.point, back.value, Quality.UNCERTAIN, back.ts_ns,
                           reason=f"read-back {back.value!r} != written {value!r}")
        return back


def _same(p: ModbusPoint, got: Value, wanted: Value) -> bool:
    if isinstance(got, (int, float)) and isinstance(wanted, (int, float)) and not isinstance(got, bool):
        step = abs(p.scale) if p.type not in ("f32", "f64") else 1e-6 * max(1.0, abs(float(wanted)))
        return abs(float(got) - float(wanted)) <= step
    return got == wanted


async def poll_once(devices: Sequence[ModbusDevice], *, clock_ns: Callable[[], int] = time.time_ns
                    ) -> list[Reading | CardReading]:
    """Read every point (and card) of every device once, concurrently per device; BAD on failure."""
    session = _Session(devices, clock_ns)
    results: dict[str, list[Reading | CardReading]] = {}

    async def one(st: _DeviceState) -> None:
        out: list[Reading | CardReading] = []
        try:
            for blocks in st.plans.values():
                out += await session.read_points(st, blocks)
            if st.device.card is not None:
                card = await session.capture(st)
                if card is not None:
                    out.append(card)
        except DeviceFailed as exc:
            out = list(session.failed(st, exc.reason))
        results[st.device.name] = out

    try:
        async with asyncio.TaskGroup() as tg:
            for st in session.states.values():
                tg.create_task(one(st), name=f"modbus-once-{st.device.name}")
    finally:
        session.close()
    return [r for d in devices for r in results.get(d.name, [])]
