"""The shared file-transfer contract: `$file` topic parsing, init metadata, safe names, the upload machine."""

from __future__ import annotations

import hashlib
import json

import pytest

from uplink.schema.filetransfer import (
    AbortCommand,
    FileMeta,
    FileResponse,
    FileTransferError,
    FinCommand,
    InitCommand,
    Mode,
    RetryPolicy,
    SegmentCommand,
    SendFin,
    SendInit,
    SendSegment,
    UploadAction,
    UploadMachine,
    UploadPhase,
    UploadPlan,
    escape_path_component,
    filename_problem,
    is_file_topic,
    parse_filemeta,
    parse_response,
    parse_topic,
)

SUM = hashlib.sha256(b"x").hexdigest()


# -- topics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "command"), [
    ("$file/f1/init", InitCommand(Mode.SYNC, "f1")),
    ("$file-async/f1/init", InitCommand(Mode.ASYNC, "f1")),
    ("$file/f1/0", SegmentCommand(Mode.SYNC, "f1", 0)),
    (f"$file/f1/1024/{SUM.upper()}", SegmentCommand(Mode.SYNC, "f1", 1024, SUM)),
    ("$file/f1/fin/10", FinCommand(Mode.SYNC, "f1", 10)),
    (f"$file-async/f1/fin/10/{SUM}", FinCommand(Mode.ASYNC, "f1", 10, SUM)),
    ("$file/f1/abort", AbortCommand(Mode.SYNC, "f1")),
])
def test_every_command_shape_parses_from_its_topic(topic: str, command: object) -> None:
    assert is_file_topic(topic)
    assert parse_topic(topic) == command


@pytest.mark.parametrize(("topic", "reason"), [
    ("$file//init", "invalid_fileid"),
    ("$file/f1/fin", "invalid_offset"),  # EMQX: a fin without a size is an offset "fin"
    ("$file/f1/-5", "invalid_offset"),
    ("$file/f1/+5", "invalid_offset"),
    ("$file/f1/٣", "invalid_offset"),
    ("$file/f1/0/abc", "invalid_checksum"),
    ("$file/f1/fin/ten", "invalid_size"),
    ("$file/f1/fin/1/2/3", "invalid_file_command"),
    ("$file/f1/0/" + SUM + "/x", "invalid_file_command"),
])
def test_malformed_command_topics_are_refused_with_the_emqx_reason(topic: str, reason: str) -> None:
    with pytest.raises(FileTransferError) as err:
        parse_topic(topic)
    assert err.value.reason == reason


def test_bare_file_prefixes_and_lookalikes_are_not_file_transfer() -> None:
    assert not is_file_topic("$file")
    assert not is_file_topic("$files/x/init")
    assert not is_file_topic("$file-response/dev1")
    assert not is_file_topic("file/x/init")


# -- names and escaping -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "", ".", "..", "../etc/passwd", "a/b", "a\\b", "C:evil", "line\nbreak", "nul\x00", "tab\t",
    "rtl\u202egnp.exe", "x" * 241, "é" * 121,
])
def test_unsafe_file_names_are_refused(name: str) -> None:
    assert filename_problem(name) is not None
    with pytest.raises(FileTransferError) as err:
        FileMeta(name=name)
    assert err.value.reason == "invalid_filemeta"


@pytest.mark.parametrize("name", ["card-2024.csv", "100%.log", "sound print ü.wav", "..hidden", "a" * 240])
def test_ordinary_file_names_are_accepted(name: str) -> None:
    assert filename_problem(name) is None


def test_escaped_ids_never_name_a_parent_or_contain_separators() -> None:
    assert escape_path_component("..") == "%2E%2E"
    assert escape_path_component(".") == "%2E"
    assert escape_path_component("a/b\\c:d%e") == "a%2Fb%5Cc%3Ad%25e"
    assert escape_path_component("x\n") == "x%0A"
    assert escape_path_component("dev-1.ü") == "dev-1.ü"


# -- metadata -----------------------------------------------------------------------------------


