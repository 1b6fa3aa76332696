"""Sans-I/O MQTT 3.1.1/5.0 client session: bytes and monotonic time in, packets out, events up.

Theory of operation
-------------------
A `ClientSession` owns one MQTT session across any number of network connections. The transport
feeds it bytes (`receive_data`) and the current time (`handle_deadline` when `next_deadline()` is
reached), takes the bytes it must write (`data_to_send`) and drains past-tense events (`next_event`).
Nothing here reads a clock, opens a socket or awaits.

States: DISCONNECTED --connect()--> CONNECTING --CONNACK ok--> CONNECTED. Any of: CONNACK refusal,
connect timeout, ping timeout, server DISCONNECT, a protocol violation by the server, our own
`disconnect()` and the transport's `connection_lost()` go back to DISCONNECTED. After a transition to
DISCONNECTED the transport flushes `data_to_send()` (a DISCONNECT may be queued) and closes.

Session state that survives connections (MQTT 5.0 section 4.1): outbound QoS 1/2 publishes that are
not completed, and inbound QoS 2 packet ids awaiting PUBREL. Per connection only: topic aliases, the
server's limits from CONNACK, keepalive and pending SUBSCRIBE/UNSUBSCRIBE (MQTT never resends those;
the caller re-issues them).

Resend policy after a reconnect (explicit, tested):
- CONNACK session_present=1: every unacknowledged PUBLISH is resent with its original packet id and
  DUP=1, every PUBREL whose PUBCOMP is missing is resent, in the original order (MQTT-4.4.0-1).
- CONNACK session_present=0 (the server lost or discarded the session): unacknowledged PUBLISHes are
  sent again as new messages (DUP=0, same packet id: ids are free in a fresh session and the caller
  keeps matching on it). A QoS 2 publish that had already been PUBREC'd is completed with
  `PublishAcked(reason_code=0)`: the server took ownership with its PUBREC, so sending it again would
  duplicate it. Inbound QoS 2 ids are forgotten.
Either way nothing the application handed over is silently dropped: at-least-once.

Flow control: at most min(config.max_inflight, server Receive Maximum) QoS>0 publishes are
uncompleted at once; `publish` raises `InflightWindowFull` past that, so callers wait for
`can_publish()` (room comes back with each `PublishAcked`).

Keepalive: when nothing was queued for sending for keep_alive_s (the server's Server Keep Alive
wins), a PINGREQ is queued; if no PINGRESP arrives within ping_timeout_s, `PingTimedOut` is emitted
and the session drops to DISCONNECTED. Calls without a `now` (publish, subscribe...) stamp their
bytes with the latest time the session has seen, which is never later than the truth, so pings are
at worst early, never late.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, replace

from uplink.mqtt import topics
from uplink.mqtt.codec import Decoder, encode, encode_publish
from uplink.mqtt.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from uplink.mqtt.packets import (
    MAX_PACKET_ID,
    MAX_PACKET_SIZE,
    MQTT_5,
    NO_PROPERTIES,
    PROTOCOL_LEVELS,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

DEFAULT_RECEIVE_MAXIMUM = 65535


# ---------------------------------------------------------------------------------------------------
# Configuration, errors, events


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What the client asks for in CONNECT, plus the session's own limits and timeouts.

    receive_maximum, maximum_packet_size and topic_alias_maximum are what *we* accept inbound (MQTT 5
    only); max_inflight caps our outbound window (the only cap at MQTT 3.1.1, where there is no
    Receive Maximum). session_expiry_s None sends no property (the session ends with the connection).
    """

    client_id: str
    protocol_level: int = MQTT_5
    clean_start: bool = True
    keep_alive_s: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    session_expiry_s: int | None = None
    connect_timeout_s: float = 10.0
    ping_timeout_s: float = 15.0
    max_inflight: int = DEFAULT_RECEIVE_MAXIMUM
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    maximum_packet_size: int | None = None
    topic_alias_maximum: int = 16
    outbound_topic_aliases: bool = True
    connect_properties: Properties = NO_PROPERTIES

    def __post_init__(self) -> None:
        if self.protocol_level not in PROTOCOL_LEVELS:
            raise ValueError(f"protocol_level: must be one of {PROTOCOL_LEVELS}, got {self.protocol_level}")
        if not 0 <= self.keep_alive_s <= 0xFFFF:
            raise ValueError(f"keep_alive_s: must be 0..65535, got {self.keep_alive_s}")
        if self.session_expiry_s is not None and not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"session_expiry_s: must be 0..4294967295, got {self.session_expiry_s}")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s: must be > 0, got {self.connect_timeout_s}")
        if not self.ping_timeout_s > 0:
            raise ValueError(f"ping_timeout_s: must be > 0, got {self.ping_timeout_s}")
        if not 1 <= self.max_inflight <= DEFAULT_RECEIVE_MAXIMUM:
            raise ValueError(f"max_inflight: must be 1..65535, got {self.max_inflight}")
        if not 1 <= self.receive_maximum <= DEFAULT_RECEIVE_MAXIMUM:
            raise ValueError(f"receive_maximum: must be 1..65535, got {self.receive_maximum}")
        if self.maximum_packet_size is not None and not 1 <= self.maximum_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(
                f"maximum_packet_size: must be 1..{MAX_PACKET_SIZE}, got {self.maximum_packet_size}"
            )
        if not 0 <= self.topic_alias_maximum <= 0xFFFF:
            raise ValueError(f"topic_alias_maximum: must be 0..65535, got {self.topic_alias_maximum}")
        if self.password is not None and self.username is None and self.protocol_level != MQTT_5:
            raise ValueError("password: MQTT 3.1.1 allows a password only together with a username")


