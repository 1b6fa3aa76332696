"""Hypothesis: framers give the same frames and counters for any split of a stream; garbage never raises."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.serial.framing import DelimiterFramer, FixedFramer, Framer, LengthPrefixedFramer
from drivers.serial.nmea import NmeaDecoder, NmeaError
from drivers.serial.slcan import CanFrame, SlcanError, format_frame, parse_line

FRAMERS: dict[str, Callable[[], Framer]] = {
    "crlf": lambda: DelimiterFramer(b"\r\n", max_frame_bytes=12),
    "nul": lambda: DelimiterFramer(b"\x00", max_frame_bytes=5),
    "len1": lambda: LengthPrefixedFramer(length_bytes=1, max_frame_bytes=40),
    "len2-header": lambda: LengthPrefixedFramer(length_bytes=2, byte_order="little", header=b"\xaa\x55",
                                                length_offset=1, length_adjust=1, max_frame_bytes=64),
    "len4": lambda: LengthPrefixedFramer(length_bytes=4, length_adjust=-2, max_frame_bytes=30),
    "fixed": lambda: FixedFramer(5),
    "fixed-sync": lambda: FixedFramer(6, sync=b"\x7e\x7e"),
}

# Streams biased towards the bytes the framers care about, so delimiters and headers actually occur.
SPECIAL = [b"\r\n", b"\r", b"\n", b"\x00", b"\xaa\x55", b"\x7e\x7e", b"\x02", b"\x00\x03"]
stream_bytes = st.lists(st.one_of(st.binary(max_size=8), st.sampled_from(SPECIAL)), max_size=40).map(b"".join)


def run(framer: Framer, chunks: list[bytes]) -> tuple[list[bytes], int, int, int]:
    frames = [f for c in chunks for f in framer.feed(c)]
    return frames, framer.stats.frames, framer.stats.bytes_dropped, framer.stats.frames_dropped


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(FRAMERS)), data=stream_bytes,
       cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_any_split_of_a_byte_stream_yields_the_same_frames_and_counts(name: str, data: bytes,
                                                                      cuts: list[int]) -> None:
    whole = run(FRAMERS[name](), [data])
    pieces = run(FRAMERS[name](), split(data, cuts))
    bytewise = run(FRAMERS[name](), [data[i:i + 1] for i in range(len(data))])
    assert pieces == whole
    assert bytewise == whole


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(FRAMERS)), data=st.binary(max_size=400))
def test_garbage_never_raises_and_buffers_stay_bounded(name: str, data: bytes) -> None:
    framer = FRAMERS[name]()
    frames = framer.feed(data)
    limit = getattr(framer, "max_frame_bytes", 64)
    assert all(len(f) <= limit for f in frames)
    assert len(framer._buf) <= limit + 2  # type: ignore[attr-defined]
    # Every input byte is accounted for: in a frame, dropped, a delimiter, or still buffered.
    assert sum(map(len, frames)) + framer.stats.bytes_dropped + len(framer._buf) <= len(data)  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=60), prefix=st.sampled_from([b"", b"$", b"$GPRMC,", b"$GPGGA,"]))
def test_nmea_garbage_is_only_ever_an_nmea_error(data: bytes, prefix: bytes) -> None:
    d = NmeaDecoder()
    try:
        d.decode(prefix + data)
    except NmeaError:
        assert d.stats.bad_checksum + d.stats.malformed == 1


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40), kind=st.sampled_from([b"", b"t", b"T", b"r", b"R", b"d", b"B"]))
def test_slcan_garbage_is_only_ever_a_slcan_error(data: bytes, kind: bytes) -> None:
    try:
        parse_line(kind + data)
    except SlcanError:
        pass


can_frames = st.one_of(
    st.builds(lambda i, d, ts: CanFrame(i, d, timestamp_ms=ts), st.integers(0, 0x7FF), st.binary(max_size=8),
              st.none() | st.integers(0, 59_999)),
    st.builds(lambda i, d: CanFrame(i, d, is_extended=True), st.integers(0, 0x1FFFFFFF),
              st.binary(max_size=8)),
    st.builds(lambda i, n: CanFrame(i, b"", is_remote=True, dlc=n), st.integers(0, 0x7FF), st.integers(0, 8)),
    st.builds(lambda i, d: CanFrame(i, d, is_extended=True, is_fd=True), st.integers(0, 0x1FFFFFFF),
              st.sampled_from([0, 8, 12, 20, 48, 64]).map(bytes)),
)


@given(frame=can_frames)
def test_every_can_frame_survives_a_slcan_round_trip(frame: CanFrame) -> None:
    assert parse_line(format_frame(frame)) == frame
