"""Runs the broker in asyncio: binds the listeners, feeds the pure core, flushes its output, fires its timers.

Theory of operation. Listeners call the hub for every connection event; the hub passes them to the
one `Broker` core with `loop.time()` as now. Output is not written at once: the first event of an
event-loop iteration that leaves output schedules one `flush` (call_soon), which drains the core and
writes each connection's bytes with a single `transport.write`, then closes what the core closed.
Many PUBLISHes fanned out within one iteration therefore cost one syscall per subscriber. The core's
timers run from a single `loop.call_at` handle, re-armed after every flush to the core's next
deadline. There are no background tasks: everything happens in listener callbacks and that timer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cloud_broker.config import BrokerConfig
from cloud_broker.core.broker import Broker
from cloud_broker.core.hooks import Authenticator, Authorizer, MessageHook
from cloud_broker.core.persistence import Persistence
from cloud_broker.listeners.tcp import ConnectionSink, start_tcp_listener

log = logging.getLogger("cloud_broker")


class BrokerHub:
    """Connects listeners to the core: connection ids, coalesced writes, the deadline timer."""

    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self.broker = broker
        self._loop = loop
        self._sinks: dict[int, ConnectionSink] = {}
        self._next_id = 0
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._closed = False

    @property
    def connection_count(self) -> int:
        return len(self._sinks)

    def open(self, sink: ConnectionSink, peer: str) -> int:
        if self._closed:
            sink.close()
            return -1  # never known to the core: later events for it are ignored there
        self._next_id += 1
        conn_id = self._next_id
        self._sinks[conn_id] = sink
        self.broker.connection_opened(conn_id, peer, self._loop.time())
        self._after_event()
        return conn_id

    def received(self, conn_id: int, data: bytes) -> None:
        self.broker.data_received(conn_id, data, self._loop.time())
        self._after_event()

    def lost(self, conn_id: int) -> None:
        if self._sinks.pop(conn_id, None) is not None:
            self.broker.connection_lost(conn_id, self._loop.time())
            self._after_event()

    def _after_event(self) -> None:
        if not self._flush_scheduled and self.broker.has_output():
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        self._arm_timer()

    def flush(self) -> None:
        """Write the core's output: one write per connection, then closes (after their last bytes)."""
        self._flush_scheduled = False
        writes, closes = self.broker.drain()
        sinks = self._sinks
        for conn_id, data in writes:
            sink = sinks.get(conn_id)
            if sink is not None:
                sink.write(data)
        for conn_id in closes:
            sink = sinks.pop(conn_id, None)
            if sink is not None:
                sink.close()  # an asyncio transport sends its buffered bytes before closing

    def _arm_timer(self) -> None:
        when = self.broker.next_deadline()
        if when is None or (self._timer_when is not None and self._timer_when <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        self.broker.handle_deadlines(self._loop.time())
        self.flush()
        self._arm_timer()

    def shutdown(self) -> None:
        """Tell every client the server is going away, write that, and close all connections."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.broker.shutdown(self._loop.time())
        self.flush()
        for sink in list(self._sinks.values()):
            sink.close()
        self._sinks.clear()


@dataclass(frozen=True, slots=True)
class ListenerAddress:
    kind: str
    host: str
    port: int


@dataclass(eq=False)
class BrokerServer:
    """A running broker. `ports` maps listener kind to bound ports, in config order."""

    broker: Broker
    hub: BrokerHub
    addresses: list[ListenerAddress]
    _servers: list[asyncio.Server] = field(repr=False)
    _closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def ports(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for addr in self.addresses:
            out.setdefault(addr.kind, []).append(addr.port)
        return out

    async def close(self) -> None:
        """Stop accepting, send DISCONNECT 0x8B to MQTT 5 clients, close every connection. Idempotent."""
        if self._closed.is_set():
            return
        for server in self._servers:
            server.close()
        self.hub.shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def serve(
    config: BrokerConfig,
    *,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer | None = None,
    persistence: Persistence | None = None,
    hooks: tuple[MessageHook, ...] = (),
) -> BrokerServer:
    """Start a broker for config and return once every listener is bound. OSError if a bind fails."""
    loop = asyncio.get_running_loop()
    if config.data_dir is not None:
        # Once, at start, before serving anyone: blocking the loop for a mkdir here stalls no client.
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    broker = Broker(config.core_settings(), authenticator=authenticator, authorizer=authorizer,
                    persistence=persistence, hooks=hooks)
    broker.restore(loop.time())
    hub = BrokerHub(broker, loop)
    servers: list[asyncio.Server] = []
    addresses: list[ListenerAddress] = []
    try:
        for listener in config.listeners:
            # ListenerConfig admits only kinds that exist, so this is tcp until more listeners land.
            server = await start_tcp_listener(hub, listener.host, listener.port)
            servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                addresses.append(ListenerAddress(listener.kind, host, port))
    except OSError:
        for server in servers:
            server.close()
            await server.wait_closed()
        raise
    return BrokerServer(broker, hub, addresses, servers)