class SessionState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


def check_publish(topic: str, qos: int, retain: bool, properties: Properties, *, maximum_qos: int,
                  retain_available: bool, alias_rule: str) -> None:
    """The checks every outbound PUBLISH passes before it touches session state (control or data stream).

    `alias_rule` is the message for a caller who set Topic Alias itself (each session owns aliasing).
    """
    if qos not in (0, 1, 2):
        raise LocalProtocolError(f"qos must be 0, 1 or 2, got {qos}")
    if qos > maximum_qos:
        raise LocalProtocolError(
            f"qos {qos} exceeds the server's Maximum QoS {maximum_qos}", ReasonCode.QOS_NOT_SUPPORTED
        )
    if retain and not retain_available:
        raise LocalProtocolError(
            "the server does not support retained messages", ReasonCode.RETAIN_NOT_SUPPORTED
        )
    if properties.topic_alias is not None:
        raise LocalProtocolError(alias_rule)
    try:
        topics.validate_topic_name(topic)
    except topics.TopicError as exc:
        raise LocalProtocolError(str(exc), exc.reason_code) from exc


def validate_filter(flt: str) -> None:
    """A topic filter we may send; LocalProtocolError with the MQTT reason code otherwise."""
    try:
        topics.validate_topic_filter(flt)
    except topics.TopicError as exc:
        raise LocalProtocolError(str(exc), exc.reason_code) from exc


def checked_subscriptions(
    subscriptions: Sequence[Subscription | tuple[str, int]],
) -> tuple[Subscription, ...]:
    """SUBSCRIBE entries as `Subscription`s, each filter and QoS checked; at least one."""
    subs = tuple(s if isinstance(s, Subscription) else Subscription(s[0], s[1]) for s in subscriptions)
    if not subs:
        raise LocalProtocolError("SUBSCRIBE needs at least one topic filter")
    for sub in subs:
        validate_filter(sub.topic_filter)
        if sub.qos not in (0, 1, 2):
            raise LocalProtocolError(f"subscription qos must be 0, 1 or 2, got {sub.qos}")
    return subs


def checked_filters(filters: Sequence[str]) -> tuple[str, ...]:
    """UNSUBSCRIBE filters, checked; a non-empty sequence (a lone string is refused, not iterated)."""
    if isinstance(filters, str):
        raise LocalProtocolError("unsubscribe takes a sequence of filters, not one string")
    if not filters:
        raise LocalProtocolError("UNSUBSCRIBE needs at least one topic filter")
    for flt in filters:
        validate_filter(flt)
    return tuple(filters)


class NotConnectedError(LocalProtocolError):
    """The session has no accepted connection: wait for `Connected`, then retry."""


class InflightWindowFull(LocalProtocolError):
    """Receive Maximum publishes are already in flight: wait for a `PublishAcked`, then retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)


@dataclass(frozen=True, slots=True)
class Connected:
    connack: ConnAck
    session_present: bool


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    """CONNACK with a failure code (MQTT 5 ReasonCode >= 0x80, or MQTT 3.1.1 ConnectReturnCode != 0)."""

    reason_code: int
    reason_string: str | None


@dataclass(frozen=True, slots=True)
class ConnectTimedOut:
    """No CONNACK within connect_timeout_s: close the transport and retry later."""


@dataclass(frozen=True, slots=True)
class PublishAcked:
    """A QoS 1 PUBACK or QoS 2 PUBCOMP (or a failing PUBREC). reason_code >= 0x80: the server refused."""

    packet_id: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An application message from the server, topic alias already resolved (and removed)."""

    publish: Publish


