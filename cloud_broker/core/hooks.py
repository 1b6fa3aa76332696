"""Seams where authentication, authorization and message interception plug into the broker core.

The core calls these synchronously on its hot path, so implementations answer from memory; anything
that needs I/O (a password database, a rule engine, file transfer storage) keeps its own state warm
and hands slow work to its own thread or task, outside the core.
"""

from __future__ import annotations

from typing import Protocol

from cloud_broker.core.model import ClientInfo, Message
from uplink.mqtt.packets import ReasonCode


class Authenticator(Protocol):
    """Decides whether a CONNECT may proceed."""

    def authenticate(self, client_id: str, username: str | None, password: bytes | None, peer: str) -> int:
        """Return an MQTT 5 reason code: 0 (Success), or e.g. 0x86 Bad user name or password, 0x87, 0x8A."""
        ...


class Authorizer(Protocol):
    """Decides which topics a connected client may publish to and subscribe to."""

    def can_publish(self, client: ClientInfo, topic: str) -> bool: ...

    def can_subscribe(self, client: ClientInfo, topic_filter: str) -> bool: ...


class MessageHook(Protocol):
    """Sees every accepted PUBLISH before routing (rules, file transfer under `$file/`)."""

    def on_publish(self, client: ClientInfo, message: Message) -> int | None:
        """Return None to route the message normally, or a reason code to acknowledge it without routing.

        A hook that consumes a message (file transfer segments) returns the PUBACK reason code, e.g. 0x00
        or 0x80. The first hook that returns a code wins; later hooks do not see the message.
        """
        ...


class AllowAll:
    """Authorizer that allows every topic (the default until ACLs exist)."""

    def can_publish(self, client: ClientInfo, topic: str) -> bool:
        return True

    def can_subscribe(self, client: ClientInfo, topic_filter: str) -> bool:
        return True


class DenyAllCredentials:
    """Authenticator for `allow_anonymous = false` without a credentials provider: nobody gets in."""

    def authenticate(self, client_id: str, username: str | None, password: bytes | None, peer: str) -> int:
        return ReasonCode.NOT_AUTHORIZED