def test_init_metadata_round_trips_through_its_canonical_json() -> None:
    meta = FileMeta(name="a.bin", size=10, checksum=SUM.upper(), expire_at=5, segments_ttl=600,
                    user_data={"class": "card"})
    again = parse_filemeta(meta.to_json())
    assert again == FileMeta(name="a.bin", size=10, checksum=SUM, expire_at=5, segments_ttl=600,
                             user_data={"class": "card"})
    assert again.to_json() == meta.to_json()


@pytest.mark.parametrize("payload", [
    b"not json", b"[1]", b"{}", b'{"name": 5}', b'{"name": "a", "foo": 1}', b'{"name": "a", "size": -1}',
    b'{"name": "a", "size": true}', b'{"name": "a", "checksum": "abc"}', b'{"name": "a", "segments_ttl": 0}',
    b'{"name": "../a"}',
])
def test_invalid_init_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(FileTransferError) as err:
        parse_filemeta(payload)
    assert err.value.reason == "invalid_filemeta"


def test_responses_have_the_emqx_fields_and_tolerate_an_unknown_version() -> None:
    response = FileResponse("$file/f/init", 7, 0, "success")
    assert json.loads(response.to_json()) == {"vsn": "0.1", "topic": "$file/f/init", "packet_id": 7,
                                              "reason_code": 0, "reason_description": "success"}
    later = parse_response(b'{"vsn":"9.9","topic":"t","packet_id":1,"reason_code":128,'
                           b'"reason_description":"incomplete","extra":1}')
    assert later == FileResponse("t", 1, 128, "incomplete") and not later.ok


# -- upload machine -----------------------------------------------------------------------------


def _plan(size: int = 25, segment: int = 10, mode: Mode = Mode.SYNC) -> UploadPlan:
    return UploadPlan("fid", mode, size, segment, SUM, FileMeta(name="a").to_json())


def _drain(machine: UploadMachine, now: float = 0.0) -> list[UploadAction]:
    out: list[UploadAction] = []
    while (action := machine.next_action(now)) is not None:
        out.append(action)
    return out


def test_the_machine_pipelines_init_and_segments_then_sends_fin_once_all_are_acked() -> None:
    m = UploadMachine(_plan())
    first = _drain(m)
    assert first == [SendInit("$file/fid/init", b'{"name":"a"}'), SendSegment(0, 10), SendSegment(10, 10),
                     SendSegment(20, 5)]
    for action in first:
        assert isinstance(action, SendInit | SendSegment)
        m.command_acked(action, 0, 0.0)
    assert _drain(m) == [SendFin(f"$file/fid/fin/25/{SUM}")]
    m.command_acked(SendFin(f"$file/fid/fin/25/{SUM}"), 0, 0.0)
    assert m.phase is UploadPhase.DONE and m.bytes_acked == 25


def test_the_window_bounds_the_commands_in_flight() -> None:
    m = UploadMachine(_plan(size=100), max_in_flight=3)
    assert len(_drain(m)) == 3
    m.command_acked(SendInit(m.plan.init_topic, m.plan.init_payload), 0, 0.0)
    assert _drain(m) == [SendSegment(20, 10)]


def test_a_resumed_upload_sends_only_the_missing_segments() -> None:
    m = UploadMachine(_plan(), acked_offsets={0, 20}, init_acked=True)
    assert _drain(m) == [SendSegment(10, 10)]


def test_a_refused_segment_is_retried_after_backoff_and_a_persistent_refusal_fails() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=1.0)
    m = UploadMachine(_plan(size=10), policy, init_acked=True)
    seg = SendSegment(0, 10)
    assert _drain(m) == [seg]
    m.command_acked(seg, 0x80, 0.0)
    assert _drain(m, 0.5) == []
    assert m.next_deadline() == 1.0
    assert _drain(m, 1.0) == [seg]
    m.command_acked(seg, 0x80, 1.0)
    assert _drain(m, 2.9) == [] and _drain(m, 3.0) == [seg]
    m.command_acked(seg, 0x80, 3.0)
    assert m.phase is UploadPhase.FAILED and "refused 3 times" in (m.failure or "")


