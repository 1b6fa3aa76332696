"""A UDP socket read in batches for the QUIC listener: many datagrams per wake-up, one flush after them.

asyncio's datagram transport reads one datagram per readiness callback, so a QUIC receiver pays a
full event-loop iteration (an `epoll_wait`) and an aioquic `transmit()` (building, encrypting and
sending an ACK) for every 1,200-byte packet. That per-datagram cost, not the bytes, is what bounds a
Python QUIC receiver. This endpoint drains up to `max_batch` datagrams per wake-up, hands each to the
protocol, and then calls the protocol's `batch_done()`, where the QUIC server flushes each touched
connection once: one ACK (and one round of PUBACKs) covers the whole batch, which also halves the
ACK processing of the sender.

Sends go straight to the socket; when the kernel buffer is full they wait in a bounded queue that a
writer callback drains (like asyncio's own transport). Past `max_queued_bytes`, datagrams are
dropped and counted: QUIC treats that as loss and retransmits, which beats unbounded memory.

Works on any event loop with `add_reader`/`add_writer` (asyncio's selector loops, uvloop).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from typing import Any, Protocol

MAX_DATAGRAM_BYTES = 65535
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_QUEUED_BYTES = 4 << 20


class BatchProtocol(Protocol):
    """What the endpoint drives: asyncio's DatagramProtocol plus the end-of-batch hook."""

    def connection_made(self, transport: Any) -> None: ...

    def datagram_received(self, data: bytes, addr: Any) -> None: ...

    def error_received(self, exc: OSError) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def batch_done(self) -> None: ...


class BatchedDatagramTransport(asyncio.DatagramTransport):
    """A bound, non-blocking UDP socket serving one `BatchProtocol` (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: BatchProtocol, *,
                 max_batch: int = DEFAULT_MAX_BATCH,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._max_batch = max_batch
        self._max_queued_bytes = max_queued_bytes
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._queued_bytes = 0
        self._closed = False
        self.dropped = 0  # datagrams dropped because the send queue was full
        self.batches = 0  # wake-ups that read at least one datagram
        self.datagrams = 0
        self._extra = {"socket": sock, "sockname": sock.getsockname()}
        protocol.connection_made(self)
        loop.add_reader(self._fd, self._read_ready)

    # -- receiving ------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        protocol = self._protocol
        count = 0
        try:
            while count < self._max_batch and not self._closed:
                try:
                    data, addr = recvfrom(MAX_DATAGRAM_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors surface here (ECONNREFUSED, ...)
                    protocol.error_received(exc)
                    break
                count += 1
                protocol.datagram_received(data, addr)
        finally:
            if count:
                self.batches += 1
                self.datagrams += count
                protocol.batch_done()

    # -- sending --------------------------------------------------------------------------------

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closed:
            return
        if not self._queue:
            try:
                self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._fd, self._write_ready)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
        if self._queued_bytes + len(data) > self._max_queued_bytes:
            self.dropped += 1
            return
        self._queue.append((bytes(data), addr))
        self._queued_bytes += len(data)

    def _write_ready(self) -> None:
        while self._queue:
            data, addr = self._queue[0]
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
            self._queue.popleft()
            self._queued_bytes -= len(data)
        self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return self._queued_bytes

    # -- lifecycle ------------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._queued_bytes = 0
        self._loop.call_soon(self._finish)

    def abort(self) -> None:
        self.close()

    def _finish(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()


__all__ = ["BatchProtocol", "BatchedDatagramTransport"]
