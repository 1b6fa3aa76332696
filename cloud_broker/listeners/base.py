"""What listeners and the hub promise each other: connection sinks, the hub's callbacks, bound listeners."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cloud_broker.config import ListenerConfig


class ConnectionSink(Protocol):
    """One connection as the hub sees it (the subset of asyncio.Transport it uses)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ConnectionHub(Protocol):
    """The broker side a listener talks to (implemented by `cloud_broker.server.BrokerHub`)."""

    high_water_bytes: int
    low_water_bytes: int

    @property
    def receive_maximum(self) -> int: ...

    def open(self, sink: ConnectionSink, peer: str, cert_identity: str | None = None,
             receive_windows: int = 1) -> int: ...

    def violation(self, conn_id: int, reason_code: int) -> None: ...

    def received(self, conn_id: int, data: bytes) -> None: ...

    def lost(self, conn_id: int) -> None: ...

    def congested(self, conn_id: int, congested: bool) -> None: ...


class BoundListener(Protocol):
    kind: str
    addresses: list[tuple[str, int]]

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


@dataclass(eq=False)
class ServerListener:
    """A BoundListener over an asyncio.Server (TCP, TLS, WebSocket)."""

    kind: str
    server: asyncio.Server
    addresses: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for sock in self.server.sockets:
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port))

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


def server_ssl_context(config: ListenerConfig) -> ssl.SSLContext:
    """TLS server context: the listener's certificate, and client certificates if ca_file is set."""
    assert config.cert_file is not None and config.key_file is not None  # checked by the config
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.cert_file, config.key_file)
    if config.ca_file is not None:
        ctx.load_verify_locations(config.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def cert_identity(transport: asyncio.BaseTransport) -> str | None:
    """The verified client certificate's subject common name, if the client presented one."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def peer_name(prefix: str, transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    if not peername:
        return f"{prefix}:?"
    host = f"[{peername[0]}]" if ":" in peername[0] else peername[0]
    return f"{prefix}:{host}:{peername[1]}"
