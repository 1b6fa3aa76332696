"""The one adapter over pyserial / pyserial-asyncio-fast: open a port, read chunks, write, close.

Nothing else imports serial_asyncio_fast or pyserial. Every failure leaves this module as
`SerialPortError` whose `kind` says what to do:
  * "open" - the port cannot be opened (absent device, permission, busy): wait and reopen;
  * "lost" - the open port failed (USB unplugged, pty closed, I/O error): close, wait and reopen.
Reads are event driven (the transport calls back on the loop); a bounded buffer pauses reading when
the consumer falls behind, so memory stays bounded and the kernel/driver buffers absorb the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import serial
import serial_asyncio_fast

from drivers.serial.config import SerialPortConfig

ErrorKind = Literal["open", "lost"]
READ_BUFFER_LIMIT_BYTES = 64 * 1024


class SerialPortError(Exception):
    """A failed open or a lost port; `reason` is a short text for the status reading."""

    def __init__(self, kind: ErrorKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: ErrorKind = kind
        self.reason = reason


class _Receiver(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ready = asyncio.Event()
        self.lost: str | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.ready.set()
        if len(self.buffer) >= READ_BUFFER_LIMIT_BYTES and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = str(exc) if exc is not None else "port closed"
        self.ready.set()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class SerialLink:
    """An open serial port. Use `await SerialLink.open(cfg)`; `close()` when done."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver, port: str) -> None:
        self._transport = transport
        self._rx = receiver
        self.port = port

    @classmethod
    async def open(cls, cfg: SerialPortConfig) -> SerialLink:
        return await cls.open_path(cfg.port, baudrate=cfg.baudrate, bytesize=cfg.bytesize,
                                   parity=cfg.parity, stopbits=cfg.stopbits, rtscts=cfg.rtscts,
                                   xonxoff=cfg.xonxoff)

    @classmethod
    async def open_path(cls, port: str, *, baudrate: int = 9600, bytesize: int = 8, parity: str = "N",
                        stopbits: float = 1, rtscts: bool = False, xonxoff: bool = False) -> SerialLink:
        loop = asyncio.get_running_loop()
        receiver = _Receiver()
        try:
            transport, _ = await serial_asyncio_fast.create_serial_connection(
                loop, lambda: receiver, port, baudrate=baudrate, bytesize=bytesize, parity=parity,
                stopbits=stopbits, rtscts=rtscts, xonxoff=xonxoff)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SerialPortError("open", f"cannot open {port}: {_describe(exc)}") from exc
        assert isinstance(transport, asyncio.Transport)
        return cls(transport, receiver, port)

    async def read(self, timeout_s: float) -> bytes:
        """Bytes received so far, waiting up to `timeout_s` for some (b"" on timeout).

        Raises SerialPortError("lost") once the buffered bytes are consumed and the port has failed.
        """
        rx = self._rx
        if not rx.buffer and rx.lost is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await rx.ready.wait()
        rx.ready.clear()
        if rx.buffer:
            data = bytes(rx.buffer)
            rx.buffer.clear()
            if rx.paused and rx.lost is None:
                rx.paused = False
                self._transport.resume_reading()
            return data
        if rx.lost is not None:
            raise SerialPortError("lost", f"{self.port} lost: {rx.lost}")
        return b""

    def write(self, data: bytes) -> None:
        """Queue bytes for sending; SerialPortError("lost") if the port has failed."""
        if self._rx.lost is not None or self._transport.is_closing():
            raise SerialPortError("lost", f"{self.port} lost: {self._rx.lost or 'closing'}")
        self._transport.write(data)

    def write_buffer_bytes(self) -> int:
        return self._transport.get_write_buffer_size()

    @property
    def lost(self) -> bool:
        return self._rx.lost is not None

    async def close(self) -> None:
        """Close the port and wait until the transport has released it (so it can be reopened)."""
        if self._rx.lost is None:
            self._transport.close()
        # The transport closes the device in an executor thread and then calls connection_lost.
        # If that does not happen in time there is nothing more we can do than let the next open try.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while self._rx.lost is None:
                    await self._rx.ready.wait()
                    self._rx.ready.clear()
