"""Typed protocol errors raised by the sans-I/O MQTT modules; nothing else escapes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uplink.mqtt.packets import ReasonCode

if TYPE_CHECKING:
    from uplink.mqtt.packets import Packet


class ProtocolError(Exception):
    """A violation of MQTT. `reason_code` is what a DISCONNECT/CONNACK should carry (MQTT 5)."""

    def __init__(self, message: str, reason_code: int = ReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        # Set by Decoder.feed: valid packets that arrived in the same chunk before the violation.
        self.packets_before: tuple[Packet, ...] = ()


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or packets that break the protocol: close the connection with reason_code."""


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol forbids (a bug or bad input on our side)."""
