"""The sans-I/O Modbus/TCP client session (drivers.modbus.mbap) and the client-side response decoders."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.mbap import MbapSession, RequestFailed, ResponseReceived, StreamBroken
from drivers.modbus.wire import (
    BadResponse,
    ExceptionAnswer,
    Request,
    check_write_response,
    decode_read_response,
    encode_request,
    encode_response,
    exception_response,
    mbap_frame,
)

READ_10 = encode_request(Request(3, 100, 10))


def answer(tid: int, unit: int, words: list[int]) -> bytes:
    return mbap_frame(tid, unit, encode_response(Request(3, 100, len(words)), words))


def test_a_request_goes_out_as_one_mbap_frame_with_a_fresh_transaction_id():
    s = MbapSession()
    tid = s.send_request(7, READ_10, deadline_s=1.0)
    assert s.data_to_send() == struct.pack(">HHHB", tid, 0, 6, 7) + READ_10
    assert s.data_to_send() == b""
    assert s.send_request(8, READ_10, deadline_s=1.0) != tid


def test_answers_are_matched_by_transaction_id_in_whatever_order_they_come():
    s = MbapSession()
    a = s.send_request(1, READ_10, deadline_s=1.0)
    b = s.send_request(2, READ_10, deadline_s=1.0)
    events = s.receive_data(answer(b, 2, [2] * 10) + answer(a, 1, [1] * 10))
    assert [(e.tid, e.unit_id) for e in events if isinstance(e, ResponseReceived)] == [(b, 2), (a, 1)]
    assert s.in_flight == 0 and not s.busy(1) and not s.busy(2)


def test_deadlines_of_answered_requests_do_not_pile_up_when_nobody_asks_for_the_next_one():
    # a caller that drops its timer while idle never calls next_deadline: the heap must not grow
    s = MbapSession()
    for k in range(1000):
        tid = s.send_request(1, READ_10, deadline_s=float(k))
        s.data_to_send()
        s.receive_data(answer(tid, 1, [0] * 10))
    assert s.in_flight == 0 and len(s._deadlines) == 0
    later = s.send_request(1, READ_10, deadline_s=5.0)
    assert s.next_deadline() == 5.0
    assert s.handle_deadline(5.0) == [RequestFailed(later, "timeout")]


def test_a_frame_split_anywhere_is_reassembled():
    s = MbapSession()
    tid = s.send_request(1, READ_10, deadline_s=1.0)
    frame = answer(tid, 1, list(range(10)))
    events = [e for byte in frame for e in s.receive_data(bytes((byte,)))]
    assert events == [ResponseReceived(tid, 1, frame[7:])]


def test_a_unit_with_a_request_outstanding_refuses_a_second_one():
    s = MbapSession()
    s.send_request(1, READ_10, deadline_s=1.0)
    assert s.busy(1)
    with pytest.raises(ValueError):
        s.send_request(1, READ_10, deadline_s=1.0)


def test_an_answer_from_another_unit_fails_the_request_at_once():
    s = MbapSession()
    tid = s.send_request(2, READ_10, deadline_s=1.0)
    assert s.receive_data(answer(tid, 3, [0] * 10)) == [RequestFailed(tid, "wrong unit id 3")]
    assert not s.busy(2)


def test_a_late_answer_to_an_abandoned_request_is_dropped_and_named_if_the_next_one_times_out():
    s = MbapSession()
    old = s.send_request(1, READ_10, deadline_s=1.0)
    s.abandon(old)
    new = s.send_request(1, READ_10, deadline_s=2.0)
    assert s.receive_data(answer(old, 1, [0] * 10)) == []
    assert s.stray_frames == 1
    assert s.handle_deadline(1.5) == []
    assert s.handle_deadline(2.0) == [RequestFailed(new, f"wrong transaction id {old}")]


def test_a_silent_device_times_out_at_its_deadline_and_not_before():
    s = MbapSession()
    early = s.send_request(1, READ_10, deadline_s=5.0)
    late = s.send_request(2, READ_10, deadline_s=9.0)
    assert s.next_deadline() == 5.0
    assert s.handle_deadline(4.999) == []
    assert s.handle_deadline(5.0) == [RequestFailed(early, "timeout")]
    assert s.next_deadline() == 9.0
    s.receive_data(answer(late, 2, [0] * 10))
    assert s.next_deadline() is None


def test_a_header_that_is_not_mbap_fails_every_outstanding_request_and_breaks_the_stream():
    s = MbapSession()
    a = s.send_request(1, READ_10, deadline_s=1.0)
    b = s.send_request(2, READ_10, deadline_s=1.0)
    events = s.receive_data(b"\xde\xad\xbe\xef\x00\x13\x37\x42\x42\x42\x42\x42")
    assert events == [RequestFailed(a, "garbage"), RequestFailed(b, "garbage"), StreamBroken("garbage")]
    assert s.in_flight == 0 and s.next_deadline() is None


def test_half_a_frame_at_the_deadline_is_a_short_frame_and_breaks_the_stream():
    s = MbapSession()
    tid = s.send_request(1, READ_10, deadline_s=1.0)
    frame = answer(tid, 1, [0] * 10)
    assert s.receive_data(frame[: len(frame) // 2]) == []
    assert s.handle_deadline(1.0) == [RequestFailed(tid, "short frame"), StreamBroken("short frame")]


@given(chunks=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60),
       counts=st.lists(st.integers(min_value=1, max_value=125), min_size=1, max_size=8))
def test_any_chunking_of_a_stream_of_answers_gives_the_same_events(chunks, counts):
    s = MbapSession()
    tids = [s.send_request(unit, encode_request(Request(3, 0, n)), deadline_s=1.0)
            for unit, n in enumerate(counts, start=1)]
    stream = b"".join(answer(tid, unit, list(range(n)))
                      for unit, (tid, n) in enumerate(zip(tids, counts, strict=True), 1))
    events, pos, k = [], 0, 0
    while pos < len(stream):
        size = chunks[k % len(chunks)]
        events += s.receive_data(stream[pos:pos + size])
        pos, k = pos + size, k + 1
    assert [e.tid for e in events] == tids
    assert all(isinstance(e, ResponseReceived) and decode_read_response(3, n, e.pdu) == list(range(n))
               for e, n in zip(events, counts, strict=True))


def test_read_responses_decode_registers_and_bits_without_the_padding():
    assert decode_read_response(3, 2, bytes.fromhex("03041234ABCD")) == [0x1234, 0xABCD]
    bits = decode_read_response(1, 10, bytes.fromhex("01020503"))
    assert bits == [True, False, True, False, False, False, False, False, True, True]


@pytest.mark.parametrize(("function", "pdu", "reason"), [
    (3, bytes.fromhex("0404000A000B"), "wrong function 4"),
    (3, bytes.fromhex("0306000A000B"), "garbage"),  # byte count says 6, 4 bytes follow
    (3, bytes.fromhex("0303000A00"), "garbage"),  # an odd byte count cannot hold registers
    (3, b"", "short frame"),
])
def test_a_response_that_does_not_answer_the_request_says_why(function, pdu, reason):
    with pytest.raises(BadResponse) as err:
        decode_read_response(function, 2, pdu)
    assert err.value.reason == reason


def test_an_exception_response_carries_its_code():
    with pytest.raises(ExceptionAnswer) as err:
        decode_read_response(3, 2, exception_response(3, 2))
    assert err.value.code == 2


def test_a_write_response_must_echo_the_request():
    request = encode_request(Request(16, 401, 2, (1, 2)))
    check_write_response(request, encode_response(Request(16, 401, 2, (1, 2))))
    with pytest.raises(BadResponse):
        check_write_response(request, encode_response(Request(16, 402, 2, (1, 2))))
    with pytest.raises(ExceptionAnswer):
        check_write_response(request, exception_response(16, 2))
