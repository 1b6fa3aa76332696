"""Modbus clients (our asyncio TCP client, pymodbus RTU), the one Modbus adapter: errors become ModbusError.

Every failure leaves this module as a `ModbusError` whose `kind` says what to do:
  * "timeout"    - nothing came back in time: retry, then back off the device;
  * "exception"  - the device answered with a Modbus exception `code` (2 = illegal data address:
                   re-plan or mark the point BAD; 6 = busy: retry later);
  * "connection" - no connection / serial port, or it dropped mid-request: back off the device;
  * "frame"      - bytes came back but no usable answer (CRC error, wrong unit id, short frame,
                   garbage): retry; on TCP a stream that is out of step is dropped and reopened.
`ModbusError.reason` is the short text readings carry ("timeout", "crc error", "wrong unit id 7",
"exception 02 illegal data address", ...). `requests` counts requests sent, retries included.

Modbus/TCP (`ModbusTcpClient`) is a small asyncio Protocol over our pure codecs: `wire` (PDUs) and
`mbap` (transaction ids, framing, matching, one deadline heap per connection, so one timer per
connection rather than one per request). Why not pymodbus here: measured on this machine against the
wellsite simulator (100 connections, 125-register reads, ~1,500 requests/s), pymodbus'
AsyncModbusTcpClient costs ~125 us of CPU per request, pymodbus' own framer and PDU classes under a
lean Protocol ~90 us (its register decoder unpacks word by word and formats a debug string per
response), and this client ~60 us. At 11 requests per 828-value card the difference is most of the
fleet benchmark's 2 ms per 1,000 values budget. Several requests may be outstanding on one
connection (`max_in_flight`, for gateways serving many unit ids), never two for one unit id.

Modbus RTU (`ModbusRtuClient`) stays on pymodbus' serial client (pyserial). Its timeouts and bad
frames are told apart without reading pymodbus' error text: the per-request deadline is ours
(`asyncio.timeout`), pymodbus' own is set longer and never fires first; pymodbus' packet trace hook
records every byte received for the current request; when the deadline passes, `wire.diagnose_rtu`
looks at those bytes: none is a timeout, anything else says what was wrong with it. (pymodbus silently
drops frames with a bad CRC or another unit id, so without the trace both would look like timeouts.)
Automatic reconnection and retries inside pymodbus are off; the driver owns both policies.
"""

from __future__ import annotations

import asyncio
import math
import struct
import sys
import termios
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException

from drivers.modbus.config import Table
from drivers.modbus.mbap import Event, MbapSession, RequestFailed, ResponseReceived
from drivers.modbus.wire import (
    REGISTERS,
    WRITE_MULTIPLE_COILS,
    WRITE_MULTIPLE_REGISTERS,
    WRITE_SINGLE_COIL,
    WRITE_SINGLE_REGISTER,
    BadResponse,
    ExceptionAnswer,
    Request,
    check_write_response,
    decode_read_response,
    diagnose_rtu,
    encode_request,
)

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


class ModbusClient(Protocol):
    """What the driver needs of a bus client (`ModbusTcpClient`, `ModbusRtuClient`)."""

    label: str
    timeout_s: float
    requests: int

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    def close(self) -> None: ...

    async def read(self, table: Table, start: int, count: int, *, unit_id: int,
                   timeout_s: float | None = None) -> list[int] | list[bool]: ...

    async def write_registers(self, start: int, values: Sequence[int], *, unit_id: int,
                              timeout_s: float | None = None) -> None: ...

    async def write_coil(self, address: int, value: bool, *, unit_id: int,
                         timeout_s: float | None = None) -> None: ...

    async def write_coils(self, address: int, values: Sequence[bool], *, unit_id: int,
                          timeout_s: float | None = None) -> None: ...


