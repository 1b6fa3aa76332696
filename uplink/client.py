"""The Uplink: one supervised MQTT client connection (connect, pump, reconnect) behind an async API.

Theory of operation
-------------------
`run()` is the supervisor. Per connection it opens a transport (`transport_factory`, TCP/TLS by
default), queues CONNECT in the sans-I/O `ClientSession` and runs two named tasks in a TaskGroup:
the *reader* feeds received bytes to the session and dispatches its events; the *pump* writes whatever
the session queued (batching every publish made since its last write, which keeps QoS 1 pipelining
cheap) and calls `handle_deadline` when the session's next deadline passes (keepalive, ping and
connect timeouts). When the link ends - EOF, OSError, server DISCONNECT, ping timeout, refusal or a
protocol violation - both tasks stop, the transport is closed and the supervisor sleeps a jittered
exponential backoff (reset after every accepted CONNACK) before the next attempt, until cancelled
or `close()`d.

At-least-once: `publish(qos>=1)` waits for room in the session's inflight window (Receive Maximum),
hands the message to the session and awaits its PUBACK/PUBCOMP. A message whose ack did not arrive
stays in the session across link drops and is resent after the reconnect (DUP=1 when the server
kept the session, as a new publish otherwise), so the caller simply keeps waiting; it only gets
`UplinkClosed` if the Uplink is closed first.

Subscriptions are remembered; after a reconnect with session_present=0 they are re-issued, and a
SUBSCRIBE/UNSUBSCRIBE that was in flight when the link dropped is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from uplink.backoff import Backoff
from uplink.mqtt.errors import LocalProtocolError
from uplink.mqtt.packets import (
    MQTT_5,
    NO_PROPERTIES,
    PROTOCOL_LEVELS,
    Properties,
    Publish,
    Subscription,
    Will,
)
from uplink.mqtt.session import (
    ClientSession,
    Connected,
    ConnectionRefused,
    ConnectTimedOut,
    Disconnected,
    MessageReceived,
    PingTimedOut,
    PublishAcked,
    SessionConfig,
    SessionState,
    Subscribed,
    Unsubscribed,
)
from uplink.tcp import client_ssl_context, open_tcp

log = logging.getLogger(__name__)

CLOSE_FLUSH_TIMEOUT_S = 1.0


class Transport(Protocol):
    """An ordered byte stream to the broker. Failures raise OSError; `recv` returns b"" at EOF.

    `send` must accept (queue) all of its bytes before its first suspension point and only then wait
    for back-pressure, so that cancelling a slow `send` never loses or splits a packet.
    """

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


class UplinkClosed(ConnectionError):
    """The Uplink was closed: the operation was not (or not known to be) completed; do not retry here."""


@dataclass(frozen=True)
class UplinkConfig:
    """Where and how to connect. Validated at construction; field names are the error paths."""

    host: str
    port: int
    client_id: str
    protocol_level: int = MQTT_5
    keep_alive_s: int = 30
    clean_start: bool = False
    session_expiry_s: int = 3600  # MQTT 5 only; how long the broker keeps our session while we are away
    username: str | None = None
    password: bytes | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (TLS only), for brokers that demand mutual TLS
    key_file: str | None = None
    will: Will | None = None
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    ping_timeout_s: float = 15.0
    max_inflight: int = 65535

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host: must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be 1..65535, got {self.port}")
        if self.protocol_level not in PROTOCOL_LEVELS:
            raise ValueError(f"protocol_level: must be one of {PROTOCOL_LEVELS}, got {self.protocol_level}")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ValueError("reconnect_initial_s: must be > 0 and <= reconnect_max_s")
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file: only meaningful with tls=True")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: a client certificate needs both cert_file and key_file")
        if self.cert_file is not None and not self.tls:
            raise ValueError("cert_file: only meaningful with tls=True")
        self.session_config()  # the session validates the rest with the same field names

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            client_id=self.client_id,
            protocol_level=self.protocol_level,
            clean_start=self.clean_start,
            keep_alive_s=self.keep_alive_s,
            username=self.username,
            password=self.password,
            will=self.will,
            session_expiry_s=self.session_expiry_s if self.protocol_level == MQTT_5 else None,
            connect_timeout_s=self.connect_timeout_s,
            ping_timeout_s=self.ping_timeout_s,
            max_inflight=self.max_inflight,
        )


TransportFactory = Callable[[UplinkConfig], Awaitable[Transport]]


def tls_context(config: UplinkConfig) -> ssl.SSLContext | None:
    """The TLS context config asks for (None: plain TCP), read afresh: renewed certificates apply."""
    if not config.tls:
        return None
    return client_ssl_context(config.ca_file, config.cert_file, config.key_file)


async def tcp_transport_factory(config: UplinkConfig) -> Transport:
    """The default transport: TCP, or TLS verifying the server when config.tls."""
    return await open_tcp(config.host, config.port, tls_context(config), config.connect_timeout_s)


@dataclass(eq=False)
class _Request:
    """A SUBSCRIBE or UNSUBSCRIBE the caller awaits; re-sent if the link drops before its ack."""

    subscriptions: tuple[Subscription, ...] = ()
    unsubscribe_filters: tuple[str, ...] = ()
    properties: Properties = NO_PROPERTIES
    future: asyncio.Future[tuple[int, ...]] | None = None  # None: our own resubscribe
    packet_id: int | None = None


class Uplink:
    """One MQTT connection to the cloud broker, kept up until cancelled or closed."""

    def __init__(
        self,
        config: UplinkConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        transport_factory: TransportFactory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.reconnects = 0
        self._clock = clock
        self._transport_factory = transport_factory or tcp_transport_factory
        self._session = ClientSession(config.session_config())
        self._backoff = Backoff(config.reconnect_initial_s, config.reconnect_max_s, 2.0, "full", rng)
        self._transport: Transport | None = None
        self._link_down = asyncio.Event()
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._down = asyncio.Event()  # set while there is no accepted connection
        self._down.set()
        self._stopped = asyncio.Event()
        self._running = False
        self._ever_connected = False
        self._send_lock = asyncio.Lock()
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._room_granted = 0  # waiters woken for a free slot that have not resumed yet
        self._connect_waiters: list[asyncio.Future[None]] = []
        self._subscriptions: dict[str, Subscription] = {}
        self._backlog: deque[_Request] = deque()  # requests to send once connected
        self._in_flight: dict[int, _Request] = {}  # packet id -> request sent on this link
        self._inbound: asyncio.Queue[Publish] = asyncio.Queue()

    # -- public API --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def session(self) -> ClientSession:
        """The underlying session (read-only use: limits from CONNACK, inflight counts)."""
        return self._session

    async def wait_connected(self) -> None:
        """Return once a CONNACK accepted us (immediately if connected); UplinkClosed if closed."""
        await self._wait_connected_or_closed()

    async def wait_disconnected(self) -> None:
        """Return once the link is down (immediately if it is not up)."""
        await self._down.wait()

    async def run(self) -> None:
        """Keep a connection up (reconnecting with backoff) until cancelled or `close()`d."""
        if self._running:
            raise RuntimeError("Uplink.run() is already running")
        self._running = True
        self._stopped.clear()
        try:
            while not self._closed.is_set():
                await self._run_connection()
                if self._closed.is_set():
                    break
                delay_s = self._backoff.next_delay()
                log.info("uplink %s: reconnecting in %.2fs", self.config.client_id, delay_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):
                        await self._closed.wait()
        finally:
            self._running = False
            self._stopped.set()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
    ) -> int:
        """Publish and return the broker's reason code (>= 0x80: refused; 0 for QoS 0 once written).

        Waits for a connection and for room in the inflight window. Raises UplinkClosed if closed
        first, LocalProtocolError if the message can never be sent (bad topic, too large, QoS above
        the server's maximum), ConnectionError if a QoS 0 write failed.
        """
        if qos == 0:
            await self._wait_connected_or_closed()
            self._session.publish(topic, payload, 0, retain, properties, now=self._clock())
            await self._flush_from_caller()
            return 0
        await self._wait_for_room()
        try:
            packet_id = self._session.publish(topic, payload, qos, retain, properties, now=self._clock())
        except LocalProtocolError:
            # The session refused the message (too large, QoS or retain not supported...) and took no
            # slot: pass the slot we were granted on, or the waiters behind us stall until the next ack.
            self._wake_room_waiters()
            raise
        assert packet_id is not None
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = future
        self._wake.set()
        return await future

    async def subscribe(
        self,
        filters: Sequence[Subscription | tuple[str, int]],
        properties: Properties = NO_PROPERTIES,
    ) -> tuple[int, ...]:
        """Subscribe and return the granted QoS / reason codes, one per filter (>= 0x80: refused)."""
        subs = tuple(f if isinstance(f, Subscription) else Subscription(f[0], f[1]) for f in filters)
        if not subs:
            raise ValueError("filters: at least one topic filter is needed")
        future: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._submit(_Request(subscriptions=subs, properties=properties, future=future))
        codes = await future
        for sub, code in zip(subs, codes, strict=False):
            if code < 0x80:
                self._subscriptions[sub.topic_filter] = sub
        return codes

    async def unsubscribe(
        self, filters: Sequence[str], properties: Properties = NO_PROPERTIES
    ) -> tuple[int, ...]:
        """Unsubscribe; returns the reason codes (empty at MQTT 3.1.1)."""
        flts = tuple(filters)
        if not flts:
            raise ValueError("filters: at least one topic filter is needed")
        for flt in flts:
            self._subscriptions.pop(flt, None)  # never resubscribe it, whatever happens to this request
        future: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._submit(_Request(unsubscribe_filters=flts, properties=properties, future=future))
        return await future

    async def inbound(self) -> AsyncIterator[Publish]:
        """Application messages received on our subscriptions, in arrival order."""
        while True:
            yield await self._inbound.get()

    async def close(self, reason_code: int = 0) -> None:
        """Send DISCONNECT (if connected), close the transport and stop `run()`. Pending publishes
        and subscriptions fail with UplinkClosed."""
        if self._closed.is_set():
            return
        self._closed.set()
        transport = self._transport
        if transport is not None and self._session.state is not SessionState.DISCONNECTED:
            self._session.disconnect(reason_code)
            try:
                # Bounded: on a dead link the write (or the lock held by a stuck pump) never completes.
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT_S):
                    await self._flush(transport)
            except OSError as exc:  # TimeoutError included
                log.info("uplink %s: DISCONNECT not delivered: %r", self.config.client_id, exc)
        self._link_down.set()
        if self._running:
            await self._stopped.wait()
        self._fail_waiters(UplinkClosed("uplink closed"))

    # -- one connection ----------------------------------------------------------------------

    async def _run_connection(self) -> None:
        cid = self.config.client_id
        try:
            transport = await self._transport_factory(self.config)
        except OSError as exc:
            log.warning("uplink %s: cannot reach %s:%d: %s", cid, self.config.host, self.config.port, exc)
            return
        self._transport = transport
        self._link_down = link_down = asyncio.Event()
        try:
            if self._closed.is_set():
                return
            self._session.connect(self._clock())
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read_loop(transport, link_down), name=f"uplink-read-{cid}")
                pump = tg.create_task(self._pump_loop(transport, link_down), name=f"uplink-pump-{cid}")
                await link_down.wait()
                reader.cancel()
                pump.cancel()
        finally:
            self._transport = None
            self._session.connection_lost()
            self._down.set()
            await transport.close()

    async def _read_loop(self, transport: Transport, link_down: asyncio.Event) -> None:
        while True:
            try:
                data = await transport.recv()
            except OSError as exc:
                log.warning("uplink %s: receive failed: %s", self.config.client_id, exc)
                break
            if not data:
                log.warning("uplink %s: broker closed the connection", self.config.client_id)
                break
            self._session.receive_data(data, self._clock())
            self._dispatch_events()
            self._wake.set()
        self._session.connection_lost()
        link_down.set()

    async def _pump_loop(self, transport: Transport, link_down: asyncio.Event) -> None:
        session = self._session
        while True:
            self._wake.clear()
            deadline = session.next_deadline()
            if deadline is not None and self._clock() >= deadline:
                session.handle_deadline(self._clock())
                self._dispatch_events()
            # A write stuck on a dead link (full socket buffer) must not hold back the ping timeout:
            # bound it by the next deadline. Cancelling is safe, `send` has queued all bytes by then.
            deadline = session.next_deadline()
            bound = asyncio.timeout(None if deadline is None else max(0.0, deadline - self._clock()))
            try:
                async with bound:
                    await self._flush(transport)
            except OSError as exc:
                if bound.expired():
                    continue
                log.warning("uplink %s: send failed: %s", self.config.client_id, exc)
                session.connection_lost()
                link_down.set()
                return
            if session.state is SessionState.DISCONNECTED:
                link_down.set()  # the final DISCONNECT (if any) is written
                return
            if self._wake.is_set():
                continue
            deadline = session.next_deadline()
            delay_s = None if deadline is None else deadline - self._clock()
            if delay_s is not None and delay_s <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()

    async def _flush(self, transport: Transport) -> None:
        # The lock keeps byte order: data is taken from the session and written under one holder.
        async with self._send_lock:
            data = self._session.data_to_send()
            if data:
                await transport.send(data)

    async def _flush_from_caller(self) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionError("link went down before the QoS 0 message was written")
        try:
            await self._flush(transport)
        except OSError as exc:
            self._session.connection_lost()
            self._link_down.set()
            raise ConnectionError(f"link failed while writing: {exc}") from exc

    # -- session events ---------------------------------------------------------------------

    def _dispatch_events(self) -> None:
        cid = self.config.client_id
        while (event := self._session.next_event()) is not None:
            if isinstance(event, PublishAcked):
                future = self._acks.pop(event.packet_id, None)
                if future is not None and not future.done():
                    future.set_result(event.reason_code)
                self._wake_room_waiters()
            elif isinstance(event, MessageReceived):
                self._inbound.put_nowait(event.publish)
            elif isinstance(event, Subscribed | Unsubscribed):
                self._on_request_acked(event.packet_id, event.reason_codes)
            elif isinstance(event, Connected):
                self._on_connected(event)
            elif isinstance(event, ConnectionRefused):
                log.warning("uplink %s: connection refused, reason 0x%02x %s", cid, event.reason_code,
                            event.reason_string or "")
            elif isinstance(event, Disconnected):
                log.warning("uplink %s: disconnected (%s), reason 0x%02x %s", cid,
                            "by broker" if event.by_server else "protocol violation by broker",
                            event.reason_code, event.reason_string or "")
            elif isinstance(event, PingTimedOut):
                log.warning("uplink %s: no PINGRESP within %.1fs", cid, self.config.ping_timeout_s)
            elif isinstance(event, ConnectTimedOut):
                log.warning("uplink %s: no CONNACK within %.1fs", cid, self.config.connect_timeout_s)

    def _on_connected(self, event: Connected) -> None:
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._backoff.reset()
        self._down.clear()
        log.info("uplink %s: connected to %s:%d (session_present=%s, window %d)", self.config.client_id,
                 self.config.host, self.config.port, event.session_present, self._session.inflight_window)
        # Requests sent on the dead link got no ack: send them again, ahead of newer ones.
        lost = list(self._in_flight.values())
        self._in_flight.clear()
        self._backlog.extendleft(reversed(lost))
        if not event.session_present and self._subscriptions:
            pending = {s.topic_filter for r in self._backlog for s in r.subscriptions}
            again = tuple(s for f, s in self._subscriptions.items() if f not in pending)
            if again:
                self._backlog.appendleft(_Request(subscriptions=again))
        self._send_backlog()
        waiters, self._connect_waiters = self._connect_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._wake_room_waiters()

    def _on_request_acked(self, packet_id: int, reason_codes: tuple[int, ...]) -> None:
        request = self._in_flight.pop(packet_id, None)
        if request is None:
            return
        if request.future is None:
            refused = [s.topic_filter for s, c in zip(request.subscriptions, reason_codes, strict=False)
                       if c >= 0x80]
            if refused:
                log.warning("uplink %s: resubscribe refused for %s", self.config.client_id, refused)
                for flt in refused:
                    self._subscriptions.pop(flt, None)
        elif not request.future.done():
            request.future.set_result(reason_codes)

    def _submit(self, request: _Request) -> None:
        if self._closed.is_set():
            raise UplinkClosed("uplink closed")
        self._backlog.append(request)
        if self._session.connected:
            self._send_backlog()
            self._wake.set()

    def _send_backlog(self) -> None:
        while self._backlog:
            request = self._backlog.popleft()
            if request.future is not None and request.future.done():
                continue  # the caller gave up (cancelled)
            if request.subscriptions:
                packet_id = self._session.subscribe(request.subscriptions, request.properties)
            else:
                packet_id = self._session.unsubscribe(request.unsubscribe_filters, request.properties)
            request.packet_id = packet_id
            self._in_flight[packet_id] = request

    # -- waiting -------------------------------------------------------------------------------

    async def _wait_connected_or_closed(self) -> None:
        while not self._session.connected:
            if self._closed.is_set():
                raise UplinkClosed("uplink closed")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._connect_waiters.append(waiter)
            await waiter

    async def _wait_for_room(self) -> None:
        """FIFO wait until the session accepts another QoS>0 publish (connected and window not full)."""
        while not self._session.can_publish(1):
            if self._closed.is_set():
                raise UplinkClosed("uplink closed")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._room_granted -= 1
                    self._wake_room_waiters()  # we were handed a slot we will not use: pass it on
                raise
            self._room_granted -= 1

    def _wake_room_waiters(self) -> None:
        # Acks arrive in bursts; slots already promised to woken-but-not-yet-running waiters are not
        # free, or each burst would wake (and requeue) quadratically many waiters.
        free = self._session.inflight_free - self._room_granted
        while free > 0 and self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._room_granted += 1
                free -= 1

    def _fail_waiters(self, exc: Exception) -> None:
        for future in self._acks.values():
            if not future.done():
                future.set_exception(exc)
        self._acks.clear()
        for waiter in [*self._room_waiters, *self._connect_waiters]:
            if not waiter.done():
                waiter.set_exception(exc)
        self._room_waiters.clear()
        self._connect_waiters.clear()
        for request in [*self._backlog, *self._in_flight.values()]:
            if request.future is not None and not request.future.done():
                request.future.set_exception(exc)
        self._backlog.clear()
        self._in_flight.clear()
