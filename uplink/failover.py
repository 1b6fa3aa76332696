"""Link policy for the Uplink: QUIC first, TCP/TLS when QUIC cannot be had, back to QUIC when it returns.

Theory of operation
-------------------
`FailoverTransportFactory` is a `transport_factory` for `uplink.client.Uplink`. Each call (the
Uplink calls it for every connection attempt, after its own jittered exponential backoff):

1. After a link that had been up was lost, the first attempt waits `spread_s(client_id,
   fleet_spread_window_s)` once: a fleet that lost its broker at the same instant comes back
   spread evenly over the window instead of in one storm (the Uplink's jitter spreads the rest).
2. If QUIC is not in a penalty period it is tried (handshake bounded by the QUIC handshake
   timeout). A handshake that fails or times out - UDP blocked, a middlebox, a wrong certificate
   - starts a penalty period drawn from a jittered exponential `Backoff` (probe_initial_s ..
   probe_max_s) and the attempt falls through to TCP/TLS at once. A 0-RTT link returns before
   its handshake completes; if that handshake then fails, the next call counts it the same way.
3. QUIC refused as overloaded (application error 2) is not a reason to hammer the same broker
   over TCP: the attempt fails and the Uplink backs off.
4. TCP/TLS (`UplinkConfig.host/port/tls/ca_file`) otherwise.

While the active link is TCP, `run_prober()` (a task the owner runs beside `Uplink.run()`)
re-probes QUIC whenever the penalty period ends: a bare handshake, closed at once with code 0.
When it succeeds the TCP link is ended cleanly - an MQTT DISCONNECT (reason 0, so no Will is
published) written between two whole packets, then close - and the Uplink's next attempt picks
QUIC. The MQTT session survives: the Uplink connects with clean_start=false and a session expiry,
and resends whatever was not acknowledged. A failed probe lengthens the penalty.

`active` ("quic", "tcp" or None) and `quic_link` tell metrics/status which transport carries the
session now; `quic_link.open_data_stream()` is how file transfer gets its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from uplink.backoff import Backoff, spread_s
from uplink.client import Transport, UplinkConfig, tls_context
from uplink.mqtt.codec import encode
from uplink.mqtt.packets import Disconnect
from uplink.quic import (
    APP_ERROR_NORMAL,
    QuicHandshakeError,
    QuicLink,
    QuicOverloaded,
    QuicSettings,
    open_quic,
)
from uplink.tcp import TcpTransport, open_tcp

log = logging.getLogger(__name__)

ActiveTransport = Literal["quic", "tcp"]


@dataclass(frozen=True)
class FailoverConfig:
    """QUIC settings plus the failover policy. Validated at construction; field names are the paths."""

    quic: QuicSettings = field(default_factory=QuicSettings)
    quic_enabled: bool = True
    tcp_enabled: bool = True
    probe_initial_s: float = 30.0  # first QUIC penalty after a failed handshake
    probe_max_s: float = 600.0
    fleet_spread_window_s: float = 0.0  # 0: no extra spread (the Uplink's backoff jitter only)

    def __post_init__(self) -> None:
        if not (self.quic_enabled or self.tcp_enabled):
            raise ValueError("quic_enabled: at least one of QUIC and TCP must be enabled")
        if not 0 < self.probe_initial_s <= self.probe_max_s:
            raise ValueError("probe_initial_s: must be > 0 and <= probe_max_s")
        if self.fleet_spread_window_s < 0:
            raise ValueError("fleet_spread_window_s: must be >= 0")


class _TcpLink:
    """The TCP/TLS transport as handed to the Uplink, with a clean way to end it for a switch-over."""

    def __init__(self, inner: TcpTransport, protocol_level: int) -> None:
        self._inner = inner
        self._level = protocol_level
        self._lock = asyncio.Lock()
        self.switched = False

    async def send(self, data: bytes) -> None:
        # The lock keeps a switch-over DISCONNECT between whole packets (the session writes whole
        # packets per call). TcpTransport.send writes before it first suspends, as required.
        if self.switched:
            raise ConnectionResetError("link ended for a switch to QUIC")
        async with self._lock:
            await self._inner.send(data)

    async def recv(self) -> bytes:
        return await self._inner.recv()

    async def close(self) -> None:
        await self._inner.close()

    async def switch_over(self) -> None:
        """End this link cleanly (MQTT DISCONNECT reason 0: the broker keeps the session, no Will)."""
        async with self._lock:
            self.switched = True
            with contextlib.suppress(OSError):
                async with asyncio.timeout(2.0):
                    await self._inner.send(encode(Disconnect(0), self._level))
        await self._inner.close()


class FailoverTransportFactory:
    """`Uplink(transport_factory=FailoverTransportFactory(...))`; see the module docstring."""

    def __init__(
        self,
        config: FailoverConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_quic_link: Callable[[QuicLink], None] | None = None,
    ) -> None:
        self.config = config
        self.active: ActiveTransport | None = None
        self.quic_link: QuicLink | None = None
        self.tcp_link: _TcpLink | None = None
        self.quic_failures = 0
        self.switches_to_quic = 0
        self._clock = clock
        self._probe_backoff = Backoff(config.probe_initial_s, config.probe_max_s, 2.0, "equal", rng)
        self._quic_penalty_until = 0.0
        self._on_quic_link = on_quic_link
        self._was_up = False
        self._probe_wake = asyncio.Event()
        self._uplink_config: UplinkConfig | None = None

    @property
    def quic_allowed_now(self) -> bool:
        return self.config.quic_enabled and self._clock() >= self._quic_penalty_until

    async def __call__(self, config: UplinkConfig) -> Transport:
        self._uplink_config = config
        self._account_previous_link()
        if self._was_up:
            self._was_up = False
            delay_s = spread_s(config.client_id, self.config.fleet_spread_window_s)
            if delay_s > 0:
                log.info("uplink %s: fleet spread: reconnecting in %.1fs", config.client_id, delay_s)
                await asyncio.sleep(delay_s)
        if self.quic_allowed_now or not self.config.tcp_enabled:
            try:
                return await self._open_quic(config)
            except QuicOverloaded:
                raise  # same broker over TCP would be just as overloaded: let the Uplink back off
            except OSError as exc:
                self._quic_failed(config, exc)
                if not self.config.tcp_enabled:
                    raise
        return await self._open_tcp(config)

    async def run_prober(self) -> None:
        """Re-probe QUIC while TCP carries the session; switch back when QUIC works. Until cancelled."""
        while True:
            if self.active == "tcp" and self.tcp_link is not None and self.config.quic_enabled:
                wait_s = max(0.0, self._quic_penalty_until - self._clock())
            else:
                wait_s = None
            self._probe_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._probe_wake.wait()
            if wait_s is None or self.active != "tcp" or self._uplink_config is None:
                continue
            if self._clock() < self._quic_penalty_until:
                continue
            await self._probe(self._uplink_config)

    # -- internals ---------------------------------------------------------------------------------

    async def _open_quic(self, config: UplinkConfig) -> Transport:
        link = await open_quic(config.host, self.config.quic, keep_alive_s=config.keep_alive_s,
                               connect_timeout_s=config.connect_timeout_s)
        self.quic_link = link
        self.tcp_link = None
        self.active = "quic"
        self._was_up = True
        if link.handshake_completed:
            self._quic_ok()
        if self._on_quic_link is not None:
            self._on_quic_link(link)
        log.info("uplink %s: QUIC link to %s:%d%s", config.client_id, config.host,
                 self.config.quic.port, " (0-RTT)" if link.early_data_attempted else "")
        return link.control

    async def _open_tcp(self, config: UplinkConfig) -> Transport:
        inner = await open_tcp(config.host, config.port, tls_context(config), config.connect_timeout_s)
        link = _TcpLink(inner, config.protocol_level)
        self.tcp_link = link
        self.quic_link = None
        self.active = "tcp"
        self._was_up = True
        self._probe_wake.set()
        log.info("uplink %s: %s link to %s:%d", config.client_id, "TLS" if config.tls else "TCP",
                 config.host, config.port)
        return link

    def _account_previous_link(self) -> None:
        link = self.quic_link
        if link is not None and link.handshake_completed:
            self._quic_ok()
        elif link is not None:
            # A 0-RTT link returns before its handshake; one that never completed it (UDP blocked
            # since the ticket was issued) is a QUIC failure like a handshake timeout.
            self._penalize()
            self.quic_link = None

    def _quic_failed(self, config: UplinkConfig, exc: OSError) -> None:
        self._penalize()
        log.warning("uplink %s: QUIC unavailable (%s): TCP for now, QUIC again in %.0fs",
                    config.client_id, exc, self._quic_penalty_until - self._clock())

    def _penalize(self) -> None:
        self.quic_failures += 1
        self._quic_penalty_until = self._clock() + self._probe_backoff.next_delay()

    def _quic_ok(self) -> None:
        self._probe_backoff.reset()
        self._quic_penalty_until = 0.0

    async def _probe(self, config: UplinkConfig) -> None:
        try:
            link = await open_quic(config.host, self.config.quic, keep_alive_s=config.keep_alive_s,
                                   connect_timeout_s=config.connect_timeout_s, wait_handshake=True)
        except (QuicHandshakeError, OSError) as exc:
            self._penalize()
            log.info("uplink %s: QUIC probe failed (%s); next in %.0fs", config.client_id, exc,
                     self._quic_penalty_until - self._clock())
            return
        await link.close(APP_ERROR_NORMAL)
        self._quic_ok()
        tcp = self.tcp_link
        if tcp is not None and self.active == "tcp":
            log.info("uplink %s: QUIC is back: leaving TCP", config.client_id)
            self.switches_to_quic += 1
            await tcp.switch_over()
