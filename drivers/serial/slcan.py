"""Pure SLCAN (Lawicel CAN232/CANUSB ASCII protocol) line codec: received-frame lines <-> CAN frames.

An adapter reports each received frame as one line terminated by CR:
    tIIIL<data>[TTTT]        standard (11-bit) data frame: 3 hex id digits, DLC digit 0-8, 2*DLC hex
    TIIIIIIIIL<data>[TTTT]   extended (29-bit) data frame: 8 hex id digits
    rIIIL[TTTT] / RIIIIIIIIL[TTTT]   remote (RTR) frames: DLC but no data
    dIIIL.. / DIIIIIIIIL.. / bIIIL.. / BIIIIIIIIL..   CAN FD (d/D) and FD with bit-rate switch (b/B);
                             the DLC digit is 0-F, 9..F meaning 12,16,20,24,32,48,64 bytes
TTTT is the optional timestamp (adapter command `Z1`): milliseconds 0..59999, 4 hex digits, wrapping
every minute. Its presence is inferred from the line length. The adapter answers commands with CR
(ok) or BEL 0x07 (error), and `z`/`Z` after transmits; those are not frames (`parse_line` returns
None for them). Leading BELs before a frame are stripped and counted by the caller via `errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

_FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
_HEX = frozenset(b"0123456789abcdefABCDEF")
MAX_TIMESTAMP_MS = 59_999


class SlcanError(ValueError):
    """A line that looks like a frame but is malformed; str(error) is the reason."""


@dataclass(frozen=True, slots=True)
class CanFrame:
    arbitration_id: int
    data: bytes
    is_extended: bool = False
    is_remote: bool = False
    is_fd: bool = False
    bitrate_switch: bool = False
    dlc: int | None = None  # for remote frames (no data); otherwise len(data)
    timestamp_ms: int | None = None  # adapter timestamp, ms within the minute

    @property
    def length(self) -> int:
        return self.dlc if self.dlc is not None else len(self.data)


def _hex(chunk: bytes, what: str) -> int:
    if not chunk or not all(b in _HEX for b in chunk):
        raise SlcanError(f"{what} {chunk[:16]!r} is not hex")
    return int(chunk, 16)


def parse_line(line: bytes) -> CanFrame | None:
    """The frame in one CR-stripped line; None for non-frame lines (acks, status); SlcanError if malformed."""
    line = line.strip(b"\r\n\x07")
    if not line:
        return None
    kind = line[:1]
    if kind not in b"tTrRdDbB":
        return None  # command answers (z, Z, V..., N..., F..) are not frames
    extended = kind in b"TRDB"
    remote = kind in b"rR"
    fd = kind in b"dDbB"
    id_len = 8 if extended else 3
    head = 1 + id_len + 1
    if len(line) < head:
        raise SlcanError(f"short frame line ({len(line)} chars)")
    can_id = _hex(line[1:1 + id_len], "id")
    if can_id > (0x1FFFFFFF if extended else 0x7FF):
        raise SlcanError(f"id {can_id:X} out of range for a {'29' if extended else '11'}-bit frame")
    dlc_code = _hex(line[1 + id_len:head], "dlc")
    if fd:
        length = _FD_LENGTHS[dlc_code]
    elif dlc_code > 8:
        raise SlcanError(f"dlc {dlc_code} > 8 in a classic CAN frame")
    else:
        length = dlc_code
    data_chars = 0 if remote else 2 * length
    rest = len(line) - head - data_chars
    if rest not in (0, 4):
        raise SlcanError(f"line has {len(line)} chars; dlc {dlc_code} needs {head + data_chars} or "
                         f"{head + data_chars + 4} (truncated or garbled)")
    data = b""
    if data_chars:
        chunk = line[head:head + data_chars]
        _hex(chunk, "data")
        data = bytes.fromhex(chunk.decode("ascii"))
    ts = None
    if rest:
        ts = _hex(line[head + data_chars:], "timestamp")
        if ts > MAX_TIMESTAMP_MS:
            raise SlcanError(f"timestamp {ts} > {MAX_TIMESTAMP_MS} ms")
    return CanFrame(can_id, data, is_extended=extended, is_remote=remote, is_fd=fd,
                    bitrate_switch=kind in b"bB", dlc=length if remote else None, timestamp_ms=ts)


def format_frame(frame: CanFrame) -> bytes:
    """The SLCAN line (with CR) an adapter sends for `frame` (for simulators and tests)."""
    if frame.is_fd:
        kind = "B" if frame.bitrate_switch else "D"
        code = _FD_LENGTHS.index(len(frame.data))
    else:
        kind = "R" if frame.is_remote else "T"
        code = frame.length
        if code > 8:
            raise ValueError("classic CAN frames carry at most 8 bytes")
    if not frame.is_extended:
        kind = kind.lower()
    ident = f"{frame.arbitration_id:08X}" if frame.is_extended else f"{frame.arbitration_id:03X}"
    data = "" if frame.is_remote else frame.data.hex().upper()
    ts = "" if frame.timestamp_ms is None else f"{frame.timestamp_ms:04X}"
    return f"{kind}{ident}{code:X}{data}{ts}\r".encode("ascii")
