"""The one adapter over pymodbus' async TCP client: reads and writes, errors translated to ModbusError.

Nothing else in the code base imports pymodbus' client. Every pymodbus failure leaves this module as
a `ModbusError` whose `kind` says what to do:
  * "timeout"    - no answer in time: retry, then back off the device;
  * "exception"  - the device answered with a Modbus exception `code` (2 = illegal data address:
                   re-plan or mark the point BAD; 6 = busy: retry later);
  * "connection" - no TCP connection: back off the device;
  * "frame"      - an answer that does not fit the request: drop the connection and retry.
Automatic reconnection inside pymodbus is switched off; the driver owns the reconnect policy.
`requests` counts the requests sent (attempts, including retries) for tests and metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.modbus.config import Table

ErrorKind = Literal["timeout", "exception", "connection", "frame"]

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
    5: "acknowledge", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusError(Exception):
    """A failed Modbus request; `kind` and `code` (Modbus exception code, if any) say why."""

    def __init__(self, kind: ErrorKind, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.code = code

    @property
    def reason(self) -> str:
        """Short text for Reading.reason ("timeout", "exception 02 illegal data address", ...)."""
        if self.kind == "exception" and self.code is not None:
            return f"exception {self.code:02d} {EXCEPTION_NAMES.get(self.code, '')}".rstrip()
        return self.kind


class ModbusTcpClient:
    """One TCP connection to one host:port; requests are serialized (one in flight at a time)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.requests = 0
        # retries=0: the driver retries; reconnect_delay=0: the driver reconnects.
        self._client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0,
                                            reconnect_delay=0, name=f"modbus-{host}:{port}")
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        """Open the connection if it is not open; ModbusError("connection") when that fails."""
        if self._client.connected:
            return
        ok = await self._client.connect()
        if not ok:
            raise ModbusError("connection", f"cannot connect to {self.host}:{self.port}")

    def close(self) -> None:
        self._client.close()

    async def read(self, table: Table, start: int, count: int, *, unit_id: int) -> list[int] | list[bool]:
        """`count` registers (ints) or bits (bools) from PDU address `start`."""
        async with self._lock:
            await self.connect()
            self.requests += 1
            c = self._client
            try:
                if table == "holding":
                    rr = await c.read_holding_registers(start, count=count, device_id=unit_id)
                elif table == "input":
                    rr = await c.read_input_registers(start, count=count, device_id=unit_id)
                elif table == "coil":
                    rr = await c.read_coils(start, count=count, device_id=unit_id)
                else:
                    rr = await c.read_discrete_inputs(start, count=count, device_id=unit_id)
            except ModbusException as exc:
                raise self._translate(exc) from exc
            self._check(rr)
            if table in ("holding", "input"):
                words = list(rr.registers)
                if len(words) != count:
                    raise ModbusError("frame", f"asked {count} registers at {start}, got {len(words)}")
                return words
            # bit responses are padded to whole bytes
            bits = list(rr.bits)[:count]
            if len(bits) != count:
                raise ModbusError("frame", f"asked {count} bits at {start}, got {len(bits)}")
            return bits

    async def write_registers(self, start: int, values: Sequence[int], *, unit_id: int) -> None:
        """Function 16 (write multiple registers); function 06 for a single register."""
        async with self._lock:
            await self.connect()
            self.requests += 1
            try:
                if len(values) == 1:
                    rr = await self._client.write_register(start, int(values[0]), device_id=unit_id)
                else:
                    words = [int(v) for v in values]
                    rr = await self._client.write_registers(start, words, device_id=unit_id)
            except ModbusException as exc:
                raise self._translate(exc) from exc
            self._check(rr)

    async def write_coil(self, address: int, value: bool, *, unit_id: int) -> None:
        async with self._lock:
            await self.connect()
            self.requests += 1
            try:
                rr = await self._client.write_coil(address, value, device_id=unit_id)
            except ModbusException as exc:
                raise self._translate(exc) from exc
            self._check(rr)

    def _check(self, rr: object) -> None:
        is_error = getattr(rr, "isError", None)
        if callable(is_error) and is_error():
            code = int(getattr(rr, "exception_code", 0) or 0)
            raise ModbusError("exception", f"{self.host}:{self.port}: exception {code}", code=code)

    def _translate(self, exc: ModbusException) -> ModbusError:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, ConnectionException):
            return ModbusError("connection", f"{where}: {exc}")
        if isinstance(exc, ModbusIOException):
            # pymodbus reports a missing answer and a mismatched one with the same class; only the
            # text tells them apart. A mismatch leaves the stream unsynchronised: drop the connection.
            if "No response" in str(exc):
                return ModbusError("timeout", f"{where}: no response within {self.timeout_s}s")
            self._client.close()
            return ModbusError("frame", f"{where}: {exc}")
        self._client.close()
        return ModbusError("frame", f"{where}: {exc}")
