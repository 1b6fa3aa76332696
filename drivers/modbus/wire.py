"""Modbus bytes on the wire (pure): PDUs, RTU and MBAP framing, CRC-16, and why an answer was unusable.

Two users. The simulator serves requests with it (`split_rtu_request`, `decode_request`,
`encode_response`, `rtu_frame`/`mbap_frame`); the driver's client adapter uses `diagnose_rtu` and
`diagnose_mbap` to say *why* the bytes a device sent back did not make a response ("crc error",
"wrong unit id 7", "short frame", "garbage") instead of guessing from a library's error text.

Function codes covered (Modbus Application Protocol v1.1b3 §6): 01/02 read coils/discrete inputs,
03/04 read holding/input registers, 05/06 write single coil/register, 15/16 write multiple
coils/registers. An exception response is the function code with bit 7 set plus one exception code.

RTU (Modbus over Serial Line v1.02 §2.5.1): unit id, PDU, CRC-16 (poly 0xA001 reflected, init 0xFFFF)
sent low byte first. MBAP (Modbus Messaging on TCP/IP v1.0b §3.1.3): transaction id, protocol id 0,
length (unit id + PDU), unit id, PDU; all big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

READ_FUNCTIONS = {1: "coil", 2: "discrete_input", 3: "holding", 4: "input"}
WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER, WRITE_MULTIPLE_COILS, WRITE_MULTIPLE_REGISTERS = 5, 6, 15, 16
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE, DEVICE_FAILURE = 1, 2, 3, 4
MBAP_HEADER_BYTES = 7
RTU_OVERHEAD_BYTES = 3  # unit id + 2 CRC bytes
# Serial line v1.02 §2.5.1.1: 1 start + 8 data + 1 parity (or a 2nd stop bit) + 1 stop = 11 bits/char.
BITS_PER_CHAR = 11


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 of data, as an int; on the wire it goes low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def rtu_frame(unit_id: int, pdu: bytes) -> bytes:
    body = bytes((unit_id,)) + pdu
    return body + crc16(body).to_bytes(2, "little")


def mbap_frame(transaction_id: int, unit_id: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit_id) + pdu


def wire_time_s(n_bytes: int, baudrate: int, bits_per_char: int = BITS_PER_CHAR) -> float:
    """Seconds n_bytes take on a serial line at baudrate."""
    return n_bytes * bits_per_char / baudrate


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request PDU. Reads have `count`; writes have `values` (register words or 0/1 bits)."""

    function: int
    address: int
    count: int
    values: tuple[int, ...] = ()


