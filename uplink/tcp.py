"""TCP and TLS byte transport for the uplink: connect, send, receive, close. No MQTT logic here.

The shape (`send`, `recv`, `close`) is the `Transport` protocol that `uplink.client` drives, so a QUIC
transport can stand in later. Failures surface as `OSError` (ConnectionError, ssl.SSLError and
TimeoutError are all OSError subclasses): the one exception family the supervisor retries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

READ_CHUNK_BYTES = 64 * 1024


def client_ssl_context(ca_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies the server certificate and host name.

    ca_file None trusts the system store. Verification is never switched off here: a gateway that
    accepts any certificate hands its credentials and commands channel to whoever sits on the path.
    cert_file/key_file: our client certificate, for brokers that demand mutual TLS.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


class TcpTransport:
    """An open TCP (optionally TLS) connection: ordered bytes both ways."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @property
    def peer(self) -> tuple[str, int] | None:
        peer = self._writer.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if peer else None

    async def send(self, data: bytes) -> None:
        """Write data and wait until the kernel buffer has room again (back-pressure)."""
        if self._writer.is_closing():
            raise ConnectionResetError("transport is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def recv(self) -> bytes:
        """The next bytes from the peer; b"" once the peer closed its side."""
        return await self._reader.read(READ_CHUNK_BYTES)

    async def close(self) -> None:
        """Close and wait briefly for the close to complete; never raises for an already dead link."""
        if not self._writer.is_closing():
            self._writer.close()
        # A peer that vanished can keep wait_closed (TLS close_notify) pending; don't hang on it.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()


async def open_tcp(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout_s: float = 10.0,
    server_hostname: str | None = None,
) -> TcpTransport:
    """Connect (and with ssl_context, complete the TLS handshake) within connect_timeout_s.

    Raises OSError (TimeoutError on the deadline, ssl.SSLCertVerificationError for a bad certificate).
    """
    async with asyncio.timeout(connect_timeout_s):
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=ssl_context,
            server_hostname=(server_hostname or host) if ssl_context is not None else None,
            limit=READ_CHUNK_BYTES,
        )
    # asyncio sets TCP_NODELAY on stream sockets already; MQTT acks are tiny and latency-bound.
    return TcpTransport(reader, writer)
