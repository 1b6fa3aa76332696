"""Seams where authentication, authorization and message interception plug into the broker core.

The core calls these synchronously on its hot path, so implementations answer from memory; anything
that needs I/O (a password database, a rule engine, file transfer storage) keeps its own state warm
and hands slow work to its own thread or task, outside the core. Slow credential checks (a salted
scrypt hash costs tens of milliseconds) do not use `Authenticator` at all: the core is built with
`deferred_auth=True`, emits `AuthRequest`s (`Broker.drain_auth_requests`) and the owner answers each
with `Broker.auth_completed` once its worker thread decided.
"""

from __future__ import annotations

from typing import Protocol

from cloud_broker.core.model import AuthRequest, AuthResult, ClientInfo, Message
from uplink.mqtt.packets import ReasonCode


class Authenticator(Protocol):
    """Decides whether a CONNECT may proceed."""

    def authenticate(self, request: AuthRequest) -> AuthResult:
        """Decide now: reason code 0 (Success), or e.g. 0x86 Bad user name or password, 0x87, 0x8A, 0x9F."""
        ...


class Authorizer(Protocol):
    """Decides which topics a connected client may publish to and subscribe to."""

    def can_publish(self, client: ClientInfo, topic: str) -> bool: ...

    def can_subscribe(self, client: ClientInfo, topic_filter: str) -> bool: ...


# A MessageHook verdict: "I consumed the message and will settle its acknowledgement later" (see below).
ACK_LATER = -1


class MessageHook(Protocol):
    """Sees every accepted PUBLISH before routing (rules, file transfer under `$file/`)."""

    def on_publish(self, client: ClientInfo, message: Message, ticket: int, packet_id: int) -> int | None:
        """Return None to route the message normally, or a reason code to acknowledge it without routing.

        `packet_id` is the PUBLISH's packet identifier (0 for QoS 0 and for wills), for hooks whose
        answers name the request they answer (file-transfer responses).

        A hook that consumes a message (file transfer segments) returns the PUBACK reason code, e.g. 0x00
        or 0x80. The first hook that returns a code wins; later hooks do not see the message.
        A hook whose answer needs I/O (a segment must reach disk first) returns `ACK_LATER` and keeps
        `ticket`; the owner later calls `Broker.complete_ack(ticket, reason_code, now)`. Until then that
        client's later acknowledgements wait too (MQTT acknowledges in order). For QoS 0 the ticket
        is 0 and means nothing.
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

    def authenticate(self, request: AuthRequest) -> AuthResult:
        return AuthResult(ReasonCode.NOT_AUTHORIZED)