@dataclass(frozen=True, slots=True)
class Subscribed:
    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    packet_id: int
    reason_codes: tuple[int, ...]  # empty at MQTT 3.1.1


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended by DISCONNECT: from the server (by_server) or from us after a violation."""

    reason_code: int
    reason_string: str | None
    by_server: bool


@dataclass(frozen=True, slots=True)
class PingTimedOut:
    """No PINGRESP within ping_timeout_s: the link is dead; close the transport and reconnect."""


Event = (
    Connected
    | ConnectionRefused
    | ConnectTimedOut
    | PublishAcked
    | MessageReceived
    | Subscribed
    | Unsubscribed
    | Disconnected
    | PingTimedOut
)


# ---------------------------------------------------------------------------------------------------
# Outbound QoS>0 bookkeeping


class _Stage(enum.Enum):
    PUBLISH_UNSENT = 1  # PUBLISH must go (first time, or again after a reconnect)
    PUBLISH_SENT = 2  # waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
    PUBREL_UNSENT = 3  # PUBREC seen; PUBREL must go again after a reconnect
    PUBREL_SENT = 4  # waiting for PUBCOMP


@dataclass(slots=True)
class _Outgoing:
    publish: Publish  # as the application gave it: full topic, no alias, DUP=0, packet id set
    stage: _Stage
    sent_before: bool = False  # went on the wire in this session: the next send carries DUP=1


class ClientSession:
    """One MQTT client session (see the module docstring for the theory of operation)."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.protocol_level = config.protocol_level
        self.state = SessionState.DISCONNECTED
        self.assigned_client_id: str | None = None
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._decoder = self._new_decoder()
        self._now_s = 0.0
        # Session state (survives reconnects when the server keeps the session).
        self._outgoing: dict[int, _Outgoing] = {}  # insertion order = original send order
        self._unsent: deque[int] = deque()  # ids in PUBLISH_UNSENT, in order
        self._inbound_qos2: set[int] = set()
        self._next_packet_id = 1
        # Ids other sessions of the same connection hold (QUIC data streams, uplink.mqtt.stream_session):
        # never allocated here, so our ids stay unique on the connection (checklist A6).
        self.reserved_packet_ids: Container[int] = frozenset()
        # Per connection.
        self._pending_subscribe: dict[int, int] = {}  # packet id -> number of filters
        self._pending_unsubscribe: dict[int, int] = {}
        self._connect_deadline_s: float | None = None
        self._last_sent_s = 0.0
        self._ping_deadline_s: float | None = None
        self._keep_alive_s = config.keep_alive_s
        self._inbound_aliases: dict[int, str] = {}
        self._outbound_aliases: OrderedDict[str, int] = OrderedDict()  # LRU: oldest first
        self._alias_properties: dict[int, Properties] = {}
        # The server's limits from CONNACK (MQTT 5); reset to the spec defaults for each connection.
        self.server_receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.server_maximum_packet_size: int | None = None
        self.server_topic_alias_maximum = 0
        self.server_maximum_qos = 2
        self.server_retain_available = True

    # -- properties the transport/facade may read ---------------------------------------------

    @property
    def client_id(self) -> str:
        """The id to connect with: the server-assigned one once we have it (needed to resume)."""
        return self.assigned_client_id if self.assigned_client_id is not None else self.config.client_id

    @property
    def connected(self) -> bool:
        return self.state is SessionState.CONNECTED

    @property
    def keep_alive_s(self) -> int:
        """Effective keepalive: the server's Server Keep Alive if it sent one, else ours."""
        return self._keep_alive_s

    @property
    def inflight_window(self) -> int:
        return min(self.config.max_inflight, self.server_receive_maximum)

    @property
    def inflight(self) -> int:
        """Uncompleted outbound QoS>0 publishes (on the wire or waiting to be resent)."""
        return len(self._outgoing)

    @property
    def inflight_free(self) -> int:
        """How many more QoS>0 publishes `publish` accepts right now (0 when not connected)."""
        if self.state is not SessionState.CONNECTED:
            return 0
        return max(0, self.inflight_window - len(self._outgoing))

    def packet_id_in_use(self, packet_id: int) -> bool:
        """Whether packet_id belongs to one of our exchanges that is not complete yet."""
        return (packet_id in self._outgoing or packet_id in self._pending_subscribe
                or packet_id in self._pending_unsubscribe)

    def can_publish(self, qos: int = 1) -> bool:
        if self.state is not SessionState.CONNECTED:
            return False
        return qos == 0 or self.inflight_free > 0

    # -- the sans-I/O surface ------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Start a connection: queue CONNECT and arm the connect timeout. The transport is fresh."""
        if self.state is not SessionState.DISCONNECTED:
            raise LocalProtocolError(f"connect() while {self.state.value}")
        self._tick(now)
        self._out.clear()
        self._decoder = self._new_decoder()
        self._reset_connection_limits()
        cfg = self.config
        props = cfg.connect_properties
        if cfg.protocol_level == MQTT_5:
            props = replace(
                props,
                session_expiry_interval=cfg.session_expiry_s or props.session_expiry_interval,
                receive_maximum=(
                    cfg.receive_maximum if cfg.receive_maximum != DEFAULT_RECEIVE_MAXIMUM else None
                ),
                maximum_packet_size=cfg.maximum_packet_size,
                topic_alias_maximum=cfg.topic_alias_maximum or None,
            )
        packet = Connect(
            client_id=self.client_id,
            protocol_level=cfg.protocol_level,
            clean_start=cfg.clean_start,
            keep_alive_s=cfg.keep_alive_s,
            username=cfg.username,
            password=cfg.password,
            will=cfg.will,
            properties=props,
        )
        self.state = SessionState.CONNECTING
        self._connect_deadline_s = now + cfg.connect_timeout_s
        self._send(packet)

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the transport. Events and replies queue up; violations disconnect."""
        self._tick(now)
        if self.state is SessionState.DISCONNECTED or not data:
            return
        failure: RemoteProtocolError | None = None
        try:
            packets: Sequence[Packet] = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            # Acks that arrived intact before the garbage still settle their publishes (fewer resends).
            packets, failure = exc.packets_before, exc
        try:
            for packet in packets:
                self._handle(packet)
                if not self._link_open():
                    return  # whatever follows belongs to a connection we gave up on
        except RemoteProtocolError as exc:
            failure = exc
        if failure is not None:
            self._violation(failure.reason_code, str(failure))

    def data_to_send(self) -> bytes:
        """Bytes the transport must write now (in order); empty when there is nothing."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """Monotonic time at which `handle_deadline` must be called, or None."""
        if self.state is SessionState.CONNECTING:
            return self._connect_deadline_s
        if self.state is SessionState.CONNECTED:
            if self._ping_deadline_s is not None:
                return self._ping_deadline_s
            if self._keep_alive_s > 0:
                return self._last_sent_s + self._keep_alive_s
        return None

    def handle_deadline(self, now: float) -> None:
        """Act on timers that are due at `now` (early calls are harmless)."""
        self._tick(now)
        if self.state is SessionState.CONNECTING:
            if self._connect_deadline_s is not None and now >= self._connect_deadline_s:
                self._enter_disconnected()
                self._events.append(ConnectTimedOut())
        elif self.state is SessionState.CONNECTED:
            if self._ping_deadline_s is not None:
                if now >= self._ping_deadline_s:
                    self._enter_disconnected()
                    self._events.append(PingTimedOut())
            elif self._keep_alive_s > 0 and now >= self._last_sent_s + self._keep_alive_s:
                self._send(PingReq())
                self._ping_deadline_s = now + self.config.ping_timeout_s

    def connection_lost(self) -> None:
        """The transport died. Unsent bytes are dropped; the session state is kept for a reconnect."""
        self._out.clear()
        if self.state is not SessionState.DISCONNECTED:
            self._enter_disconnected()

    # -- commands ----------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties = NO_PROPERTIES,
        *,
        now: float | None = None,
    ) -> int | None:
        """Queue an application message; returns its packet id (None for QoS 0).

        Raises NotConnectedError, InflightWindowFull (wait for room), or LocalProtocolError when the
        message breaks the server's limits (QoS, retain, Maximum Packet Size) or is malformed; in every
        error case the session is unchanged.
        """
        if now is not None:
            self._tick(now)
        self._require_connected()
        check_publish(topic, qos, retain, properties, maximum_qos=self.server_maximum_qos,
                      retain_available=self.server_retain_available,
                      alias_rule="topic aliases are managed by the session; do not set topic_alias")
        if qos == 0:
            self._send_publish(Publish(topic, payload, 0, retain, properties=properties))
            return None
        if self.inflight_free <= 0:
            raise InflightWindowFull(
                f"{len(self._outgoing)} publishes in flight (window {self.inflight_window})"
            )
        next_packet_id = self._next_packet_id
        packet_id = self._allocate_packet_id()
        message = Publish(topic, payload, qos, retain, packet_id=packet_id, properties=properties)
        try:
            self._send_publish(message)  # raises before any other state changes if unsendable
        except LocalProtocolError:
            self._next_packet_id = next_packet_id
            raise
        self._outgoing[packet_id] = _Outgoing(message, _Stage.PUBLISH_SENT, sent_before=True)
        return packet_id

    def subscribe(
        self,
        subscriptions: Sequence[Subscription | tuple[str, int]],
        properties: Properties = NO_PROPERTIES,
        *,
        now: float | None = None,
    ) -> int:
        """Queue a SUBSCRIBE; returns its packet id (matched by a later `Subscribed`)."""
        if now is not None:
            self._tick(now)
        self._require_connected()
        subs = checked_subscriptions(subscriptions)
        packet_id = self._allocate_packet_id()
        self._send(Subscribe(packet_id, subs, properties))
        self._pending_subscribe[packet_id] = len(subs)
        return packet_id

    def unsubscribe(
        self, filters: Sequence[str], properties: Properties = NO_PROPERTIES, *, now: float | None = None
    ) -> int:
        """Queue an UNSUBSCRIBE; returns its packet id (matched by a later `Unsubscribed`)."""
        if now is not None:
            self._tick(now)
        self._require_connected()
        filters = checked_filters(filters)
        packet_id = self._allocate_packet_id()
        self._send(Unsubscribe(packet_id, filters, properties))
        self._pending_unsubscribe[packet_id] = len(filters)
        return packet_id

    def disconnect(self, reason_code: int = 0, properties: Properties = NO_PROPERTIES) -> None:
        """Queue DISCONNECT and drop to DISCONNECTED (no event: the caller knows). Idempotent."""
        if self.state is SessionState.DISCONNECTED:
            return
        if self.protocol_level == MQTT_5:
            self._send(Disconnect(reason_code, properties))
        else:
            self._send(Disconnect())
        self._enter_disconnected()

    # -- inbound packets -------------------------------------------------------------------------

    def _handle(self, packet: Packet) -> None:
        if self.state is SessionState.CONNECTING:
            if isinstance(packet, ConnAck):
                self._on_connack(packet)
            elif isinstance(packet, Disconnect):
                self._on_disconnect(packet)
            else:
                raise RemoteProtocolError(f"{packet.type.name} before CONNACK")
            return
        if isinstance(packet, Publish):
            self._on_publish(packet)
        elif isinstance(packet, PubAck):
            self._on_puback(packet)
        elif isinstance(packet, PubRec):
            self._on_pubrec(packet)
        elif isinstance(packet, PubRel):
            self._on_pubrel(packet)
        elif isinstance(packet, PubComp):
            self._on_pubcomp(packet)
        elif isinstance(packet, SubAck):
            self._on_suback(packet)
        elif isinstance(packet, UnsubAck):
            self._on_unsuback(packet)
        elif isinstance(packet, PingResp):
            # An unsolicited PINGRESP is harmless; only a missing one matters.
            self._ping_deadline_s = None
        elif isinstance(packet, Disconnect):
            self._on_disconnect(packet)
        elif isinstance(packet, Auth):
            raise RemoteProtocolError("AUTH without an Authentication Method in CONNECT")
        else:
            # CONNECT, a second CONNACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ: a server never sends these.
            raise RemoteProtocolError(f"a server must not send {packet.type.name} here")

    def _on_connack(self, connack: ConnAck) -> None:
        if connack.reason_code != 0:
            self._enter_disconnected()
            self._events.append(ConnectionRefused(connack.reason_code, connack.properties.reason_string))
            return
        if connack.session_present and self.config.clean_start:
            # MQTT-3.2.2-4 (v5) / 3.2.2-1 (v3.1.1): an accepted clean start never has a session.
            raise RemoteProtocolError("CONNACK session_present=1 after a clean start")
        props = connack.properties
        self._connect_deadline_s = None
        if self.protocol_level == MQTT_5:
            if props.receive_maximum is not None:
                if props.receive_maximum == 0:
                    raise RemoteProtocolError("CONNACK Receive Maximum 0")
                self.server_receive_maximum = props.receive_maximum
            self.server_maximum_packet_size = props.maximum_packet_size
            self.server_topic_alias_maximum = props.topic_alias_maximum or 0
            if props.maximum_qos is not None:
                self.server_maximum_qos = props.maximum_qos
            if props.retain_available is not None:
                self.server_retain_available = bool(props.retain_available)
            if props.server_keep_alive is not None:
                self._keep_alive_s = props.server_keep_alive
            if props.assigned_client_identifier is not None:
                self.assigned_client_id = props.assigned_client_identifier
        self.state = SessionState.CONNECTED
        self._last_sent_s = self._now_s
        self._events.append(Connected(connack, connack.session_present))
        if not connack.session_present:
            self._start_new_session()
        self._resend_after_connack()

    def _on_publish(self, publish: Publish) -> None:
        publish = self._resolve_inbound_alias(publish)
        if publish.qos == 0:
            self._events.append(MessageReceived(publish))
            return
        assert publish.packet_id is not None  # the codec guarantees an id for QoS > 0
        if publish.qos == 1:
            # Acknowledged on receipt: the application's handling is not part of the MQTT exchange.
            self._events.append(MessageReceived(publish))
            self._send(PubAck(publish.packet_id))
            return
        if publish.packet_id not in self._inbound_qos2:
            if self.protocol_level == MQTT_5 and len(self._inbound_qos2) >= self.config.receive_maximum:
                raise RemoteProtocolError(
                    f"more than Receive Maximum {self.config.receive_maximum} QoS 2 messages unreleased",
                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                )
            # Method B of MQTT 5.0 4.3.3: deliver now, remember the id until PUBREL so that a resend
            # (with or without DUP) is acknowledged but not delivered a second time.
            self._inbound_qos2.add(publish.packet_id)
            self._events.append(MessageReceived(publish))
        self._send(PubRec(publish.packet_id))

    def _on_pubrel(self, pubrel: PubRel) -> None:
        if pubrel.packet_id in self._inbound_qos2:
            self._inbound_qos2.discard(pubrel.packet_id)
            self._send(PubComp(pubrel.packet_id))
        elif self.protocol_level == MQTT_5:
            # We may have lost the id (fresh process resuming a server session): answer, don't fail.
            self._send(PubComp(pubrel.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
        else:
            self._send(PubComp(pubrel.packet_id))

    def _on_puback(self, puback: PubAck) -> None:
        record = self._expect_outgoing(puback.packet_id, "PUBACK", _Stage.PUBLISH_SENT)
        if record.publish.qos != 1:
            raise RemoteProtocolError(f"PUBACK for QoS 2 publish {puback.packet_id}")
        self._complete(puback.packet_id, puback.reason_code)

    def _on_pubrec(self, pubrec: PubRec) -> None:
        record = self._outgoing.get(pubrec.packet_id)
        if record is not None and record.publish.qos == 2 and record.stage is _Stage.PUBREL_SENT:
            # Our PUBREL and a resent PUBREC crossed: answering again is what MQTT-4.3.3 asks.
            self._send(PubRel(pubrec.packet_id))
            return
        record = self._expect_outgoing(pubrec.packet_id, "PUBREC", _Stage.PUBLISH_SENT)
        if record.publish.qos != 2:
            raise RemoteProtocolError(f"PUBREC for QoS 1 publish {pubrec.packet_id}")
        if pubrec.reason_code >= 0x80:
            self._complete(pubrec.packet_id, pubrec.reason_code)  # the exchange ends here (v5 4.3.3)
            return
        record.stage = _Stage.PUBREL_SENT
        # Re-insert at the end: after a reconnect PUBRELs go in PUBREC order (MQTT-4.6.0-3), and the
        # relative order of the PUBLISHes still to be resent is unaffected.
        self._outgoing[pubrec.packet_id] = self._outgoing.pop(pubrec.packet_id)
        self._send(PubRel(pubrec.packet_id))

    def _on_pubcomp(self, pubcomp: PubComp) -> None:
        self._expect_outgoing(pubcomp.packet_id, "PUBCOMP", _Stage.PUBREL_SENT)
        self._complete(pubcomp.packet_id, pubcomp.reason_code)

    def _on_suback(self, suback: SubAck) -> None:
        count = self._pending_subscribe.pop(suback.packet_id, None)
        if count is None:
            raise RemoteProtocolError(f"SUBACK for unknown packet id {suback.packet_id}")
        if len(suback.reason_codes) != count:
            raise RemoteProtocolError(f"SUBACK has {len(suback.reason_codes)} codes for {count} filters")
        self._events.append(Subscribed(suback.packet_id, suback.reason_codes))

    def _on_unsuback(self, unsuback: UnsubAck) -> None:
        count = self._pending_unsubscribe.pop(unsuback.packet_id, None)
        if count is None:
            raise RemoteProtocolError(f"UNSUBACK for unknown packet id {unsuback.packet_id}")
        if self.protocol_level == MQTT_5 and len(unsuback.reason_codes) != count:
            raise RemoteProtocolError(f"UNSUBACK has {len(unsuback.reason_codes)} codes for {count} filters")
        self._events.append(Unsubscribed(unsuback.packet_id, unsuback.reason_codes))

    def _on_disconnect(self, disconnect: Disconnect) -> None:
        self._enter_disconnected()
        self._events.append(
            Disconnected(disconnect.reason_code, disconnect.properties.reason_string, by_server=True)
        )

    # -- helpers -------------------------------------------------------------------------------------

    def _new_decoder(self) -> Decoder:
        return Decoder(self.config.protocol_level, self.config.maximum_packet_size or MAX_PACKET_SIZE)

    def _reset_connection_limits(self) -> None:
        """Defaults that hold until a CONNACK says otherwise (MQTT 5.0 3.2.2.3)."""
        self.server_receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.server_maximum_packet_size = None
        self.server_topic_alias_maximum = 0
        self.server_maximum_qos = 2
        self.server_retain_available = True
        self._keep_alive_s = self.config.keep_alive_s
        self._inbound_aliases = {}
        self._outbound_aliases = OrderedDict()
        self._ping_deadline_s = None

    def _tick(self, now: float) -> None:
        # Monotonic input; keep the largest so a stale `now` never moves time backwards.
        self._now_s = max(self._now_s, now)

    def _link_open(self) -> bool:
        return self.state is not SessionState.DISCONNECTED

    def _require_connected(self) -> None:
        if self.state is not SessionState.CONNECTED:
            raise NotConnectedError(f"session is {self.state.value}")

    def _send(self, packet: Packet) -> None:
        max_size = None if isinstance(packet, Connect) else self.server_maximum_packet_size
        self._out += encode(packet, self.protocol_level, max_size)
        self._last_sent_s = self._now_s

    def _send_publish(self, message: Publish, dup: bool = False) -> None:
        """Encode message with an outbound topic alias if the server allows them; commit the alias only
        once the packet encoded (a too-large packet must leave the alias table untouched)."""
        topic = message.topic
        properties = message.properties
        alias: int | None = None
        evict: str | None = None
        if self.server_topic_alias_maximum > 0 and self.config.outbound_topic_aliases:
            known = self._outbound_aliases.get(message.topic)
            if known is not None:
                alias = known
                topic = ""
            elif len(self._outbound_aliases) < self.server_topic_alias_maximum:
                alias = len(self._outbound_aliases) + 1
            else:
                evict, alias = next(iter(self._outbound_aliases.items()))
            if properties is NO_PROPERTIES:
                # The common telemetry case; dataclasses.replace on 27 fields per message is costly.
                cached = self._alias_properties.get(alias)
                if cached is None:
                    cached = self._alias_properties[alias] = Properties(topic_alias=alias)
                properties = cached
            else:
                properties = replace(properties, topic_alias=alias)
        self._out += encode_publish(
            topic, message.payload, message.qos, message.retain, dup, message.packet_id,
            self.protocol_level, properties, self.server_maximum_packet_size,
        )
        self._last_sent_s = self._now_s
        if alias is not None:
            if evict is not None:
                del self._outbound_aliases[evict]
            self._outbound_aliases[message.topic] = alias
            self._outbound_aliases.move_to_end(message.topic)

    def _resolve_inbound_alias(self, publish: Publish) -> Publish:
        alias = publish.properties.topic_alias
        if alias is None:
            if not publish.topic:
                raise RemoteProtocolError("PUBLISH with an empty topic and no Topic Alias")
            return publish
        if not 1 <= alias <= self.config.topic_alias_maximum or self.protocol_level != MQTT_5:
            raise RemoteProtocolError(f"Topic Alias {alias} outside 1..{self.config.topic_alias_maximum}",
                                      ReasonCode.TOPIC_ALIAS_INVALID)
        if publish.topic:
            self._inbound_aliases[alias] = publish.topic
            topic = publish.topic
        else:
            mapped = self._inbound_aliases.get(alias)
            if mapped is None:
                raise RemoteProtocolError(f"Topic Alias {alias} used before it was set")
            topic = mapped
        return replace(publish, topic=topic, properties=replace(publish.properties, topic_alias=None))

    def _allocate_packet_id(self) -> int:
        """Next free id after the last one handed out; skips ids still in use (MQTT-2.2.1-3)."""
        for _ in range(MAX_PACKET_ID):
            candidate = self._next_packet_id
            self._next_packet_id = candidate % MAX_PACKET_ID + 1
            if not self.packet_id_in_use(candidate) and candidate not in self.reserved_packet_ids:
                return candidate
        raise InflightWindowFull("all 65535 packet identifiers are in use")

    def _expect_outgoing(self, packet_id: int, what: str, stage: _Stage) -> _Outgoing:
        record = self._outgoing.get(packet_id)
        if record is None:
            raise RemoteProtocolError(f"{what} for unknown packet id {packet_id}")
        if record.stage is not stage:
            raise RemoteProtocolError(f"{what} for packet id {packet_id} in stage {record.stage.name}")
        return record

    def _complete(self, packet_id: int, reason_code: int) -> None:
        del self._outgoing[packet_id]
        self._events.append(PublishAcked(packet_id, reason_code))
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Send queued PUBLISHes (resends after a reconnect) while the server's window has room."""
        while self._unsent and len(self._outgoing) - len(self._unsent) < self.inflight_window:
            packet_id = self._unsent.popleft()
            record = self._outgoing[packet_id]
            try:
                self._send_publish(record.publish, dup=record.sent_before)
            except LocalProtocolError as exc:
                if exc.reason_code != ReasonCode.PACKET_TOO_LARGE:
                    raise
                # The new server's Maximum Packet Size is smaller than the old one's: MQTT-3.1.2-25
                # says discard and behave as if sent; the caller learns it from the reason code.
                del self._outgoing[packet_id]
                self._events.append(PublishAcked(packet_id, ReasonCode.PACKET_TOO_LARGE))
                continue
            record.stage = _Stage.PUBLISH_SENT
            record.sent_before = True

    def _start_new_session(self) -> None:
        """The server has no session for us: apply the session_present=0 policy (module docstring)."""
        self._inbound_qos2.clear()
        for packet_id, record in list(self._outgoing.items()):
            if record.stage in (_Stage.PUBREL_UNSENT, _Stage.PUBREL_SENT):
                del self._outgoing[packet_id]
                self._events.append(PublishAcked(packet_id, ReasonCode.SUCCESS))
            else:
                record.sent_before = False
        self._unsent = deque(
            pid for pid, rec in self._outgoing.items() if rec.stage is _Stage.PUBLISH_UNSENT
        )

    def _resend_after_connack(self) -> None:
        # PUBRELs are never held back by the window (MQTT-4.9.0-3); PUBLISHes are, in original order.
        for packet_id, record in self._outgoing.items():
            if record.stage is _Stage.PUBREL_UNSENT:
                self._send(PubRel(packet_id))
                record.stage = _Stage.PUBREL_SENT
        self._send_unsent()

    def _enter_disconnected(self) -> None:
        self.state = SessionState.DISCONNECTED
        self._connect_deadline_s = None
        self._ping_deadline_s = None
        self._pending_subscribe.clear()
        self._pending_unsubscribe.clear()
        for record in self._outgoing.values():
            if record.stage is _Stage.PUBLISH_SENT:
                record.stage = _Stage.PUBLISH_UNSENT
            elif record.stage is _Stage.PUBREL_SENT:
                record.stage = _Stage.PUBREL_UNSENT
        self._unsent = deque(
            pid for pid, rec in self._outgoing.items() if rec.stage is _Stage.PUBLISH_UNSENT
        )

    def _violation(self, reason_code: int, message: str) -> None:
        """The server broke the protocol: tell it why (MQTT 5 only) and give up the connection.

        At MQTT 3.1.1 a DISCONNECT would mean a *normal* close (and suppress our Will), so we only close.
        """
        if self.protocol_level == MQTT_5:
            try:
                self._send(Disconnect(reason_code))
            except ProtocolError:
                pass  # the reason code itself is unencodable: closing is still the right answer
        self._enter_disconnected()
        self._events.append(Disconnected(reason_code, message, by_server=False))
