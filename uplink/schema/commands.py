"""Operator<->agent command contract: command/response envelopes, status messages, signatures and nonces.

Wire format (JSON, UTF-8) on `{prefix}/{agent}/cmd`:

    {"id": "c-1", "name": "point.write", "args": {"point": "rtu1/speed_set", "value": 7.5},
     "issued_at_ns": ..., "expires_at_ns": ..., "nonce": "9f...", "key_id": "ops-1", "signature": "<b64>",
     "reply_to": "ops/replies/x", "correlation": "abc"}

Replies go to the MQTT 5 Response Topic with the request's Correlation Data echoed; an MQTT 3.1.1
request (no properties) names its reply topic in `reply_to` (default `{prefix}/{agent}/reply`) and gets its
`correlation` echoed in the payload. Every command gets exactly one *final* response (`final: true`) with a
`code` and a human `message`; long commands (config.apply) may send `final: false` progress notes first.
The command `id` is the idempotency key: a re-delivered command gets the stored final response again.

Signatures. A control command (config.apply, point.write, agent.restart) may be required to carry an
Ed25519 signature over `signing_bytes(agent_id, command)`: the ASCII line `fieldgate-cmd-v1\n` followed by
the canonical JSON of {agent, id, name, args, issued_at_ns, expires_at_ns, nonce, key_id}: keys sorted,
separators "," and ":", no insignificant whitespace, non-ASCII characters as UTF-8 (not escaped), floats in
shortest round-trip form. The agent id is inside the signed bytes so a command signed for one agent cannot
be replayed on another; `reply_to`/`correlation` are not (they only route the answer). Replay protection:
the signed command carries a random `nonce` and an `expires_at_ns`; the agent refuses an expired command
and remembers every accepted nonce until its expiry (`NonceCache`, persisted by the agent), so within the
validity window a replay is caught by the nonce and after it by the expiry.

This module is pure: time is passed in; cryptography is used only as a computation.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from enum import StrEnum
from typing import Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

COMMAND_NAMES = (
    "config.apply",
    "config.get",
    "point.write",
    "card.capture",
    "file.upload",
    "logs.fetch",
    "agent.status",
    "agent.restart",
)
CONTROL_COMMANDS = frozenset({"config.apply", "point.write", "agent.restart"})
SIGNING_DOMAIN = b"fieldgate-cmd-v1\n"
CONTENT_TYPE_COMMAND = "application/vnd.fieldgate.command.v1+json"
CONTENT_TYPE_RESPONSE = "application/vnd.fieldgate.response.v1+json"
CONTENT_TYPE_STATUS = "application/vnd.fieldgate.status.v1+json"
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ResultCode(StrEnum):
    """What happened to a command. Only OK means the command did what it asked."""

    OK = "ok"
    PROGRESS = "progress"  # a non-final note (config.apply stages)
    INVALID = "invalid"  # malformed envelope or arguments, or a config that fails validation
    UNKNOWN_COMMAND = "unknown_command"
    UNAUTHORIZED = "unauthorized"  # signature required but missing, unknown key, or bad signature
    REPLAYED = "replayed"  # nonce already used
    EXPIRED = "expired"  # past expires_at_ns (or too far in the future to be honest)
    FAILED = "failed"  # valid and authorized, but carrying it out failed (device error, ...)
    ROLLED_BACK = "rolled_back"  # config.apply: the new config failed its health gate; old one runs
    BUSY = "busy"  # another config.apply is in progress: try again later
    UNSUPPORTED = "unsupported"  # known command this agent cannot serve (feature not present)


class CommandError(ValueError):
    """A command cannot be accepted; `code` says why (INVALID, UNAUTHORIZED, ...)."""

    def __init__(self, code: ResultCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    issued_at_ns: int | None = None
    expires_at_ns: int | None = None
    nonce: str | None = None
    key_id: str | None = None
    signature: str | None = None  # base64 (standard alphabet) of the 64-byte Ed25519 signature
    reply_to: str | None = None  # MQTT 3.1.1 only: where to answer (the v5 Response Topic wins)
    correlation: str | None = None  # MQTT 3.1.1 only: echoed in the response

    @property
    def is_control(self) -> bool:
        return self.name in CONTROL_COMMANDS


class Response(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    name: str
    code: ResultCode
    message: str
    agent: str
    ts_ns: int
    final: bool = True
    result: dict[str, Any] | None = None
    correlation: str | None = None


class AgentStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The retained message on `{prefix}/{agent}/status`: birth (online, refreshed) or death (offline).

    The will carries state "offline" with reason "connection lost"; a clean stop publishes "offline" with
    reason "stopped" before disconnecting. Fields other than state/agent/ts_ns may be absent in a will.
    """

    state: Literal["online", "offline"]
    agent: str
    ts_ns: int
    reason: str | None = None
    versions: dict[str, str] = msgspec.field(default_factory=dict)
    config_version: str | None = None
    started_at_ns: int | None = None
    uptime_s: float | None = None
    transport: str | None = None
    link: str | None = None  # "up" while the birth is current
    queue_depth: int | None = None
    queue_bytes: int | None = None
    clock: str | None = None  # "synced" | "unsynced"
    health: str | None = None


def encode_json(obj: msgspec.Struct) -> bytes:
    return msgspec.json.encode(obj)