class _PymodbusClient:
    """One serial line through pymodbus; requests are serialised, one in flight at a time.

    Waiters take turns in arrival order (asyncio.Lock is FIFO), which is what makes sharing a bus fair
    between the devices on it: no device can issue two requests while another one waits.
    """

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
                raise ModbusError("frame", f"{self.label}: asked {count} registers, got {len(words)}",
                                  detail=f"wrong length {len(words)}")
            return words
        bits = list(rr.bits)[:count]  # bit responses are padded to whole bytes
        if len(bits) != count:
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
        why = diagnose_rtu(rx, unit_id, function)
        if why == "timeout":
            return ModbusError("timeout", f"{self.label}: no response")
        return ModbusError("frame", f"{self.label}: {why} ({rx[:16].hex()})", detail=why)


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


class ModbusRtuClient(_PymodbusClient):
    """Modbus RTU on a serial port (pyserial, through pymodbus' serial transport)."""

    def __init__(self, serial_port: str, *, baudrate: int = 19200, parity: str = "E", stopbits: int = 1,
                 bytesize: int = 8, timeout_s: float = 1.0) -> None:
        self.serial_port = serial_port
        client = AsyncModbusSerialClient(serial_port, baudrate=baudrate, parity=parity, stopbits=stopbits,
                                         bytesize=bytesize, timeout=timeout_s + _BACKSTOP_S, retries=0,
                                         reconnect_delay=0, name=f"modbus-{serial_port}",
                                         trace_packet=self._trace_packet, trace_connect=self._trace_connect)
        super().__init__(serial_port, client, timeout_s=timeout_s)


_READ_REQUEST = struct.Struct(">BHH")


