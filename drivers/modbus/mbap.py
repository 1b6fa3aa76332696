"""Client side of one Modbus/TCP connection (pure): transaction ids, MBAP framing, matching, deadlines.

Theory of operation (Modbus Messaging on TCP/IP v1.0b §3.1.3, §4.2). A request goes out as an MBAP
frame (transaction id, protocol id 0, length, unit id, PDU). The answer carries the same transaction
id, which is what lets several requests be outstanding on one connection: a gateway with many unit ids
behind it answers each as its unit does, in any order. `MbapSession` hands out transaction ids,
frames requests into `data_to_send()`, splits the received byte stream into frames and matches each
to its request:
  * a frame for an outstanding transaction id and the same unit id  -> `ResponseReceived`;
  * the same transaction id but another unit id                    -> `RequestFailed("wrong unit id N")`;
  * an unknown transaction id (the late answer of a request already given up) is dropped and
    counted in `stray_frames`; if its request then times out, the reason says
    "wrong transaction id N" instead of "timeout";
  * a header that is not MBAP (protocol id != 0, length outside 2..254) means the stream cannot be
    resynchronised: every outstanding request fails with "garbage" and `StreamBroken` tells the
    caller to drop the connection.
Deadlines are monotonic seconds passed in; the session keeps them in one heap, so the caller runs a
single timer per connection for `next_deadline()` instead of one per request. At a deadline the
expired request fails with "timeout" - or "short frame" when part of a frame sits in the buffer,
in which case the stream is broken too (the rest of that frame may never come).

One request per unit id at a time is the caller's rule (`busy(unit_id)` tells); this module only
refuses a second one with ValueError.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

MBAP_HEADER = struct.Struct(">HHHB")
MAX_MBAP_LENGTH = 254  # unit id + the longest PDU (253 bytes)


@dataclass(slots=True)  # not frozen: one per answer, and a frozen init costs twice as much
class ResponseReceived:
    tid: int
    unit_id: int
    pdu: bytes


@dataclass(frozen=True, slots=True)
class RequestFailed:
    tid: int
    reason: str  # "timeout", "short frame", "garbage", "wrong unit id 7", "wrong transaction id 9"


@dataclass(frozen=True, slots=True)
class StreamBroken:
    """The byte stream is out of step: close the connection (every outstanding request already failed)."""

    reason: str


Event = ResponseReceived | RequestFailed | StreamBroken


@dataclass(slots=True)
class _Pending:
    unit_id: int
    deadline_s: float
    stray_tid: int | None = None  # an unknown transaction id seen while this request waited


class MbapSession:
    """Transactions of one Modbus/TCP connection; see the module docstring."""

    def __init__(self) -> None:
        self._next_tid = 0
        self._pending: dict[int, _Pending] = {}
        self._units: dict[int, int] = {}  # unit id -> its outstanding transaction id
        self._deadlines: list[tuple[float, int]] = []  # heap; stale entries are skipped lazily
        self._out: list[bytes] = []
        self._rx = b""
        self.stray_frames = 0

    # -- sending ------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def busy(self, unit_id: int) -> bool:
        return unit_id in self._units

    def send_request(self, unit_id: int, pdu: bytes, deadline_s: float) -> int:
        """Frame a request PDU for `unit_id`; its transaction id. ValueError if the unit is busy."""
        if unit_id in self._units:
            raise ValueError(f"unit {unit_id} already has a request outstanding")
        if len(self._pending) >= 0xFFFF:
            raise ValueError("every transaction id is in use")
        tid = self._next_tid
        while True:
            tid = tid % 0xFFFF + 1  # 1..65535: some servers treat 0 as "no transaction id"
            if tid not in self._pending:
                break
        self._next_tid = tid
        self._pending[tid] = _Pending(unit_id, deadline_s)
        self._units[unit_id] = tid
        heapq.heappush(self._deadlines, (deadline_s, tid))
        self._out.append(MBAP_HEADER.pack(tid, 0, len(pdu) + 1, unit_id) + pdu)
        return tid

    def abandon(self, tid: int) -> None:
        """The caller gave up on a request (cancelled): its answer, if any, will be a stray frame."""
        self._forget(tid)

    def data_to_send(self) -> bytes:
        out, self._out = self._out, []
        return out[0] if len(out) == 1 else b"".join(out)

    # -- receiving ----------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        rx = self._rx + data if self._rx else data
        events: list[Event] = []
        pos, size = 0, len(rx)
        while size - pos >= 8:  # header + at least a function code
            tid, proto, length, unit = MBAP_HEADER.unpack_from(rx, pos)
            if proto != 0 or not 2 <= length <= MAX_MBAP_LENGTH:
                self._rx = b""
                return events + self._break("garbage")
            end = pos + 6 + length
            if end > size:
                break
            pdu = rx[pos + 7:end]
            pos = end
            pending = self._pending.get(tid)
            if pending is None:
                self._stray(tid, unit)
            elif pending.unit_id != unit:
                self._forget(tid)
                events.append(RequestFailed(tid, f"wrong unit id {unit}"))
            else:
                self._forget(tid)
                events.append(ResponseReceived(tid, unit, pdu))
        self._rx = rx[pos:] if pos < size else b""
        return events

    def _stray(self, tid: int, unit: int) -> None:
        self.stray_frames += 1
        waiting = self._units.get(unit)
        if waiting is not None:
            self._pending[waiting].stray_tid = tid

    # -- time ---------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap:
            deadline_s, tid = heap[0]
            pending = self._pending.get(tid)
            if pending is not None and pending.deadline_s == deadline_s:
                return deadline_s
            heapq.heappop(heap)  # answered or abandoned
        return None

    def handle_deadline(self, now_s: float) -> list[Event]:
        """Fail the requests whose deadline has passed."""
        events: list[Event] = []
        while (deadline_s := self.next_deadline()) is not None and deadline_s <= now_s:
            _, tid = heapq.heappop(self._deadlines)
            pending = self._pending[tid]
            if self._rx:
                self._rx = b""
                self._forget(tid)
                events.append(RequestFailed(tid, "short frame"))
                return events + self._break("short frame")
            self._forget(tid)
            reason = "timeout" if pending.stray_tid is None else f"wrong transaction id {pending.stray_tid}"
            events.append(RequestFailed(tid, reason))
        return events

    # -- internals ----------------------------------------------------------------------------------
    def _forget(self, tid: int) -> None:
        pending = self._pending.pop(tid, None)
        if pending is not None and self._units.get(pending.unit_id) == tid:
            del self._units[pending.unit_id]
        if not self._pending:
            # Every deadline left is stale. Clear them here: a caller that drops its timer while the
            # connection is idle never calls next_deadline, and the heap would grow by one per request.
            self._deadlines.clear()

    def _break(self, reason: str) -> list[Event]:
        failed: list[Event] = [RequestFailed(tid, reason) for tid in self._pending]
        self._pending.clear()
        self._units.clear()
        self._deadlines.clear()
        return [*failed, StreamBroken(reason)]
