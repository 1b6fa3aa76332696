"""The EMQX-compatible MQTT file-transfer contract: `$file` topics, init metadata, responses, upload machine.

Shared by the edge uploader and the broker's file-transfer server, so both ends parse and build the
same bytes. Pure: no I/O, time is passed in. Follows the EMQX code (emqx_ft) where its docs differ:

    {mode}/{fileId}/init                         JSON metadata (`FileMeta`)
    {mode}/{fileId}/{offset}[/{sha256hex}]       raw segment bytes
    {mode}/{fileId}/fin/{fileSize}[/{sha256hex}] empty
    {mode}/{fileId}/abort                        empty
    mode = "$file" (sync fin: PUBACK after assembly) or "$file-async" (fin result as a response message)

Responses go to the command's MQTT 5 Response-Topic or to `$file-response/{clientId}` as
`{"vsn":"0.1","topic","packet_id","reason_code","reason_description"}`.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

SYNC_PREFIX: Final = "$file"
ASYNC_PREFIX: Final = "$file-async"
RESPONSE_PREFIX: Final = "$file-response"
RESPONSE_VSN: Final = "0.1"
MAX_NAME_BYTES: Final = 240
MAX_FILE_ID_BYTES: Final = 255
CHECKSUM_HEX_CHARS: Final = 64

RC_SUCCESS: Final = 0x00
RC_NO_MATCHING_SUBSCRIBERS: Final = 0x10  # file transfer is off: the broker routed it as plain MQTT
RC_UNSPECIFIED_ERROR: Final = 0x80  # the only error code emqx_ft emits
RC_IMPLEMENTATION_SPECIFIC: Final = 0x83  # documented as "cancel the transfer"; never emitted by EMQX
RC_NOT_AUTHORIZED: Final = 0x87
RC_QUOTA_EXCEEDED: Final = 0x97  # documented as "pause with backoff"; never emitted by EMQX

META_FIELDS: Final = frozenset({"name", "size", "checksum", "expire_at", "segments_ttl", "user_data"})


class Mode(Enum):
    SYNC = SYNC_PREFIX
    ASYNC = ASYNC_PREFIX


class FileTransferError(ValueError):
    """A command the server must refuse with 0x80. `reason` is the EMQX error atom, `detail` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------- names and checksums


