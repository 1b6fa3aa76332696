"""Unit tests of the pure Modbus wire codec (CRC, RTU/MBAP frames, request/response PDUs, diagnosis)
and the quarantine back-off."""

from __future__ import annotations

import pytest

from drivers.modbus.wire import (
    BadRequest,
    Request,
    check_rtu,
    crc16,
    decode_request,
    diagnose_mbap,
    diagnose_rtu,
    encode_request,
    encode_response,
    exception_response,
    mbap_frame,
    rtu_frame,
    split_rtu_request,
    wire_time_s,
)
from drivers.scheduling import Backoff


def test_the_crc_matches_the_serial_line_specification_example():
    # Modbus over Serial Line v1.02 §6.2.2 / widely published vector: 01 03 00 00 00 0A -> C5 CD
    assert rtu_frame(1, bytes.fromhex("030000000A")) == bytes.fromhex("01030000000AC5CD")
    assert crc16(b"123456789") == 0x4B37  # CRC-16/MODBUS check value


def test_every_request_round_trips_through_its_pdu():
    for req in (Request(3, 299, 125), Request(1, 0, 2000), Request(5, 7, 1, (1,)), Request(6, 980, 1, (15,)),
                Request(15, 3, 10, (1, 0, 1, 1, 0, 0, 0, 0, 1, 1)), Request(16, 401, 2, (0x4228, 0))):
        assert decode_request(encode_request(req)) == req


@pytest.mark.parametrize(("pdu", "code"), [
    (b"", 1), (bytes((0x2B, 0x0E, 1, 0)), 1), (bytes.fromhex("03000000"), 3),
    (bytes.fromhex("030000007E"), 3), (bytes.fromhex("0500000001"), 3), (bytes.fromhex("10000000020300"), 3),
])
def test_malformed_requests_are_refused_with_the_exception_code_to_answer(pdu, code):
    with pytest.raises(BadRequest) as err:
        decode_request(pdu)
    assert err.value.code == code


def test_responses_encode_registers_bits_and_write_echoes():
    assert encode_response(Request(3, 0, 2), [0x1234, 0xABCD]) == bytes.fromhex("03041234ABCD")
    assert encode_response(Request(1, 0, 10), [1, 0, 1, 0, 0, 0, 0, 0, 1, 1]) == bytes.fromhex("01020503")
    assert encode_response(Request(16, 401, 2, (1, 2))) == bytes.fromhex("1001910002")
    assert exception_response(3, 2) == bytes.fromhex("8302")


def test_rtu_requests_are_split_from_a_byte_stream_by_their_length():
    a = rtu_frame(1, encode_request(Request(3, 0, 10)))
    b = rtu_frame(2, encode_request(Request(16, 5, 2, (7, 8))))
    assert split_rtu_request(a[:5]) is None
    frame, unit, pdu = split_rtu_request(a + b) or (b"", 0, b"")
    assert (frame, unit, pdu) == (a, 1, a[1:-2]) and check_rtu(frame)
    assert split_rtu_request(b)[:2] == (b, 2)  # type: ignore[index]
    assert not check_rtu(a[:-1] + bytes((a[-1] ^ 1,)))


def test_an_unusable_rtu_answer_is_diagnosed():
    good = rtu_frame(4, encode_response(Request(3, 0, 2), [1, 2]))
    assert diagnose_rtu(b"", 4, 3) == "timeout"
    assert diagnose_rtu(good[:-1] + bytes((good[-1] ^ 0xFF,)), 4, 3) == "crc error"
    assert diagnose_rtu(good[:4], 4, 3) == "short frame"
    assert diagnose_rtu(rtu_frame(5, encode_response(Request(3, 0, 2), [1, 2])), 4, 3) == "wrong unit id 5"
    assert diagnose_rtu(b"\xde\xad\xbe\xef\x00\x13\x37", 4, 3) == "garbage"
    assert diagnose_rtu(rtu_frame(4, bytes.fromhex("0400")), 4, 3) == "wrong function 4"


def test_an_unusable_tcp_answer_is_diagnosed():
    good = mbap_frame(9, 4, encode_response(Request(3, 0, 2), [1, 2]))
    assert diagnose_mbap(b"", 4) == "timeout"
    assert diagnose_mbap(good[:6], 4) == "short frame"
    assert diagnose_mbap(good[:-1], 4) == "short frame"
    assert diagnose_mbap(mbap_frame(9, 7, b"\x03\x02\x00\x01"), 4) == "wrong unit id 7"
    assert diagnose_mbap(good, 4, transaction_id=8) == "wrong transaction id 9"
    assert diagnose_mbap(b"\xde\xad\xbe\xef\x00\x13\x37\x42\x42", 4) == "garbage"


def test_wire_time_counts_eleven_bits_per_byte():
    assert wire_time_s(19200, 19200) == pytest.approx(11.0)


def test_backoff_doubles_from_the_first_wait_to_the_cap_and_resets_on_success():
    b = Backoff(5.0, 30.0)
    assert [b.failed(100.0) - 100.0 for _ in range(5)] == [5.0, 10.0, 20.0, 30.0, 30.0]
    b.succeeded()
    assert b.failed(0.0) == 5.0 and b.failures == 1
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