class BadRequest(ValueError):
    """The request PDU is malformed; `code` is the exception code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _bits_to_bytes(bits: tuple[int, ...] | list[int] | list[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _bytes_to_bits(data: bytes, count: int) -> tuple[int, ...]:
    return tuple((data[i // 8] >> (i % 8)) & 1 for i in range(count))


def encode_request(req: Request) -> bytes:
    """The request PDU (client side; used by tests and tools)."""
    f = req.function
    if f in READ_FUNCTIONS:
        return struct.pack(">BHH", f, req.address, req.count)
    if f == WRITE_SINGLE_COIL:
        return struct.pack(">BHH", f, req.address, 0xFF00 if req.values[0] else 0)
    if f == WRITE_SINGLE_REGISTER:
        return struct.pack(">BHH", f, req.address, req.values[0])
    if f == WRITE_MULTIPLE_COILS:
        data = _bits_to_bytes(req.values)
        return struct.pack(">BHHB", f, req.address, len(req.values), len(data)) + data
    if f == WRITE_MULTIPLE_REGISTERS:
        return struct.pack(f">BHHB{len(req.values)}H", f, req.address, len(req.values), 2 * len(req.values),
                           *req.values)
    raise ValueError(f"function {f} is not supported")


def request_pdu_size(head: bytes) -> int | None:
    """Bytes of a request PDU from its first bytes; None when more bytes are needed, 0 when unknown."""
    if not head:
        return None
    f = head[0]
    if f in READ_FUNCTIONS or f in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER):
        return 5
    if f in (WRITE_MULTIPLE_COILS, WRITE_MULTIPLE_REGISTERS):
        return None if len(head) < 6 else 6 + head[5]
    return 0


def decode_request(pdu: bytes) -> Request:
    """A request from its PDU; BadRequest (with the exception code to answer) when it is malformed."""
    if not pdu:
        raise BadRequest(ILLEGAL_FUNCTION, "empty PDU")
    f = pdu[0]
    size = request_pdu_size(pdu)
    if size == 0:
        raise BadRequest(ILLEGAL_FUNCTION, f"function {f} is not supported")
    if size is None or len(pdu) != size:
        raise BadRequest(ILLEGAL_VALUE, f"function {f}: PDU of {len(pdu)} bytes")
    _, address, second = struct.unpack_from(">BHH", pdu)
    if f in READ_FUNCTIONS:
        limit = 2000 if f in (1, 2) else 125
        if not 1 <= second <= limit:
            raise BadRequest(ILLEGAL_VALUE, f"count {second} outside 1..{limit}")
        return Request(f, address, second)
    if f == WRITE_SINGLE_COIL:
        if second not in (0, 0xFF00):
            raise BadRequest(ILLEGAL_VALUE, f"coil value 0x{second:04X}")
        return Request(f, address, 1, (1 if second else 0,))
    if f == WRITE_SINGLE_REGISTER:
        return Request(f, address, 1, (second,))
    data = pdu[6:]
    if f == WRITE_MULTIPLE_COILS:
        if not 1 <= second <= 1968 or len(data) != (second + 7) // 8:
            raise BadRequest(ILLEGAL_VALUE, f"{second} coils in {len(data)} bytes")
        return Request(f, address, second, _bytes_to_bits(data, second))
    if not 1 <= second <= 123 or len(data) != 2 * second:
        raise BadRequest(ILLEGAL_VALUE, f"{second} registers in {len(data)} bytes")
    return Request(f, address, second, struct.unpack(f">{second}H", data))


def encode_response(req: Request, values: list[int] | tuple[int, ...] | None = None) -> bytes:
    """The normal response PDU to `req`; reads pass the registers (or 0/1 bits) read."""
    f = req.function
    if f in (1, 2):
        assert values is not None
        data = _bits_to_bytes(list(values))
        return bytes((f, len(data))) + data
    if f in (3, 4):
        assert values is not None
        return struct.pack(f">BB{len(values)}H", f, 2 * len(values), *values)
    if f == WRITE_SINGLE_COIL:
        return struct.pack(">BHH", f, req.address, 0xFF00 if req.values[0] else 0)
    if f == WRITE_SINGLE_REGISTER:
        return struct.pack(">BHH", f, req.address, req.values[0])
    return struct.pack(">BHH", f, req.address, req.count)


def exception_response(function: int, code: int) -> bytes:
    return bytes((function | 0x80, code))


def response_pdu_size(head: bytes) -> int | None:
    """Bytes of a response PDU from its first bytes; None when more are needed, 0 when unknown."""
    if not head:
        return None
    f = head[0]
    if f & 0x80:
        return 2
    if f in READ_FUNCTIONS:
        return None if len(head) < 2 else 2 + head[1]
    if f in (5, 6, 15, 16):
        return 5
    return 0


def split_rtu_request(buffer: bytes) -> tuple[bytes, int, bytes] | None:
    """(frame, unit id, pdu) of the first request in an RTU byte stream; None when incomplete.

    The frame's CRC is not checked here: see `check_rtu`. A frame whose function is unknown is
    taken to run to the end of the buffer (the line is garbage until the next silence).
    """
    if len(buffer) < 2:
        return None
    size = request_pdu_size(buffer[1:])
    if size is None:
        return None
    if size == 0:
        return buffer, buffer[0], buffer[1:-2]
    total = 1 + size + 2
    if len(buffer) < total:
        return None
    frame = buffer[:total]
    return frame, frame[0], frame[1:-2]


def check_rtu(frame: bytes) -> bool:
    """True when the frame's trailing CRC matches."""
    return len(frame) >= 4 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def diagnose_rtu(rx: bytes, unit_id: int, function: int) -> str:
    """Why the bytes received after an RTU request are not the expected answer (for Reading.reason)."""
    if not rx:
        return "timeout"
    if rx[0] != unit_id:
        if len(rx) >= 4 and _rtu_complete(rx) and check_rtu(rx[:_rtu_complete(rx)]):
            return f"wrong unit id {rx[0]}"
        return "garbage" if len(rx) >= 4 else "short frame"
    size = _rtu_complete(rx)
    if size == 0:
        return "garbage" if response_pdu_size(rx[1:]) == 0 else "short frame"
    if not check_rtu(rx[:size]):
        return "crc error"
    if rx[1] & 0x7F != function:
        return f"wrong function {rx[1]}"
    return "garbage"


