"""Modbus TCP/RTU driver: polls groups and captures cards per device on schedule, quarantines failing devices.

Theory of operation. Every device gets one task (named `modbus-<device>`) in the driver's TaskGroup.
The task keeps a `Schedule` of its poll groups plus its card, sleeps until the next deadline
(monotonic seconds), and runs the due jobs; all schedules start at one instant, so devices whose
staggered phases share a slot wake together (drivers.scheduling). A block's answer is decoded by the
block's compiled decoder (blockdecode), shared by every device planned alike. Devices on one bus - the
same TCP host:port (a gateway serving many unit ids) or the same serial port - share one client, and
the client serialises requests in arrival order, so there is one request in flight per bus and the
devices on it take turns request by request (a card of 11 requests never locks out the other units
for its whole duration).

Failure policy per request: a timeout or an unusable answer (CRC error, wrong unit id, short frame) is
retried `device.retries` times; an exception 02 on a multi-point block teaches the planner a device
limit (planner.learn_illegal_address), an exception 03 or a short answer teaches a smaller request
size (planner.learn_max_count), and the block's points are re-read with the new plan; other
exceptions mark the block's points BAD with the reason. A request still failing after retries, or a
lost connection, fails the device: its points are emitted BAD with the reason, a TCP connection is
dropped (a serial line stays open for the other units), and the device is quarantined (no requests)
with a back-off that doubles from `quarantine_s` to `quarantine_max_s` and resets on success. A dead
unit therefore costs the bus `timeout_s * (retries + 1)` once per back-off, never once per poll.

An unexpected error inside one device's job (a bug, a decoder surprise) is logged with its traceback,
reported as BAD readings with reason "internal error: <type>", and quarantines that device like a
failure; it never reaches the TaskGroup, so the other devices keep running.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from drivers.base import CardReading, Emit, Quality, Reading, Value
from drivers.modbus.blockdecode import block_decoder
from drivers.modbus.card import TIME_WORDS, capture_card
from drivers.modbus.client import ModbusClient, ModbusError, ModbusRtuClient, ModbusTcpClient
from drivers.modbus.config import CardSpec, ModbusDevice, ModbusPoint, Table, modicon_to_pdu
from drivers.modbus.decode import encode
from drivers.modbus.planner import DeviceLimits, ReadBlock, learn_illegal_address, learn_max_count, plan_reads
from drivers.scheduling import Backoff, Schedule

log = logging.getLogger(__name__)

CARD_JOB = "__card__"
TRIGGER_POLL_S = 0.5  # how often card_now reads the acquisition time while it waits for a triggered card
GOOD = Quality.GOOD


class _NoNewCard(Exception):
    """A triggered card did not come: the trigger was refused or the acquisition time never changed."""


class DeviceFailed(Exception):
    """The device did not answer (after retries) or the connection is gone: quarantine it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _DeviceState:
    device: ModbusDevice
    client: ModbusClient
    backoff: Backoff
    limits: DeviceLimits = field(default_factory=DeviceLimits)
    plans: dict[str, tuple[ReadBlock, ...]] = field(default_factory=dict)
    last_card_at_ns: int | None = None
    status: Quality = Quality.UNCERTAIN
    reason: str | None = "not polled yet"
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    card_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one capture at a time per device

    def groups(self) -> dict[str, list[ModbusPoint]]:
        out: dict[str, list[ModbusPoint]] = {}
        for p in self.device.points:
            out.setdefault(p.group, []).append(p)
        return out

    def plan(self, points: Sequence[ModbusPoint]) -> tuple[ReadBlock, ...]:
        d = self.device
        return plan_reads(points, max_registers=d.max_registers_per_read, max_bits=d.max_bits_per_read,
                          max_gap=d.max_gap, limits=self.limits)

    def replan(self) -> None:
        self.plans = {g: self.plan(pts) for g, pts in self.groups().items()}


def _client_for(d: ModbusDevice) -> ModbusClient:
    if d.transport == "rtu":
        return ModbusRtuClient(d.serial_port, baudrate=d.baudrate, parity=d.parity, stopbits=d.stopbits,
                               bytesize=d.bytesize, timeout_s=d.timeout_s)
    return ModbusTcpClient(d.host, d.port, timeout_s=d.timeout_s)


