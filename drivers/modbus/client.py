"""The one adapter over pymodbus' async clients (TCP, and RTU over pyserial): errors become ModbusError.

Nothing else in the code base imports pymodbus' client. Every failure leaves this module as a
`ModbusError` whose `kind` says what to do:
  * "timeout"    - nothing came back in time: retry, then back off the device;
  * "exception"  - the device answered with a Modbus exception `code` (2 = illegal data address:
                   re-plan or mark the point BAD; 6 = busy: retry later);
  * "connection" - no connection / serial port, or it dropped mid-request: back off the device;
  * "frame"      - bytes came back but no usable answer (CRC error, wrong unit id, short frame,
                   garbage): retry; on TCP the connection is dropped to resynchronise the stream.
`ModbusError.reason` is the short text readings carry ("timeout", "crc error", "wrong unit id 7",
"exception 02 illegal data address", ...).

How timeouts and bad frames are told apart without reading pymodbus' error text: the per-request
deadline is ours (`asyncio.timeout`), pymodbus' own is set longer and never fires first; pymodbus'
packet trace hook records every byte received for the current request; when the deadline passes,
`wire.diagnose_rtu`/`diagnose_mbap` look at those bytes: none is a timeout, anything else says what
was wrong with it. (pymodbus silently drops frames with a bad CRC or another unit id, so without the
trace both would look like timeouts.) Automatic reconnection and retries inside pymodbus are off; the
driver owns both policies. `requests` counts requests sent, retries included.
"""

from __future__ import annotations

import asyncio
import sys
import termios
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from drivers.modbus.config import Table
from drivers.modbus.wire import diagnose_mbap, diagnose_rtu

ErrorKind = Literal["timeout", "exception", "connection", "frame"]

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
    5: "acknowledge", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
_READ_FUNCTION = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}
# pymodbus' own response timeout is only a backstop behind ours.
_BACKSTOP_S = 5.0


