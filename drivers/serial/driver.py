"""Serial line driver: one owned task per port reads, decodes, decimates and emits; lost ports are reopened.

Theory of operation. Each port runs `open -> pump -> close -> wait -> open ...` in its own task
(`serial:<name>`) inside one TaskGroup, so a port that vanishes (USB unplug, pty gone) never stalls the
others. The pump waits for bytes with a short timeout, so decimated reports and the idle check fire on
time even on a silent line. Decoding is pure (`PortDecoder`); this module only moves bytes and time.
Reopen waits double from `reopen_initial_s` to `reopen_max_s` and reset after a successful open. The
line status point turns BAD with the reason on the first failure of a series, not on every retry.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from drivers.base import Emit, Quality, Reading, Value
from drivers.serial.config import SerialPortConfig, SlcanProtocol
from drivers.serial.dbc import CanDatabase
from drivers.serial.decimate import Decimator
from drivers.serial.decoder import PortDecoder, PortStats
from drivers.serial.port import SerialLink, SerialPortError

WAKE_S = 0.5  # longest sleep of a pump without bytes; bounds how late the idle check can be


@dataclass(slots=True)
class _Port:
    cfg: SerialPortConfig
    decoder: PortDecoder
    decimator: Decimator[Reading]
    last_frame_s: float


class SerialDriver:
    """Acquires every configured serial port until cancelled (see the module docstring)."""

    def __init__(self, ports: Sequence[SerialPortConfig], *, clock_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic, name: str = "serial") -> None:
        names = [p.name for p in ports]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate serial port names: {dup}")
        self.name = name
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        databases: dict[str, CanDatabase] = {}  # one load per DBC file shared by several ports
        now_s = monotonic()
        self._ports: dict[str, _Port] = {}
        for cfg in ports:
            db = None
            if isinstance(cfg.protocol, SlcanProtocol):
                path = cfg.protocol.dbc
                if path not in databases:
                    databases[path] = CanDatabase.from_file(path)
                db = databases[path]
            decoder = PortDecoder(cfg, dbc=db)
            decimator: Decimator[Reading] = Decimator(
                start_s=now_s, default_interval_s=cfg.report_interval_s,
                intervals_s={cfg.status_point: None, **cfg.report_intervals_s})
            self._ports[cfg.name] = _Port(cfg, decoder, decimator, now_s)

    def stats(self, port: str) -> PortStats:
        """Counters of one port by name (KeyError if unknown)."""
        return self._ports[port].decoder.stats

    async def run(self, emit: Emit) -> None:
        async with asyncio.TaskGroup() as tg:
            for port in self._ports.values():
                tg.create_task(self._run_port(port, emit), name=f"serial:{port.cfg.name}")

    async def write(self, point: str, value: Value) -> Reading:
        """Serial points are read-only: the answer is a BAD reading saying so (do not retry)."""
        return Reading(self.name, point, value, Quality.BAD, self._clock_ns(),
                       reason="not writable: serial line points are read-only")

    def _emit_all(self, readings: list[Reading], port: _Port, emit: Emit) -> None:
        now_s = self._monotonic()
        for r in readings:
            passed = port.decimator.offer(r.point, r, now_s)
            if passed is not None:
                emit(passed)

    async def _run_port(self, port: _Port, emit: Emit) -> None:
        cfg = port.cfg
        delay_s = cfg.reopen_initial_s
        first_failure = True
        while True:
            try:
                link = await SerialLink.open(cfg)
            except SerialPortError as exc:
                port.decoder.stats.open_failures += 1
                if first_failure:
                    self._emit_all(port.decoder.port_lost(exc.reason, self._clock_ns()), port, emit)
                    first_failure = False
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, cfg.reopen_max_s)
                continue
            port.decoder.stats.opens += 1
            delay_s = cfg.reopen_initial_s
            port.last_frame_s = self._monotonic()
            try:
                if isinstance(cfg.protocol, SlcanProtocol):
                    for command in cfg.protocol.init_commands:
                        link.write(command.encode("ascii") + b"\r")
                await self._pump(port, link, emit)
            except SerialPortError as exc:
                port.decoder.stats.losses += 1
                # The pending decimated values are the last ones before the loss: report them now
                # rather than after the port returns.
                for r in port.decimator.due(math.inf):
                    emit(r)
                self._emit_all(port.decoder.port_lost(exc.reason, self._clock_ns()), port, emit)
                first_failure = False
            finally:
                await link.close()
            await asyncio.sleep(delay_s)

    async def _pump(self, port: _Port, link: SerialLink, emit: Emit) -> None:
        cfg = port.cfg
        while True:
            now_s = self._monotonic()
            wake_s = WAKE_S
            deadline = port.decimator.next_deadline()
            if deadline is not None:
                wake_s = min(wake_s, max(0.0, deadline - now_s))
            data = await link.read(wake_s)
            now_s = self._monotonic()
            if data:
                frames_before = port.decoder.stats.frames
                self._emit_all(port.decoder.feed(data, self._clock_ns()), port, emit)
                if port.decoder.stats.frames > frames_before:
                    port.last_frame_s = now_s
            for r in port.decimator.due(now_s):
                emit(r)
            if cfg.idle_timeout_s is not None and now_s - port.last_frame_s >= cfg.idle_timeout_s:
                self._emit_all(port.decoder.idle(now_s - port.last_frame_s, self._clock_ns()), port, emit)
