"""Wellsite simulator: A11 beam-pump RTUs served over Modbus TCP and Modbus RTU (a serial line / pty).

Theory of operation. Each well is a `WellSim`: a holding-register image laid out by `A11Map` plus a
state that is advanced lazily, from the injected clock, whenever a request reaches the well (no
background task per well, so a fleet of 833 wells costs no CPU while idle). `WellSim.handle` turns a
request PDU into a response PDU; the servers below only move bytes (`drivers.modbus.wire` frames them),
so TCP and RTU wells behave identically.

Cards: a new card is published every card interval (register 40981, minutes; the constructor's
`card_interval_s` overrides the initial value) and `trigger_delay_s` after a non-zero write to the
trigger register 40982 (which reads back non-zero, "card in progress", until the card is out).
Publishing writes time, point count, SPM, stroke and the four curves in one synchronous step, so no
request can see a mix of two cards. Acquisition times are whole seconds and strictly increase, so
every card is distinguishable by its time. Slots n..249 of each curve block read 0. Cards of slots
nobody asked about are kept in the ring (100 by default) as records and rendered only on demand.

Scalars drift plausibly: pressures and temperature wander slowly, electrical values follow the card's
motor power, energy counters integrate power and never decrease, a stopped well (write 2 to 40320)
publishes 1302 "stopped" cards. Writable: 40320, 40402 (VFD set frequency, scales SPM), 40981-40983,
plus any map point marked writable (registers and coils). Writes elsewhere answer exception 02; bad
values answer exception 03. `strict=True` also refuses (02) reads that touch unmapped registers, the
way many real RTUs do; otherwise unmapped registers read 0. `artefacts` injects field artefacts into
every card (see hil.cards).

Transports. TCP: up to 247 unit ids per port; more wells take more ports (`endpoints` lists them);
a request for an absent unit answers exception 0B (gateway target failed to respond). RTU: up to 247
wells on one serial port (normally one end of a socat pty pair, `hil.pty`); a request for an absent
unit, or with a bad CRC, gets no answer (serial line v1.02 §2.4.1). The line is 8N2 (11 bits per
character, as the spec's default 8E1; a Linux pty refuses parity settings). With `pace=True` the RTU line
runs at wire speed: the response's last byte leaves when the request and the response would have
taken (request bytes + response bytes) * 11 / baudrate seconds on a real line, and the response is
written in small chunks at that rate, so wire time in benchmarks is real.

Faults (`set_fault(well, kind)`), for bad-input tests: "silent" (no answer), "crc" (a corrupted CRC;
garbage on TCP), "garbage", "short" (a truncated frame), "wrong_unit" (a well-formed answer from
another unit id), "busy" (exception 06), "disconnect" (TCP: close the connection; RTU: silent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import msgspec
import serial

from drivers.base import Value
from drivers.modbus.card import encode_acquisition_time
from drivers.modbus.config import ModbusDevice
from drivers.modbus.decode import decode, encode
from drivers.modbus.wire import (
    ILLEGAL_ADDRESS,
    ILLEGAL_FUNCTION,
    ILLEGAL_VALUE,
    MBAP_HEADER_BYTES,
    WRITE_MULTIPLE_COILS,
    WRITE_MULTIPLE_REGISTERS,
    WRITE_SINGLE_COIL,
    WRITE_SINGLE_REGISTER,
    BadRequest,
    Request,
    check_rtu,
    decode_request,
    encode_response,
    exception_response,
    mbap_frame,
    rtu_frame,
    split_rtu_request,
    wire_time_s,
)
from hil.a11_map import A11Map
from hil.cards import Artefacts, Card, generate_card, well_profile
from hil.net import free_port

MAX_UNITS_PER_PORT = 247
GATEWAY_TARGET_FAILED = 11
DEVICE_BUSY = 6
Fault = Literal["none", "silent", "crc", "garbage", "short", "wrong_unit", "busy", "disconnect"]
FAULTS: tuple[str, ...] = ("none", "silent", "crc", "garbage", "short", "wrong_unit", "busy", "disconnect")


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
                 amap: A11Map | None = None, strict: bool = False,
                 artefacts: Artefacts | None = None, max_registers: int = 125) -> None:
        self.name, self.seed = name, seed
        self.max_registers = max_registers  # some RTUs refuse longer reads with exception 03
        self.map = amap or A11Map()
        self.image = [0] * self.map.size
        self.strict = strict
        self.artefacts = artefacts
        # strict: a request touching an unmapped register is refused with exception 02, as many RTUs do
        self._mapped = bytearray(self.map.size)
        for a in self.map.mapped_pdus():
            self._mapped[a] = 1
        self._writable = self.map.writable_pdus()
        self._points = {p.name: p for p in self.map.points}
        coils = self.map.coil_points()
        self.coils = [0] * (max((p.location()[1] + 1 for p in coils), default=0))
        self._writable_coils = {p.location()[1] for p in coils if p.writable}
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
        p = self._points[point]
        start = p.location()[1]
        self.image[start:start + p.register_count()] = encode(p, value)

    def value(self, point: str) -> Value:
        """Decoded current value of a point (what a client would read now, without advancing)."""
        p = self._points[point]
        table, start = p.location()
        if table == "coil":
            return decode(p, [bool(self.coils[start])])
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
            # Cards of slots the well was not asked about are recorded in the ring without being
            # generated (they are deterministic, `card_for` regenerates any of them); only the newest
            # is rendered into registers. That keeps a fleet of idle wells cheap over a simulated day.
            missed = int((now_s - self._next_card_s) // self.card_interval_s)
            for k in range(max(0, missed - (self.ring.maxlen or missed)), missed):
                self._record(self._next_card_s + k * self.card_interval_s)
            self._next_card_s += missed * self.card_interval_s
            self._publish(self._next_card_s)
            self._next_card_s += self.card_interval_s
        self._update_scalars(now_s)

    def _record(self, at_s: float) -> CardRecord:
        condition = self.condition if self.running else 1302
        acq_s = max(int(at_s), self._last_card_s + 1)  # whole seconds, strictly increasing
        self._last_card_s = acq_s
        rec = CardRecord(acq_s * 1_000_000_000, condition, self.set_points, self.vfd_hz / 50.0)
        self.ring.append(rec)
        return rec

    def _publish(self, at_s: float) -> None:
        card = self.card_for(self._record(at_s))
        m = self.map
        # one synchronous step: nothing can read between these writes (single-threaded event loop)
        curves = {"position_m": card.position_m, "load_kn": card.load_kn,
                  "current_a": card.current_a, "power_kw": card.power_kw}
        for name, (start, scale) in m.curve_pdus().items():
            values = curves[name] or ()
            inverse = round(1 / scale)
            words = [round(v * inverse) & 0xFFFF for v in values]
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
                             spm_factor=rec.spm_factor, artefacts=self.artefacts)

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
    def handle(self, req: Request, now_s: float) -> bytes:
        """The response PDU to a request PDU (an exception response when the RTU refuses it)."""
        f = req.function
        if f == 3:
            if req.count > self.max_registers:
                return exception_response(f, ILLEGAL_VALUE)
            words = self.read(req.address, req.count, now_s)
            return encode_response(req, words) if isinstance(words, list) else exception_response(f, words)
        if f == 1:
            end = req.address + req.count
            if end > len(self.coils):
                return exception_response(f, ILLEGAL_ADDRESS)
            return encode_response(req, self.coils[req.address:end])
        if f in (WRITE_SINGLE_REGISTER, WRITE_MULTIPLE_REGISTERS):
            code = self.write(req.address, list(req.values), now_s)
            return encode_response(req) if code is None else exception_response(f, code)
        if f in (WRITE_SINGLE_COIL, WRITE_MULTIPLE_COILS):
            addrs = range(req.address, req.address + len(req.values))
            if any(a not in self._writable_coils for a in addrs):
                return exception_response(f, ILLEGAL_ADDRESS)
            self.coils[req.address:req.address + len(req.values)] = list(req.values)
            return encode_response(req)
        # the A11 map has no input registers or discrete inputs
        return exception_response(f, ILLEGAL_ADDRESS if f in (2, 4) else ILLEGAL_FUNCTION)

    def read(self, start: int, count: int, now_s: float) -> list[int] | int:
        """The registers, or exception code 02 when the range leaves the image (or the map, if strict)."""
        end = start + count
        if end > len(self.image) or (self.strict and not all(self._mapped[start:end])):
            return ILLEGAL_ADDRESS
        self.advance(now_s)
        return self.image[start:end]

    def write(self, start: int, values: list[int], now_s: float) -> int | None:
        """Apply a register write; an exception code when the device would refuse it."""
        self.advance(now_s)
        if any(a not in self._writable for a in range(start, start + len(values))):
            return ILLEGAL_ADDRESS
        before = self.image[:]
        self.image[start:start + len(values)] = values
        code = self._apply_controls(now_s)
        if code is not None:
            self.image = before
        return code

    def _apply_controls(self, now_s: float) -> int | None:
        start_stop = int(self._number("start_stop"))
        if start_stop not in (1, 2):
            return ILLEGAL_VALUE
        self.running = start_stop == 1
        set_points = int(self._number("card_set_points"))
        if not 50 <= set_points <= 250:
            return ILLEGAL_VALUE
        self.set_points = set_points
        hz = self._number("vfd_set_frequency")
        if not 10.0 <= hz <= 60.0:
            return ILLEGAL_VALUE
        self.vfd_hz = hz
        minutes = int(self._number("card_interval"))
        if minutes < 1:
            return ILLEGAL_VALUE
        if minutes != self._interval_min:
            self._interval_min = minutes
            self.card_interval_s = minutes * 60.0
            self._next_card_s = now_s + self.card_interval_s
        if self._number("card_trigger") != 0 and self._trigger_due_s is None:
            self._trigger_due_s = now_s + self.trigger_delay_s
        return None


Endpoint = tuple[str, str, int, int]  # (well name, host or serial port, TCP port (0 for RTU), unit id)


class Wellsite:
    """N simulated A11 wells on one host, over Modbus TCP (247 units per port) or RTU (one serial line)."""

    def __init__(self, wells: int, *, host: str = "127.0.0.1", port: int = 0, seed: int = 1,
                 card_interval_s: float = 1800.0, n_points: int = 200, trigger_delay_s: float = 1.0,
                 clock: Callable[[], float] = time.time, conditions: dict[int, int] | None = None,
                 transport: Literal["tcp", "rtu"] = "tcp", serial_port: str = "", agent_serial_port: str = "",
                 baudrate: int = 19200, pace: bool = True, strict: bool = False, amap: A11Map | None = None,
                 artefacts: Artefacts | None = None, max_registers: int = 125,
                 units_per_port: int = MAX_UNITS_PER_PORT) -> None:
        """port 0 picks free ports; otherwise ports port, port+1, ... Conditions map unit -> code.

        TCP: `units_per_port` wells share one port as unit ids 1..n (a gateway); 1 gives every well its
        own port, like a fleet of RTUs with their own addresses.

        RTU: the simulator opens `serial_port`; `agent_serial_port` (the other end of the pty pair) is
        only what `endpoints` and `agent_devices_for` tell the agent to open.
        """
        if wells < 1:
            raise ValueError("wells must be >= 1")
        if not 1 <= units_per_port <= MAX_UNITS_PER_PORT:
            raise ValueError(f"units_per_port must be in 1..{MAX_UNITS_PER_PORT}")
        self.units_per_port = units_per_port
        if transport == "rtu":
            if wells > MAX_UNITS_PER_PORT:
                raise ValueError(f"one RTU line carries at most {MAX_UNITS_PER_PORT} units")
            if not serial_port:
                raise ValueError("transport rtu needs serial_port")
        self.host, self.seed, self.clock = host, seed, clock
        self.transport = transport
        self.serial_port, self.agent_serial_port = serial_port, agent_serial_port or serial_port
        self.baudrate, self.pace = baudrate, pace
        self.map = amap or A11Map()
        self._base_port = port
        now = clock()
        self.wells: list[WellSim] = []
        for i in range(wells):
            cond = (conditions or {}).get(i + 1, 1202)
            self.wells.append(WellSim(f"well-{i + 1:03d}", seed, now_s=now, card_interval_s=card_interval_s,
                                      n_points=n_points, condition=cond, trigger_delay_s=trigger_delay_s,
                                      amap=self.map, strict=strict, artefacts=artefacts,
                                      max_registers=max_registers))
        self.faults: dict[str, Fault] = {}
        self.requests_served = 0
        self.endpoints: list[Endpoint] = []
        self._servers: list[asyncio.Server] = []
        self._clients: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._units: dict[int, dict[int, WellSim]] = {}  # port (0 for RTU) -> unit -> well
        self._tg: asyncio.TaskGroup | None = None
        self._line: _RtuLine | None = None

    def set_fault(self, well: str, fault: Fault) -> None:
        """Make a well misbehave from its next answer on ("none" heals it)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        self.well(well)
        self.faults[well] = fault

    def respond(self, port: int, unit: int, pdu: bytes) -> tuple[WellSim | None, bytes]:
        """(the addressed well, its response PDU); no well: (None, b"")."""
        well = self._units.get(port, {}).get(unit)
        if well is None:
            return None, b""
        self.requests_served += 1
        try:
            req = decode_request(pdu)
        except BadRequest as exc:
            return well, exception_response(pdu[0] if pdu else 0, exc.code)
        if self.faults.get(well.name) == "busy":
            return well, exception_response(req.function, DEVICE_BUSY)
        return well, well.handle(req, self.clock())

    def faulty(self, well: WellSim, unit: int, response: bytes,
               make: Callable[[int, bytes], bytes]) -> bytes | None:
        """The frame (`make(unit, pdu)`) to send for `well`'s answer after its fault; None for no answer."""
        frame = make(unit, response)
        fault = self.faults.get(well.name, "none")
        if fault in ("silent", "disconnect"):
            return None
        if fault == "crc":
            return frame[:-1] + bytes((frame[-1] ^ 0xFF,))
        if fault == "garbage":
            return b"\xde\xad\xbe\xef\x00\x13\x37\x42\x42\x42\x42\x42"
        if fault == "short":
            return frame[: max(3, len(frame) // 2)]
        if fault == "wrong_unit":
            return make(unit % MAX_UNITS_PER_PORT + 1, response)
        return frame

    async def start(self) -> None:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        if self.transport == "rtu":
            self._units[0] = {unit: w for unit, w in enumerate(self.wells, start=1)}
            self._line = _RtuLine(self, self.serial_port, self.baudrate, self.pace)
            self._line.open()
            name = f"wellsite-rtu-{os.path.basename(self.serial_port)}"
            self._tg.create_task(self._line.serve(), name=name)
            self.endpoints = [(w.name, self.agent_serial_port, 0, u) for u, w in enumerate(self.wells, 1)]
            return
        for chunk_index in range(0, len(self.wells), self.units_per_port):
            chunk = self.wells[chunk_index:chunk_index + self.units_per_port]
            offset = chunk_index // self.units_per_port
            # port 0: free_port() is only free "right now"; the server binds it immediately below
            port = free_port() if self._base_port == 0 else self._base_port + offset
            self._units[port] = {unit: w for unit, w in enumerate(chunk, start=1)}
            server = await asyncio.start_server(partial(self._serve_tcp, port), self.host, port)
            self._servers.append(server)
            self.endpoints += [(w.name, self.host, port, unit) for unit, w in enumerate(chunk, start=1)]

    async def _serve_tcp(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[writer] = task
        try:
            while True:
                header = await reader.readexactly(MBAP_HEADER_BYTES)
                tid, proto, length, unit = struct.unpack(">HHHB", header)
                if proto != 0 or not 2 <= length <= 254:
                    break  # not Modbus/TCP: drop the connection, as devices do
                pdu = await reader.readexactly(length - 1)
                well, response = self.respond(port, unit, pdu)
                if well is None:
                    writer.write(mbap_frame(tid, unit, exception_response(pdu[0], GATEWAY_TARGET_FAILED)))
                    continue
                if self.faults.get(well.name) == "disconnect":
                    break
                frame = self.faulty(well, unit, response, partial(mbap_frame, tid))
                if frame is not None:
                    writer.write(frame)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away: nothing to answer
        finally:
            self._clients.pop(writer, None)
            writer.close()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        handlers = list(self._clients.values())
        for writer in list(self._clients):
            writer.close()  # Python 3.11's Server.close() leaves accepted connections open
        await asyncio.gather(*handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._tg is not None:
            if self._line is not None:
                self._line.close()
            await self._tg.__aexit__(None, None, None)
            self._tg = None

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


class _RtuLine:
    """The simulator's end of a serial line: reads requests, answers for its units, paced at the baud rate.

    Framing by length (the function code says how long a request is), not by silence: a pty has no
    inter-character timing. A frame with a bad CRC or for an absent unit is dropped without an answer.
    """

    def __init__(self, site: Wellsite, path: str, baudrate: int, pace: bool) -> None:
        self.site, self.path, self.baudrate, self.pace = site, path, baudrate, pace
        self._port: serial.Serial | None = None
        self._rx = bytearray()
        self._first_byte_at = 0.0
        self._arrived = asyncio.Event()
        self._closed = asyncio.Event()

    def open(self) -> None:
        # 8N2: 11 bits per character like the spec's 8E1 (a Linux pty refuses parity with EINVAL)
        self._port = serial.Serial(self.path, self.baudrate, parity="N", stopbits=2, timeout=0)
        asyncio.get_running_loop().add_reader(self._port.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._port is not None
        try:
            data = self._port.read(4096)
        except serial.SerialException:
            data = b""  # the other end went away; the agent will reopen it
        if data:
            if not self._rx:
                self._first_byte_at = asyncio.get_running_loop().time()
            self._rx += data
            self._arrived.set()

    def close(self) -> None:
        if self._port is not None:
            asyncio.get_running_loop().remove_reader(self._port.fileno())
            self._port.close()
            self._port = None
        self._closed.set()
        self._arrived.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed.is_set():
            await self._arrived.wait()
            self._arrived.clear()
            while (found := split_rtu_request(bytes(self._rx))) is not None:
                frame, unit, pdu = found
                started = self._first_byte_at
                del self._rx[:len(frame)]
                self._first_byte_at = loop.time()
                if not check_rtu(frame):
                    self._rx.clear()  # a corrupted request: the line is garbage until the next silence
                    break
                well, response = self.site.respond(0, unit, pdu)
                if well is None or not response:
                    continue
                out = self.site.faulty(well, unit, response, rtu_frame)
                if out is not None:
                    await self._send(out, started + wire_time_s(len(frame), self.baudrate))

    async def _send(self, frame: bytes, start_at: float) -> None:
        """Write the frame so that its k-th byte is out (k+1) character times after `start_at`."""
        loop = asyncio.get_running_loop()
        chunk = max(1, int(self.baudrate / 11 * 0.004)) if self.pace else len(frame)  # ~4 ms of bytes
        for i in range(0, len(frame), chunk):
            piece = frame[i:i + chunk]
            if self.pace:
                due = start_at + wire_time_s(i + len(piece), self.baudrate)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self._port is None:
                return
            with contextlib.suppress(BlockingIOError):
                self._port.write(piece)


def endpoints_for(wells: int, host: str, port: int,
                  units_per_port: int = MAX_UNITS_PER_PORT) -> list[Endpoint]:
    """The endpoints a `Wellsite(wells, host=host, port=port)` with a fixed base port will serve."""
    return [(f"well-{i + 1:03d}", host, port + i // units_per_port, i % units_per_port + 1)
            for i in range(wells)]


def agent_devices_for(wellsite: Wellsite | Sequence[Endpoint], *, poll_interval_s: float = 10.0,
                      card_interval_s: float = 60.0, timeout_s: float = 1.0, retries: int = 1,
                      amap: A11Map | None = None) -> list[ModbusDevice]:
    """Agent device configs (the site's map) for a started wellsite or a list of its TCP endpoints."""
    if isinstance(wellsite, Wellsite):
        endpoints, amap = wellsite.endpoints, amap or wellsite.map
        rtu, baudrate = wellsite.transport == "rtu", wellsite.baudrate
    else:
        endpoints, rtu, baudrate = list(wellsite), False, 19200
    amap = amap or A11Map()
    card = msgspec.structs.replace(amap.card, interval_s=card_interval_s)
    out = []
    for name, where, port, unit in endpoints:
        if rtu:
            out.append(ModbusDevice(name=name, transport="rtu", serial_port=where, baudrate=baudrate,
                                    parity="N", stopbits=2, unit_id=unit, timeout_s=timeout_s,
                                    retries=retries, poll_interval_s=poll_interval_s,
                                    points=amap.points, card=card))
        else:
            out.append(ModbusDevice(name=name, host=where, port=port, unit_id=unit, timeout_s=timeout_s,
                                    retries=retries, poll_interval_s=poll_interval_s, points=amap.points,
                                    card=card))
    return out


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`edge-hil wellsite`: its arguments; `main` (also `func`) is the async entry point `main(args)`."""
    p = subparsers.add_parser("wellsite", help="serve simulated A11 wells over Modbus TCP or RTU")
    p.add_argument("--wells", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5020, help="first port (0: free ports)")
    p.add_argument("--units-per-port", type=int, default=MAX_UNITS_PER_PORT,
                   help="TCP: wells per port as unit ids 1..n (1: a port per well)")
    p.add_argument("--rtu", metavar="SERIAL_PORT", default="", help="serve RTU on this serial port instead")
    p.add_argument("--baudrate", type=int, default=19200)
    p.add_argument("--no-pace", action="store_true", help="RTU: answer at once instead of at wire speed")
    p.add_argument("--strict", action="store_true", help="refuse reads of unmapped registers (exception 02)")
    p.add_argument("--card-interval-s", type=float, default=1800.0)
    p.add_argument("--n-points", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(main=main, func=main)
    return p


async def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, after printing one endpoint per line."""
    site = Wellsite(args.wells, host=args.host, port=args.port, seed=args.seed,
                    card_interval_s=args.card_interval_s, n_points=args.n_points,
                    transport="rtu" if args.rtu else "tcp", serial_port=args.rtu, baudrate=args.baudrate,
                    pace=not args.no_pace, strict=args.strict, units_per_port=args.units_per_port)
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