def decode_command(payload: bytes) -> Command:
    """Parse and check a command envelope; CommandError(INVALID) naming the problem."""
    try:
        cmd = msgspec.json.decode(payload, type=Command)
    except msgspec.ValidationError as exc:
        raise CommandError(ResultCode.INVALID, f"malformed command: {exc}") from None
    except msgspec.DecodeError as exc:
        raise CommandError(ResultCode.INVALID, f"command is not valid JSON: {exc}") from None
    if not _ID_RE.match(cmd.id):
        raise CommandError(ResultCode.INVALID, "id: must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if cmd.name not in COMMAND_NAMES:
        raise CommandError(
            ResultCode.UNKNOWN_COMMAND, f"unknown command {cmd.name!r} (known: {', '.join(COMMAND_NAMES)})"
        )
    return cmd


def peek_id(payload: bytes) -> tuple[str, str, str | None, str | None]:
    """(id, name, reply_to, correlation) of an unparsable payload, best effort, for the error reply."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return "", "", None, None
    if not isinstance(raw, dict):
        return "", "", None, None

    def text(key: str) -> str | None:
        v = raw.get(key)
        return v if isinstance(v, str) else None

    return text("id") or "", text("name") or "", text("reply_to"), text("correlation")


def decode_response(payload: bytes) -> Response:
    return msgspec.json.decode(payload, type=Response)


def decode_status(payload: bytes) -> AgentStatus:
    return msgspec.json.decode(payload, type=AgentStatus)


def canonical_json(value: object) -> bytes:
    """Sorted keys, compact separators, UTF-8: the bytes a signature covers (see the module docstring)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def signing_bytes(agent_id: str, cmd: Command) -> bytes:
    body = {
        "agent": agent_id,
        "id": cmd.id,
        "name": cmd.name,
        "args": cmd.args,
        "issued_at_ns": cmd.issued_at_ns,
        "expires_at_ns": cmd.expires_at_ns,
        "nonce": cmd.nonce,
        "key_id": cmd.key_id,
    }
    return SIGNING_DOMAIN + canonical_json(body)


def sign_command(private_key: Ed25519PrivateKey, agent_id: str, cmd: Command) -> Command:
    """The command with its signature set (the operator side)."""
    sig = private_key.sign(signing_bytes(agent_id, cmd))
    return msgspec.structs.replace(cmd, signature=base64.b64encode(sig).decode("ascii"))


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo), 32 raw bytes, or base64 of those bytes."""
    text = raw.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    if len(text) != 32:
        try:
            text = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError("not PEM, 32 raw bytes or base64 of an Ed25519 public key") from None
    if len(text) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return Ed25519PublicKey.from_public_bytes(text)


def verify_command(
    agent_id: str,
    cmd: Command,
    keys: dict[str, Ed25519PublicKey],
    *,
    now_ns: int,
    max_validity_s: float = 24 * 3600.0,
) -> None:
    """Check the signature and validity window of a signed command; CommandError if it does not hold.

    The nonce is checked separately (`NonceCache.check_and_add`), after the signature, so a forged
    command cannot burn a nonce.
    """
    if cmd.signature is None:
        raise CommandError(ResultCode.UNAUTHORIZED, f"{cmd.name} must be signed (signature missing)")
    if cmd.nonce is None or not 8 <= len(cmd.nonce) <= 128:
        raise CommandError(ResultCode.UNAUTHORIZED, "nonce: a signed command needs a nonce of 8-128 chars")
    if cmd.expires_at_ns is None:
        raise CommandError(ResultCode.UNAUTHORIZED, "expires_at_ns: a signed command needs an expiry")
    key = keys.get(cmd.key_id or "")
    if key is None:
        raise CommandError(ResultCode.UNAUTHORIZED, f"key_id: {cmd.key_id!r} is not a provisioned key")
    try:
        sig = base64.b64decode(cmd.signature, validate=True)
        key.verify(sig, signing_bytes(agent_id, cmd))
    except (binascii.Error, InvalidSignature):
        raise CommandError(ResultCode.UNAUTHORIZED, "signature does not verify") from None
    if now_ns > cmd.expires_at_ns:
        raise CommandError(ResultCode.EXPIRED, "command expired (expires_at_ns is in the past)")
    if cmd.expires_at_ns - now_ns > int(max_validity_s * 1e9):
        # A far-future expiry would make the nonce cache remember it (nearly) forever.
        raise CommandError(ResultCode.EXPIRED, f"expires_at_ns is more than {max_validity_s:g} s ahead")


class NonceCache:
    """Nonces of accepted signed commands, each remembered until its command's expiry (pure).

    Bounded by `max_entries`: when full, the entry expiring first is dropped (its command expires soonest,
    so the expiry check takes over for it sooner than for any other).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max_entries = max_entries
        self._expiry_ns: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._expiry_ns)

    def check_and_add(self, nonce: str, expires_at_ns: int, now_ns: int) -> None:
        """Remember nonce; CommandError(REPLAYED) if it is already remembered."""
        self.purge(now_ns)
        if nonce in self._expiry_ns:
            raise CommandError(ResultCode.REPLAYED, f"nonce {nonce!r} was already used (replayed command)")
        if len(self._expiry_ns) >= self._max_entries:
            oldest = min(self._expiry_ns, key=self._expiry_ns.__getitem__)
            del self._expiry_ns[oldest]
        self._expiry_ns[nonce] = expires_at_ns

    def purge(self, now_ns: int) -> None:
        expired = [n for n, exp in self._expiry_ns.items() if exp < now_ns]
        for n in expired:
            del self._expiry_ns[n]

    def to_bytes(self) -> bytes:
        return msgspec.json.encode(self._expiry_ns)

    @classmethod
    def from_bytes(cls, data: bytes, max_entries: int = 100_000) -> NonceCache:
        cache = cls(max_entries)
        cache._expiry_ns = dict(msgspec.json.decode(data, type=dict[str, int]))
        return cache


def parse_kv_args(pairs: list[str]) -> dict[str, Any]:
    """`key=value` words (the operator CLI) -> args; a value is JSON when it parses as JSON, else a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
