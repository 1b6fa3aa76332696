"""Plain TCP listener: accepts connections and moves their bytes between sockets and the broker hub.

It holds no MQTT logic. Each accepted connection becomes one `asyncio.Protocol` (no streams: the
callbacks go straight to the hub, which feeds the pure core and writes its coalesced output).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol

log = logging.getLogger("cloud_broker.listeners.tcp")


class ConnectionSink(Protocol):
    """What the hub needs from a connection to send to it: the subset of asyncio.Transport it uses."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class ConnectionHub(Protocol):
    """The broker side a listener talks to (implemented by `cloud_broker.server.BrokerHub`)."""

    def open(self, sink: ConnectionSink, peer: str) -> int: ...

    def received(self, conn_id: int, data: bytes) -> None: ...

    def lost(self, conn_id: int) -> None: ...


class _TcpConnection(asyncio.Protocol):
    __slots__ = ("_conn_id", "_hub")

    def __init__(self, hub: ConnectionHub) -> None:
        self._hub = hub
        self._conn_id: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # MQTT is request/response: small acks must not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        peer = f"tcp:{peername[0]}:{peername[1]}" if peername else "tcp:?"
        self._conn_id = self._hub.open(transport, peer)

    def data_received(self, data: bytes) -> None:
        if self._conn_id is not None:
            self._hub.received(self._conn_id, data)

    def eof_received(self) -> bool:
        return False  # half-closed MQTT connections are over: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn_id is not None:
            if exc is not None:
                log.debug("connection %d lost: %s", self._conn_id, exc)
            self._hub.lost(self._conn_id)
            self._conn_id = None


async def start_tcp_listener(hub: ConnectionHub, host: str, port: int) -> asyncio.Server:
    """Bind host:port (0: a free port) and serve MQTT over TCP into hub. OSError if the bind fails."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _TcpConnection(hub), host, port, reuse_address=True,
                                    backlog=1024)