def _unsafe_char(ch: str) -> bool:
    # Control, format (bidi overrides disguise extensions), surrogate, private-use, unassigned, and
    # line/paragraph separators: none belongs in a file name that operators will read and type.
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def filename_problem(name: str) -> str | None:
    """Why `name` is not a safe single path component (EMQX `is_filename_safe`, stricter), or None."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes of UTF-8"
    for ch in name:
        if ch in "/\\:":
            return f"contains {ch!r}"
        if _unsafe_char(ch):
            return f"contains the non-printable character U+{ord(ch):04X}"
    return None


def escape_path_component(value: str) -> str:
    """Percent-encode a client or file id for use as one directory name (EMQX `escape_filename`).

    `%`, `:`, `\\`, `/` and non-printable characters become their UTF-8 bytes as uppercase `%XX`;
    `.` and `..` are encoded whole, so the result never names a parent or the directory itself.
    """
    if value in (".", ".."):
        return "".join(f"%{b:02X}" for b in value.encode())
    out: list[str] = []
    for ch in value:
        if ch in "%:\\/" or _unsafe_char(ch):
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    return "".join(out)


def is_checksum(text: str) -> bool:
    """True for exactly 64 hex digits (SHA-256; either case, as Erlang's decode_hex accepts)."""
    return len(text) == CHECKSUM_HEX_CHARS and all(c in "0123456789abcdefABCDEF" for c in text)


def _parse_checksum(text: str) -> str:
    if not is_checksum(text):
        raise FileTransferError("invalid_checksum", f"{text[:80]!r} is not 64 hex digits")
    return text.lower()


def _parse_uint(text: str, reason: str) -> int:
    # Decimal digits only: int() would also take "+5", " 5", "5_0" and non-ASCII digits.
    if not text or not text.isascii() or not text.isdigit():
        raise FileTransferError(reason, f"{text[:80]!r} is not a non-negative decimal integer")
    return int(text)


# ---------------------------------------------------------------------------------------------- topics


@dataclass(frozen=True, slots=True)
class InitCommand:
    mode: Mode
    file_id: str


@dataclass(frozen=True, slots=True)
class SegmentCommand:
    mode: Mode
    file_id: str
    offset: int
    checksum: str | None = None  # lowercase hex


@dataclass(frozen=True, slots=True)
class FinCommand:
    mode: Mode
    file_id: str
    size: int
    checksum: str | None = None  # lowercase hex


@dataclass(frozen=True, slots=True)
class AbortCommand:
    mode: Mode
    file_id: str


FileCommand = InitCommand | SegmentCommand | FinCommand | AbortCommand


def is_file_topic(topic: str) -> bool:
    """True for topics the file-transfer server owns (`$file/...`, `$file-async/...`; not bare `$file`)."""
    return topic.startswith((SYNC_PREFIX + "/", ASYNC_PREFIX + "/"))


def parse_topic(topic: str) -> FileCommand:
    """The command a `$file/` or `$file-async/` topic names; FileTransferError if malformed.

    The caller checks `is_file_topic` first. Offsets and sizes are whole levels of decimal digits
    (negative offsets are refused, an improvement over EMQX which parses a signed integer).
    """
    levels = topic.split("/")
    mode = Mode.ASYNC if levels[0] == ASYNC_PREFIX else Mode.SYNC
    if levels[0] not in (SYNC_PREFIX, ASYNC_PREFIX) or len(levels) < 2:
        raise FileTransferError("invalid_file_command", f"{topic[:200]!r} is not a file-transfer topic")
    file_id, rest = levels[1], levels[2:]
    if not file_id:
        raise FileTransferError("invalid_fileid", "the file id level is empty")
    if len(file_id.encode("utf-8", "surrogatepass")) > MAX_FILE_ID_BYTES:
        raise FileTransferError("invalid_fileid", f"longer than {MAX_FILE_ID_BYTES} bytes")
    if rest == ["init"]:
        return InitCommand(mode, file_id)
    if rest == ["abort"]:
        return AbortCommand(mode, file_id)
    if len(rest) in (2, 3) and rest[0] == "fin":
        size = _parse_uint(rest[1], "invalid_size")
        checksum = _parse_checksum(rest[2]) if len(rest) == 3 else None
        return FinCommand(mode, file_id, size, checksum)
    if len(rest) in (1, 2):
        offset = _parse_uint(rest[0], "invalid_offset")
        checksum = _parse_checksum(rest[1]) if len(rest) == 2 else None
        return SegmentCommand(mode, file_id, offset, checksum)
    raise FileTransferError("invalid_file_command", f"unknown command in {topic[:200]!r}")


def init_topic(mode: Mode, file_id: str) -> str:
    return f"{mode.value}/{file_id}/init"


def segment_topic(mode: Mode, file_id: str, offset: int, checksum: str | None = None) -> str:
    base = f"{mode.value}/{file_id}/{offset}"
    return base if checksum is None else f"{base}/{checksum}"


def fin_topic(mode: Mode, file_id: str, size: int, checksum: str | None = None) -> str:
    base = f"{mode.value}/{file_id}/fin/{size}"
    return base if checksum is None else f"{base}/{checksum}"


def abort_topic(mode: Mode, file_id: str) -> str:
    return f"{mode.value}/{file_id}/abort"


def response_topic(client_id: str) -> str:
    return f"{RESPONSE_PREFIX}/{client_id}"


# ------------------------------------------------------------------------------------------ init metadata


def _optional_uint(obj: dict[str, object], key: str, *, positive: bool = False) -> int | None:
    value = obj.get(key)
    if value is None and key not in obj:
        return None
    # JSON true/false decode to bool, a subclass of int: not a size.
    if not isinstance(value, int) or isinstance(value, bool) or value < (1 if positive else 0):
        raise FileTransferError("invalid_filemeta", f"{key}: must be an integer >= {1 if positive else 0}")
    return value


@dataclass(frozen=True, slots=True)
class FileMeta:
    """The init payload. Only these six fields exist; EMQX rejects unknown ones.

    `size` and `expire_at` are informational (EMQX never checks them); `checksum` is the SHA-256 of
    the whole file (lowercase hex here); `segments_ttl` (s) bounds how long the server keeps
    fragments of an unfinished transfer; `user_data` is any JSON value, exported with the file.
    """

    name: str
    size: int | None = None
    checksum: str | None = None
    expire_at: int | None = None
    segments_ttl: int | None = None
    user_data: object = field(default=None)

    def __post_init__(self) -> None:
        problem = filename_problem(self.name)
        if problem is not None:
            raise FileTransferError("invalid_filemeta", f"name: {problem}")
        if self.checksum is not None and not is_checksum(self.checksum):
            raise FileTransferError("invalid_filemeta", "checksum: must be 64 hex digits (SHA-256)")
        for key, value, least in (("size", self.size, 0), ("expire_at", self.expire_at, 0),
                                  ("segments_ttl", self.segments_ttl, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise FileTransferError("invalid_filemeta", f"{key}: must be an integer >= {least}")

    def to_dict(self) -> dict[str, object]:
        """The JSON object: absent optional fields are left out (None user_data included)."""
        out: dict[str, object] = {"name": self.name}
        if self.size is not None:
            out["size"] = self.size
        if self.checksum is not None:
            out["checksum"] = self.checksum.lower()
        if self.expire_at is not None:
            out["expire_at"] = self.expire_at
        if self.segments_ttl is not None:
            out["segments_ttl"] = self.segments_ttl
        if self.user_data is not None:
            out["user_data"] = self.user_data
        return out

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no spaces): a retry re-sends exactly these."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_filemeta(payload: bytes) -> FileMeta:
    """Validate an init payload (EMQX filemeta schema); FileTransferError("invalid_filemeta") if not."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileTransferError("invalid_filemeta", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FileTransferError("invalid_filemeta", "must be a JSON object")
    unknown = sorted(set(obj) - META_FIELDS)
    if unknown:
        raise FileTransferError("invalid_filemeta", f"unknown field(s) {unknown}")
    name = obj.get("name")
    if not isinstance(name, str):
        raise FileTransferError("invalid_filemeta", "name: required, a string")
    checksum = obj.get("checksum")
    if checksum is not None and not (isinstance(checksum, str) and is_checksum(checksum)):
        raise FileTransferError("invalid_filemeta", "checksum: must be 64 hex digits (SHA-256)")
    return FileMeta(
        name=name,
        size=_optional_uint(obj, "size"),
        checksum=checksum.lower() if isinstance(checksum, str) else None,
        expire_at=_optional_uint(obj, "expire_at"),
        segments_ttl=_optional_uint(obj, "segments_ttl", positive=True),
        user_data=obj.get("user_data"),
    )


# ------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class FileResponse:
    """The server's answer to one command, published to the response topic at QoS 1."""

    topic: str
    packet_id: int
    reason_code: int
    reason_description: str

    @property
    def ok(self) -> bool:
        return self.reason_code < 0x80

    def to_json(self) -> bytes:
        return json.dumps({
            "vsn": RESPONSE_VSN,
            "topic": self.topic,
            "packet_id": self.packet_id,
            "reason_code": self.reason_code,
            "reason_description": self.reason_description,
        }, separators=(",", ":"), ensure_ascii=False).encode()


def parse_response(payload: bytes) -> FileResponse:
    """Read a response; ValueError if it lacks a field. An unknown `vsn` is tolerated (A19)."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"file-transfer response is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("file-transfer response must be a JSON object")
    topic, packet_id = obj.get("topic"), obj.get("packet_id")
    code, description = obj.get("reason_code"), obj.get("reason_description", "")
    if not isinstance(topic, str) or not isinstance(code, int) or isinstance(code, bool):
        raise ValueError("file-transfer response needs a string topic and an integer reason_code")
    if not isinstance(packet_id, int) or isinstance(packet_id, bool):
        packet_id = 0  # only used to pair with a command; the topic already names the transfer
    return FileResponse(topic, packet_id, code, str(description))


# ------------------------------------------------------------------------------ client upload machine
#
# Theory of operation. An upload is init, the segments [0, size) in `segment_size` steps, then fin.
# `next_action(now)` hands out the next command to publish (at most `max_in_flight` unanswered at a
# time; init and segments pipeline together because the server accepts segments before init), and
# `command_acked` takes each PUBACK reason code. A segment or init refused with 0x80 is retried after
# an exponential backoff, up to `max_attempts`; 0x97 backs off 10 -> 80 s (EIP-0021); 0x83, 0x87 and
# 0x10 (file transfer disabled) end the upload. fin is sent only once init and every segment are
# acknowledged. In sync mode the fin PUBACK is the verdict; in async mode a PUBACK 0 only means
# "assembly started" and the verdict is the response message whose topic is the fin topic (PUBACK
# and response may arrive in either order; a missing response makes fin go out again after
# `fin_response_timeout_s`, which is safe because fin is idempotent). A failed fin (A20) forgets
# all progress and sends init and every segment again; a second failure ends the upload with
# `restart_with_new_id` so the caller starts over under a fresh fileId.
# At MQTT 3.1.1 PUBACK carries no verdict (`puback_has_reason=False`): failure responses for init
# and segments then put those commands back in the queue.


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """What one upload sends. `init_payload` is fixed once, so retries re-send identical bytes."""

    file_id: str
    mode: Mode
    size: int
    segment_size: int
    checksum: str  # SHA-256 of the whole file, lowercase hex
    init_payload: bytes

    def __post_init__(self) -> None:
        if self.size < 0 or self.segment_size < 1:
            raise ValueError("size must be >= 0 and segment_size >= 1")
        if not is_checksum(self.checksum):
            raise ValueError("checksum: must be 64 hex digits")

    @property
    def offsets(self) -> range:
        return range(0, self.size, self.segment_size)

    def segment_length(self, offset: int) -> int:
        return min(self.segment_size, self.size - offset)

    @property
    def init_topic(self) -> str:
        return init_topic(self.mode, self.file_id)

    @property
    def fin_topic(self) -> str:
        return fin_topic(self.mode, self.file_id, self.size, self.checksum)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6  # per command, before the upload fails
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    quota_initial_backoff_s: float = 10.0  # 0x97, EIP-0021: 10 s doubling up to 80 s
    quota_max_backoff_s: float = 80.0
    fin_response_timeout_s: float = 330.0  # the broker's assemble_timeout (300 s) plus a margin
    max_fin_failures: int = 2

    def backoff_s(self, attempt: int, quota: bool = False) -> float:
        first, cap = ((self.quota_initial_backoff_s, self.quota_max_backoff_s) if quota
                      else (self.initial_backoff_s, self.max_backoff_s))
        return float(min(cap, first * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True, slots=True)
class SendInit:
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class SendSegment:
    """Read [offset, offset+length), hash it and publish to `segment_topic(..., sha256hex)`."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SendFin:
    topic: str


UploadAction = SendInit | SendSegment | SendFin


class UploadPhase(Enum):
    SENDING = "sending"
    AWAITING_FIN_RESULT = "awaiting_fin_result"
    DONE = "done"
    FAILED = "failed"


_INIT = -1  # key of the init command in attempt counters
_FIN = -2


class UploadMachine:
    """The sans-I/O client side of one transfer (see the theory of operation above)."""

    def __init__(
        self,
        plan: UploadPlan,
        policy: RetryPolicy | None = None,
        *,
        acked_offsets: frozenset[int] | set[int] = frozenset(),
        init_acked: bool = False,
        max_in_flight: int = 16,
        puback_has_reason: bool = True,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.plan = plan
        self.policy = policy or RetryPolicy()
        self.max_in_flight = max_in_flight
        self.puback_has_reason = puback_has_reason
        self.phase = UploadPhase.SENDING
        self.failure: str | None = None
        self.restart_with_new_id = False
        self.fin_failures = 0
        self.resets = 0  # times progress was forgotten after a failed fin: persisted acks are stale
        valid = set(plan.offsets)
        self.acked: set[int] = {o for o in acked_offsets if o in valid}
        self.init_acked = init_acked
        self._ready: list[int] = sorted(valid - self.acked, reverse=True)  # pop() gives the lowest
        self._delayed: dict[int, float] = {}  # key -> not before (monotonic s)
        self._in_flight: set[int] = set()
        self._attempts: dict[int, int] = {}
        self._fin_deadline: float | None = None
        self._early_fin: FileResponse | None = None

    # -- queries --------------------------------------------------------------------------------

    @property
    def bytes_acked(self) -> int:
        return sum(self.plan.segment_length(o) for o in self.acked)

    @property
    def finished(self) -> bool:
        return self.phase in (UploadPhase.DONE, UploadPhase.FAILED)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def next_deadline(self) -> float | None:
        times = list(self._delayed.values())
        if self._fin_deadline is not None:
            times.append(self._fin_deadline)
        return min(times) if times else None

    # -- driving --------------------------------------------------------------------------------

    def next_action(self, now: float) -> UploadAction | None:
        """The next command to publish now, or None (window full, backing off, waiting or finished)."""
        if self.phase is not UploadPhase.SENDING or len(self._in_flight) >= self.max_in_flight:
            return None
        for key, when in sorted(self._delayed.items(), key=lambda kv: kv[1]):
            if when <= now:
                del self._delayed[key]
                if key >= 0:
                    self._ready.append(key)
                    self._ready.sort(reverse=True)
        if not self.init_acked and _INIT not in self._in_flight and _INIT not in self._delayed:
            self._in_flight.add(_INIT)
            return SendInit(self.plan.init_topic, self.plan.init_payload)
        if self._ready:
            offset = self._ready.pop()
            self._in_flight.add(offset)
            return SendSegment(offset, self.plan.segment_length(offset))
        complete = self.init_acked and len(self.acked) == len(self.plan.offsets)
        if complete and not self._in_flight and _FIN not in self._delayed:
            self._in_flight.add(_FIN)
            return SendFin(self.plan.fin_topic)
        return None

    def command_acked(self, action: UploadAction, reason_code: int, now: float) -> None:
        """The PUBACK reason code for an action `next_action` handed out."""
        key = self._key(action)
        self._in_flight.discard(key)
        if self.finished:
            return
        # 0x10 is a success code to MQTT but here means the broker routed our command as a plain
        # message: file transfer is off and nothing was stored.
        if reason_code < 0x80 and reason_code != RC_NO_MATCHING_SUBSCRIBERS:
            if isinstance(action, SendInit):
                self.init_acked = True
            elif isinstance(action, SendSegment):
                self.acked.add(action.offset)
            elif self.plan.mode is Mode.SYNC:
                self.phase = UploadPhase.DONE
            else:
                early, self._early_fin = self._early_fin, None
                self.phase = UploadPhase.AWAITING_FIN_RESULT
                self._fin_deadline = now + self.policy.fin_response_timeout_s
                if early is not None:
                    self.response_received(early, now)
            return
        if isinstance(action, SendFin) and reason_code != RC_NO_MATCHING_SUBSCRIBERS:
            self._fin_failed(f"fin refused with 0x{reason_code:02X}", now)
        else:
            self._refused(key, reason_code, now)

    def response_received(self, response: FileResponse, now: float) -> None:
        """A message from the response topic; ones for other transfers or commands are ignored."""
        if self.finished or not is_file_topic(response.topic):
            return
        try:
            command = parse_topic(response.topic)
        except FileTransferError:
            return
        if command.file_id != self.plan.file_id:
            return
        if isinstance(command, FinCommand):
            if response.topic != self.plan.fin_topic:
                return
            if self.phase is UploadPhase.AWAITING_FIN_RESULT:
                self._fin_deadline = None
                if response.ok:
                    self.phase = UploadPhase.DONE
                else:
                    self._fin_failed(f"fin failed: {response.reason_description}", now)
            elif _FIN in self._in_flight:
                self._early_fin = response  # the PUBACK is still on its way
            return
        if response.ok or self.puback_has_reason:
            return  # at MQTT 5 the PUBACK already told us
        if isinstance(command, InitCommand) and self.init_acked:
            self.init_acked = False
            self._refused(_INIT, RC_UNSPECIFIED_ERROR, now)
        elif isinstance(command, SegmentCommand) and command.offset in self.acked:
            self.acked.discard(command.offset)
            self._refused(command.offset, RC_UNSPECIFIED_ERROR, now)

    def handle_deadline(self, now: float) -> None:
        """No fin result in time (async): send fin again."""
        if self._fin_deadline is not None and now >= self._fin_deadline:
            self._fin_deadline = None
            self.phase = UploadPhase.SENDING
            self._refused(_FIN, RC_UNSPECIFIED_ERROR, now)

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _key(action: UploadAction) -> int:
        if isinstance(action, SendInit):
            return _INIT
        if isinstance(action, SendSegment):
            return action.offset
        return _FIN

    def _fail(self, reason: str, *, restart_with_new_id: bool = False) -> None:
        self.phase = UploadPhase.FAILED
        self.failure = reason
        self.restart_with_new_id = restart_with_new_id
        self._fin_deadline = None

    def _refused(self, key: int, reason_code: int, now: float) -> None:
        what = {_INIT: "init", _FIN: "fin"}.get(key, f"segment at {key}")
        if reason_code == RC_NO_MATCHING_SUBSCRIBERS:
            self._fail(f"{what}: 0x10, file transfer is not enabled on the broker (configuration error)")
            return
        if reason_code == RC_NOT_AUTHORIZED:
            self._fail(f"{what}: 0x87, not authorized to publish file-transfer topics")
            return
        if reason_code == RC_IMPLEMENTATION_SPECIFIC:
            self._fail(f"{what}: 0x83, the broker cancelled the transfer")
            return
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        if attempts >= self.policy.max_attempts:
            self._fail(f"{what}: refused {attempts} times (last 0x{reason_code:02X})")
            return
        self._delayed[key] = now + self.policy.backoff_s(attempts, quota=reason_code == RC_QUOTA_EXCEEDED)

    def _fin_failed(self, reason: str, now: float) -> None:
        self.fin_failures += 1
        if self.fin_failures >= self.policy.max_fin_failures:
            self._fail(reason, restart_with_new_id=True)
            return
        # A20: the server may have lost fragments; resend init and every segment, then fin.
        self.phase = UploadPhase.SENDING
        self.resets += 1
        self.init_acked = False
        self.acked.clear()
        self._delayed.clear()
        self._attempts.clear()
        self._ready = sorted(set(self.plan.offsets) - self._in_flight, reverse=True)
