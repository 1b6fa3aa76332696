"""Sans-I/O byte-stream framers: delimiter, length-prefixed and fixed-size frames, with bounded buffers.

Theory of operation. A serial line is a byte stream with no frame boundaries of its own; a framer
turns whatever chunks the port happens to deliver into whole frames. `feed(data)` appends a chunk
and returns every frame completed by it, so the frames depend only on the bytes, never on how the
stream was split into chunks (the property tests check exactly that). Garbage (line noise, a device
booting, a partial frame after a reconnect) must never wedge a framer: each one resynchronises on
its own structure (the next delimiter, the next header/sync word) and counts the bytes it threw away
in `stats.bytes_dropped`. Buffers are bounded by `max_frame_bytes`, so a stream with no valid frame
costs constant memory.

`reset()` forgets a partial frame (after the port was reopened); its bytes count as dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Endian = Literal["big", "little"]


@dataclass(slots=True)
class FramerStats:
    """Counters a framer keeps for metrics and tests (monotonic; never reset)."""

    frames: int = 0  # frames returned by feed()
    bytes_dropped: int = 0  # bytes discarded while resynchronising or in overlong frames
    frames_dropped: int = 0  # frames that were recognised but discarded (overlong, bad length)


class Framer(Protocol):
    stats: FramerStats

    def feed(self, data: bytes) -> list[bytes]: ...

    def reset(self) -> None: ...


class DelimiterFramer:
    """Frames end with `delimiter` (e.g. b"\\r\\n"); the delimiter is not part of the frame.

    Empty frames (two delimiters in a row) are skipped. A frame longer than `max_frame_bytes` is
    dropped whole: once the buffer holds more than that without a delimiter, the bytes are discarded
    and so is everything up to the next delimiter (the rest of the overlong frame).
    """

    def __init__(self, delimiter: bytes = b"\r\n", *, max_frame_bytes: int = 1024) -> None:
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self.delimiter = delimiter
        self.max_frame_bytes = max_frame_bytes
        self.stats = FramerStats()
        self._buf = bytearray()
        self._discarding = False  # inside an overlong frame: drop until the next delimiter

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        delim = self.delimiter
        start = 0
        while True:
            end = self._buf.find(delim, start)
            if end < 0:
                break
            length = end - start
            if self._discarding or length > self.max_frame_bytes:
                self.stats.bytes_dropped += length
                self.stats.frames_dropped += 1
                self._discarding = False
            elif length:
                out.append(bytes(self._buf[start:end]))
            start = end + len(delim)
        del self._buf[:start]
        # No delimiter in the rest. Keep len(delim) - 1 bytes: they may be the start of a delimiter
        # that the next chunk completes.
        keep = len(delim) - 1
        if self._discarding or len(self._buf) > self.max_frame_bytes + keep:
            drop = max(0, len(self._buf) - keep)
            if drop:
                self.stats.bytes_dropped += drop
                del self._buf[:drop]
            self._discarding = True
        self.stats.frames += len(out)
        return out

    def reset(self) -> None:
        self.stats.bytes_dropped += len(self._buf)
        self._buf.clear()
        self._discarding = False


class LengthPrefixedFramer:
    """Frames carry their own length: [header][length_offset bytes][length field][body].

    The length field is `length_bytes` (1, 2 or 4) wide in `byte_order`. The whole frame is
    `len(header) + length_offset + length_bytes + value + length_adjust` bytes: `length_adjust`
    covers trailers the length does not count (e.g. +1 for a checksum byte) or a length that counts
    the header too (negative). Frames are returned whole, header included, so parsers can check it.

    Resync: with a header, bytes before the next header are dropped; a declared size that is
    impossible (< header+length field, or > max_frame_bytes) drops the header's first byte and
    searches again. Without a header a bad length drops one byte at a time.
    """

    def __init__(self, *, length_bytes: Literal[1, 2, 4] = 1, byte_order: Endian = "big",
                 header: bytes = b"", length_offset: int = 0, length_adjust: int = 0,
                 max_frame_bytes: int = 1024) -> None:
        if length_bytes not in (1, 2, 4):
            raise ValueError("length_bytes must be 1, 2 or 4")
        if length_offset < 0:
            raise ValueError("length_offset must be >= 0")
        self.length_bytes = length_bytes
        self.byte_order: Endian = byte_order
        self.header = header
        self.length_offset = length_offset
        self.length_adjust = length_adjust
        self._prefix = len(header) + length_offset + length_bytes  # bytes before the body
        if max_frame_bytes < self._prefix:
            raise ValueError("max_frame_bytes is shorter than header + length field")
        self.max_frame_bytes = max_frame_bytes
        self.stats = FramerStats()
        self._buf = bytearray()

    def _drop(self, n: int) -> None:
        self.stats.bytes_dropped += n
        del self._buf[:n]

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self.header:
                at = self._buf.find(self.header)
                if at < 0:
                    # Keep a possible header start at the tail; drop the rest.
                    self._drop(max(0, len(self._buf) - (len(self.header) - 1)))
                    break
                if at:
                    self._drop(at)
            if len(self._buf) < self._prefix:
                break
            lo = self._prefix - self.length_bytes
            value = int.from_bytes(self._buf[lo:self._prefix], self.byte_order)
            size = self._prefix + value + self.length_adjust
            if size < self._prefix or size > self.max_frame_bytes:
                self.stats.frames_dropped += 1
                self._drop(1)
                continue
            if len(self._buf) < size:
                break
            out.append(bytes(self._buf[:size]))
            del self._buf[:size]
        self.stats.frames += len(out)
        return out

    def reset(self) -> None:
        self.stats.bytes_dropped += len(self._buf)
        self._buf.clear()


class FixedFramer:
    """Frames of exactly `size_bytes`, optionally starting with a `sync` word (counted in the size).

    Without sync, the stream is cut every `size_bytes` (there is nothing to resync on; a lost byte
    shifts every later frame, so prefer a sync word). With sync, bytes before a sync word are dropped.
    """

    def __init__(self, size_bytes: int, *, sync: bytes = b"") -> None:
        if size_bytes < 1:
            raise ValueError("size_bytes must be >= 1")
        if len(sync) > size_bytes:
            raise ValueError("sync is longer than the frame")
        self.size_bytes = size_bytes
        self.sync = sync
        self.max_frame_bytes = size_bytes
        self.stats = FramerStats()
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self.sync:
                at = self._buf.find(self.sync)
                if at < 0:
                    drop = max(0, len(self._buf) - (len(self.sync) - 1))
                    self.stats.bytes_dropped += drop
                    del self._buf[:drop]
                    break
                if at:
                    self.stats.bytes_dropped += at
                    del self._buf[:at]
            if len(self._buf) < self.size_bytes:
                break
            out.append(bytes(self._buf[:self.size_bytes]))
            del self._buf[:self.size_bytes]
        self.stats.frames += len(out)
        return out

    def reset(self) -> None:
        self.stats.bytes_dropped += len(self._buf)
        self._buf.clear()