@pytest.mark.parametrize(("code", "words"), [
    (0x10, "not enabled"), (0x87, "not authorized"), (0x83, "cancelled"),
])
def test_terminal_reason_codes_end_the_upload_with_an_actionable_reason(code: int, words: str) -> None:
    m = UploadMachine(_plan(size=10), init_acked=True)
    m.command_acked(SendSegment(0, 10), code, 0.0)
    assert m.phase is UploadPhase.FAILED and words in (m.failure or "")
    assert not m.restart_with_new_id


def test_quota_exceeded_backs_off_ten_seconds_first() -> None:
    m = UploadMachine(_plan(size=10), init_acked=True)
    seg = SendSegment(0, 10)
    _drain(m)
    m.command_acked(seg, 0x97, 0.0)
    assert m.next_deadline() == 10.0


def test_async_fin_waits_for_the_response_in_either_order() -> None:
    for response_first in (False, True):
        m = UploadMachine(_plan(size=10, mode=Mode.ASYNC), acked_offsets={0}, init_acked=True)
        fin = _drain(m)[0]
        assert isinstance(fin, SendFin)
        ok = FileResponse(fin.topic, 3, 0, "success")
        if response_first:
            m.response_received(ok, 0.0)
            assert m.phase is UploadPhase.SENDING
            m.command_acked(fin, 0, 0.0)
        else:
            m.command_acked(fin, 0, 0.0)
            assert m.phase is UploadPhase.AWAITING_FIN_RESULT
            m.response_received(FileResponse("$file-async/other/fin/1", 1, 0, "success"), 0.0)
            assert m.phase is UploadPhase.AWAITING_FIN_RESULT
            m.response_received(ok, 0.0)
        assert m.finished and m.failure is None


def test_a_missing_async_fin_result_sends_fin_again() -> None:
    policy = RetryPolicy(fin_response_timeout_s=5.0, initial_backoff_s=1.0)
    m = UploadMachine(_plan(size=10, mode=Mode.ASYNC), policy, acked_offsets={0}, init_acked=True)
    fin = _drain(m)[0]
    assert isinstance(fin, SendFin)
    m.command_acked(fin, 0, 0.0)
    assert m.next_deadline() == 5.0
    m.handle_deadline(5.0)
    assert _drain(m, 6.0) == [fin]


def test_a_failed_fin_resends_everything_and_a_second_failure_asks_for_a_new_file_id() -> None:
    m = UploadMachine(_plan(size=20, mode=Mode.ASYNC), acked_offsets={0, 10}, init_acked=True)
    fin = _drain(m)[0]
    assert isinstance(fin, SendFin)
    m.command_acked(fin, 0, 0.0)
    m.response_received(FileResponse(fin.topic, 1, 128, "incomplete"), 0.0)
    assert m.resets == 1 and m.acked == set() and not m.init_acked
    again = _drain(m)
    init = SendInit(m.plan.init_topic, m.plan.init_payload)
    assert again == [init, SendSegment(0, 10), SendSegment(10, 10)]
    for action in again:
        assert isinstance(action, SendInit | SendSegment)
        m.command_acked(action, 0, 0.0)
    fin = _drain(m)[0]
    assert isinstance(fin, SendFin)
    m.command_acked(fin, 0x80, 0.0)
    assert m.phase is UploadPhase.FAILED and m.restart_with_new_id


def test_at_mqtt_311_a_failure_response_puts_an_acked_segment_back() -> None:
    m = UploadMachine(_plan(size=20, mode=Mode.ASYNC), init_acked=True, puback_has_reason=False)
    segs = _drain(m)
    for action in segs:
        assert isinstance(action, SendSegment)
        m.command_acked(action, 0, 0.0)  # 3.1.1 PUBACKs say nothing
    m.response_received(FileResponse(f"$file-async/fid/10/{SUM}", 2, 128, "checksum_mismatch"), 0.0)
    assert m.acked == {0}
    assert _drain(m, 10.0) == [SendSegment(10, 10)]


def test_an_empty_file_is_just_init_and_fin() -> None:
    m = UploadMachine(_plan(size=0))
    init = _drain(m)
    assert init == [SendInit(m.plan.init_topic, m.plan.init_payload)]
    m.command_acked(init[0], 0, 0.0)
    assert _drain(m) == [SendFin(f"$file/fid/fin/0/{SUM}")]
