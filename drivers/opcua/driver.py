"""OPC UA driver: keep one session per server alive and turn its data changes into Readings.

Theory of operation, per server (one named task each, all owned by `run`'s TaskGroup):

    connect (security, identity) -> resolve addresses -> subscribe (or poll) -> ... loss ...
       ^                                                                             |
       +------------------ back-off (reconnect_min_s doubling to _max_s) <-----------+

1. Connect. A secure server needs the client certificate, generated into `cert_dir` on first use.
   Any failure (refused, timeout, BadUserAccessDenied, untrusted certificate) marks every point BAD
   with the status name as reason — once per distinct reason, not once per retry — and the session
   task sleeps its back-off and tries again. Nothing escapes to the caller; only cancellation ends it.
2. Resolve, once per connection: configured NodeIds are normalised (namespace URIs to indexes),
   browse paths translated in one TranslateBrowsePathsToNodeIds call. A point that does not resolve
   is reported BAD with the server's reason and left out until the next connection.
3. Acquire. In subscribe mode one subscription carries a monitored item per point, with the point's
   sampling interval and an absolute deadband DataChangeFilter evaluated by the server. A server
   that refuses the subscription gets polled instead, as do single items it refuses; an item refused
   only for its filter is monitored without it and the driver applies the deadband. In poll mode
   (and for fallbacks) points are read in groups of equal period, at monotonic deadlines.
4. Loss. asyncua's supervisor notices a closed socket or an unanswered keep-alive probe; the link
   raises, every point is reported BAD ("BadConnectionClosed"), and the loop goes back to 1 — a new
   session, fresh address resolution and a new subscription, as a restarted server requires.

Readings: value, quality from the StatusCode severity, reason = the StatusCode name when not plain
Good, `source_ts_ns` from the SourceTimestamp (ServerTimestamp when the device gives none), `ts_ns`
from the injected wall clock when the value reached us.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from drivers.base import Emit, Quality, Reading, Value
from drivers.opcua.certs import ensure_certificate
from drivers.opcua.client import (
    FILTER_REFUSALS,
    MonitorSpec,
    OpcUaConnectionError,
    OpcUaError,
    OpcUaLink,
    OpcUaServiceError,
    Sample,
    default_application_uri,
)
from drivers.opcua.config import OpcUaPoint, OpcUaServer
from drivers.opcua.status import exceeds_deadband, quality_of, reason_of

_log = logging.getLogger(__name__)


def _first_opcua_error(group: BaseExceptionGroup[BaseException]) -> OpcUaError | None:
    for exc in group.exceptions:
        if isinstance(exc, OpcUaError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_opcua_error(exc)
            if inner is not None:
                return inner
    return None


class _ServerSession:
    """Connection loop and point state of one server (see the module docstring)."""

    def __init__(
        self,
        cfg: OpcUaServer,
        clock_ns: Callable[[], int],
        monotonic: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.cfg = cfg
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._rng = rng
        self.link: OpcUaLink | None = None
        self.node_ids: dict[str, str] = {}  # point name -> resolved node id, for this connection
        self._last: dict[str, tuple[Value, Quality, str | None]] = {}  # last reported, for deadbands
        self._down_reason: str | None = None  # reason of the BAD readings last sent for all points
        self._established = False
        self._cert: tuple[Path, Path] | None = None

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        attempt = 0
        while True:
            self._established = False
            try:
                await self._connect_and_acquire(emit)
            except OpcUaError as exc:
                _log.warning("opcua %s: %s", self.cfg.name, exc)
                self._all_bad(emit, exc.reason)
            if self._established:
                attempt = 0
            delay_s = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * 2.0**attempt)
            attempt = min(attempt + 1, 32)
            # Jitter in [0.5, 1] x delay keeps a fleet of agents from reconnecting in lock-step.
            await asyncio.sleep(delay_s * (0.5 + 0.5 * self._rng.random()))

    async def _certificate(self) -> tuple[Path, Path] | None:
        if self.cfg.security_policy == "None":
            return None
        if self._cert is None:
            assert self.cfg.cert_dir is not None  # enforced by OpcUaServer
            uri = self.cfg.application_uri or default_application_uri()
            try:
                self._cert = await asyncio.to_thread(
                    ensure_certificate, self.cfg.cert_dir, uri, socket.gethostname()
                )
            except OSError as exc:
                raise OpcUaConnectionError(
                    "BadCertificateInvalid", f"cannot create client certificate in {self.cfg.cert_dir}: {exc}"
                ) from exc
        return self._cert

    async def _connect_and_acquire(self, emit: Emit) -> None:
        cert = await self._certificate()
        async with OpcUaLink(self.cfg, cert) as link:
            self.link = link
            try:
                await self._acquire(link, emit)
            except BaseExceptionGroup as group:
                # A link failure ends the sibling tasks too; surface it as the one error it is.
                # Anything else in the group (a bug, a cancellation) propagates untouched.
                ours, rest = group.split(OpcUaError)
                first = _first_opcua_error(ours) if ours is not None else None
                if rest is not None or first is None:
                    raise
                raise first from group
            finally:
                self.link = None
                self.node_ids = {}

    async def _acquire(self, link: OpcUaLink, emit: Emit) -> None:
        cfg = self.cfg
        await self._resolve(link, emit)
        self._established = True
        self._down_reason = None
        self._last.clear()  # a new session reports every first value, deadband or not
        resolved = [p for p in cfg.points if p.name in self.node_ids]
        monitored: list[OpcUaPoint] = []
        polled: list[OpcUaPoint] = []
        client_deadband: set[str] = set()
        if cfg.mode == "subscribe" and resolved:
            specs = [
                MonitorSpec(
                    p.name, self.node_ids[p.name], p.sampling_interval_s, p.deadband_abs, p.queue_size
                )
                for p in resolved
            ]
            try:
                refused = await link.subscribe(cfg.publishing_interval_s, specs)
            except OpcUaServiceError as exc:
                _log.warning("opcua %s: subscription refused (%s); polling instead", cfg.name, exc.reason)
                refused = {p.name: exc for p in resolved}
            for p in resolved:
                err = refused.get(p.name)
                if err is None:
                    monitored.append(p)
                elif err.reason in FILTER_REFUSALS:
                    monitored.append(p)
                    client_deadband.add(p.name)
                else:
                    _log.warning("opcua %s: %s not monitored (%s); polling it", cfg.name, p.name, err.reason)
                    polled.append(p)
        else:
            polled = resolved
        periods: dict[float, list[OpcUaPoint]] = {}
        for p in polled:
            periods.setdefault(p.sampling_interval_s or cfg.poll_interval_s, []).append(p)
        async with asyncio.TaskGroup() as tg:
            tag = f"opcua:{cfg.name}"
            tg.create_task(link.wait_lost(), name=f"{tag}:watch")
            if monitored:
                tg.create_task(self._consume(link, emit, client_deadband), name=f"{tag}:subscription")
            for period_s, points in periods.items():
                tg.create_task(self._poll(link, emit, points, period_s), name=f"{tag}:poll:{period_s}s")

    async def _resolve(self, link: OpcUaLink, emit: Emit) -> None:
        by_path = [p for p in self.cfg.points if p.browse_path is not None]
        results: list[str | OpcUaError] = list(await link.resolve_paths([p.path_elements() for p in by_path]))
        targets = dict(zip((p.name for p in by_path), results, strict=True))
        for p in self.cfg.points:
            if p.node_id is not None:
                try:
                    targets[p.name] = await link.node_id(p.node_id)
                except OpcUaServiceError as exc:
                    targets[p.name] = exc
        self.node_ids = {}
        for name, target in targets.items():
            if isinstance(target, OpcUaError):
                _log.warning("opcua %s: cannot resolve %s (%s)", self.cfg.name, name, target.reason)
                self._emit_bad(emit, name, target.reason)
            else:
                self.node_ids[name] = target

    async def _consume(self, link: OpcUaLink, emit: Emit, client_deadband: set[str]) -> None:
        async for name, sample in link.notifications():
            self.report(emit, self.cfg.point(name), sample, deadband=name in client_deadband)

    async def _poll(self, link: OpcUaLink, emit: Emit, points: Sequence[OpcUaPoint], period_s: float) -> None:
        node_ids = [self.node_ids[p.name] for p in points]
        deadline = self._monotonic()
        while True:
            try:
                samples = await link.read(node_ids)
            except OpcUaServiceError as exc:
                for p in points:
                    self._emit_bad(emit, p.name, exc.reason)
            else:
                for p, sample in zip(points, samples, strict=True):
                    self.report(emit, p, sample, deadband=True)
            deadline += period_s
            now = self._monotonic()
            if deadline < now:  # overran (slow server): skip the missed polls rather than burst
                deadline = now
            await asyncio.sleep(deadline - now)

    # -- readings ------------------------------------------------------------------------------

    def reading(self, point: OpcUaPoint, sample: Sample) -> Reading:
        quality = quality_of(sample.status_code)
        # Part 4 §7.39: a Bad value is not to be used; do not pass a stale number on.
        value = None if quality is Quality.BAD else sample.value
        return Reading(
            device=self.cfg.name,
            point=point.name,
            value=value,
            quality=quality,
            ts_ns=self._clock_ns(),
            source_ts_ns=sample.source_ts_ns,
            reason=reason_of(sample.status_code, sample.status_name),
        )

    def report(self, emit: Emit, point: OpcUaPoint, sample: Sample, *, deadband: bool) -> None:
        """Emit a sample, unless the driver-side deadband says it is no news."""
        reading = self.reading(point, sample)
        if deadband and point.deadband_abs is not None:
            last = self._last.get(point.name)
            if (
                last is not None
                and last[1] == reading.quality
                and last[2] == reading.reason
                and not exceeds_deadband(last[0], reading.value, point.deadband_abs)
            ):
                return
        self._last[point.name] = (reading.value, reading.quality, reading.reason)
        emit(reading)

    def _emit_bad(self, emit: Emit, name: str, reason: str) -> None:
        self._last[name] = (None, Quality.BAD, reason)
        emit(
            Reading(
                device=self.cfg.name,
                point=name,
                value=None,
                quality=Quality.BAD,
                ts_ns=self._clock_ns(),
                reason=reason,
            )
        )

    def _all_bad(self, emit: Emit, reason: str) -> None:
        if reason == self._down_reason:
            return
        self._down_reason = reason
        for p in self.cfg.points:
            self._emit_bad(emit, p.name, reason)

    def bad_reading(self, point: OpcUaPoint, reason: str) -> Reading:
        return Reading(
            device=self.cfg.name,
            point=point.name,
            value=None,
            quality=Quality.BAD,
            ts_ns=self._clock_ns(),
            reason=reason,
        )


class OpcUaDriver:
    """Acquires every configured OPC UA server concurrently; `write` sets a point and reads it back.

    Points are named `server/point`, or just `point` when no other server has a point of that name.
    """

    name = "opcua"

    def __init__(
        self,
        servers: Sequence[OpcUaServer],
        *,
        clock_ns: Callable[[], int],
        monotonic: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        names = [s.name for s in servers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate OPC UA server names: {dup}")
        rng = rng or random.Random()
        self._sessions = {s.name: _ServerSession(s, clock_ns, monotonic, rng) for s in servers}

    async def run(self, emit: Emit) -> None:
        """Acquire from all servers until cancelled; failures become BAD readings, never exceptions."""
        async with asyncio.TaskGroup() as tg:
            for name, session in self._sessions.items():
                tg.create_task(session.run(emit), name=f"opcua:{name}")

    def _locate(self, point: str) -> tuple[_ServerSession, OpcUaPoint]:
        server, sep, name = point.rpartition("/")
        if sep:
            session = self._sessions.get(server)
            if session is None:
                raise KeyError(f"no OPC UA server {server!r}")
            return session, session.cfg.point(name)
        found = [(s, p) for s in self._sessions.values() for p in s.cfg.points if p.name == name]
        if not found:
            raise KeyError(f"no OPC UA point {name!r}")
        if len(found) > 1:
            raise KeyError(f"point {name!r} exists on several servers; use server/point")
        return found[0]

    async def write(self, point: str, value: Value) -> Reading:
        """Write value (as the variable's own data type) and return the read-back reading.

        KeyError for an unknown point, ValueError for a point not configured writable. A refused
        write or a missing connection is a BAD reading with the reason; a read-back that differs
        from what was written is UNCERTAIN with reason "read-back mismatch".
        """
        session, p = self._locate(point)
        if not p.writable:
            raise ValueError(f"point {point!r} is not writable (set writable = true in its config)")
        link = session.link
        node_id = session.node_ids.get(p.name)
        if link is None or not link.connected:
            return session.bad_reading(p, "BadNotConnected")
        if node_id is None:
            return session.bad_reading(p, "BadNodeIdUnknown")
        try:
            sample, confirmed = await link.write(node_id, value)
        except OpcUaError as exc:
            return session.bad_reading(p, exc.reason)
        reading = session.reading(p, sample)
        if reading.quality is Quality.GOOD and not confirmed:
            reading = dataclasses.replace(reading, quality=Quality.UNCERTAIN, reason="read-back mismatch")
        return reading
