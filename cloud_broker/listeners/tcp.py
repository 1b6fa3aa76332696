"""MQTT over TCP and over TLS: accepts connections and moves their bytes between sockets and the hub.

It holds no MQTT logic. Each accepted connection becomes one `asyncio.Protocol` (no streams: the
callbacks go straight to the hub, which feeds the pure core and writes its coalesced output). The
transport's write-buffer limits drive back-pressure: past the high-water mark the hub is told the
connection is congested (and stops reading it) until the buffer drains below the low-water mark.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from cloud_broker.listeners.base import (
    ConnectionHub,
    ServerListener,
    cert_identity,
    peer_name,
    server_ssl_context,
)

if TYPE_CHECKING:
    from cloud_broker.config import ListenerConfig

log = logging.getLogger("cloud_broker.listeners.tcp")

TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _StreamConnection(asyncio.Protocol):
    __slots__ = ("_conn_id", "_hub", "_prefix")

    def __init__(self, hub: ConnectionHub, prefix: str) -> None:
        self._hub = hub
        self._prefix = prefix
        self._conn_id: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # MQTT is request/response: small acks must not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(self._hub.high_water_bytes, self._hub.low_water_bytes)
        identity = cert_identity(transport) if self._prefix == "tls" else None
        self._conn_id = self._hub.open(transport, peer_name(self._prefix, transport), identity)

    def data_received(self, data: bytes) -> None:
        if self._conn_id is not None:
            self._hub.received(self._conn_id, data)

    def eof_received(self) -> bool:
        return False  # half-closed MQTT connections are over: let the transport close

    def pause_writing(self) -> None:
        if self._conn_id is not None:
            self._hub.congested(self._conn_id, True)

    def resume_writing(self) -> None:
        if self._conn_id is not None:
            self._hub.congested(self._conn_id, False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn_id is not None:
            if exc is not None:
                log.debug("connection %d lost: %s", self._conn_id, exc)
            self._hub.lost(self._conn_id)
            self._conn_id = None


async def start(hub: ConnectionHub, config: ListenerConfig) -> ServerListener:
    """Bind config.host:port (0: a free port) and serve MQTT over TCP, or TLS for kind "tls"."""
    loop = asyncio.get_running_loop()
    ctx: ssl.SSLContext | None = server_ssl_context(config) if config.kind == "tls" else None
    prefix = config.kind
    server = await loop.create_server(
        lambda: _StreamConnection(hub, prefix), config.host, config.port, reuse_address=True, backlog=1024,
        ssl=ctx, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if ctx is not None else None)
    return ServerListener(config.kind, server)
