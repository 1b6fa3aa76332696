"""T-Box simulator: a vehicle on a route, as NMEA (RMC+GGA at 1 Hz) on one serial port and SLCAN on another.

The vehicle model is a pure function of simulated time (`VehicleModel.state(t_s)`): a repeating drive
cycle (accelerate, cruise, brake, stand) moves the vehicle along a closed route of waypoints; engine
speed, coolant warm-up, battery state of charge, pack voltage and current follow from speed and
acceleration. The CAN side sends every message of the DBC at its own `GenMsgCycleTime` (10 ms..1 s;
100 ms when the DBC gives none) as Lawicel SLCAN lines, the way a USB-CAN adapter on a live bus
would. Both writers reopen their port when it vanishes, like a device that was unplugged.

`sent` keeps the values that actually went on the wire (decoded back from the encoded payload, so
quantised exactly as a receiver sees them); tests compare what the driver reports against it.
`corrupt_every = N` garbles every Nth line (bad NMEA checksum / truncated SLCAN line) to exercise the
receiver's error handling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.serial.dbc import CanDatabase, MessageInfo
from drivers.serial.nmea import KNOT_KMH, format_sentence
from drivers.serial.port import SerialLink, SerialPortError
from drivers.serial.slcan import CanFrame, format_frame

DEFAULT_DBC = Path(__file__).with_name("dbc") / "vehicle.dbc"
DEFAULT_CYCLE_MS = 100
EARTH_RADIUS_M = 6_371_000.0
WRITE_BACKLOG_LIMIT_BYTES = 16 * 1024  # beyond this, frames are dropped like an overrun adapter
REOPEN_S = 0.2
# A closed loop of about 4.6 km in the Daqing oil field area (lat, lon in degrees).
DEFAULT_ROUTE: tuple[tuple[float, float], ...] = (
    (46.5880, 125.1040), (46.5880, 125.1300), (46.5990, 125.1300), (46.5990, 125.1040),
)
# Drive cycle (s): accelerate, cruise, brake, stand.
ACCEL_S, CRUISE_S, BRAKE_S, STAND_S = 20.0, 60.0, 15.0, 10.0
CYCLE_S = ACCEL_S + CRUISE_S + BRAKE_S + STAND_S


@dataclass(frozen=True, slots=True)
class VehicleState:
    lat_deg: float
    lon_deg: float
    speed_kmh: float
    course_deg: float
    accel_mps2: float
    signals: dict[str, float]


def _local_xy(origin: tuple[float, float], p: tuple[float, float]) -> tuple[float, float]:
    """Equirectangular projection around `origin` (metres east, north): fine over a few km."""
    lat0 = math.radians(origin[0])
    return (math.radians(p[1] - origin[1]) * EARTH_RADIUS_M * math.cos(lat0),
            math.radians(p[0] - origin[0]) * EARTH_RADIUS_M)


class VehicleModel:
    """Deterministic vehicle state at simulated time t (seconds since start)."""

    def __init__(self, route: Sequence[tuple[float, float]] = DEFAULT_ROUTE, *,
                 cruise_kmh: float = 60.0, start_soc_pct: float = 85.0) -> None:
        if len(route) < 2:
            raise ValueError("a route needs at least two waypoints")
        self.route = tuple(route)
        self.cruise_kmh = cruise_kmh
        self.start_soc_pct = start_soc_pct
        closed = [*self.route, self.route[0]]
        self._legs: list[tuple[tuple[float, float], tuple[float, float], float, float]] = []
        for a, b in itertools.pairwise(closed):
            x, y = _local_xy(a, b)
            length = math.hypot(x, y)
            if length > 0:
                self._legs.append((a, b, length, math.degrees(math.atan2(x, y)) % 360.0))
        self.route_m = sum(leg[2] for leg in self._legs)
        v = cruise_kmh / 3.6
        self._cycle_m = v * ACCEL_S / 2 + v * CRUISE_S + v * BRAKE_S / 2

    def _speed_accel_distance(self, t_s: float) -> tuple[float, float, float]:
        """(speed m/s, acceleration m/s², distance m) of the drive cycle at t."""
        v = self.cruise_kmh / 3.6
        n, u = divmod(t_s, CYCLE_S)
        d = n * self._cycle_m
        if u < ACCEL_S:
            a = v / ACCEL_S
            return a * u, a, d + a * u * u / 2
        d += v * ACCEL_S / 2
        u -= ACCEL_S
        if u < CRUISE_S:
            return v, 0.0, d + v * u
        d += v * CRUISE_S
        u -= CRUISE_S
        if u < BRAKE_S:
            a = -v / BRAKE_S
            return v + a * u, a, d + v * u + a * u * u / 2
        return 0.0, 0.0, d + v * BRAKE_S / 2

    def _place(self, along_m: float) -> tuple[float, float, float]:
        """(lat, lon, course) at `along_m` metres from the first waypoint."""
        for a, b, length, course in self._legs:
            if along_m <= length:
                f = along_m / length
                return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, course
            along_m -= length
        return self.route[0][0], self.route[0][1], self._legs[0][3]  # float rounding at the loop's end

    def state(self, t_s: float) -> VehicleState:
        speed, accel, dist = self._speed_accel_distance(max(0.0, t_s))
        lat, lon, course = self._place(dist % self.route_m)
        kmh = speed * 3.6
        soc = max(5.0, self.start_soc_pct - dist / 1000.0 * 0.15)  # ~0.15 % per km
        current_a = 15.0 + 0.6 * kmh + 120.0 * accel  # regenerative braking -> negative
        signals = {
            "EngineSpeed": 750.0 + 32.0 * kmh,
            "VehicleSpeed": kmh,
            "CoolantTemp": 90.0 - 70.0 * math.exp(-t_s / 300.0),
            "SOC": soc,
            "PackVoltage": 560.0 + 1.2 * soc - 0.04 * current_a,
            "PackCurrent": current_a,
            "ChargeState": 0.0,
        }
        return VehicleState(lat, lon, kmh, course, accel, signals)


def _nmea_angle(value: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    a = abs(value)
    deg = int(a)
    minutes = (a - deg) * 60.0
    if round(minutes, 5) >= 60.0:  # 59.999995 would print as 60.00000
        deg, minutes = deg + 1, 0.0
    return (f"{deg:02d}{minutes:08.5f}" if lat else f"{deg:03d}{minutes:08.5f}"), hemi


def nmea_lines(state: VehicleState, utc_ns: int, *, satellites: int = 9) -> list[bytes]:
    """RMC and GGA sentences for one fix (talker GP)."""
    tm = time.gmtime(utc_ns // 1_000_000_000)
    cs = (utc_ns // 10_000_000) % 100
    hms = f"{tm.tm_hour:02d}{tm.tm_min:02d}{tm.tm_sec:02d}.{cs:02d}"
    date = f"{tm.tm_mday:02d}{tm.tm_mon:02d}{tm.tm_year % 100:02d}"
    lat, ns = _nmea_angle(state.lat_deg, True)
    lon, ew = _nmea_angle(state.lon_deg, False)
    knots = f"{state.speed_kmh / KNOT_KMH:.2f}"
    course = f"{state.course_deg:.1f}" if state.speed_kmh > 0 else ""
    rmc = format_sentence("GPRMC", [hms, "A", lat, ns, lon, ew, knots, course, date, "", "", "A"])
    gga = format_sentence("GPGGA", [hms, lat, ns, lon, ew, "1", f"{satellites:02d}", "0.9", "152.3", "M",
                                    "-9.8", "M", "", ""])
    return [rmc, gga]


@dataclass(slots=True)
class TboxStats:
    nmea_lines: int = 0
    can_frames: int = 0
    corrupted: int = 0
    overruns: int = 0  # frames dropped because the port did not drain
    reopens: int = 0


@dataclass(slots=True)
class _Schedule:
    message: MessageInfo
    cycle_s: float
    due_s: float


@dataclass
class TboxSimulator:
    """Writes NMEA to `nmea_port` and SLCAN to `can_port` (either may be None) until cancelled."""

    nmea_port: str | None
    can_port: str | None
    dbc: CanDatabase = field(default_factory=lambda: CanDatabase.from_file(DEFAULT_DBC))
    model: VehicleModel = field(default_factory=VehicleModel)
    corrupt_every: int = 0
    can_timestamps: bool = False
    nmea_interval_s: float = 1.0
    clock_ns: Callable[[], int] = time.time_ns
    monotonic: Callable[[], float] = time.monotonic
    stats: TboxStats = field(default_factory=TboxStats)
    sent: dict[str, deque[float]] = field(default_factory=dict)  # signal -> recent values on the wire
    nmea_sent: deque[bytes] = field(default_factory=lambda: deque(maxlen=100))
    _lines: int = 0

    def _corrupt_now(self) -> bool:
        self._lines += 1
        return self.corrupt_every > 0 and self._lines % self.corrupt_every == 0

    async def run(self) -> None:
        start_s = self.monotonic()
        async with asyncio.TaskGroup() as tg:
            if self.nmea_port is not None:
                tg.create_task(self._writer(self.nmea_port, self._nmea_loop, start_s), name="tbox:nmea")
            if self.can_port is not None:
                tg.create_task(self._writer(self.can_port, self._can_loop, start_s), name="tbox:can")

    async def _writer(self, path: str, loop: Callable[[SerialLink, float], Coroutine[Any, Any, None]],
                      start_s: float) -> None:
        """Open `path`, run `loop` on it, and reopen whenever the port vanishes."""
        while True:
            try:
                link = await SerialLink.open_path(path, baudrate=115200)
            except SerialPortError:
                await asyncio.sleep(REOPEN_S)  # port absent (pty pair stopped): wait for it to return
                continue
            self.stats.reopens += 1
            try:
                await loop(link, start_s)
            except SerialPortError:
                pass  # the other side of the cable went away; reopen below
            finally:
                await link.close()
            await asyncio.sleep(REOPEN_S)

    def _write(self, link: SerialLink, data: bytes) -> bool:
        if link.write_buffer_bytes() > WRITE_BACKLOG_LIMIT_BYTES:
            self.stats.overruns += 1
            return False
        link.write(data)
        return True

    async def _nmea_loop(self, link: SerialLink, start_s: float) -> None:
        due_s = self.monotonic()
        while True:
            now_s = self.monotonic()
            if due_s > now_s:
                await asyncio.sleep(due_s - now_s)
            due_s += self.nmea_interval_s
            state = self.model.state(self.monotonic() - start_s)
            for line in nmea_lines(state, self.clock_ns()):
                if self._corrupt_now():
                    self.stats.corrupted += 1
                    bad_sum = b"00" if line[-4:-2] != b"00" else b"11"
                    self._write(link, line[:-4] + bad_sum + b"\r\n")
                elif self._write(link, line):
                    self.nmea_sent.append(line)
                    self.stats.nmea_lines += 1

    async def _can_loop(self, link: SerialLink, start_s: float) -> None:
        now_s = self.monotonic()
        schedule = [_Schedule(m, (m.cycle_time_ms or DEFAULT_CYCLE_MS) / 1000.0, now_s)
                    for m in self.dbc.messages]
        while True:
            now_s = self.monotonic()
            next_s = min(s.due_s for s in schedule)
            if next_s > now_s:
                await asyncio.sleep(next_s - now_s)
                now_s = self.monotonic()
            signals = self.model.state(now_s - start_s).signals
            for s in schedule:
                if s.due_s > now_s:
                    continue
                # Advance by whole cycles from the previous deadline: no drift, no catch-up bursts.
                s.due_s += s.cycle_s * (1 + int((now_s - s.due_s) // s.cycle_s))
                self._send_frame(link, s.message, signals, now_s)

    def _send_frame(self, link: SerialLink, m: MessageInfo, signals: dict[str, float], now_s: float) -> None:
        payload = self.dbc.encode(m.name, {k: v for k, v in signals.items() if k in m.signals})
        ts = int(now_s * 1000) % 60_000 if self.can_timestamps else None
        frame = CanFrame(m.frame_id, payload, is_extended=m.is_extended, timestamp_ms=ts)
        line = format_frame(frame)
        if self._corrupt_now():
            self.stats.corrupted += 1
            self._write(link, line[: len(line) // 2] + b"\r")  # truncated: a line cut mid-frame
            return
        if self._write(link, line):
            self.stats.can_frames += 1
            for name, value in self.dbc.decode(frame).items():
                self.sent.setdefault(name, deque(maxlen=2000)).append(float(value))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "tbox", help="simulate a vehicle T-Box: NMEA position and SLCAN CAN frames on serial ports",
        description="Drive a vehicle around a route and write NMEA (RMC+GGA, 1 Hz) and SLCAN frames from a "
        "DBC signal model. Without --nmea-port/--can-port, starts two socat pty pairs in --dir and prints "
        "the ports the agent should open.")
    p.add_argument("--dir", type=Path, default=None, help="where to create pty links (default: a temp dir)")
    p.add_argument("--nmea-port", default=None, help="write NMEA to this existing port instead")
    p.add_argument("--can-port", default=None, help="write SLCAN to this existing port instead")
    p.add_argument("--dbc", type=Path, default=DEFAULT_DBC, help="DBC signal model (default: %(default)s)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0 = until interrupted)")
    p.add_argument("--corrupt-every", type=int, default=0, help="garble every Nth line (0 = never)")
    p.add_argument("--can-timestamps", action="store_true", help="append SLCAN timestamps (Z1 mode)")
    p.add_argument("--cruise-kmh", type=float, default=60.0)
    p.set_defaults(main=main)


async def main(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        nmea_port, can_port = args.nmea_port, args.can_port
        if nmea_port is None and can_port is None:
            from hil.pty import pty_pair

            directory = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tbox-")))
            directory.mkdir(parents=True, exist_ok=True)
            await stack.enter_async_context(pty_pair(directory / "gps.sim", directory / "gps"))
            await stack.enter_async_context(pty_pair(directory / "can.sim", directory / "can"))
            nmea_port, can_port = str(directory / "gps.sim"), str(directory / "can.sim")
            print(f"tbox: nmea on {directory / 'gps'}, slcan on {directory / 'can'}", flush=True)
        sim = TboxSimulator(nmea_port, can_port, dbc=CanDatabase.from_file(args.dbc),
                            model=VehicleModel(cruise_kmh=args.cruise_kmh), corrupt_every=args.corrupt_every,
                            can_timestamps=args.can_timestamps)
        try:
            async with asyncio.timeout(args.duration or None):
                await sim.run()
        except TimeoutError:
            pass
        s = sim.stats
        print(f"tbox: nmea_lines={s.nmea_lines} can_frames={s.can_frames} corrupted={s.corrupted} "
              f"overruns={s.overruns}", flush=True)
    return 0
