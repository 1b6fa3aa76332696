"""Plain values the broker core passes around: routed messages, subscriptions, client identity."""

from __future__ import annotations

from dataclasses import dataclass

from uplink.mqtt.packets import NO_PROPERTIES, Properties


@dataclass(frozen=True, slots=True)
class Message:
    """One application message as routed: the publisher's view, before per-subscriber changes.

    `properties` holds only what travels to subscribers (no Topic Alias, no Subscription Identifiers).
    `expires_at` is the monotonic deadline derived from Message Expiry Interval (None: never).
    `publisher_id` is the publishing client id (for No Local); None for messages the broker made itself.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: Properties = NO_PROPERTIES
    expires_at: float | None = None
    publisher_id: str | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionEntry:
    """One subscription of one session. `topic_filter` is as subscribed, `$share/group/` prefix included."""

    client_id: str
    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who is on a connection, as authenticated; what authorizers and hooks decide on."""

    client_id: str
    username: str | None
    peer: str
    protocol_level: int
    # Identity the transport vouched for (the verified TLS client certificate's subject CN), if any.
    cert_identity: str | None = None
    role: str | None = None  # what the authenticator granted (e.g. "device", "operator"); None: anonymous


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """One CONNECT's credentials, as handed to an authenticator (inline or on the owner's worker)."""

    conn_id: int
    client_id: str
    username: str | None
    password: bytes | None
    peer: str
    cert_identity: str | None = None


@dataclass(frozen=True, slots=True)
class AuthResult:
    """An authenticator's verdict: an MQTT 5 CONNACK reason code, and on success who the client is."""

    reason_code: int
    username: str | None = None  # replaces the CONNECT's user name (e.g. from a certificate)
    role: str | None = None


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """A delivery owed to a session, as persisted: the message and the subscriber-side options applied."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...] = ()
