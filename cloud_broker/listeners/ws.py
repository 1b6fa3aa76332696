"""MQTT over WebSocket (and over WebSocket on TLS): RFC 6455 framing by wsproto, MQTT bytes to the hub.

The HTTP upgrade must ask for the listener's path (default `/mqtt`) and the `mqtt` subprotocol (MQTT
5.0 section 6); anything else gets an HTTP error and is closed. After the upgrade every binary message
is a slice of the MQTT byte stream (packets may span frames, frames may hold several packets); a text
frame is a protocol violation (the connection closes). The hub writes MQTT bytes; each write goes out
as one binary frame.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.events import Message as WsMessage
from wsproto.utilities import LocalProtocolError as WsLocalError
from wsproto.utilities import RemoteProtocolError as WsRemoteError

from cloud_broker.listeners.base import (
    ConnectionHub,
    ServerListener,
    cert_identity,
    peer_name,
    server_ssl_context,
)

if TYPE_CHECKING:
    from cloud_broker.config import ListenerConfig

log = logging.getLogger("cloud_broker.listeners.ws")

SUBPROTOCOLS = ("mqtt", "mqttv3.1")  # "mqttv3.1" is what some MQTT 3.1-era clients still ask for
MAX_HANDSHAKE_BYTES = 16384
TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _WsConnection(asyncio.Protocol):
    def __init__(self, hub: ConnectionHub, path: str, prefix: str) -> None:
        self._hub = hub
        self._path = path
        self._prefix = prefix
        self._ws = WSConnection(ConnectionType.SERVER)
        self._transport: asyncio.Transport | None = None
        self._conn_id: int | None = None
        self._handshake_bytes = 0

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(self._hub.high_water_bytes, self._hub.low_water_bytes)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._conn_id is None:
            self._handshake_bytes += len(data)
            if self._handshake_bytes > MAX_HANDSHAKE_BYTES:
                transport.close()
                return
        try:
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    if self._conn_id is not None:
                        self._hub.received(self._conn_id, bytes(event.data))
                elif isinstance(event, Request):
                    self._upgrade(event)
                elif isinstance(event, Ping):
                    transport.write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self._ws.state is not ConnectionState.CLOSED:
                        transport.write(self._ws.send(event.response()))
                    transport.close()
                    return
                elif isinstance(event, TextMessage):
                    # MQTT over WebSocket is binary only (MQTT-6.0.0-1): close the connection.
                    self.close(1003)
                    return
        except (WsRemoteError, WsLocalError) as exc:
            log.debug("websocket protocol error from %s: %s", peer_name(self._prefix, transport), exc)
            transport.close()

    def _upgrade(self, request: Request) -> None:
        transport = self._transport
        assert transport is not None
        path = request.target.split("?", 1)[0]
        if path != self._path:
            transport.write(self._ws.send(RejectConnection(status_code=404)))
            transport.close()
            return
        chosen = next((p for p in SUBPROTOCOLS if p in request.subprotocols), None)
        if chosen is None:
            transport.write(self._ws.send(RejectConnection(status_code=400)))
            transport.close()
            return
        transport.write(self._ws.send(AcceptConnection(subprotocol=chosen)))
        identity = cert_identity(transport) if self._prefix == "wss" else None
        self._conn_id = self._hub.open(self, peer_name(self._prefix, transport), identity)

    def pause_writing(self) -> None:
        if self._conn_id is not None:
            self._hub.congested(self._conn_id, True)

    def resume_writing(self) -> None:
        if self._conn_id is not None:
            self._hub.congested(self._conn_id, False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn_id is not None:
            conn_id, self._conn_id = self._conn_id, None
            self._hub.lost(conn_id)

    # ---------------------------------------------------------------- ConnectionSink (for the hub)

    def write(self, data: bytes) -> None:
        if self._transport is not None and self._ws.state is ConnectionState.OPEN:
            self._transport.write(self._ws.send(WsMessage(data=data)))

    def close(self, code: int = 1000) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._ws.state is ConnectionState.OPEN:
            transport.write(self._ws.send(CloseConnection(code=code)))
        transport.close()

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()


async def start(hub: ConnectionHub, config: ListenerConfig) -> ServerListener:
    """Bind and serve MQTT over WebSocket on config.ws_path (kind "wss": over TLS)."""
    loop = asyncio.get_running_loop()
    ctx = server_ssl_context(config) if config.kind == "wss" else None
    path, prefix = config.ws_path, config.kind
    server = await loop.create_server(
        lambda: _WsConnection(hub, path, prefix), config.host, config.port, reuse_address=True, backlog=1024,
        ssl=ctx, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if ctx is not None else None)
    return ServerListener(config.kind, server)