def _rtu_complete(rx: bytes) -> int:
    size = response_pdu_size(rx[1:])
    if not size or len(rx) < 1 + size + 2:
        return 0
    return 1 + size + 2


def diagnose_mbap(rx: bytes, unit_id: int, transaction_id: int | None = None) -> str:
    """Why the bytes received after a Modbus/TCP request are not the expected answer."""
    if not rx:
        return "timeout"
    if len(rx) < MBAP_HEADER_BYTES + 1:
        return "short frame"
    tid, proto, length, unit = struct.unpack_from(">HHHB", rx)
    if proto != 0 or not 2 <= length <= 254:
        return "garbage"
    if len(rx) < 6 + length:
        return "short frame"
    if unit != unit_id:
        return f"wrong unit id {unit}"
    if transaction_id is not None and tid != transaction_id:
        return f"wrong transaction id {tid}"
    return "garbage"


# -- client side: responses ------------------------------------------------------------------------
class BadResponse(ValueError):
    """The response PDU does not answer the request; `reason` is the short text for Reading.reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExceptionAnswer(Exception):
    """The device answered the request with a Modbus exception `code` (function code | 0x80)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exception {code}")
        self.code = code


# Big-endian register arrays by word count: a read answer carries at most 127 words (byte count <= 254).
REGISTERS = tuple(struct.Struct(f">{n}H") for n in range(128))


def decode_read_response(function: int, count: int, pdu: bytes) -> list[int] | list[bool]:
    """The registers (FC 03/04) or bits (FC 01/02) a read response carries.

    ExceptionAnswer for an exception response; BadResponse when the PDU is not an answer to this
    function or its byte count disagrees with the PDU's length. Fewer or more values than `count`
    are returned as they are: a device that answers a shorter read than asked teaches the caller its
    limit. Bits beyond `count` (padding to whole bytes) are dropped.
    """
    _check_function(function, pdu)
    if len(pdu) < 2 or pdu[1] != len(pdu) - 2:
        raise BadResponse("garbage")
    if function >= 3:
        if pdu[1] & 1:
            raise BadResponse("garbage")  # registers come in whole 2-byte words
        return list(REGISTERS[pdu[1] >> 1].unpack_from(pdu, 2))
    data = pdu[2:]
    return [bool((data[i >> 3] >> (i & 7)) & 1) for i in range(min(count, 8 * len(data)))]


def check_write_response(request_pdu: bytes, pdu: bytes) -> None:
    """A write response must echo the request's function, address and value/quantity (its first 5 bytes)."""
    _check_function(request_pdu[0], pdu)
    if pdu != request_pdu[:5]:
        raise BadResponse("garbage")


def _check_function(function: int, pdu: bytes) -> None:
    if not pdu:
        raise BadResponse("short frame")
    if pdu[0] == function | 0x80:
        if len(pdu) != 2:
            raise BadResponse("garbage")
        raise ExceptionAnswer(pdu[1])
    if pdu[0] != function:
        raise BadResponse(f"wrong function {pdu[0]}")