class _Session:
    """Clients per bus and device state, shared by the driver and poll_once."""

    def __init__(self, devices: Sequence[ModbusDevice], clock_ns: Callable[[], int]) -> None:
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        self.clock_ns = clock_ns
        self.clients: dict[tuple[str, str, int], ModbusClient] = {}
        self.states: dict[str, _DeviceState] = {}
        first_on_bus: dict[tuple[str, str, int], ModbusDevice] = {}
        for d in devices:
            key = d.bus_key()
            other = first_on_bus.setdefault(key, d)
            if d.transport == "rtu" and other.line_settings() != d.line_settings():
                raise ValueError(f"devices {other.name} and {d.name} share {d.serial_port} but not its "
                                 f"line settings (baudrate, parity, stopbits, bytesize)")
            if key not in self.clients:
                self.clients[key] = _client_for(d)
            st = _DeviceState(device=d, client=self.clients[key],
                              backoff=Backoff(d.quarantine_s, d.quarantine_max_s))
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
                return await st.client.read(table, start, count, unit_id=d.unit_id, timeout_s=d.timeout_s)
            except ModbusError as exc:
                if exc.kind == "exception" or (exc.kind == "frame" and exc.detail and
                                               exc.detail.startswith("wrong length")):
                    raise  # the device answered: retrying the same request gets the same answer
                if exc.kind in ("timeout", "frame") and attempt < d.retries:
                    continue
                if d.transport == "tcp" or exc.kind == "connection":
                    st.client.close()  # resynchronise: a late answer must not be taken for the next one
                raise DeviceFailed(exc.reason) from exc
        raise AssertionError("unreachable")

    async def read_points(self, st: _DeviceState, blocks: Sequence[ReadBlock]) -> list[Reading]:
        """Readings for every point of the blocks; learns limits on exception 02/03 or short answers."""
        out: list[Reading] = []
        pending = list(blocks)
        device_name = st.device.name
        while pending:
            block = pending.pop(0)
            try:
                words = await self.read(st, block.table, block.start, block.count)
            except ModbusError as exc:
                learned = self._learn(st, block, exc)
                if learned is not None:
                    st.limits = learned
                    st.replan()
                    pending[:0] = st.plan(block.points)
                    continue
                now = self.clock_ns()
                out += [Reading(device_name, p.name, None, Quality.BAD, now, reason=exc.reason)
                        for p in block.points]
                continue
            now = self.clock_ns()
            points = block.points
            values, errors = block_decoder(block.start, block.count, points)(words)
            first = len(out)
            out += [Reading(device_name, p.name, v, GOOD, now) for p, v in zip(points, values, strict=True)]
            for k, error in errors:
                out[first + k] = Reading(device_name, points[k].name, None, Quality.BAD, now,
                                         reason=f"decode: {error}")
        return out

    @staticmethod
    def _learn(st: _DeviceState, block: ReadBlock, exc: ModbusError) -> DeviceLimits | None:
        if exc.code == 2:
            return learn_illegal_address(block, st.limits)
        if exc.code == 3 and len(block.points) > 1:
            return learn_max_count(block, st.limits)
        if exc.kind == "frame" and exc.detail and exc.detail.startswith("wrong length"):
            returned = int(exc.detail.rsplit(" ", 1)[1])
            return learn_max_count(block, st.limits, returned)
        return None

    async def capture(self, st: _DeviceState, known_at_ns: int | None = None) -> CardReading | None:
        reader = functools.partial(self.read, st)  # registers: the card reads holding only
        for attempt in (1, 2):
            try:
                return await capture_card(reader, st.device, clock_ns=self.clock_ns, limits=st.limits,
                                          known_at_ns=known_at_ns)
            except ModbusError as exc:  # the device answered, but refused part of the card
                if attempt == 1 and exc.kind in ("exception", "frame") and await self._learn_card_layout(st):
                    continue
                return CardReading(device=st.device.name, acquired_at_ns=0, n_points=0, position_m=(),
                                   load_kn=(), current_a=None, power_kw=None, quality=Quality.BAD,
                                   ts_ns=self.clock_ns(), reason=f"card: {exc.reason}")
        raise AssertionError("unreachable")

    async def _learn_card_layout(self, st: _DeviceState) -> bool:
        """Read the card's registers as points once, so the planner learns what the device refuses.

        Called after a card read was refused; True when the limits changed (capture again)."""
        spec = st.device.card
        assert spec is not None
        before = st.limits

        def reg(name: str, address: int, **kw: object) -> ModbusPoint:
            return ModbusPoint(name=name, table="holding", pdu_address=modicon_to_pdu(address)[1], **kw)  # type: ignore[arg-type]

        points = [reg("__time", spec.acquisition_time_register, type="string", length=6),
                  reg("__n", spec.n_points_register)]
        points += [st.device.point(n) for n in spec.scalars]
        for curve, (start, _) in spec.curves().items():
            points += [reg(f"__{curve}{k}", start + k) for k in range(spec.max_points)]
        await self.read_points(st, st.plan(points))
        return st.limits != before

    def failed(self, st: _DeviceState, reason: str) -> list[Reading]:
        st.status, st.reason = Quality.BAD, reason
        now = self.clock_ns()
        return [Reading(st.device.name, p.name, None, Quality.BAD, now, reason=reason)
                for p in st.device.points]


