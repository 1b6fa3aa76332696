"""Wellsite simulator: N A11 beam-pump RTUs served over Modbus TCP by pymodbus' server.

Theory of operation. Each well is a `WellSim`: a holding-register image laid out by `A11Map` plus a
state that is advanced lazily, from the injected clock, whenever a request reaches the well (no
background task per well, so a fleet of 833 wells costs no CPU while idle). pymodbus calls our
`action` hook on every request before it answers; the hook advances the well and copies the requested
slice of our image into pymodbus' register list, or applies a write.

Cards: a new card is published every card interval (register 40981, minutes; the constructor's
`card_interval_s` overrides the initial value) and `trigger_delay_s` after a non-zero write to the
trigger register 40982 (which reads back non-zero, "card in progress", until the card is out).
Publishing writes time, point count, SPM, stroke and the four curves in one synchronous step, so no
request can see a mix of two cards. Acquisition times are whole seconds and strictly increase, so
every card is distinguishable by its time. Slots n..249 of each curve block read 0.

Scalars drift plausibly: pressures and temperature wander slowly, electrical values follow the card's
motor power, energy counters integrate power and never decrease, a stopped well (write 2 to 40320)
publishes 1302 "stopped" cards. Writable: 40320, 40402 (VFD set frequency, scales SPM), 40981-40983.
Writes elsewhere answer exception 02; bad values answer exception 03.

Unit ids are 1..247 per port; more wells take more ports (`endpoints` lists them).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.base import Value
from drivers.modbus.card import encode_acquisition_time
from drivers.modbus.config import ModbusDevice, a11_device
from drivers.modbus.decode import decode, encode
from hil.a11_map import A11Map
from hil.cards import Card, generate_card, well_profile
from hil.net import free_port

MAX_UNITS_PER_PORT = 247


@dataclass(frozen=True, slots=True)
class CardRecord:
    """What the ring keeps per card; the card itself is regenerated on demand (it is deterministic)."""

    ts_ns: int
    condition: int
    n_points: int
    spm_factor: float


class WellSim:
    """One A11 RTU: register image and state, advanced lazily to `now_s` (pure; no I/O, no tasks)."""

    def __init__(self, name: str, seed: int, *, now_s: float, card_interval_s: float, n_points: int = 200,
                 condition: int = 1202, trigger_delay_s: float = 1.0, ring_size: int = 100,
                 amap: A11Map | None = None) -> None:
        self.name, self.seed = name, seed
        self.map = amap or A11Map()
        self.image = [0] * self.map.size
        self.profile = well_profile(name, seed)
        self.condition = condition
        self.running = condition != 1302
        self.card_interval_s = card_interval_s
        self.trigger_delay_s = trigger_delay_s
        self.set_points = n_points
        self.vfd_hz = 50.0
        self.ring: deque[CardRecord] = deque(maxlen=ring_size)
        self.active_energy_kwh = round(1000.0 + self.profile.rod_weight_kn * 37.0, 2)
        self.reactive_energy_kvarh = self.active_energy_kwh * 0.3
        self._last_s = now_s
        self._last_card_s = 0
        self._trigger_due_s: float | None = None
        self._avg_power_kw = 0.0
        self._phase = (self.profile.rod_weight_kn * 7.3) % (2 * math.pi)
        self._interval_min = max(1, math.ceil(card_interval_s / 60))
        self._put("card_interval", self._interval_min)
        self._put("card_set_points", n_points)
        self._put("start_stop", 1 if self.running else 2)
        self._put("vfd_set_frequency", self.vfd_hz)
        self._publish(now_s)
        self._next_card_s = now_s + card_interval_s
        self._update_scalars(now_s)

    # -- register helpers -------------------------------------------------------------------------
    def _put(self, point: str, value: float | int) -> None:
        p = self.map.point(point)
        start = p.location()[1]
        self.image[start:start + p.register_count()] = encode(p, value)

    def value(self, point: str) -> Value:
        """Decoded current value of a point (what a client would read now, without advancing)."""
        p = self.map.point(point)
        start = p.location()[1]
        return decode(p, self.image[start:start + p.register_count()])

    def _number(self, point: str) -> float:
        v = self.value(point)
        assert isinstance(v, (int, float)), v
        return float(v)

    # -- time -------------------------------------------------------------------------------------
    def advance(self, now_s: float) -> None:
        """Bring cards and scalars up to `now_s` (monotone: an earlier now is ignored)."""
        if now_s < self._last_s:
            return
        if self._trigger_due_s is not None and now_s >= self._trigger_due_s:
            self._publish(self._trigger_due_s)
            self._trigger_due_s = None
            self._put("card_trigger", 0)
        if now_s >= self._next_card_s:
            self._publish(self._next_card_s)
            behind = now_s - self._next_card_s
            self._next_card_s += self.card_interval_s * (1 + int(behind // self.card_interval_s))
        self._update_scalars(now_s)

    def _publish(self, at_s: float) -> None:
        condition = self.condition if self.running else 1302
        acq_s = max(int(at_s), self._last_card_s + 1)  # whole seconds, strictly increasing
        self._last_card_s = acq_s
        rec = CardRecord(acq_s * 1_000_000_000, condition, self.set_points, self.vfd_hz / 50.0)
        card = self.card_for(rec)
        self.ring.append(rec)
        m = self.map
        # one synchronous step: nothing can read between these writes (single-threaded event loop)
        curves = {"position_m": card.position_m, "load_kn": card.load_kn,
                  "current_a": card.current_a, "power_kw": card.power_kw}
        for name, (start, scale) in m.curve_pdus().items():
            values = curves[name] or ()
            words = [round(v / scale) & 0xFFFF for v in values]
            words += [0] * (m.card.block_registers - len(words))
            self.image[start:start + m.card.block_registers] = words
        self.image[m.n_points_pdu] = card.n_points
        self.image[m.time_pdu:m.time_pdu + 6] = encode_acquisition_time(
            card.ts_ns, encoding=m.card.time_encoding, utc_offset_h=m.card.utc_offset_h)
        self._put("spm", card.spm)
        self._put("stroke_length", card.stroke_m)
        self._put("card_measured_points", card.n_points)
        if card.power_kw is not None:
            self._avg_power_kw = max(0.0, sum(card.power_kw) / len(card.power_kw))
        else:
            self._avg_power_kw = 0.0 if not self.running else self.profile.fluid_load_kn * 0.4

    def card_for(self, rec: CardRecord) -> Card:
        return generate_card(self.name, self.seed, rec.ts_ns, rec.condition, n_points=rec.n_points,
                             spm_factor=rec.spm_factor)

    def cards(self) -> list[Card]:
        """The ring of recent cards, oldest first."""
        return [self.card_for(rec) for rec in self.ring]

    def _update_scalars(self, now_s: float) -> None:
        dt_h = max(0.0, now_s - self._last_s) / 3600.0
        self._last_s = now_s
        power = self._avg_power_kw if self.running else 0.0
        self.active_energy_kwh += power * dt_h
        self.reactive_energy_kvarh += power * 0.35 * dt_h
        slow = math.sin(2 * math.pi * now_s / 3600.0 + self._phase)
        p = self.profile
        self._put("tubing_pressure", round(1.2 + 0.3 * p.fluid_load_kn / 20 + 0.05 * slow, 3))
        self._put("casing_pressure", round(0.8 + 0.04 * slow, 3))
        self._put("back_pressure", round(0.5 + 0.02 * slow, 3))
        self._put("wellhead_temperature", round(35.0 + 3.0 * slow, 2))
        self._put("run_status", 1 if self.running else 0)
        self._put("water_cut", round(60.0 + 5.0 * slow, 2))
        self._put("dynamic_fluid_level", round(900.0 + 40.0 * slow, 1))
        amps = (p.motor_no_load_a + power * 2.2) if self.running else 0.0
        for ph, k in (("a", 1.0), ("b", 0.98), ("c", 1.02)):
            self._put(f"current_{ph}_phase", round(amps * k, 2))
            self._put(f"voltage_{ph}_phase", round(380.0 * k + 2.0 * slow, 1))
        self._put("active_energy", round(self.active_energy_kwh, 2))
        self._put("reactive_energy", round(self.reactive_energy_kvarh, 2))
        self._put("active_power", round(power, 2))
        self._put("reactive_power", round(power * 0.35, 2))
        self._put("reverse_power", 0.0)
        self._put("power_factor", 0.86 if self.running else 0.0)
        self._put("vfd_running_frequency", self.vfd_hz if self.running else 0.0)

    # -- requests ---------------------------------------------------------------------------------
    def read(self, start: int, count: int, now_s: float) -> list[int]:
        self.advance(now_s)
        return self.image[start:start + count]

    def write(self, start: int, values: list[int], now_s: float) -> ExcCodes | None:
        """Apply a register write; an exception code when the device would refuse it."""
        self.advance(now_s)
        writable = self.map.writable_pdus()
        if any(a not in writable for a in range(start, start + len(values))):
            return ExcCodes.ILLEGAL_ADDRESS
        before = self.image[:]
        self.image[start:start + len(values)] = values
        code = self._apply_controls(now_s)
        if code is not None:
            self.image = before
        return code

    def _apply_controls(self, now_s: float) -> ExcCodes | None:
        start_stop = int(self._number("start_stop"))
        if start_stop not in (1, 2):
            return ExcCodes.ILLEGAL_VALUE
        self.running = start_stop == 1
        set_points = int(self._number("card_set_points"))
        if not 50 <= set_points <= 250:
            return ExcCodes.ILLEGAL_VALUE
        self.set_points = set_points
        hz = self._number("vfd_set_frequency")
        if not 10.0 <= hz <= 60.0:
            return ExcCodes.ILLEGAL_VALUE
        self.vfd_hz = hz
        minutes = int(self._number("card_interval"))
        if minutes < 1:
            return ExcCodes.ILLEGAL_VALUE
        if minutes != self._interval_min:
            self._interval_min = minutes
            self.card_interval_s = minutes * 60.0
            self._next_card_s = now_s + self.card_interval_s
        if self._number("card_trigger") != 0 and self._trigger_due_s is None:
            self._trigger_due_s = now_s + self.trigger_delay_s
        return None


class Wellsite:
    """N simulated A11 wells on one host, served by pymodbus TCP servers (247 units per port)."""

    def __init__(self, wells: int, *, host: str = "127.0.0.1", port: int = 0, seed: int = 1,
                 card_interval_s: float = 1800.0, n_points: int = 200, trigger_delay_s: float = 1.0,
                 clock: Callable[[], float] = time.time, conditions: dict[int, int] | None = None) -> None:
        """port 0 picks free ports; otherwise ports port, port+1, ... Conditions map unit -> code."""
        if wells < 1:
            raise ValueError("wells must be >= 1")
        self.host, self.seed, self.clock = host, seed, clock
        self._base_port = port
        now = clock()
        self.wells: list[WellSim] = []
        for i in range(wells):
            cond = (conditions or {}).get(i + 1, 1202)
            self.wells.append(WellSim(f"well-{i + 1:03d}", seed, now_s=now, card_interval_s=card_interval_s,
                                      n_points=n_points, condition=cond, trigger_delay_s=trigger_delay_s))
        self._servers: list[ModbusTcpServer] = []
        self.endpoints: list[Endpoint] = []

    async def _action(self, well: WellSim, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values: list[int] | list[bool] | None) -> ExcCodes | None:
        now = self.clock()
        offset = address - start_address
        if set_values is None:
            registers[offset:offset + count] = well.read(address, count, now)
            return None
        return well.write(address, [int(v) for v in set_values], now)

    async def start(self) -> None:
        size = self.wells[0].map.size
        for chunk_index in range(0, len(self.wells), MAX_UNITS_PER_PORT):
            chunk = self.wells[chunk_index:chunk_index + MAX_UNITS_PER_PORT]
            # port 0: free_port() is only free "right now"; the server binds it immediately below
            offset = chunk_index // MAX_UNITS_PER_PORT
            port = free_port() if self._base_port == 0 else self._base_port + offset
            devices = [
                SimDevice(id=unit, simdata=[SimData(0, values=[0] * size, datatype=DataType.REGISTERS)],
                          action=partial(self._action, well))
                for unit, well in enumerate(chunk, start=1)
            ]
            server = ModbusTcpServer(devices, address=(self.host, port))
            await server.serve_forever(background=True)
            self._servers.append(server)
            self.endpoints += [(w.name, self.host, port, unit) for unit, w in enumerate(chunk, start=1)]

    async def stop(self) -> None:
        for server in self._servers:
            await server.shutdown()  # type: ignore[no-untyped-call]
        self._servers.clear()

    async def __aenter__(self) -> Wellsite:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def well(self, name: str) -> WellSim:
        for w in self.wells:
            if w.name == name:
                return w
        raise KeyError(name)


Endpoint = tuple[str, str, int, int]  # (well name, host, port, unit id)


def endpoints_for(wells: int, host: str, port: int) -> list[Endpoint]:
    """The endpoints a `Wellsite(wells, host=host, port=port)` with a fixed base port will serve."""
    return [(f"well-{i + 1:03d}", host, port + i // MAX_UNITS_PER_PORT, i % MAX_UNITS_PER_PORT + 1)
            for i in range(wells)]


def agent_devices_for(wellsite: Wellsite | Sequence[Endpoint], *, poll_interval_s: float = 10.0,
                      card_interval_s: float = 60.0, timeout_s: float = 1.0) -> list[ModbusDevice]:
    """Agent device configs (default A11 map) for a started wellsite or a list of its endpoints."""
    endpoints = wellsite.endpoints if isinstance(wellsite, Wellsite) else list(wellsite)
    return [a11_device(name, host, port, unit, poll_interval_s=poll_interval_s,
                       card_interval_s=card_interval_s, timeout_s=timeout_s)
            for name, host, port, unit in endpoints]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`edge-hil wellsite`: its arguments; `main` (also `func`) is the async entry point `main(args)`."""
    p = subparsers.add_parser("wellsite", help="serve simulated A11 wells over Modbus TCP")
    p.add_argument("--wells", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5020, help="first port (0: free ports)")
    p.add_argument("--card-interval-s", type=float, default=1800.0)
    p.add_argument("--n-points", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(main=main, func=main)
    return p


async def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, after printing one endpoint per line."""
    site = Wellsite(args.wells, host=args.host, port=args.port, seed=args.seed,
                    card_interval_s=args.card_interval_s, n_points=args.n_points)
    await site.start()
    for name, host, port, unit in site.endpoints:
        print(f"{name} {host}:{port} unit {unit}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await site.stop()
    return 0
