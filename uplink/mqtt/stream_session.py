"""Sans-I/O MQTT session of one QUIC data stream (EMQX multi-stream): publish/subscribe state, no CONNECT.

Theory of operation
-------------------
EMQX runs a separate copy of the channel per QUIC data stream (checklist A5, A6, A9, A10): a data
stream carries only PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE (and from the
server SUBACK/UNSUBACK); acks come back on the stream of the request; the server's QoS state,
inbound topic aliases and subscriptions of a stream die with the stream. CONNECT, PINGREQ and
DISCONNECT stay on the control stream (`uplink.mqtt.session.ClientSession`), which also supplies
the server's limits from its CONNACK.

A `DataStreamSession` is one *logical* data stream that outlives its QUIC streams and connections:

    DETACHED --attach(limits)--> ATTACHED --detach() / violation--> DETACHED

- `attach` binds it to a fresh QUIC stream (a new stream after a reset, or the first stream of a
  new connection). State the server lost with the old stream is rebuilt here: every remembered
  subscription is re-issued in one SUBSCRIBE (A9, A10 - even when CONNACK said session_present=1,
  because data-stream subscriptions are not part of the session), SUBSCRIBE/UNSUBSCRIBE requests
  still unanswered are sent again, and every publish that was not acknowledged is sent again (DUP=1
  if it went out before; MQTT-4.4.0-1 does not apply across streams but the flag is harmless and
  tells the server it may be a repeat). A QoS 2 publish the server had already PUBREC'd is
  completed with `PublishAcked(0)`: the server took ownership with its PUBREC and routed it, and the
  new stream's server state has no packet id to PUBREL. So nothing the application handed over is
  dropped, and nothing already owned by the server is sent twice by design: at-least-once.
- Inflight window: at most min(config.max_inflight, server Receive Maximum) uncompleted QoS>0
  publishes on this stream. EMQX keeps an inflight window per stream, so the stream's own window
  is the protocol's. (Our broker's QUIC listener maps all streams onto one core session, whose
  Receive Maximum the control session's window and ours then share: keep max_inflight small and the
  control session's max_inflight below Receive Maximum minus it - see `uplink.streams`.)
- Packet ids: the server allocates its ids per stream, but ours are unique across the whole
  connection (A6 "to be safe"): every session of the connection - the control `ClientSession` and
  each data stream - allocates through one `PacketIdRegistry` and skips ids any other member holds.
  A disjoint range per stream was the alternative; it caps every stream at a fixed slice of 65535
  ids and needs a change to how the control session counts, whereas the registry leaves the
  control session's allocation order as it was and only adds "skip ids in use elsewhere".
- No keepalive here: the control stream pings (A7), so this session has no timers and no deadline.
- The server breaking the data-stream contract (CONNACK, PINGRESP, DISCONNECT, AUTH, malformed
  bytes) ends only this stream: `StreamFailed` tells the transport to reset it, and the session is
  DETACHED until the next `attach`. An ack for an id we do not hold is ignored and counted
  (`stray_acks`): with per-stream server state a late ack for a resent message is conceivable, and
  resetting the stream would cost a resend of the whole window for nothing.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from uplink.mqtt.codec import Decoder, encode, encode_publish
from uplink.mqtt.errors import LocalProtocolError, RemoteProtocolError
from uplink.mqtt.packets import (
    MAX_PACKET_ID,
    MAX_PACKET_SIZE,
    MQTT_5,
    NO_PROPERTIES,
    PROTOCOL_LEVELS,
    Packet,
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
)
from uplink.mqtt.session import (
    DEFAULT_RECEIVE_MAXIMUM,
    ClientSession,
    InflightWindowFull,
    MessageReceived,
    NotConnectedError,
    PublishAcked,
    Subscribed,
    Unsubscribed,
    check_publish,
    checked_filters,
    checked_subscriptions,
)

# ---------------------------------------------------------------------------------------------------
# Packet ids shared by the sessions of one connection


class PacketIdUser(Protocol):
    def packet_id_in_use(self, packet_id: int) -> bool: ...


class PacketIdRegistry:
    """The sessions of one QUIC connection; an id held by one member is never allocated by another."""

    def __init__(self) -> None:
        self._members: list[PacketIdUser] = []

    def join(self, member: PacketIdUser) -> None:
        if not any(m is member for m in self._members):
            self._members.append(member)

    def leave(self, member: PacketIdUser) -> None:
        self._members = [m for m in self._members if m is not member]

    def held_elsewhere(self, packet_id: int, asking: PacketIdUser) -> bool:
        return any(m is not asking and m.packet_id_in_use(packet_id) for m in self._members)

    def join_control(self, session: ClientSession) -> None:
        """Make the control session a member: it skips ids the data streams hold, and they skip its."""
        self.join(session)
        session.reserved_packet_ids = _HeldElsewhere(self, session)


class _HeldElsewhere:
    """`ClientSession.reserved_packet_ids` for a registry member: ids other members hold."""

    __slots__ = ("_member", "_registry")

    def __init__(self, registry: PacketIdRegistry, member: PacketIdUser) -> None:
        self._registry = registry
        self._member = member

    def __contains__(self, packet_id: object) -> bool:
        return isinstance(packet_id, int) and self._registry.held_elsewhere(packet_id, self._member)


# ---------------------------------------------------------------------------------------------------
# Configuration, limits, events


@dataclass(frozen=True, slots=True)
class DataStreamConfig:
    """The stream's own limits. topic_alias_maximum must equal what the control session's CONNECT
    announced (the server may use that many inbound aliases per stream)."""

    protocol_level: int = MQTT_5
    max_inflight: int = 32  # EMQX's default per-stream window (mqtt.max_inflight)
    maximum_packet_size: int | None = None  # what we accept inbound (None: the protocol maximum)
    topic_alias_maximum: int = 16

    def __post_init__(self) -> None:
        if self.protocol_level not in PROTOCOL_LEVELS:
            raise ValueError(f"protocol_level: must be one of {PROTOCOL_LEVELS}, got {self.protocol_level}")
        if not 1 <= self.max_inflight <= DEFAULT_RECEIVE_MAXIMUM:
            raise ValueError(f"max_inflight: must be 1..65535, got {self.max_inflight}")
        if self.maximum_packet_size is not None and not 1 <= self.maximum_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(f"maximum_packet_size: must be 1..{MAX_PACKET_SIZE}")
        if not 0 <= self.topic_alias_maximum <= 0xFFFF:
            raise ValueError(f"topic_alias_maximum: must be 0..65535, got {self.topic_alias_maximum}")


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The server's limits from the control stream's CONNACK; they apply to every stream."""

    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    maximum_packet_size: int | None = None
    maximum_qos: int = 2
    retain_available: bool = True

    @classmethod
    def of(cls, session: ClientSession) -> StreamLimits:
        return cls(session.server_receive_maximum, session.server_maximum_packet_size,
                   session.server_maximum_qos, session.server_retain_available)


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The server broke the data-stream contract: reset this stream (error code = reason_code)."""

    reason_code: int
    message: str


StreamEvent = PublishAcked | MessageReceived | Subscribed | Unsubscribed | StreamFailed


class _Stage(enum.Enum):
    UNSENT = 1  # PUBLISH must go (first time, or again on a new stream)
    SENT = 2  # waiting for PUBACK / PUBREC
    PUBREL_SENT = 3  # QoS 2: PUBREC seen, waiting for PUBCOMP


@dataclass(slots=True)
class _Outgoing:
    publish: Publish
    stage: _Stage
    sent_before: bool = False


@dataclass(slots=True)
class _Request:
    packet: Subscribe | Unsubscribe
    ours: bool = False  # a re-subscription the session made itself (no caller waits for it)


# ---------------------------------------------------------------------------------------------------
# The session


class DataStreamSession:
    """One logical data stream (see the module docstring for the theory of operation)."""

    def __init__(self, config: DataStreamConfig, registry: PacketIdRegistry | None = None) -> None:
        self.config = config
        self.level = config.protocol_level
        self.attached = False
        self.limits = StreamLimits()
        self.attachments = 0  # how many streams this session has been bound to
        self.resent = 0  # publishes sent again on a new stream
        self.stray_acks = 0
        self._registry = registry or PacketIdRegistry()
        self._registry.join(self)
        self._out = bytearray()
        self._events: deque[StreamEvent] = deque()
        self._decoder = self._new_decoder()
        self._outgoing: dict[int, _Outgoing] = {}  # insertion order = send order
        self._requests: dict[int, _Request] = {}
        self._inbound_qos2: set[int] = set()
        self._aliases: dict[int, str] = {}
        self._subscriptions: dict[str, Subscription] = {}  # granted filters, re-issued on attach
        self._next_packet_id = 1

    # -- what the transport reads -------------------------------------------------------------------

    @property
    def inflight_window(self) -> int:
        return min(self.config.max_inflight, self.limits.receive_maximum)

    @property
    def inflight(self) -> int:
        return len(self._outgoing)

    @property
    def inflight_free(self) -> int:
        return max(0, self.inflight_window - len(self._outgoing)) if self.attached else 0

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscriptions.values())

    def can_publish(self, qos: int = 1) -> bool:
        return self.attached and (qos == 0 or self.inflight_free > 0)

    def packet_id_in_use(self, packet_id: int) -> bool:
        return packet_id in self._outgoing or packet_id in self._requests

    # -- the sans-I/O surface -------------------------------------------------------------------------

    def attach(self, limits: StreamLimits) -> None:
        """Bind to a fresh stream: queue re-subscriptions, open requests and unacknowledged publishes."""
        if self.attached:
            self.detach()
        self.attached = True
        self.attachments += 1
        self.limits = limits
        self._out.clear()
        self._decoder = self._new_decoder()
        self._inbound_qos2.clear()
        self._aliases.clear()
        for packet_id, record in list(self._outgoing.items()):
            if record.stage is _Stage.PUBREL_SENT:
                del self._outgoing[packet_id]  # the server owns it since its PUBREC (module docstring)
                self._events.append(PublishAcked(packet_id, ReasonCode.SUCCESS))
            else:
                record.stage = _Stage.UNSENT
        pending_filters = {s.topic_filter for r in self._requests.values()
                           if isinstance(r.packet, Subscribe) for s in r.packet.subscriptions}
        again = tuple(s for f, s in self._subscriptions.items() if f not in pending_filters)
        if again:
            packet_id = self._allocate_packet_id()
            self._requests[packet_id] = _Request(Subscribe(packet_id, again), ours=True)
        # Re-subscriptions first: deliveries must find their stream before anything else happens.
        order = sorted(self._requests, key=lambda pid: not self._requests[pid].ours)
        for packet_id in order:
            self._send(self._requests[packet_id].packet)
        self._send_unsent()

    def detach(self) -> None:
        """The stream is gone (reset, FIN, connection lost). Unsent bytes are dropped; state is kept."""
        self.attached = False
        self._out.clear()
        for record in self._outgoing.values():
            if record.stage is _Stage.SENT:
                record.stage = _Stage.UNSENT

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the stream. Events and replies queue up; a violation detaches."""
        if not self.attached or not data:
            return
        failure: RemoteProtocolError | None = None
        try:
            packets: Sequence[Packet] = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            packets, failure = exc.packets_before, exc
        try:
            for packet in packets:
                self._handle(packet)
        except RemoteProtocolError as exc:
            failure = exc
        if failure is not None:
            self.detach()
            self._events.append(StreamFailed(failure.reason_code, str(failure)))

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_event(self) -> StreamEvent | None:
        return self._events.popleft() if self._events else None

    # -- commands --------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties = NO_PROPERTIES) -> int | None:
        """Queue an application message; its packet id (None for QoS 0). Errors leave no trace:
        NotConnectedError (not attached), InflightWindowFull, LocalProtocolError (never sendable)."""
        if not self.attached:
            raise NotConnectedError("data stream not attached")
        check_publish(topic, qos, retain, properties, maximum_qos=self.limits.maximum_qos,
                      retain_available=self.limits.retain_available,
                      alias_rule="data streams send full topics; do not set topic_alias")
        if qos == 0:
            self._send_publish(Publish(topic, payload, 0, retain, properties=properties))
            return None
        if self.inflight_free <= 0:
            raise InflightWindowFull(
                f"{len(self._outgoing)} publishes in flight (window {self.inflight_window})")
        packet_id = self._allocate_packet_id()
        message = Publish(topic, payload, qos, retain, packet_id=packet_id, properties=properties)
        self._send_publish(message)  # raises (too large) before any state changes
        self._outgoing[packet_id] = _Outgoing(message, _Stage.SENT, sent_before=True)
        return packet_id

    def subscribe(self, subscriptions: Sequence[Subscription | tuple[str, int]],
                  properties: Properties = NO_PROPERTIES) -> int:
        """Queue a SUBSCRIBE on this stream (deliveries for it arrive here); matched by `Subscribed`."""
        if not self.attached:
            raise NotConnectedError("data stream not attached")
        subs = checked_subscriptions(subscriptions)
        packet_id = self._allocate_packet_id()
        packet = Subscribe(packet_id, subs, properties)
        self._send(packet)
        self._requests[packet_id] = _Request(packet)
        return packet_id

    def unsubscribe(self, filters: Sequence[str], properties: Properties = NO_PROPERTIES) -> int:
        """Queue an UNSUBSCRIBE; the filters are forgotten at once (never re-issued on a new stream)."""
        if not self.attached:
            raise NotConnectedError("data stream not attached")
        filters = checked_filters(filters)
        packet_id = self._allocate_packet_id()
        packet = Unsubscribe(packet_id, filters, properties)
        self._send(packet)
        self._requests[packet_id] = _Request(packet)
        for flt in filters:
            self._subscriptions.pop(flt, None)
        return packet_id

    def take_pending(self) -> list[tuple[int, Publish]]:
        """Remove and return the publishes not yet sent or acknowledged, in order (for the caller to
        send another way: the link fell back to TCP). QoS 2 publishes already PUBREC'd stay."""
        taken = [(pid, r.publish) for pid, r in self._outgoing.items() if r.stage is not _Stage.PUBREL_SENT]
        for packet_id, _ in taken:
            del self._outgoing[packet_id]
        return taken

    def take_requests(self) -> list[tuple[int, Subscribe | Unsubscribe]]:
        """Remove and return the caller's SUBSCRIBE/UNSUBSCRIBE requests still unanswered (as
        `take_pending`); the session's own re-subscriptions stay."""
        taken = [(pid, r.packet) for pid, r in self._requests.items() if not r.ours]
        for packet_id, _ in taken:
            del self._requests[packet_id]
        return taken

    # -- inbound -------------------------------------------------------------------------------------------

    def _handle(self, packet: Packet) -> None:
        if isinstance(packet, Publish):
            self._on_publish(packet)
        elif isinstance(packet, PubAck):
            record = self._sent(packet.packet_id, _Stage.SENT, qos=1)
            if record is not None:
                self._complete(packet.packet_id, packet.reason_code)
        elif isinstance(packet, PubRec):
            record = self._outgoing.get(packet.packet_id)
            if record is not None and record.stage is _Stage.PUBREL_SENT:
                self._send(PubRel(packet.packet_id))  # our PUBREL and a resent PUBREC crossed
                return
            record = self._sent(packet.packet_id, _Stage.SENT, qos=2)
            if record is None:
                return
            if packet.reason_code >= 0x80:
                self._complete(packet.packet_id, packet.reason_code)
                return
            record.stage = _Stage.PUBREL_SENT
            self._send(PubRel(packet.packet_id))
        elif isinstance(packet, PubComp):
            if self._sent(packet.packet_id, _Stage.PUBREL_SENT, qos=2) is not None:
                self._complete(packet.packet_id, packet.reason_code)
        elif isinstance(packet, PubRel):
            known = packet.packet_id in self._inbound_qos2
            self._inbound_qos2.discard(packet.packet_id)
            code = 0 if known or self.level != MQTT_5 else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
            self._send(PubComp(packet.packet_id, code))
        elif isinstance(packet, SubAck | UnsubAck):
            self._on_request_ack(packet)
        else:
            raise RemoteProtocolError(f"{packet.type.name} on a data stream", ReasonCode.PROTOCOL_ERROR)

    def _on_publish(self, publish: Publish) -> None:
        publish = self._resolve_alias(publish)
        if publish.qos == 0:
            self._events.append(MessageReceived(publish))
            return
        assert publish.packet_id is not None  # the codec guarantees an id for QoS > 0
        if publish.qos == 1:
            self._events.append(MessageReceived(publish))
            self._send(PubAck(publish.packet_id))  # on this stream: the one it arrived on (A6)
            return
        if publish.packet_id not in self._inbound_qos2:
            self._inbound_qos2.add(publish.packet_id)
            self._events.append(MessageReceived(publish))
        self._send(PubRec(publish.packet_id))

    def _on_request_ack(self, ack: SubAck | UnsubAck) -> None:
        request = self._requests.get(ack.packet_id)
        expected = Subscribe if isinstance(ack, SubAck) else Unsubscribe
        if request is None or not isinstance(request.packet, expected):
            self.stray_acks += 1
            return
        del self._requests[ack.packet_id]
        if isinstance(request.packet, Subscribe):
            assert isinstance(ack, SubAck)
            subs = request.packet.subscriptions
            if len(ack.reason_codes) != len(subs):
                raise RemoteProtocolError(f"SUBACK has {len(ack.reason_codes)} codes for {len(subs)} filters")
            for sub, code in zip(subs, ack.reason_codes, strict=True):
                if code < 0x80:
                    self._subscriptions[sub.topic_filter] = sub
                elif request.ours:
                    self._subscriptions.pop(sub.topic_filter, None)  # refused now: stop re-issuing it
            if not request.ours:
                self._events.append(Subscribed(ack.packet_id, ack.reason_codes))
        else:
            self._events.append(Unsubscribed(ack.packet_id, ack.reason_codes))

    def _sent(self, packet_id: int, stage: _Stage, qos: int) -> _Outgoing | None:
        record = self._outgoing.get(packet_id)
        if record is None or record.stage is not stage or record.publish.qos != qos:
            self.stray_acks += 1
            return None
        return record

    def _complete(self, packet_id: int, reason_code: int) -> None:
        del self._outgoing[packet_id]
        self._events.append(PublishAcked(packet_id, reason_code))
        self._send_unsent()

    def _resolve_alias(self, publish: Publish) -> Publish:
        alias = publish.properties.topic_alias
        if alias is None:
            if not publish.topic:
                raise RemoteProtocolError("PUBLISH with an empty topic and no Topic Alias")
            return publish
        if self.level != MQTT_5 or not 1 <= alias <= self.config.topic_alias_maximum:
            raise RemoteProtocolError(f"Topic Alias {alias} outside 1..{self.config.topic_alias_maximum}",
                                      ReasonCode.TOPIC_ALIAS_INVALID)
        if publish.topic:
            self._aliases[alias] = publish.topic
            topic = publish.topic
        else:
            known = self._aliases.get(alias)
            if known is None:
                raise RemoteProtocolError(f"Topic Alias {alias} used before it was set on this stream")
            topic = known
        return replace(publish, topic=topic, properties=replace(publish.properties, topic_alias=None))

    # -- helpers -----------------------------------------------------------------------------------------

    def _new_decoder(self) -> Decoder:
        return Decoder(self.level, self.config.maximum_packet_size or MAX_PACKET_SIZE)

    def _send(self, packet: Packet) -> None:
        self._out += encode(packet, self.level, self.limits.maximum_packet_size)

    def _send_publish(self, message: Publish, dup: bool = False) -> None:
        self._out += encode_publish(message.topic, message.payload, message.qos, message.retain, dup,
                                    message.packet_id, self.level, message.properties,
                                    self.limits.maximum_packet_size)

    def _send_unsent(self) -> None:
        """Send queued publishes (resends on a new stream) while the window has room, in order."""
        if not self.attached:
            return
        in_window = sum(1 for r in self._outgoing.values() if r.stage is not _Stage.UNSENT)
        for packet_id, record in list(self._outgoing.items()):
            if in_window >= self.inflight_window:
                break
            if record.stage is not _Stage.UNSENT:
                continue
            try:
                self._send_publish(record.publish, dup=record.sent_before)
            except LocalProtocolError as exc:
                if exc.reason_code != ReasonCode.PACKET_TOO_LARGE:
                    raise
                # A new server with a smaller Maximum Packet Size (MQTT-3.1.2-25: behave as if sent).
                del self._outgoing[packet_id]
                self._events.append(PublishAcked(packet_id, ReasonCode.PACKET_TOO_LARGE))
                continue
            if record.sent_before:
                self.resent += 1
            record.stage = _Stage.SENT
            record.sent_before = True
            in_window += 1

    def _allocate_packet_id(self) -> int:
        """Next id after the last one, skipping ids in use here or on another stream of the connection."""
        for _ in range(MAX_PACKET_ID):
            candidate = self._next_packet_id
            self._next_packet_id = candidate % MAX_PACKET_ID + 1
            if not self.packet_id_in_use(candidate) and not self._registry.held_elsewhere(candidate, self):
                return candidate
        raise InflightWindowFull("all 65535 packet identifiers are in use on this connection")

