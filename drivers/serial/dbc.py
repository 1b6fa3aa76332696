"""The one adapter over cantools: load a DBC file, decode CAN frames to signal values, encode for simulators.

Nothing else imports cantools. Its failures leave this module as `DbcError` (the file cannot be used:
stop and fix the configuration) or `SignalDecodeError` (one frame does not fit its message: mark that
message's signals BAD and carry on). Frames are looked up by (identifier, extended flag), because an
11-bit and a 29-bit frame may share a number. Choices (VAL_ tables) are not applied: signals decode to
their scaled numbers, which is what telemetry stores; the choice names stay in the DBC for display.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cantools
from cantools.database.can import Database, Message
from cantools.database.errors import DecodeError, EncodeError
from cantools.database.errors import Error as CantoolsError

from drivers.serial.slcan import CanFrame

SignalValue = float | int


class DbcError(ValueError):
    """The DBC file cannot be loaded or does not describe CAN messages."""


class SignalDecodeError(ValueError):
    """A frame with a known identifier whose payload does not fit the message (e.g. too short)."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    name: str
    frame_id: int
    is_extended: bool
    length: int  # bytes
    cycle_time_ms: int | None  # GenMsgCycleTime; None for event messages / not given
    signals: tuple[str, ...]
    units: Mapping[str, str]


def _info(m: Message) -> MessageInfo:
    return MessageInfo(
        name=m.name, frame_id=m.frame_id, is_extended=bool(m.is_extended_frame), length=m.length,
        cycle_time_ms=m.cycle_time or None, signals=tuple(s.name for s in m.signals),
        units={s.name: s.unit or "" for s in m.signals},
    )


class CanDatabase:
    """Messages and signals of one DBC file, indexed for decoding."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._by_key: dict[tuple[int, bool], tuple[Message, MessageInfo]] = {}
        for m in db.messages:
            self._by_key[(m.frame_id, bool(m.is_extended_frame))] = (m, _info(m))
        self._by_name = {info.name: (m, info) for m, info in self._by_key.values()}

    @classmethod
    def from_file(cls, path: str | Path) -> CanDatabase:
        try:
            db = cantools.database.load_file(str(path), database_format="dbc")
        except (OSError, CantoolsError, ValueError) as exc:  # cantools raises all three for bad input
            raise DbcError(f"cannot load DBC {path}: {exc}") from exc
        if not isinstance(db, Database):
            raise DbcError(f"{path} is not a CAN database")
        return cls(db)

    @classmethod
    def from_string(cls, text: str) -> CanDatabase:
        try:
            db = cantools.database.load_string(text, database_format="dbc")
        except (CantoolsError, ValueError) as exc:
            raise DbcError(f"cannot parse DBC text: {exc}") from exc
        if not isinstance(db, Database):
            raise DbcError("not a CAN database")
        return cls(db)

    @property
    def messages(self) -> tuple[MessageInfo, ...]:
        return tuple(info for _, info in self._by_key.values())

    def message(self, name: str) -> MessageInfo:
        """The message called `name`; KeyError if the DBC has none."""
        return self._by_name[name][1]

    def lookup(self, frame_id: int, is_extended: bool) -> MessageInfo | None:
        hit = self._by_key.get((frame_id, is_extended))
        return None if hit is None else hit[1]

    def decode(self, frame: CanFrame) -> dict[str, SignalValue]:
        """Signal name -> scaled value; KeyError for an unknown id, SignalDecodeError for a misfit payload."""
        message, info = self._by_key[(frame.arbitration_id, frame.is_extended)]
        if len(frame.data) < info.length:
            raise SignalDecodeError(f"{info.name}: short frame, {len(frame.data)} of {info.length} bytes")
        try:
            decoded = message.decode(frame.data, decode_choices=False, scaling=True)
        except (DecodeError, ValueError) as exc:
            raise SignalDecodeError(f"{info.name}: {exc}") from exc
        if not isinstance(decoded, dict):  # container messages (decode_containers) are not used
            raise SignalDecodeError(f"{info.name}: container messages are not supported")
        out: dict[str, SignalValue] = {}
        for name, value in decoded.items():
            if isinstance(value, (int, float)):
                out[name] = value
        return out

    def encode(self, message_name: str, values: Mapping[str, SignalValue]) -> bytes:
        """Payload of `message_name` with the given (scaled) signal values, clamped to the DBC ranges."""
        message, _ = self._by_name[message_name]
        clamped: dict[str, SignalValue] = {}
        for sig in message.signals:
            v = values.get(sig.name, sig.offset)
            if sig.minimum is not None:
                v = max(v, sig.minimum)
            if sig.maximum is not None:
                v = min(v, sig.maximum)
            clamped[sig.name] = v
        try:
            return bytes(message.encode(clamped, scaling=True, strict=True))
        except (EncodeError, ValueError) as exc:
            raise SignalDecodeError(f"{message_name}: cannot encode: {exc}") from exc