class ModbusTcpClient:
    """Modbus/TCP to host:port: one connection, up to `max_in_flight` requests outstanding on it, one per
    unit id. Waiters take turns in arrival order (`_Turns`), so devices sharing a
    gateway share it fairly."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0, max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.host, self.port = host, port
        self.label = f"{host}:{port}"
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.requests = 0
        self._session = MbapSession()
        self._transport: asyncio.Transport | None = None
        self._futures: dict[int, asyncio.Future[bytes]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_s = math.inf
        self._idle_check = False  # a _disarm_if_idle call is scheduled
        self._connect_lock = asyncio.Lock()
        self._turns = _Turns(max_in_flight)

    # connection -----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        """Open the connection if it is not open; ModbusError("connection") when that fails."""
        if self.connected:
            return
        async with self._connect_lock:
            if self.connected:
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    transport, _ = await loop.create_connection(lambda: _MbapProtocol(self),
                                                                self.host, self.port)
            except (OSError, TimeoutError) as exc:
                why = str(exc) or "timeout"
                raise ModbusError("connection", f"cannot connect to {self.label}: {why}") from exc
            self._session = MbapSession()
            self._transport = transport

    def close(self) -> None:
        """Drop the connection; requests still outstanding on it fail with "disconnected"."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._lost()

    def _lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at_s = None, math.inf
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(ModbusError("connection", f"{self.label}: connection lost",
                                              detail="disconnected"))
        self._session = MbapSession()

    def _connection_lost(self, transport: asyncio.BaseTransport) -> None:
        if transport is self._transport:  # not a connection already replaced by close() + connect()
            self._transport = None
            self._lost()

    # requests -------------------------------------------------------------------------------------
    async def read(self, table: Table, start: int, count: int, *, unit_id: int,
                   timeout_s: float | None = None) -> list[int] | list[bool]:
        """`count` registers (ints) or bits (bools) from PDU address `start`."""
        function = _READ_FUNCTION[table]
        pdu = await self._exchange(unit_id, _READ_REQUEST.pack(function, start, count), timeout_s)
        if function >= 3 and len(pdu) == 2 + 2 * count and pdu[0] == function and pdu[1] == 2 * count:
            return list(REGISTERS[count].unpack_from(pdu, 2))  # the usual answer: every register asked
        try:
            values = decode_read_response(function, count, pdu)
        except ExceptionAnswer as exc:
            raise ModbusError("exception", f"{self.label}: exception {exc.code}", code=exc.code) from None
        except BadResponse as exc:
            raise ModbusError("frame", f"{self.label}: {exc.reason} ({pdu[:16].hex()})",
                              detail=exc.reason) from None
        if len(values) != count:
            raise ModbusError("frame", f"{self.label}: asked {count} values at {start}, got {len(values)}",
                              detail=f"wrong length {len(values)}")
        return values

    async def write_registers(self, start: int, values: Sequence[int], *, unit_id: int,
                              timeout_s: float | None = None) -> None:
        """Function 16 (write multiple registers); function 06 for a single register."""
        words = tuple(int(v) for v in values)
        function = WRITE_SINGLE_REGISTER if len(words) == 1 else WRITE_MULTIPLE_REGISTERS
        await self._write(Request(function, start, len(words), words), unit_id, timeout_s)

    async def write_coil(self, address: int, value: bool, *, unit_id: int,
                         timeout_s: float | None = None) -> None:
        """Function 05 (write single coil)."""
        await self._write(Request(WRITE_SINGLE_COIL, address, 1, (1 if value else 0,)), unit_id, timeout_s)

    async def write_coils(self, address: int, values: Sequence[bool], *, unit_id: int,
                          timeout_s: float | None = None) -> None:
        """Function 15 (write multiple coils)."""
        bits = tuple(1 if v else 0 for v in values)
        await self._write(Request(WRITE_MULTIPLE_COILS, address, len(bits), bits), unit_id, timeout_s)

    async def _write(self, request: Request, unit_id: int, timeout_s: float | None) -> None:
        try:
            request_pdu = encode_request(request)
        except struct.error as exc:  # a value outside 0..65535
            raise ValueError(f"{self.label}: cannot encode {request}: {exc}") from exc
        pdu = await self._exchange(unit_id, request_pdu, timeout_s)
        try:
            check_write_response(request_pdu, pdu)
        except ExceptionAnswer as exc:
            raise ModbusError("exception", f"{self.label}: exception {exc.code}", code=exc.code) from None
        except BadResponse as exc:
            raise ModbusError("frame", f"{self.label}: {exc.reason} ({pdu[:16].hex()})",
                              detail=exc.reason) from None

    async def _exchange(self, unit_id: int, pdu: bytes, timeout_s: float | None) -> bytes:
        """Send one request PDU and wait for its response PDU (one request per unit at a time)."""
        turns = self._turns
        if not turns.take(unit_id):
            await turns.wait(unit_id)
        try:
            transport = self._transport
            if transport is None or transport.is_closing():
                await self.connect()
                transport = self._transport
                assert transport is not None
            loop = asyncio.get_running_loop()
            deadline_s = loop.time() + (timeout_s or self.timeout_s)
            tid = self._session.send_request(unit_id, pdu, deadline_s)
            self.requests += 1
            fut: asyncio.Future[bytes] = loop.create_future()
            self._futures[tid] = fut
            transport.write(self._session.data_to_send())
            if deadline_s < self._timer_at_s:
                self._arm(deadline_s)
            try:
                return await fut
            finally:
                # still registered: nothing settled it, we were cancelled; a late answer will be a stray
                if self._futures.pop(tid, None) is not None:
                    self._session.abandon(tid)
        finally:
            turns.give_back(unit_id)

    # events from the session ----------------------------------------------------------------------
    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, ResponseReceived):
                fut = self._futures.pop(ev.tid, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev.pdu)
            elif isinstance(ev, RequestFailed):
                fut = self._futures.pop(ev.tid, None)
                if fut is not None and not fut.done():
                    if ev.reason == "timeout":
                        fut.set_exception(ModbusError("timeout", f"{self.label}: no response"))
                    else:
                        fut.set_exception(ModbusError("frame", f"{self.label}: {ev.reason}",
                                                      detail=ev.reason))
            else:  # StreamBroken: a stream out of step cannot be trusted with the next answer
                self.close()
        if self._timer is not None and not self._session.in_flight and not self._idle_check:
            # Runs after the tasks just woken: a caller that goes on sends its next request first.
            self._idle_check = True
            asyncio.get_running_loop().call_soon(self._disarm_if_idle)

    def _disarm_if_idle(self) -> None:
        # Nothing outstanding once the woken callers have run: drop the deadline timer rather than
        # let it wake the loop seconds later for nothing (a wake-up per job on a fleet of devices).
        self._idle_check = False
        if self._timer is not None and not self._session.in_flight:
            self._timer.cancel()
            self._timer, self._timer_at_s = None, math.inf

    def _arm(self, at_s: float) -> None:
        # One timer per connection, for the earliest deadline; later deadlines wait for it to fire.
        # It is dropped when the connection falls idle (_disarm_if_idle).
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at_s = at_s
        self._timer = asyncio.get_running_loop().call_at(at_s, self._on_timer, at_s)

    def _on_timer(self, at_s: float) -> None:
        self._timer, self._timer_at_s = None, math.inf
        # the loop may run a timer up to its clock resolution early: it is due at at_s
        self._dispatch(self._session.handle_deadline(max(at_s, asyncio.get_running_loop().time())))
        upcoming = self._session.next_deadline()
        if upcoming is not None and self._timer is None:
            self._arm(upcoming)