class ModbusError(Exception):
    """A failed Modbus request; `kind` and `code` (Modbus exception code, if any) say why."""

    def __init__(self, kind: ErrorKind, message: str, code: int | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        """Short text for Reading.reason ("timeout", "exception 02 illegal data address", ...)."""
        if self.kind == "exception" and self.code is not None:
            return f"exception {self.code:02d} {EXCEPTION_NAMES.get(self.code, '')}".rstrip()
        return self.detail or self.kind


class ModbusClient:
    """One connection (TCP) or one serial line (RTU); requests are serialised, one in flight at a time.

    Waiters take turns in arrival order (asyncio.Lock is FIFO), which is what makes sharing a bus fair
    between the devices on it: no device can issue two requests while another one waits.
    """

    framing: Literal["mbap", "rtu"] = "mbap"

    def __init__(self, label: str, client: Any, *, timeout_s: float) -> None:
        self.label = label
        self.timeout_s = timeout_s
        self.requests = 0
        self._client = client
        self._lock = asyncio.Lock()
        self._rx = b""
        self._dropped = False

    # pymodbus hooks -------------------------------------------------------------------------------
    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            # pymodbus passes its whole receive buffer each time; keep everything this request saw
            self._rx = data if data.startswith(self._rx) else self._rx + data
        return data

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self._dropped = True

    # connection -----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        """Open the connection if it is not open; ModbusError("connection") when that fails."""
        if self._client.connected:
            return
        try:
            ok = await self._client.connect()
        except (OSError, termios.error, ModbusException) as exc:  # SerialException is an OSError
            raise ModbusError("connection", f"cannot open {self.label}: {exc}") from exc
        finally:
            _honour_cancel()
        if not ok:
            raise ModbusError("connection", f"cannot connect to {self.label}")

    def close(self) -> None:
        self._client.close()

    # requests -------------------------------------------------------------------------------------
    async def read(self, table: Table, start: int, count: int, *, unit_id: int,
                   timeout_s: float | None = None) -> list[int] | list[bool]:
        """`count` registers (ints) or bits (bools) from PDU address `start`."""
        c = self._client
        calls: dict[str, Callable[..., Awaitable[Any]]] = {
            "holding": c.read_holding_registers, "input": c.read_input_registers,
            "coil": c.read_coils, "discrete_input": c.read_discrete_inputs}
        rr = await self._request(_READ_FUNCTION[table], unit_id, timeout_s,
                                 lambda: calls[table](start, count=count, device_id=unit_id))
        if table in ("holding", "input"):
            words = list(rr.registers)
            if len(words) != count:
                self._resync()
                raise ModbusError("frame", f"{self.label}: asked {count} registers, got {len(words)}",
                                  detail=f"wrong length {len(words)}")
            return words
        bits = list(rr.bits)[:count]  # bit responses are padded to whole bytes
        if len(bits) != count:
            self._resync()
            raise ModbusError("frame", f"{self.label}: asked {count} bits at {start}, got {len(bits)}",
                              detail=f"wrong length {len(bits)}")
        return bits

    async def write_registers(self, start: int, values: Sequence[int], *, unit_id: int,
                              timeout_s: float | None = None) -> None:
        """Function 16 (write multiple registers); function 06 for a single register."""
        words = [int(v) for v in values]
        if len(words) == 1:
            await self._request(6, unit_id, timeout_s,
                                lambda: self._client.write_register(start, words[0], device_id=unit_id))
        else:
            await self._request(16, unit_id, timeout_s,
                                lambda: self._client.write_registers(start, words, device_id=unit_id))

    async def write_coil(self, address: int, value: bool, *, unit_id: int,
                         timeout_s: float | None = None) -> None:
        """Function 05 (write single coil)."""
        await self._request(5, unit_id, timeout_s,
                            lambda: self._client.write_coil(address, bool(value), device_id=unit_id))

    async def write_coils(self, address: int, values: Sequence[bool], *, unit_id: int,
                          timeout_s: float | None = None) -> None:
        """Function 15 (write multiple coils)."""
        bits = [bool(v) for v in values]
        await self._request(15, unit_id, timeout_s,
                            lambda: self._client.write_coils(address, bits, device_id=unit_id))

    async def _request(self, function: int, unit_id: int, timeout_s: float | None,
                       call: Callable[[], Awaitable[Any]]) -> Any:
        async with self._lock:
            await self.connect()
            self.requests += 1
            self._rx, self._dropped = b"", False
            try:
                async with asyncio.timeout(timeout_s or self.timeout_s):
                    try:
                        rr = await call()
                    finally:
                        _honour_cancel()
            except TimeoutError:
                raise self._no_answer(unit_id, function) from None
            except ConnectionException as exc:
                raise ModbusError("connection", f"{self.label}: {exc}") from exc
            except ModbusException as exc:  # pymodbus gave up on its own (backstop timeout or a bad frame)
                raise self._no_answer(unit_id, function) from exc
            if self._dropped:
                raise ModbusError("connection", f"{self.label}: connection lost", detail="disconnected")
            is_error = getattr(rr, "isError", None)
            if callable(is_error) and is_error():
                code = int(getattr(rr, "exception_code", 0) or 0)
                raise ModbusError("exception", f"{self.label}: exception {code}", code=code)
            return rr

    def _no_answer(self, unit_id: int, function: int) -> ModbusError:
        if self._dropped:
            return ModbusError("connection", f"{self.label}: connection lost", detail="disconnected")
        rx = self._rx
        why = diagnose_rtu(rx, unit_id, function) if self.framing == "rtu" else diagnose_mbap(rx, unit_id)
        if why == "timeout":
            return ModbusError("timeout", f"{self.label}: no response")
        self._resync()
        return ModbusError("frame", f"{self.label}: {why} ({rx[:16].hex()})", detail=why)

    def _resync(self) -> None:
        # A TCP stream that carried a bad answer may carry its tail into the next one: start over.
        # A serial line resynchronises by itself (pymodbus clears its buffer before each request).
        if self.framing == "mbap":
            self._client.close()


def _honour_cancel() -> None:
    """Re-raise a cancellation that pymodbus' asyncio.wait_for swallowed.

    On Python 3.11 wait_for drops a cancel that arrives as its inner future completes (CPython
    gh-86296); a refused connect completes at once, so a driver being stopped could keep running.
    The task still counts the request (`cancelling()`), so it is raised again here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() and not _cancel_in_flight():
        raise asyncio.CancelledError


def _cancel_in_flight() -> bool:
    # True while a CancelledError is already propagating (inside an except/finally for it)
    return isinstance(sys.exc_info()[1], asyncio.CancelledError)


class ModbusTcpClient(ModbusClient):
    """Modbus/TCP to host:port."""

    framing = "mbap"

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0) -> None:
        self.host, self.port = host, port
        client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s + _BACKSTOP_S, retries=0,
                                      reconnect_delay=0, name=f"modbus-{host}:{port}",
                                      trace_packet=self._trace_packet, trace_connect=self._trace_connect)
        super().__init__(f"{host}:{port}", client, timeout_s=timeout_s)


class ModbusRtuClient(ModbusClient):
    """Modbus RTU on a serial port (pyserial, through pymodbus' serial transport)."""

    framing = "rtu"

    def __init__(self, serial_port: str, *, baudrate: int = 19200, parity: str = "E", stopbits: int = 1,
                 bytesize: int = 8, timeout_s: float = 1.0) -> None:
        self.serial_port = serial_port
        client = AsyncModbusSerialClient(serial_port, baudrate=baudrate, parity=parity, stopbits=stopbits,
                                         bytesize=bytesize, timeout=timeout_s + _BACKSTOP_S, retries=0,
                                         reconnect_delay=0, name=f"modbus-{serial_port}",
                                         trace_packet=self._trace_packet, trace_connect=self._trace_connect)
        super().__init__(serial_port, client, timeout_s=timeout_s)