class ModbusDriver:
    """Acquires every configured device until cancelled; see the module docstring for the policy.

    `monotonic` and `sleep` are the time seam: tests pass a fake clock whose sleep advances it.
    `on_job(device, job, duration_s, ok)` is told about every poll-group read and card capture (job is
    the group name or "card"), for per-device latency and error metrics; it must not raise.
    """

    name = "modbus"

    def __init__(self, devices: Sequence[ModbusDevice], *, clock_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_job: Callable[[str, str, float, bool], None] | None = None) -> None:
        self.devices = tuple(devices)
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_job = on_job
        self._session = _Session(self.devices, clock_ns)

    def status(self) -> dict[str, tuple[Quality, str | None]]:
        """Device name -> (quality, reason) as of the last job."""
        return {n: (st.status, st.reason) for n, st in self._session.states.items()}

    def limits(self, device: str) -> DeviceLimits:
        """What the driver has learned about a device's addressing so far."""
        return self._session.states[device].limits

    def plans(self, device: str) -> dict[str, tuple[ReadBlock, ...]]:
        """Poll group -> the read requests one poll of it currently costs."""
        return {group: tuple(blocks) for group, blocks in self._session.states[device].plans.items()}

    def plan(self, device: str) -> tuple[ReadBlock, ...]:
        """The read requests one poll of every group of the device currently costs."""
        return tuple(b for blocks in self.plans(device).values() for b in blocks)

    def requests_sent(self) -> int:
        return sum(c.requests for c in self._session.clients.values())

    async def run(self, emit: Emit) -> None:
        try:
            # one start for all: devices whose phases share a stagger slot then wake together
            start_s = self._monotonic()
            async with asyncio.TaskGroup() as tg:
                for slot, st in enumerate(self._session.states.values()):
                    tg.create_task(self._run_device(st, emit, slot, start_s), name=f"modbus-{st.device.name}")
        finally:
            self._session.close()

    async def _run_device(self, st: _DeviceState, emit: Emit, slot: int, start_s: float) -> None:
        d = st.device
        jobs = [(g, d.interval_of(g)) for g in st.groups()]
        if d.card is not None:
            jobs.append((CARD_JOB, d.card.interval_s))
        if not jobs:
            return
        schedule = Schedule(jobs, now_s=start_s, first_slot=slot * len(jobs))
        while True:
            delay = schedule.next_deadline() - self._monotonic()
            if delay > 0:
                await self._sleep(delay)
            for key in schedule.pop_due(self._monotonic()):
                reason = await self._guarded_job(st, key, emit)
                if reason is not None:
                    for r in self._session.failed(st, reason):
                        emit(r)
                    schedule.postpone_all(st.backoff.failed(self._monotonic()))
                    break
                st.backoff.succeeded()

    async def _guarded_job(self, st: _DeviceState, key: str, emit: Emit) -> str | None:
        """Run one job; the failure reason when the device must be quarantined, else None."""
        started_s = self._monotonic()
        reason: str | None = None
        try:
            await self._run_job(st, key, emit)
        except DeviceFailed as exc:
            reason = exc.reason
        except Exception as exc:  # supervisor boundary: contain one device's bug, loudly
            log.exception("modbus: device %s job %s failed unexpectedly; quarantining it",
                          st.device.name, key)
            st.client.close()
            reason = f"internal error: {type(exc).__name__}"
        if self._on_job is not None:
            self._on_job(st.device.name, key, self._monotonic() - started_s, reason is None)
        return reason

    async def _run_job(self, st: _DeviceState, key: str, emit: Emit) -> None:
        if key == CARD_JOB:
            async with st.card_lock:  # card_now may be capturing this device's card too
                # A card is emitted once: the schedule may find the same card again before the RTU has a
                # new one; then only its header is read (None).
                card = await self._session.capture(st, known_at_ns=st.last_card_at_ns)
                if card is not None and self._is_new(st, card):
                    emit(card)
        else:
            for r in await self._session.read_points(st, st.plans.get(key, ())):
                emit(r)
        st.status, st.reason = GOOD, None

    async def acquire_once(self, device: str, *, card: bool = True) -> list[Reading | CardReading]:
        """Poll every group of one device now (and capture its card), keeping what the driver has
        learned about it; for commands such as "card now" and for tests. Failures give BAD readings."""
        st = self._session.states[device]
        out: list[Reading | CardReading] = []
        keys = list(st.plans) + ([CARD_JOB] if card and st.device.card is not None else [])
        for key in keys:
            reason = await self._guarded_job(st, key, out.append)
            if reason is not None:
                return out + self._session.failed(st, reason)
        return out

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

    @staticmethod
    def _is_new(st: _DeviceState, card: CardReading) -> bool:
        """False for a GOOD card already emitted; else True, and a GOOD card becomes the device's newest."""
        if card.quality != Quality.GOOD:
            return True
        if card.acquired_at_ns == st.last_card_at_ns:
            return False
        st.last_card_at_ns = card.acquired_at_ns
        return True

    async def card_now(self, device: str, *, trigger: bool = True) -> tuple[CardReading | None, bool]:
        """Capture `device`'s card now, for the "card.capture" command: (card, new).

        With `trigger`: read the acquisition time, write 1 to the trigger register, read the time
        again every `TRIGGER_POLL_S` until it changes (at most `CardSpec.trigger_timeout_s`), then
        capture the new card. Without: capture the card the RTU holds. Requests go through the
        device's bus like the schedule's, and the schedule's own capture of this device waits for
        this one (and the other way round), so a card is emitted once: `new` is False when the
        device's schedule already emitted this card, and the caller must not emit it again. The card
        is None when the device holds none yet. A failure gives a BAD card with the reason and
        `new` False: it answers the command and is not recorded (the device's schedule records the
        failures of its own jobs). KeyError for an unknown device, ValueError for one without a card
        (or, with `trigger`, without a trigger register).
        """
        st = self._session.states.get(device)
        if st is None:
            raise KeyError(f"no device {device!r}")
        spec = st.device.card
        if spec is None:
            raise ValueError(f"device {device!r} has no card configured")
        if trigger and spec.trigger_register is None:
            raise ValueError(f"device {device!r}: its card has no trigger register")
        try:
            if trigger:
                await self._trigger_card(st, spec)
            async with st.card_lock:
                card = await self._session.capture(st)
                return card, card is not None and self._is_new(st, card)
        except (ModbusError, DeviceFailed, _NoNewCard) as exc:
            reason = exc.reason if isinstance(exc, (ModbusError, DeviceFailed)) else str(exc)
            return CardReading(device=device, acquired_at_ns=0, n_points=0, position_m=(), load_kn=(),
                               current_a=None, power_kw=None, quality=Quality.BAD, ts_ns=self._clock_ns(),
                               reason=f"card: {reason}"), False

    async def _trigger_card(self, st: _DeviceState, spec: CardSpec) -> None:
        """Write the trigger register and wait until the acquisition time changes (_NoNewCard if not)."""
        assert spec.trigger_register is not None
        time_pdu = modicon_to_pdu(spec.acquisition_time_register)[1]
        d = st.device
        before = await self._session.read(st, "holding", time_pdu, TIME_WORDS)
        try:
            async with st.write_lock:
                await st.client.write_registers(modicon_to_pdu(spec.trigger_register)[1], [1],
                                                unit_id=d.unit_id, timeout_s=d.timeout_s)
        except ModbusError as exc:
            raise _NoNewCard(f"trigger refused: {exc.reason}") from exc
        deadline_s = self._monotonic() + spec.trigger_timeout_s
        while (left_s := deadline_s - self._monotonic()) > 0:
            await self._sleep(min(TRIGGER_POLL_S, left_s))
            if await self._session.read(st, "holding", time_pdu, TIME_WORDS) != before:
                return
        raise _NoNewCard(f"no new card within {spec.trigger_timeout_s:g} s of the trigger")

    async def write(self, point: str, value: Value) -> Reading:
        """Write a writable point and confirm by reading it back (GOOD if equal within one scale step).

        Coils use function 05; registers 06 (one word) or 16 (several); a `bits` point is a
        read-modify-write of its register, under a per-device lock so two bit writes cannot undo
        each other. A refused or failed write gives a BAD reading with the reason; a read-back that
        differs gives UNCERTAIN with both values in the reason.
        """
        st, p = self._resolve(point)
        if not p.writable:
            raise PermissionError(f"{st.device.name}/{p.name} is not writable")
        table, start = p.location()
        if table not in ("coil", "holding"):
            raise PermissionError(f"{table} is read-only in Modbus")
        unit, timeout_s = st.device.unit_id, st.device.timeout_s
        try:
            async with st.write_lock:
                if table == "coil":
                    await st.client.write_coil(start, bool(value), unit_id=unit, timeout_s=timeout_s)
                else:
                    words = encode(p, value)
                    if p.type == "bits":
                        # read-modify-write: the other 15 bits of the register must survive
                        (current,) = await self._session.read(st, "holding", start, 1)
                        assert p.bit is not None
                        words = [(int(current) & ~(1 << p.bit)) | words[0]]
                    await st.client.write_registers(start, words, unit_id=unit, timeout_s=timeout_s)
                (back,) = await self._session.read_points(st, plan_reads([p]))
        except (ModbusError, DeviceFailed) as exc:
            return Reading(st.device.name, p.name, None, Quality.BAD, self._clock_ns(), reason=exc.reason)
        if back.quality == Quality.GOOD and not _same(p, back.value, value):
            return Reading(back.device, back.point, back.value, Quality.UNCERTAIN, back.ts_ns,
                           reason=f"read-back {back.value!r} != written {value!r}")
        return back

    def close(self) -> None:
        """Close every connection and serial port (run() does this itself when it ends)."""
        self._session.close()


ModbusTcpDriver = ModbusDriver  # the name the agent has used since TCP was the only transport


def _same(p: ModbusPoint, got: Value, wanted: Value) -> bool:
    if isinstance(got, (int, float)) and isinstance(wanted, (int, float)) and not isinstance(got, bool):
        step = abs(p.scale) if p.type not in ("f32", "f64") else 1e-6 * max(1.0, abs(float(wanted)))
        return abs(float(got) - float(wanted)) <= step
    if isinstance(got, bool) and isinstance(wanted, (bool, int)):
        return got == bool(wanted)
    return got == wanted


async def poll_once(devices: Sequence[ModbusDevice], *, clock_ns: Callable[[], int] = time.time_ns
                    ) -> list[Reading | CardReading]:
    """Read every point (and card) of every device once, concurrently per device; BAD on failure."""
    session = _Session(devices, clock_ns)
    results: dict[str, list[Reading | CardReading]] = {}

    async def one(st: _DeviceState) -> None:
        out: list[Reading | CardReading] = []
        try:
            for blocks in list(st.plans.values()):
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
