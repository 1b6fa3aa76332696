"""Framers: delimiter, length-prefixed and fixed frames, bounded buffers, resync and drop counters."""

from __future__ import annotations

import pytest

from drivers.serial.framing import DelimiterFramer, FixedFramer, LengthPrefixedFramer


def test_crlf_lines_come_out_without_the_delimiter_and_empty_lines_are_skipped() -> None:
    f = DelimiterFramer(b"\r\n")
    assert f.feed(b"one\r\ntw") == [b"one"]
    assert f.feed(b"o\r\n\r\nthree\r") == [b"two"]
    assert f.feed(b"\n") == [b"three"]
    assert f.stats.frames == 3
    assert f.stats.bytes_dropped == 0


def test_a_delimiter_split_across_chunks_is_still_found() -> None:
    f = DelimiterFramer(b"\r\n", max_frame_bytes=4)
    assert f.feed(b"abcd\r") == []
    assert f.feed(b"\nefgh\r\n") == [b"abcd", b"efgh"]


def test_an_overlong_line_is_dropped_whole_and_counted_and_the_next_line_survives() -> None:
    f = DelimiterFramer(b"\n", max_frame_bytes=8)
    out = f.feed(b"0123456789ABCDEF")  # no delimiter yet, already too long
    out += f.feed(b"GHIJ\nok\n")
    assert out == [b"ok"]
    assert f.stats.bytes_dropped == 20
    assert f.stats.frames_dropped == 1


def test_the_buffer_stays_bounded_on_an_endless_line() -> None:
    f = DelimiterFramer(b"\r\n", max_frame_bytes=64)
    for _ in range(1000):
        f.feed(b"x" * 100)
    assert len(f._buf) <= 64 + 1
    assert f.stats.bytes_dropped >= 100_000 - 65


def test_reset_counts_the_partial_frame_as_dropped() -> None:
    f = DelimiterFramer(b"\n")
    f.feed(b"partial")
    f.reset()
    assert f.stats.bytes_dropped == 7
    assert f.feed(b"next\n") == [b"next"]


def test_gbt32960_style_frames_are_cut_by_their_length_field_after_a_header() -> None:
    # '##', cmd, ack, 17-byte VIN, encryption, 2-byte big-endian length, data, BCC.
    def frame(data: bytes) -> bytes:
        return b"##\x02\xfe" + b"LVIN0000000000001" + b"\x01" + len(data).to_bytes(2, "big") + data + b"\x55"

    f = LengthPrefixedFramer(length_bytes=2, byte_order="big", header=b"##", length_offset=20,
                             length_adjust=1, max_frame_bytes=256)
    a, b = frame(b"\x01\x02\x03"), frame(b"")
    assert f.feed(b"noise#" + a + b[:10]) == [a]
    assert f.feed(b[10:]) == [b]
    assert f.stats.bytes_dropped == 6


def test_a_length_prefix_that_exceeds_the_maximum_resyncs_on_the_next_header() -> None:
    f = LengthPrefixedFramer(length_bytes=1, header=b"\xaa\x55", max_frame_bytes=16)
    good = b"\xaa\x55\x03abc"
    assert f.feed(b"\xaa\x55\xff" + good) == [good]
    assert f.stats.frames_dropped == 1
    assert f.stats.bytes_dropped == 3


@pytest.mark.parametrize(("width", "order", "prefix"), [
    (1, "big", b"\x04"), (2, "big", b"\x00\x04"), (2, "little", b"\x04\x00"),
    (4, "big", b"\x00\x00\x00\x04"), (4, "little", b"\x04\x00\x00\x00"),
])
def test_length_fields_of_every_width_and_byte_order(width: int, order: str, prefix: bytes) -> None:
    f = LengthPrefixedFramer(length_bytes=width, byte_order=order)  # type: ignore[arg-type]
    assert f.feed(prefix + b"DATA" + prefix) == [prefix + b"DATA"]


def test_a_length_that_counts_the_length_field_itself_uses_a_negative_adjust() -> None:
    f = LengthPrefixedFramer(length_bytes=1, length_adjust=-1)
    assert f.feed(b"\x03ab\x01") == [b"\x03ab", b"\x01"]


def test_fixed_frames_without_sync_are_cut_every_size_bytes() -> None:
    f = FixedFramer(4)
    assert f.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert f.feed(b"kl") == [b"ijkl"]


def test_fixed_frames_with_a_sync_word_skip_garbage_before_it() -> None:
    f = FixedFramer(6, sync=b"\xfe\xfe")
    assert f.feed(b"\x01\x02\xfe\xfeABCD\x09\xfe\xfeEF") == [b"\xfe\xfeABCD"]
    assert f.feed(b"GH") == [b"\xfe\xfeEFGH"]
    assert f.stats.bytes_dropped == 3


def test_framers_reject_impossible_settings() -> None:
    with pytest.raises(ValueError):
        DelimiterFramer(b"")
    with pytest.raises(ValueError):
        LengthPrefixedFramer(length_bytes=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FixedFramer(2, sync=b"abc")