class _Turns:
    """Who may send next on one connection: at most `limit` requests in flight, one per unit id, and
    waiters served in arrival order.

    `take` admits at once when it can (the common case, a device polling its own connection: no
    future, no coroutine); otherwise `wait` queues. A turn is handed over to the first waiter it
    frees, so nobody who arrives later can overtake. Invariant, kept because every release hands over
    synchronously: a waiter waits only while its unit is busy or every slot is taken, so a newcomer
    that `take` admits overtakes no one who could have gone.
    """

    __slots__ = ("_active", "_limit", "_waiters")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._active: set[int] = set()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def take(self, unit_id: int) -> bool:
        active = self._active
        if unit_id in active or len(active) >= self._limit:
            return False
        active.add(unit_id)
        return True

    async def wait(self, unit_id: int) -> None:
        """Queue until `unit_id` holds a turn (handed over by `give_back`)."""
        entry = (unit_id, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self.give_back(unit_id)  # handed a turn, then cancelled before using it
            elif entry in self._waiters:  # else give_back already dropped it as cancelled
                self._waiters.remove(entry)
            raise

    def give_back(self, unit_id: int) -> None:
        self._active.discard(unit_id)
        if not self._waiters:
            return
        active = self._active
        keep: deque[tuple[int, asyncio.Future[None]]] = deque()
        for entry in self._waiters:
            unit, fut = entry
            if fut.done():
                continue  # cancelled while waiting
            if unit not in active and len(active) < self._limit:
                active.add(unit)
                fut.set_result(None)
            else:
                keep.append(entry)
        self._waiters = keep


# Bytes one socket read may take. A response is at most 260 bytes (MBAP header + 253-byte PDU); more
# than that arrives only with several requests outstanding, and the rest is read on the next pass.
_RX_BUFFER_BYTES = 4096


class _MbapProtocol(asyncio.BufferedProtocol):
    """Moves bytes between the transport and the client's session; holds no Modbus logic.

    A buffered protocol: the loop reads into our small buffer (recv_into). A plain Protocol gets a
    fresh `recv(256 KiB)` per read, which glibc serves with mmap + mremap + munmap and a page fault:
    measured ~14 us of system time per response on this machine, a quarter of a request's cost.
    """

    def __init__(self, client: ModbusTcpClient) -> None:
        self._client = client
        self._transport: asyncio.BaseTransport | None = None
        self._buffer = memoryview(bytearray(_RX_BUFFER_BYTES))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # asyncio sets TCP_NODELAY on it: each request leaves at once

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        client = self._client
        if self._transport is client._transport:
            client._dispatch(client._session.receive_data(bytes(self._buffer[:nbytes])))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._client._connection_lost(self._transport)
