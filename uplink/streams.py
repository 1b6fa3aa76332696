"""asyncio glue for one QUIC data stream beside an Uplink: `publish(...) -> reason code`, as `Uplink` has.

Theory of operation
-------------------
`DataStreamUplink(uplink, current_link)` carries traffic that must never queue behind telemetry on
the control stream - files - on a QUIC data stream of the Uplink's current connection. It has the
part of `Uplink`'s surface a file uploader uses: `publish`, `subscribe`, `unsubscribe`, `inbound`,
`wait_connected`, `config` (the Uplink's) and `session` (the control session: the server's limits).

`run()` is the supervisor (one named TaskGroup): whenever the Uplink is connected it asks
`current_link()` for the QUIC link under it (`FailoverTransportFactory.quic_link`, say):
- a QUIC link: open a data stream, `attach` the pure `DataStreamSession` with the CONNACK limits,
  run a reader and a pump until the stream or the connection ends, `detach`. A stream reset or FIN
  while the connection lives gets a new stream at once (A9); a new connection gets one once its
  CONNACK is in (A10; the server parks data streams until then anyway, but we need its limits).
  The session re-subscribes and resends what was not acknowledged; callers just keep waiting.
- no QUIC link (the failover runs TCP/TLS): the data stream's work moves onto the control
  connection - publishes waiting for an ack and open requests are handed to `Uplink.publish` /
  `subscribe` (their callers get that result), the stream's subscriptions are made there, and new
  calls go straight to the Uplink until a QUIC link is back (A12: the same FT logic on top).
Publishes wait for room in the stream's own inflight window (`DataStreamConfig.max_inflight`, at
most the server's Receive Maximum).

Packet ids: `run()` makes the Uplink's session and this stream members of one `PacketIdRegistry`,
so ids are unique across the connection (A6). Give several DataStreamUplinks of one Uplink the same
registry.

Receive Maximum on our own broker: its QUIC listener serves every stream of a connection from one
core session, whose Receive Maximum then bounds control + data publishes together. So give the
Uplink `max_inflight` <= broker Receive Maximum minus the data streams' `max_inflight` (with the
broker default 1024 and ours 32: 992). EMQX keeps a window per stream and needs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Literal

from uplink.client import Uplink, UplinkClosed, UplinkConfig
from uplink.mqtt.packets import NO_PROPERTIES, Properties, Publish, Subscribe, Subscription
from uplink.mqtt.session import ClientSession, MessageReceived, PublishAcked, Subscribed, Unsubscribed
from uplink.mqtt.stream_session import (
    DataStreamConfig,
    DataStreamSession,
    PacketIdRegistry,
    StreamFailed,
    StreamLimits,
)
from uplink.quic import QuicLink, QuicStream, QuicStreamError

log = logging.getLogger(__name__)

Mode = Literal["stream", "control"]
_REOPEN_DELAY_S = 0.2  # between failed attempts to open a stream on a live connection


class DataStreamUplink:
    """A QUIC data stream with an Uplink-like API (see the module docstring)."""

    def __init__(
        self,
        uplink: Uplink,
        current_link: Callable[[], QuicLink | None],
        stream_config: DataStreamConfig | None = None,
        *,
        registry: PacketIdRegistry | None = None,
        name: str = "data",
    ) -> None:
        self.uplink = uplink
        self.name = name
        self.stream_config = stream_config or DataStreamConfig(
            protocol_level=uplink.config.protocol_level,
            topic_alias_maximum=uplink.session.config.topic_alias_maximum)
        self.registry = registry or PacketIdRegistry()
        self.stream_session = DataStreamSession(self.stream_config, self.registry)
        self.mode: Mode | None = None  # where publishes go now; None: nowhere yet (wait)
        self.streams_opened = 0
        self.stream_failures = 0
        self._current_link = current_link
        self._stream: QuicStream | None = None
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._requests: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._inbound: asyncio.Queue[Publish] = asyncio.Queue()
        self._changed = asyncio.Event()  # replaced on every notify: waiters re-check their condition
        self._wake = asyncio.Event()  # the pump has bytes to write
        self._closed = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None

    # -- the Uplink-like surface -----------------------------------------------------------------------

    @property
    def config(self) -> UplinkConfig:
        return self.uplink.config

    @property
    def session(self) -> ClientSession:
        """The control session (read-only: the server's limits from CONNACK apply to every stream)."""
        return self.uplink.session

    @property
    def connected(self) -> bool:
        return self.mode is not None

    async def wait_connected(self) -> None:
        while self.mode is None:
            await self._wait_change()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      properties: Properties = NO_PROPERTIES) -> int:
        """Publish on the data stream (or, over TCP, the control connection); the broker's reason code.

        Waits for a stream and for room in its window; a publish cut by a stream reset or a reconnect
        is resent and keeps waiting. UplinkClosed if closed first; LocalProtocolError if never sendable.
        """
        while True:
            if self.mode == "control":
                return await self.uplink.publish(topic, payload, qos, retain, properties)
            if self.mode == "stream" and self.stream_session.can_publish(qos):
                break
            await self._wait_change()
        packet_id = self.stream_session.publish(topic, payload, qos, retain, properties)
        self._wake.set()
        if packet_id is None:
            return 0
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = future
        return await future

    async def subscribe(self, filters: Sequence[Subscription | tuple[str, int]],
                        properties: Properties = NO_PROPERTIES) -> tuple[int, ...]:
        """Subscribe on the data stream: deliveries for these filters arrive here (`inbound`)."""
        while True:
            if self.mode == "control":
                return await self.uplink.subscribe(filters, properties)
            if self.mode == "stream":
                break
            await self._wait_change()
        packet_id = self.stream_session.subscribe(filters, properties)
        return await self._request(packet_id)

    async def unsubscribe(self, filters: Sequence[str],
                          properties: Properties = NO_PROPERTIES) -> tuple[int, ...]:
        while True:
            if self.mode == "control":
                return await self.uplink.unsubscribe(filters, properties)
            if self.mode == "stream":
                break
            await self._wait_change()
        packet_id = self.stream_session.unsubscribe(filters, properties)
        return await self._request(packet_id)

    async def inbound(self) -> AsyncIterator[Publish]:
        """Messages delivered on the data stream (over TCP they come through `uplink.inbound()`)."""
        while True:
            yield await self._inbound.get()

    async def close(self) -> None:
        """FIN the stream and stop `run()`; pending calls fail with UplinkClosed."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._stream is not None:
            with contextlib.suppress(OSError):
                await self._stream.close()
        self._fail_waiters(UplinkClosed(f"data stream {self.name} closed"))
        self._notify()

    # -- supervisor --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a data stream up beside the Uplink until cancelled or closed."""
        self.registry.join_control(self.uplink.session)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                while not self._closed.is_set():
                    if not await self._until(self.uplink.wait_connected()):
                        break
                    link = self._current_link()
                    if link is None or link.closed:
                        await self._serve_control()
                        continue
                    try:
                        stream = await link.open_data_stream()
                    except QuicStreamError as exc:
                        log.warning("data stream %s: cannot open a stream: %s", self.name, exc)
                        await self._until(asyncio.sleep(_REOPEN_DELAY_S))
                        continue
                    await self._serve_stream(link, stream)
        except UplinkClosed:
            pass  # the Uplink was closed: so are we
        finally:
            self._tg = None
            self.mode = None
            self._closed.set()
            self.registry.leave(self.stream_session)
            self._fail_waiters(UplinkClosed(f"data stream {self.name} stopped"))

    async def _serve_stream(self, link: QuicLink, stream: QuicStream) -> None:
        session = self.stream_session
        self._stream = stream
        self.streams_opened += 1
        session.attach(StreamLimits.of(self.uplink.session))
        self._dispatch()
        self.mode = "stream"
        self._notify()
        log.info("data stream %s: on QUIC stream %d (%d publishes to resend)", self.name,
                 stream.stream_id, session.inflight)
        down = asyncio.Event()
        failure: list[StreamFailed] = []
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._guard(self._read(stream, failure), down),
                                   name=f"stream-{self.name}-read"),
                    tg.create_task(self._guard(self._pump(stream), down), name=f"stream-{self.name}-pump"),
                    tg.create_task(self._guard(self.uplink.wait_disconnected(), down),
                                   name=f"stream-{self.name}-link"),
                    tg.create_task(self._guard(self._closed.wait(), down), name=f"stream-{self.name}-close"),
                ]
                await down.wait()
                for task in tasks:
                    task.cancel()
        finally:
            self.mode = None
            self._stream = None
            session.detach()
            if failure:
                stream.abort(failure[0].reason_code)
            elif not self._closed.is_set() and not link.closed:
                stream.abort(0)  # FIN'd by the broker or failed: drop both directions, free the slot
            self._notify()

    async def _guard(self, coro: Coroutine[Any, Any, object], down: asyncio.Event) -> None:
        try:
            await coro
        except QuicStreamError as exc:
            if not self._closed.is_set():
                self.stream_failures += 1
                log.info("data stream %s: stream lost: %s", self.name, exc)
        finally:
            down.set()

    async def _read(self, stream: QuicStream, failure: list[StreamFailed]) -> None:
        session = self.stream_session
        while True:
            data = await stream.recv()
            if not data:
                log.info("data stream %s: broker finished stream %d", self.name, stream.stream_id)
                return
            session.receive_data(data)
            failed = self._dispatch()
            self._wake.set()
            if failed is not None:
                self.stream_failures += 1
                log.warning("data stream %s: broker broke the stream contract (0x%02x %s): resetting",
                            self.name, failed.reason_code, failed.message)
                failure.append(failed)
                return

    async def _pump(self, stream: QuicStream) -> None:
        session = self.stream_session
        while True:
            self._wake.clear()
            data = session.data_to_send()
            if data:
                await stream.send(data)
            else:
                await self._wake.wait()

    async def _serve_control(self) -> None:
        """No QUIC under the Uplink: hand our pending work to it and route new calls there."""
        assert self._tg is not None
        session = self.stream_session
        self.mode = "control"
        for packet_id, message in session.take_pending():
            future = self._acks.pop(packet_id, None)
            self._tg.create_task(self._moved(future, self.uplink.publish(
                message.topic, message.payload, message.qos, message.retain, message.properties)),
                name=f"stream-{self.name}-moved-{packet_id}")
        for packet_id, request in session.take_requests():
            waiter = self._requests.pop(packet_id, None)
            if isinstance(request, Subscribe):
                call = self.uplink.subscribe(request.subscriptions, request.properties)
            else:
                call = self.uplink.unsubscribe(request.topic_filters, request.properties)
            self._tg.create_task(self._moved(waiter, call), name=f"stream-{self.name}-moved-{packet_id}")
        if session.subscriptions:
            self._tg.create_task(self._moved(None, self.uplink.subscribe(session.subscriptions)),
                                 name=f"stream-{self.name}-resubscribe")
        self._notify()
        try:
            await self._until(self.uplink.wait_disconnected())
        finally:
            self.mode = None

    @staticmethod
    async def _moved(future: asyncio.Future[Any] | None, call: Coroutine[Any, Any, Any]) -> None:
        try:
            result = await call
        except (UplinkClosed, OSError) as exc:
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(result)

    # -- plumbing ---------------------------------------------------------------------------------------

    async def _request(self, packet_id: int) -> tuple[int, ...]:
        future: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._requests[packet_id] = future
        self._wake.set()
        return await future

    def _dispatch(self) -> StreamFailed | None:
        failed: StreamFailed | None = None
        while (event := self.stream_session.next_event()) is not None:
            if isinstance(event, PublishAcked):
                future = self._acks.pop(event.packet_id, None)
                if future is not None and not future.done():
                    future.set_result(event.reason_code)
                self._notify()
            elif isinstance(event, MessageReceived):
                self._inbound.put_nowait(event.publish)
            elif isinstance(event, Subscribed | Unsubscribed):
                waiter = self._requests.pop(event.packet_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.reason_codes)
            elif isinstance(event, StreamFailed):
                failed = event
        return failed

    async def _until(self, coro: Coroutine[Any, Any, object]) -> bool:
        """Run coro unless we are closed first; False if closed."""
        if self._closed.is_set():
            coro.close()
            return False
        # Both tasks are owned here: whichever is left is cancelled before we return.
        loop = asyncio.get_running_loop()
        task = loop.create_task(coro, name=f"stream-{self.name}-wait")
        closed = loop.create_task(self._closed.wait(), name=f"stream-{self.name}-wait-close")
        try:
            await asyncio.wait((task, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, closed):
                t.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return not self._closed.is_set()

    async def _wait_change(self) -> None:
        if self._closed.is_set():
            raise UplinkClosed(f"data stream {self.name} closed")
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _fail_waiters(self, exc: Exception) -> None:
        futures: list[asyncio.Future[Any]] = [*self._acks.values(), *self._requests.values()]
        for future in futures:
            if not future.done():
                future.set_exception(exc)
        self._acks.clear()
        self._requests.clear()
        self._notify()


__all__ = ["DataStreamUplink"]
