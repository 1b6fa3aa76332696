"""The broker core: the MQTT 3.1.1/5.0 server side of every connection, bytes in and bytes out, no I/O.

Theory of operation. Listeners give each network connection an id and call `connection_opened`,
`data_received` and `connection_lost`, passing monotonic time in seconds. The core decodes packets,
runs the protocol (CONNECT, sessions, routing, retained messages, wills, keepalive) and collects
output: bytes per connection and connections to close. After each batch of input (one event-loop
iteration) the owner calls `drain()` and writes each connection's bytes in one write, then closes
the listed connections (after their final bytes). Timers are the owner's job too: it calls
`handle_deadlines(now)` at `next_deadline()`.

Invariants:
- A connection is in `_conns` from `connection_opened` until the core closes it or it is lost;
  afterwards input for its id is ignored, so the listener's late callbacks are harmless.
- A session is attached to at most one connection (`Session.conn_id`); a second CONNECT with the
  same client id takes the session over and closes the first connection (DISCONNECT 0x8E in v5).
- A protocol violation by one client closes that connection only (DISCONNECT with the reason code
  in v5); nothing raised by the protocol escapes to the listener.
- Deadlines sit in one heap with lazy invalidation: an entry counts only if its time still equals
  the owner's current deadline (`Connection.deadline`, `Session.expires_at`, the delayed will's).
- Durability (when built with `journal=True`): every change to a persistent session's queue or to
  the retained store becomes an intent in the journal (see `core.persistence`). A PUBACK/PUBREC whose
  message produced intents is held until the owner reports that journal batch committed; the acks
  a connection sends after it wait behind it, so acknowledgements keep the order of the PUBLISHes
  (MQTT-4.6.0-2/3). A hook may hold an ack the same way (`ACK_LATER`, `complete_ack`).
- Exactly once for inbound QoS 2: a persistent session's unreleased QoS 2 packet ids are journaled in
  the batch that routed the message, and each id remembers that batch. A resent PUBLISH (a new
  connection, DUP set) is never routed again and its PUBREC waits for that same batch, so no PUBREC
  goes out before the message is durable. PUBCOMP (and a refusing PUBREC) frees the id for reuse by
  the client, so it waits until the id's deletion is durable: otherwise a restart would revive the
  id and drop the client's next message under it as a resend.
- No acknowledgement for a message nobody took: when subscribers matched but every one of them
  dropped the message because its queue was full (`max_queued_messages`), an MQTT 5 publisher gets
  PUBACK/PUBREC 0x97 (Quota exceeded) and keeps the message to retry. MQTT 3.1.1 has no negative
  ack, so the broker closes a 3.1.1 publisher's connection instead of acknowledging (its will is
  published, as for any connection the server closes); with clean session 0 the client resends the
  message, DUP set, after it reconnects. If at least one subscriber took the message the ack is
  0x00 and the drops are only counted (`messages_dropped`): a retry would duplicate it for the others,
  and one abandoned subscriber must not stall every publisher. QoS 0 drops are only counted.
- Authentication may be deferred (`deferred_auth=True`): CONNECT becomes an `AuthRequest` for the
  owner; packets the client pipelines behind its CONNECT wait in the connection's backlog until
  `auth_completed` decides.
- Back-pressure: the owner marks a connection congested when its socket's write buffer passes the
  high-water mark. QoS 0 messages for it are dropped (counted), QoS 1/2 ones wait in its session's
  queue until `set_congested(conn_id, False)`.
"""

from __future__ import annotations

import heapq
import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from enum import Enum

from cloud_broker.core.hooks import ACK_LATER, Authenticator, Authorizer, MessageHook
from cloud_broker.core.model import (
    AuthRequest,
    AuthResult,
    ClientInfo,
    Message,
    StoredDelivery,
    SubscriptionEntry,
)
from cloud_broker.core.persistence import (
    DeleteDelivery,
    DeleteInboundQos2,
    DeleteRetained,
    DeleteSession,
    Intent,
    MarkReleased,
    MarkSent,
    SaveDelivery,
    SaveInboundQos2,
    SaveRetained,
    SaveSession,
    SessionRecord,
    StoredState,
)
from cloud_broker.core.retained import RetainedStore
from cloud_broker.core.router import Router, SharedGroup
from cloud_broker.core.session import Delivery, Session
from cloud_broker.core.settings import SESSION_NEVER_EXPIRES, CoreSettings
from uplink.mqtt.codec import Decoder, encode, encode_publish
from uplink.mqtt.errors import ProtocolError, RemoteProtocolError
from uplink.mqtt.packets import (
    MAX_PACKET_SIZE,
    MQTT_5,
    MQTT_311,
    NO_PROPERTIES,
    SUBACK_FAILURE_311,
    ConnAck,
    Connect,
    ConnectReturnCode,
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
    UnsubAck,
    Unsubscribe,
    Will,
)
from uplink.mqtt.topics import TopicError, parse_shared, validate_topic_filter

_DL_CONNECTION = 0  # connect timeout, then keepalive
_DL_SESSION = 1  # expiry of a detached session
_DL_WILL = 2  # delayed will (MQTT 5 Will Delay Interval)

_MAX_RECEIVE = 65535
# Packets a client may pipeline behind its CONNECT while a deferred authentication runs.
_MAX_AUTH_BACKLOG = 64
# Topics under this prefix are the broker's own statistics: republished often, never journaled.
SYS_PREFIX = "$SYS/"
# `_accept`'s verdict when subscribers matched but every one's queue was full (0x97 at MQTT 5). Kept
# apart from a hook's own 0x97, which 3.1.1 acks like its other refusals.
_QUEUES_FULL = -2


class _State(Enum):
    AWAITING_CONNECT = 0
    CONNECTED = 1
    CLOSED = 2
    AUTHENTICATING = 3


class _HeldAck:
    """An acknowledgement waiting for its journal batch to commit and/or a hook to settle it."""

    __slots__ = ("batch", "data", "kind", "level", "packet_id", "ticket")

    def __init__(self, batch: int, data: bytes | None, ticket: int, kind: int, packet_id: int,
                 level: int) -> None:
        self.batch = batch
        self.data = data  # None until the hook settled it
        self.ticket = ticket
        self.kind = kind  # 1: PUBACK, 2: PUBREC, 3: PUBCOMP
        self.packet_id = packet_id
        self.level = level


class Counters:
    """Totals since start, for `$SYS` and metrics. Plain attributes: incremented on the hot path."""

    __slots__ = ("auth_failures", "bytes_received", "bytes_sent", "connections_total", "messages_dropped",
                 "messages_received", "messages_sent", "protocol_violations", "publish_quota_exceeded",
                 "publish_refused", "qos0_dropped_congested")

    def __init__(self) -> None:
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_received = 0  # PUBLISH packets accepted from clients
        self.messages_sent = 0  # PUBLISH packets written to clients (resends included)
        self.messages_dropped = 0  # queue full, too large for the client, or expired
        self.qos0_dropped_congested = 0
        self.publish_refused = 0  # not authorized
        self.publish_quota_exceeded = 0  # every matching subscriber's queue was full (see _accept)
        self.protocol_violations = 0
        self.auth_failures = 0
        self.connections_total = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Connection:
    """One network connection's protocol state. Owned by the Broker."""

    __slots__ = (
        "aliases",
        "backlog",
        "cert_identity",
        "client",
        "congested",
        "conn_id",
        "connect_expiry_s",
        "deadline",
        "decoder",
        "held",
        "inflight_window",
        "keepalive_window_s",
        "last_rx",
        "max_packet_size_out",
        "opened_at",
        "peer",
        "pending_connect",
        "protocol_level",
        "receive_limit",
        "session",
        "state",
        "violation",
        "will",
    )

    def __init__(self, conn_id: int, peer: str, now: float, max_packet_size: int,
                 cert_identity: str | None = None, receive_limit: int = _MAX_RECEIVE) -> None:
        self.conn_id = conn_id
        # Unacknowledged inbound QoS 1/2 PUBLISHes allowed: Receive Maximum, times the windows of a
        # multi-stream (QUIC) connection whose listener enforces Receive Maximum per stream.
        self.receive_limit = receive_limit
        self.peer = peer
        self.cert_identity = cert_identity
        self.congested = False
        self.held: deque[_HeldAck] | None = None  # acknowledgements waiting (see the module docstring)
        # While AUTHENTICATING: the CONNECT, the client id in use, the id we assigned (v5), the will.
        self.pending_connect: tuple[Connect, str, str | None, Will | None] | None = None
        self.backlog: list[Packet] = []  # packets pipelined behind a CONNECT being authenticated
        # A violation that arrived behind a CONNECT being authenticated: answered after its CONNACK.
        self.violation: ProtocolError | None = None
        self.opened_at = now
        self.last_rx = now
        self.decoder = Decoder(None, max_packet_size)
        self.state = _State.AWAITING_CONNECT
        self.protocol_level = MQTT_311
        self.session: Session | None = None
        self.client: ClientInfo | None = None
        self.will: Will | None = None
        self.keepalive_window_s: float | None = None  # None: no keepalive enforcement
        self.deadline: float | None = None  # time of this connection's live heap entry
        self.aliases: dict[int, str] = {}  # inbound Topic Alias -> topic name
        self.inflight_window = _MAX_RECEIVE
        self.max_packet_size_out = MAX_PACKET_SIZE
        self.connect_expiry_s = 0  # Session Expiry Interval the client asked for in CONNECT


def _reason_311(reason: int) -> int:
    """The MQTT 3.1.1 CONNACK return code closest to an MQTT 5 CONNACK reason code."""
    if reason == ReasonCode.SUCCESS:
        return ConnectReturnCode.ACCEPTED
    if reason == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
        return ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION
    if reason == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID:
        return ConnectReturnCode.IDENTIFIER_REJECTED
    if reason == ReasonCode.BAD_USER_NAME_OR_PASSWORD:
        return ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD
    if reason in (ReasonCode.NOT_AUTHORIZED, ReasonCode.BANNED, ReasonCode.BAD_AUTHENTICATION_METHOD):
        return ConnectReturnCode.NOT_AUTHORIZED
    return ConnectReturnCode.SERVER_UNAVAILABLE


def _stored(delivery: Delivery) -> StoredDelivery:
    return StoredDelivery(delivery.message, delivery.qos, delivery.retain, delivery.subscription_ids)


def _default_client_id() -> str:
    return "fg-" + secrets.token_hex(10)


class Broker:
    """All sessions, subscriptions and retained messages, serving every connection of every listener."""

    def __init__(
        self,
        settings: CoreSettings | None = None,
        *,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
        hooks: Sequence[MessageHook] = (),
        client_id_factory: Callable[[], str] = _default_client_id,
        journal: bool = False,
        deferred_auth: bool = False,
    ) -> None:
        self.settings = settings = settings or CoreSettings()
        settings.validate()
        self._authenticator = authenticator
        self._deferred_auth = deferred_auth
        self._auth_requests: list[AuthRequest] = []
        self._authorizer = authorizer  # None: everything allowed (skips a call on the hot path)
        self._hooks = tuple(hooks)
        self.counters = Counters()
        # Journal (see the module docstring): intents of the open batch, its number, the last committed.
        self._journal_on = journal
        self._journal: list[Intent] = []
        self._batch = 1
        self._committed = 0
        self._held_conns: set[int] = set()  # connections with held acknowledgements
        self._tickets: dict[int, tuple[int, _HeldAck]] = {}  # hook ticket -> (conn_id, held ack)
        self._next_ticket = 0
        self._new_client_id = client_id_factory
        self._conns: dict[int, Connection] = {}
        self._sessions: dict[str, Session] = {}
        self._router = Router()
        self._retained = RetainedStore(on_expired=self._retained_expired)
        self._delayed_wills: dict[str, tuple[float, ClientInfo, Message]] = {}
        self._deadlines: list[tuple[float, int, int, int | str]] = []
        self._deadline_seq = 0
        self._writes: dict[int, list[bytes]] = {}
        self._closes: list[int] = []
        self._connack_properties = Properties(
            receive_maximum=settings.receive_maximum if settings.receive_maximum != _MAX_RECEIVE else None,
            maximum_packet_size=(
                settings.max_packet_size_bytes if settings.max_packet_size_bytes < MAX_PACKET_SIZE else None
            ),
            topic_alias_maximum=settings.topic_alias_maximum or None,
            maximum_qos=settings.maximum_qos if settings.maximum_qos < 2 else None,
            retain_available=int(settings.retain_available),
            wildcard_subscription_available=int(settings.wildcard_subscription_available),
            subscription_identifier_available=int(settings.subscription_identifier_available),
            shared_subscription_available=int(settings.shared_subscription_available),
        )

    # ---------------------------------------------------------------- inputs from listeners and timers

    def connection_opened(self, conn_id: int, peer: str, now: float,
                          cert_identity: str | None = None, receive_windows: int = 1) -> None:
        """A listener accepted a connection; it has `connect_timeout_s` to send CONNECT.

        `cert_identity` is the identity the transport verified (TLS client certificate), if any.
        `receive_windows` > 1: the connection multiplexes that many streams, each with its own Receive
        Maximum window that the listener enforces (MQTT over QUIC, EMQX semantics); the core then
        allows that many windows' worth of unacknowledged PUBLISHes on the one session, bounded by the
        packet identifier space.
        """
        if receive_windows < 1:
            raise ValueError("receive_windows must be at least 1")
        limit = min(_MAX_RECEIVE, self.settings.receive_maximum * receive_windows)
        conn = Connection(conn_id, peer, now, self.settings.max_packet_size_bytes, cert_identity, limit)
        self._conns[conn_id] = conn
        self.counters.connections_total += 1
        self._schedule_connection(conn, now + self.settings.connect_timeout_s)

    def data_received(self, conn_id: int, data: bytes, now: float) -> None:
        """Bytes arrived on a connection. Violations close that connection only."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        conn.last_rx = now
        self.counters.bytes_received += len(data)
        if conn.violation is not None:
            return  # its decoder failed already; the violation is answered once its CONNECT is
        try:
            packets = conn.decoder.feed(data)
        except RemoteProtocolError as exc:
            # The valid packets that preceded the violation in this chunk are served first, so a
            # CONNECT followed by garbage gets CONNACK 0 and then DISCONNECT, not a failed CONNACK.
            self._handle_all(conn, list(exc.packets_before), now)
            if conn.state is _State.AUTHENTICATING:
                conn.violation = exc
            elif conn.state is not _State.CLOSED:
                self._violation(conn, exc, now)
            return
        self._handle_all(conn, packets, now)

    def _handle_all(self, conn: Connection, packets: list[Packet], now: float) -> None:
        for i, packet in enumerate(packets):
            state = conn.state
            if state is _State.CLOSED:
                return
            if state is _State.AUTHENTICATING:
                conn.backlog.extend(packets[i:])
                if len(conn.backlog) > _MAX_AUTH_BACKLOG:
                    self._violation(conn, RemoteProtocolError(
                        "too many packets before CONNACK", ReasonCode.QUOTA_EXCEEDED), now)
                return
            try:
                self._handle(conn, packet, now)
            except ProtocolError as exc:
                self._violation(conn, exc, now)
                return

    def connection_lost(self, conn_id: int, now: float) -> None:
        """The network connection ended without us closing it: an abnormal disconnect unless DISCONNECTed."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            self._close(conn, now, disconnect_reason=None, publish_will=True, tell_listener=False)

    def handle_deadlines(self, now: float) -> None:
        """Run every timer due at or before now: connect timeouts, keepalives, session expiry, wills."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            when, _, kind, key = heapq.heappop(heap)
            if kind == _DL_CONNECTION:
                conn = self._conns.get(key)  # type: ignore[arg-type]
                if conn is not None and conn.deadline == when:
                    self._connection_deadline(conn, now)
            elif kind == _DL_SESSION:
                session = self._sessions.get(key)  # type: ignore[arg-type]
                if session is not None and session.conn_id is None and session.expires_at == when:
                    self._end_session(session, now)
            else:
                will = self._delayed_wills.get(key)  # type: ignore[arg-type]
                if will is not None and will[0] == when:
                    del self._delayed_wills[key]  # type: ignore[arg-type]
                    self._publish_will(will[1], will[2], now)

    def next_deadline(self) -> float | None:
        """The earliest time `handle_deadlines` has work (possibly a little early), or None."""
        return self._deadlines[0][0] if self._deadlines else None

    def shutdown(self, now: float) -> None:
        """Close every connection: DISCONNECT 0x8B (Server shutting down) to MQTT 5 clients; no wills."""
        for conn in list(self._conns.values()):
            reason = ReasonCode.SERVER_SHUTTING_DOWN if conn.state is _State.CONNECTED else None
            self._close(conn, now, disconnect_reason=reason, publish_will=False)

    def drain(self) -> tuple[list[tuple[int, bytes]], list[int]]:
        """Take the output: (conn_id, bytes) to write, in order, then conn_ids to close after writing."""
        writes = [(cid, b"".join(chunks)) for cid, chunks in self._writes.items()]
        self._writes = {}
        closes, self._closes = self._closes, []
        sent = 0
        for _cid, data in writes:
            sent += len(data)
        self.counters.bytes_sent += sent
        return writes, closes

    def has_output(self) -> bool:
        return bool(self._writes or self._closes)

    def needs_flush(self) -> bool:
        """Whether the owner has anything to take: output, journal intents or authentication requests."""
        return bool(self._writes or self._closes or self._journal or self._auth_requests)

    # ---------------------------------------------------------------- durability, deferred decisions

    def has_journal(self) -> bool:
        """Whether intents wait to be taken with `drain_journal`."""
        return bool(self._journal)

    def drain_journal(self) -> tuple[int, list[Intent]]:
        """Take the open batch of intents and its number; the owner applies batches in this order."""
        batch, intents = self._batch, self._journal
        self._journal = []
        self._batch += 1
        return batch, intents

    def journal_committed(self, batch: int, now: float) -> None:
        """Every batch up to `batch` is durable: release the acknowledgements that waited for it."""
        if batch <= self._committed:
            return
        self._committed = batch
        for conn_id in list(self._held_conns):
            conn = self._conns.get(conn_id)
            if conn is not None:
                self._release_held(conn)

    def complete_ack(self, ticket: int, reason_code: int, now: float) -> None:
        """A hook settles the acknowledgement it deferred with `ACK_LATER`. Unknown tickets are ignored
        (the connection closed meanwhile: the client will resend)."""
        found = self._tickets.pop(ticket, None)
        if found is None:
            return
        conn_id, held = found
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        v5 = held.level == MQTT_5
        code = reason_code if v5 else 0
        if held.kind == 1:
            held.data = encode(PubAck(held.packet_id, code), held.level)
        else:
            session = conn.session
            if (reason_code >= 0x80 and session is not None
                    and self._forget_inbound_qos2(session, held.packet_id)):
                # Refused: a resend is a new message. The client may reuse the id once it reads this
                # PUBREC, so it waits until the id's deletion is durable (see Session.inbound_qos2_batch).
                held.batch = max(held.batch, session.inbound_qos2_batch)
            held.data = encode(PubRec(held.packet_id, code), held.level)
        held.ticket = 0
        self._release_held(conn)

    def drain_auth_requests(self) -> list[AuthRequest]:
        """CONNECTs waiting for the owner's authenticator (only with `deferred_auth=True`)."""
        out, self._auth_requests = self._auth_requests, []
        return out

    def auth_completed(self, conn_id: int, result: AuthResult, now: float) -> None:
        """The owner's verdict on a deferred CONNECT; the client's pipelined packets run after it."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state is not _State.AUTHENTICATING or conn.pending_connect is None:
            return
        pkt, client_id, assigned, will = conn.pending_connect
        conn.pending_connect = None
        conn.state = _State.AWAITING_CONNECT
        if result.reason_code != ReasonCode.SUCCESS:
            self.counters.auth_failures += 1
            self._refuse(conn, result.reason_code, now)
            return
        self._finish_connect(conn, pkt, client_id, assigned, will, result, now)
        backlog, conn.backlog = conn.backlog, []
        self._handle_all(conn, backlog, now)
        violation, conn.violation = conn.violation, None
        if violation is not None and conn.state is not _State.CLOSED:
            self._violation(conn, violation, now)

    def set_congested(self, conn_id: int, congested: bool, now: float) -> None:
        """The connection's write buffer passed the high-water mark (True) or drained (False)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.congested == congested:
            return
        conn.congested = congested
        session = conn.session
        if not congested and session is not None and session.conn_id == conn_id and session.pending:
            self._pump(conn, session, now)

    def close_connection(self, conn_id: int, reason_code: int, now: float) -> None:
        """The owner ends a connection (e.g. a consumer too slow for too long): abnormal, will published."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            self._close(conn, now, disconnect_reason=reason_code, publish_will=True)

    # ---------------------------------------------------------------- other entry points

    def restore(self, state: StoredState, now: float) -> None:
        """Rebuild retained messages and persistent sessions from storage (once, before serving).

        Deliveries that were in flight go back in flight with their packet ids, to be resent with DUP
        when the client resumes (MQTT-4.4.0-1); the rest wait in the queue in their original order.
        """
        for message in state.retained:
            self._retained.store(message)
        for record in state.sessions:
            session = Session(record.client_id, record.protocol_level, record.expiry_interval_s,
                              self.settings.max_queued_messages)
            session.durable = self._journal_on and record.expiry_interval_s != 0
            for entry in record.subscriptions:
                session.subscriptions[entry.topic_filter] = entry
                self._router.add(entry)
            self._sessions[record.client_id] = session
            if record.expires_at is not None and record.expires_at <= now:
                self._end_session(session, now)
                continue
            if record.expiry_interval_s == SESSION_NEVER_EXPIRES:
                session.expires_at = None
            else:
                session.expires_at = (record.expires_at if record.expires_at is not None
                                      else now + record.expiry_interval_s)
                self._push_deadline(session.expires_at, _DL_SESSION, session.client_id)
        for queued in state.deliveries:
            restored = self._sessions.get(queued.client_id)
            if restored is None:
                continue
            stored = queued.delivery
            delivery = Delivery(stored.message, stored.qos, stored.retain, stored.subscription_ids,
                                queued.released, queued.seq)
            restored.next_seq = max(restored.next_seq, queued.seq + 1)
            if queued.packet_id is not None and queued.packet_id not in restored.inflight:
                restored.inflight[queued.packet_id] = delivery
            else:
                restored.pending.append(delivery)
        for inbound in state.inbound_qos2:
            owner = self._sessions.get(inbound.client_id)
            if owner is not None:
                owner.inbound_qos2[inbound.packet_id] = 0  # stored, hence committed: nothing to wait for

    def publish(self, message: Message, now: float) -> int:
        """Route a message the broker itself originates (rules, `$SYS`); no hooks or authorization.

        Returns the number of sessions it was delivered or queued to (a full queue does not count).
        """
        if message.retain:
            self._store_retained(message)
        return self._route(message, now)[0]

    def open_connections(self) -> list[int]:
        """Ids of the connections the core still considers open."""
        return list(self._conns)

    def session(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def stats(self) -> dict[str, int]:
        """Gauges (connections, sessions, ...) and the counters since start."""
        connected = 0
        for conn in self._conns.values():
            if conn.state is _State.CONNECTED:
                connected += 1
        queued = 0
        for session in self._sessions.values():
            queued += len(session.pending) + len(session.inflight)
        return {
            "connections": len(self._conns),
            "clients_connected": connected,
            "sessions": len(self._sessions),
            "subscriptions": len(self._router),
            "retained": len(self._retained),
            "messages_queued": queued,
            **self.counters.as_dict(),
        }

    # ---------------------------------------------------------------- dispatch

    def _handle(self, conn: Connection, packet: Packet, now: float) -> None:
        if conn.state is _State.AWAITING_CONNECT:
            if not isinstance(packet, Connect):
                raise RemoteProtocolError("the first packet must be CONNECT", ReasonCode.PROTOCOL_ERROR)
            self._on_connect(conn, packet, now)
            return
        kind = type(packet)
        if kind is Publish:
            self._on_publish(conn, packet, now)  # type: ignore[arg-type]
        elif kind is PubAck:
            self._on_puback(conn, packet, now)  # type: ignore[arg-type]
        elif kind is PingReq:
            self._send(conn, PingResp())
        elif kind is Subscribe:
            self._on_subscribe(conn, packet, now)  # type: ignore[arg-type]
        elif kind is Unsubscribe:
            self._on_unsubscribe(conn, packet)  # type: ignore[arg-type]
        elif kind is PubRec:
            self._on_pubrec(conn, packet, now)  # type: ignore[arg-type]
        elif kind is PubRel:
            self._on_pubrel(conn, packet)  # type: ignore[arg-type]
        elif kind is PubComp:
            self._on_pubcomp(conn, packet, now)  # type: ignore[arg-type]
        elif kind is Disconnect:
            self._on_disconnect(conn, packet, now)  # type: ignore[arg-type]
        elif kind is Connect:
            raise RemoteProtocolError("a second CONNECT on one connection", ReasonCode.PROTOCOL_ERROR)
        else:
            # AUTH (enhanced authentication is not offered) and server-to-client packets.
            raise RemoteProtocolError(f"unexpected {packet.type.name} from a client",
                                      ReasonCode.PROTOCOL_ERROR)

    def _violation(self, conn: Connection, exc: ProtocolError, now: float) -> None:
        """Close a connection that broke the protocol, telling the client why where MQTT allows it."""
        self.counters.protocol_violations += 1
        if conn.state is _State.CONNECTED:
            self._close(conn, now, disconnect_reason=exc.reason_code, publish_will=True)
            return
        # Before CONNACK the only allowed answer is a failed CONNACK, and only in a format the client reads.
        level = conn.decoder.protocol_level
        if exc.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            if level == MQTT_5:
                self._send_raw(conn, encode(ConnAck(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION), MQTT_5))
            else:
                # MQTT 3.1 / 3.1.1 / unknown levels all read the 3.1.1 CONNACK layout.
                self._send_raw(conn, encode(ConnAck(False, ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION),
                                            MQTT_311))
        elif level == MQTT_5 and exc.reason_code >= 0x80:
            self._send_raw(conn, encode(ConnAck(False, exc.reason_code), MQTT_5))
        self._close(conn, now, disconnect_reason=None, publish_will=False)

    # ---------------------------------------------------------------- CONNECT

    def _on_connect(self, conn: Connection, pkt: Connect, now: float) -> None:
        settings = self.settings
        level = pkt.protocol_level
        conn.protocol_level = level
        v5 = level == MQTT_5
        props = pkt.properties
        if v5 and props.authentication_method is not None:
            self._refuse(conn, ReasonCode.BAD_AUTHENTICATION_METHOD, now)
            return
        client_id = pkt.client_id
        assigned: str | None = None
        if not client_id:
            # MQTT 3.1.1 requires clean session with an empty id; we apply the same rule to MQTT 5,
            # where a resumable session under an id the client never learns would be a leak.
            if not pkt.clean_start:
                self._refuse(conn, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, now)
                return
            client_id = self._new_client_id()
            while client_id in self._sessions:
                client_id = self._new_client_id()
            if v5:
                assigned = client_id
        elif len(client_id) > settings.max_client_id_length:
            self._refuse(conn, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, now)
            return

        will = pkt.will
        if will is not None:
            if will.qos > settings.maximum_qos:
                if v5:
                    self._refuse(conn, ReasonCode.QOS_NOT_SUPPORTED, now)
                    return
                will = replace(will, qos=settings.maximum_qos)  # 3.1.1 has no code for it: downgrade
            if will.retain and not settings.retain_available:
                if v5:
                    self._refuse(conn, ReasonCode.RETAIN_NOT_SUPPORTED, now)
                    return
                will = replace(will, retain=False)

        anonymous = pkt.username is None and pkt.password is None and conn.cert_identity is None
        if anonymous and settings.allow_anonymous:
            result = AuthResult(ReasonCode.SUCCESS)
        elif self._deferred_auth:
            conn.state = _State.AUTHENTICATING
            conn.pending_connect = (pkt, client_id, assigned, will)
            self._auth_requests.append(AuthRequest(conn.conn_id, client_id, pkt.username, pkt.password,
                                                   conn.peer, conn.cert_identity))
            return
        elif self._authenticator is None:
            # No credentials provider: credentials cannot be checked, so only anonymity can pass.
            result = AuthResult(ReasonCode.SUCCESS if settings.allow_anonymous else ReasonCode.NOT_AUTHORIZED)
        else:
            result = self._authenticator.authenticate(AuthRequest(
                conn.conn_id, client_id, pkt.username, pkt.password, conn.peer, conn.cert_identity))
        if result.reason_code != ReasonCode.SUCCESS:
            self.counters.auth_failures += 1
            self._refuse(conn, result.reason_code, now)
            return
        self._finish_connect(conn, pkt, client_id, assigned, will, result, now)

    def _finish_connect(self, conn: Connection, pkt: Connect, client_id: str, assigned: str | None,
                        will: Will | None, auth: AuthResult, now: float) -> None:
        """The CONNECT is authenticated: keepalive, session (new, resumed or taken over), CONNACK."""
        settings = self.settings
        level = pkt.protocol_level
        v5 = level == MQTT_5
        props = pkt.properties

        # Keepalive: MQTT 5 lets the server impose its own (Server Keep Alive); 3.1.1 clients keep theirs.
        keep_alive_s = pkt.keep_alive_s
        server_keep_alive: int | None = None
        if v5 and settings.server_keep_alive_s is not None and settings.server_keep_alive_s != keep_alive_s:
            keep_alive_s = server_keep_alive = settings.server_keep_alive_s
        conn.keepalive_window_s = keep_alive_s * settings.keepalive_multiplier if keep_alive_s else None

        if v5:
            requested_expiry = props.session_expiry_interval or 0
        else:
            requested_expiry = 0 if pkt.clean_start else SESSION_NEVER_EXPIRES
        conn.connect_expiry_s = requested_expiry
        expiry = requested_expiry
        expiry_override: int | None = None
        if settings.max_session_expiry_s is not None and expiry > settings.max_session_expiry_s:
            expiry = expiry_override = settings.max_session_expiry_s

        # Take over: the old connection ends abnormally (its will follows the usual rules).
        existing = self._sessions.get(client_id)
        if existing is not None and existing.conn_id is not None:
            old = self._conns.get(existing.conn_id)
            if old is not None:
                self._close(old, now, disconnect_reason=ReasonCode.SESSION_TAKEN_OVER, publish_will=True)
            existing = self._sessions.get(client_id)  # an expiry-0 session ended with its connection
        if existing is not None and pkt.clean_start:
            self._end_session(existing, now)
            existing = None
        # A new connection to the session before the Will Delay Interval ran out: no will (MQTT 3.1.3.2.2).
        self._delayed_wills.pop(client_id, None)

        if existing is None:
            session = Session(client_id, level, expiry, settings.max_queued_messages)
            self._sessions[client_id] = session
            session_present = False
        else:
            session = existing
            session.protocol_level = level
            session.expiry_interval_s = expiry
            session.expires_at = None
            session_present = True
        session.conn_id = conn.conn_id
        if self._journal_on:
            if expiry != 0:
                session.durable = True
                self._save_session(session)
            elif session.durable:
                # Resumed without expiry: it ends with this connection, so storage forgets it now
                # (a crash before then must not bring it back).
                session.durable = False
                self._journal.append(DeleteSession(client_id))

        conn.session = session
        username = auth.username if auth.username is not None else pkt.username
        conn.client = ClientInfo(client_id, username, conn.peer, level, conn.cert_identity, auth.role)
        conn.will = will
        conn.state = _State.CONNECTED
        if v5:
            conn.inflight_window = min(props.receive_maximum or _MAX_RECEIVE, settings.max_inflight_messages)
            if props.maximum_packet_size is not None:
                conn.max_packet_size_out = props.maximum_packet_size
        else:
            conn.inflight_window = settings.max_inflight_messages

        if v5:
            connack_props = self._connack_properties
            if assigned is not None or server_keep_alive is not None or expiry_override is not None:
                connack_props = replace(connack_props, assigned_client_identifier=assigned,
                                        server_keep_alive=server_keep_alive,
                                        session_expiry_interval=expiry_override)
            self._send(conn, ConnAck(session_present, ReasonCode.SUCCESS, connack_props))
        else:
            self._send(conn, ConnAck(session_present, ConnectReturnCode.ACCEPTED))

        if conn.keepalive_window_s is not None:
            self._schedule_connection(conn, now + conn.keepalive_window_s)
        else:
            conn.deadline = None

        if session_present:
            self._resend_inflight(conn, session, now)
            self._pump(conn, session, now)

    def _refuse(self, conn: Connection, reason: int, now: float) -> None:
        """Answer CONNECT with a failure CONNACK and close."""
        if conn.protocol_level == MQTT_5:
            self._send(conn, ConnAck(False, reason))
        else:
            self._send(conn, ConnAck(False, _reason_311(reason)))
        self._close(conn, now, disconnect_reason=None, publish_will=False)

    # ---------------------------------------------------------------- PUBLISH from a client

    def _on_publish(self, conn: Connection, pkt: Publish, now: float) -> None:
        settings = self.settings
        topic = pkt.topic
        props = pkt.properties
        qos = pkt.qos
        expires_at: float | None = None
        if props is not NO_PROPERTIES:
            if props.subscription_identifiers:
                raise RemoteProtocolError("a client PUBLISH carries a Subscription Identifier",
                                          ReasonCode.PROTOCOL_ERROR)
            alias = props.topic_alias
            if alias is not None:
                if not 0 < alias <= settings.topic_alias_maximum:
                    raise RemoteProtocolError(f"topic alias {alias} is out of range",
                                              ReasonCode.TOPIC_ALIAS_INVALID)
                if topic:
                    conn.aliases[alias] = topic
                else:
                    found = conn.aliases.get(alias)
                    if found is None:
                        raise RemoteProtocolError(f"topic alias {alias} was never set",
                                                  ReasonCode.TOPIC_ALIAS_INVALID)
                    topic = found
                props = replace(props, topic_alias=None)
            if props.message_expiry_interval is not None:
                expires_at = now + props.message_expiry_interval
        if not topic:
            raise RemoteProtocolError("PUBLISH with an empty topic name and no topic alias",
                                      ReasonCode.PROTOCOL_ERROR)
        if qos > settings.maximum_qos:
            raise RemoteProtocolError(f"QoS {qos} is not supported", ReasonCode.QOS_NOT_SUPPORTED)
        if pkt.retain and not settings.retain_available:
            raise RemoteProtocolError("retained messages are not supported", ReasonCode.RETAIN_NOT_SUPPORTED)

        session = conn.session
        client = conn.client
        assert session is not None and client is not None  # CONNECTED implies both
        pid = pkt.packet_id
        if qos == 2:
            assert pid is not None
            first_batch = session.inbound_qos2.get(pid)
            if first_batch is not None:
                # A re-sent QoS 2 PUBLISH whose first copy we already routed: acknowledge, never route
                # twice. Its PUBREC promises what the first copy's did, so it waits for the same journal
                # batch: the first PUBREC may have died, held, with its connection before that commit.
                self._ack(conn, 2, pid, 0, first_batch, 0)
                return
            if len(session.inbound_qos2) >= conn.receive_limit:
                raise RemoteProtocolError("more unacknowledged QoS 2 PUBLISHes than Receive Maximum",
                                          ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
        held = conn.held
        if qos and held and len(held) >= conn.receive_limit:
            # Acks held behind the journal or a hook count as unacknowledged (MQTT-3.3.4-9).
            raise RemoteProtocolError("more unacknowledged QoS 1/2 PUBLISHes than Receive Maximum",
                                      ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)

        self.counters.messages_received += 1
        journal_before = len(self._journal)
        ticket = 0
        if ((topic[0] == "$" and topic.startswith(SYS_PREFIX))
                or (self._authorizer is not None and not self._authorizer.can_publish(client, topic))):
            # $SYS/ is the broker's own. MQTT 5: PUBACK/PUBREC 0x87. MQTT 3.1.1 cannot say no: the
            # message is acked and dropped (for QoS 0 it is dropped silently at both levels).
            self.counters.publish_refused += 1
            reason: int = ReasonCode.NOT_AUTHORIZED
        else:
            message = Message(topic, pkt.payload, qos, pkt.retain, props, expires_at, client.client_id)
            if qos and self._hooks:
                self._next_ticket += 1
                ticket = self._next_ticket
            reason = self._accept(client, message, now, ticket, pid or 0)
        if qos == 0:
            return
        assert pid is not None
        if reason == _QUEUES_FULL:
            if conn.protocol_level != MQTT_5:
                # MQTT 3.1.1 has no negative PUBACK, and acking would tell the client we own a message
                # nobody took. Closing without the ack is 3.1.1's way to refuse (cf. MQTT-3.3.5-2): the
                # client resends it, DUP set, when it reconnects with its session (clean session 0).
                self._close(conn, now, disconnect_reason=None, publish_will=True)
                return
            reason = ReasonCode.QUOTA_EXCEEDED
        journaled = len(self._journal) > journal_before
        if qos == 2 and reason < 0x80:
            if session.durable:
                # Same batch as the message's deliveries: after a crash both exist or neither does.
                self._journal.append(SaveInboundQos2(session.client_id, pid))
                session.inbound_qos2_batch = self._batch
                journaled = True
            session.inbound_qos2[pid] = self._batch if journaled else 0
        self._ack(conn, qos, pid, reason, self._batch if journaled else 0,
                  ticket if reason == ACK_LATER else 0)

    def _ack(self, conn: Connection, kind: int, pid: int, reason: int, batch: int, ticket: int) -> None:
        """PUBACK (kind 1), PUBREC (2) or PUBCOMP (3) now, or held until journal batch `batch` is
        committed (0: nothing to wait for), a hook settled it (`ticket`) and earlier held acks went out."""
        level = conn.protocol_level
        if ticket:
            data = None
        else:
            # MQTT 3.1.1 acks carry no reason code.
            code = reason if level == MQTT_5 else 0
            packet: Packet
            if kind == 1:
                packet = PubAck(pid, code)
            elif kind == 2:
                packet = PubRec(pid, code)
            else:
                packet = PubComp(pid, code)
            data = encode(packet, level)
        held = conn.held
        if batch <= self._committed:
            batch = 0
        if not batch and not ticket and not held:
            self._write(conn.conn_id, data)  # type: ignore[arg-type]  # ticket 0 implies data
            return
        entry = _HeldAck(batch, data, ticket, kind, pid, level)
        if held is None:
            held = conn.held = deque()
        held.append(entry)
        self._held_conns.add(conn.conn_id)
        if ticket:
            self._tickets[ticket] = (conn.conn_id, entry)
        self._release_held(conn)

    def _release_held(self, conn: Connection) -> None:
        """Write held acknowledgements from the front while they are settled and durable."""
        held = conn.held
        if not held:
            return
        committed = self._committed
        while held:
            entry = held[0]
            if entry.ticket or entry.batch > committed:
                return
            held.popleft()
            assert entry.data is not None
            self._write(conn.conn_id, entry.data)
        self._held_conns.discard(conn.conn_id)

    def _accept(self, client: ClientInfo, message: Message, now: float, ticket: int = 0,
                packet_id: int = 0) -> int:
        """Hooks, retained store, routing; returns the PUBACK/PUBREC reason code, ACK_LATER or
        _QUEUES_FULL."""
        for hook in self._hooks:
            verdict = hook.on_publish(client, message, ticket, packet_id)
            if verdict is not None:
                return verdict
        if message.retain:
            self._store_retained(message)
        taken, full = self._route(message, now)
        if taken:
            return ReasonCode.SUCCESS
        if full:
            # Subscribers matched but every one of them had a full queue: nobody owns the message, so
            # the publisher must keep it and retry (0x97 Quota exceeded) rather than settle it.
            self.counters.publish_quota_exceeded += 1
            return _QUEUES_FULL
        return ReasonCode.NO_MATCHING_SUBSCRIBERS

    def _store_retained(self, message: Message) -> None:
        if self._retained.store(message) and self._journal_on and not message.topic.startswith(SYS_PREFIX):
            if message.payload:
                self._journal.append(SaveRetained(message))
            else:
                self._journal.append(DeleteRetained(message.topic))

    def _retained_expired(self, topic: str) -> None:
        if self._journal_on:
            self._journal.append(DeleteRetained(topic))

    # ---------------------------------------------------------------- routing and delivery

    def _route(self, message: Message, now: float) -> tuple[int, int]:
        """Deliver message to every matching session; returns (sessions that took it, sessions that
        dropped it because their queue was full)."""
        targets = self._router.match(message.topic)
        if not targets:
            return 0, 0
        # Encoded QoS 0 PUBLISH per (protocol level, retain flag, subscription ids): fan-out encodes once.
        cache: dict[tuple[int, bool, tuple[int, ...]], bytes | None] = {}
        sessions = self._sessions
        if len(targets) == 1 and type(targets[0]) is SubscriptionEntry:
            entry = targets[0]
            if entry.no_local and entry.client_id == message.publisher_id:
                return 0, 0
            session = sessions[entry.client_id]
            sub_ids: tuple[int, ...] = (entry.subscription_id,) if entry.subscription_id is not None else ()
            retain = message.retain and entry.retain_as_published
            delivery = Delivery(message, min(entry.qos, message.qos), retain, sub_ids)
            if self._deliver(session, delivery, now, cache):
                return 1, 0
            return 0, 1
        # A client whose filters overlap gets one copy: the highest QoS, every Subscription Identifier.
        merged: dict[str, tuple[int, bool, tuple[int, ...]]] = {}
        taken = full = 0
        for target in targets:
            if type(target) is SharedGroup:
                picked = target.pick(self._is_online)
                if picked is None:
                    continue
                picked_ids = (picked.subscription_id,) if picked.subscription_id is not None else ()
                delivery = Delivery(message, min(picked.qos, message.qos), False, picked_ids)
                if self._deliver(sessions[picked.client_id], delivery, now, cache):
                    taken += 1
                else:
                    full += 1
                continue
            assert isinstance(target, SubscriptionEntry)
            if target.no_local and target.client_id == message.publisher_id:
                continue
            ids: tuple[int, ...] = (target.subscription_id,) if target.subscription_id is not None else ()
            seen = merged.get(target.client_id)
            if seen is None:
                merged[target.client_id] = (target.qos, target.retain_as_published, ids)
            else:
                merged[target.client_id] = (max(seen[0], target.qos), seen[1] or target.retain_as_published,
                                            seen[2] + ids)
        for client_id, (qos, rap, ids) in merged.items():
            delivery = Delivery(message, min(qos, message.qos), message.retain and rap, ids)
            if self._deliver(sessions[client_id], delivery, now, cache):
                taken += 1
            else:
                full += 1
        return taken, full

    def _is_online(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        return session is not None and session.conn_id is not None

    def _deliver(self, session: Session, delivery: Delivery, now: float,
                 cache: dict[tuple[int, bool, tuple[int, ...]], bytes | None] | None = None) -> bool:
        """Send or queue a delivery; False only when the session's queue was full and it was dropped.

        Other losses count as taken: a QoS 0 delivery the session does not queue or cannot read in
        time is what QoS 0 allows, and one too large for the client or expired will never fit, so a
        retry by the publisher could not help.
        """
        conn = self._conns.get(session.conn_id) if session.conn_id is not None else None
        if conn is None:
            if delivery.qos > 0 or self.settings.queue_qos0_offline:
                return self._enqueue(session, delivery)
            return True
        if delivery.qos == 0:
            if conn.congested:
                # The client does not read fast enough: at most once may be never (counted).
                self.counters.qos0_dropped_congested += 1
                return True
            if cache is None:
                data = self._encode_delivery(conn, delivery, 0, False, now)
            else:
                key = (conn.protocol_level, delivery.retain, delivery.subscription_ids)
                if key in cache and delivery.message.expires_at is None:
                    data = cache[key]
                else:
                    data = self._encode_delivery(conn, delivery, 0, False, now)
                    cache[key] = data
            if data is not None and len(data) <= conn.max_packet_size_out:
                self.counters.messages_sent += 1
                self._write(conn.conn_id, data)
            return True
        if session.pending or conn.congested or len(session.inflight) >= conn.inflight_window:
            return self._enqueue(session, delivery)
        if session.durable:
            delivery.seq = seq = session.next_seq
            session.next_seq = seq + 1
            pid = self._send_inflight(conn, session, delivery, now)
            if pid:
                self._journal.append(SaveDelivery(session.client_id, seq, _stored(delivery), pid))
            return True
        self._send_inflight(conn, session, delivery, now)
        return True

    def _enqueue(self, session: Session, delivery: Delivery) -> bool:
        """Queue a delivery (journaled for a durable session); False when the queue was full."""
        if not session.enqueue(delivery):
            self.counters.messages_dropped += 1
            return False
        if session.durable:
            delivery.seq = seq = session.next_seq
            session.next_seq = seq + 1
            self._journal.append(SaveDelivery(session.client_id, seq, _stored(delivery)))
        return True

    def _settled(self, session: Session, delivery: Delivery) -> None:
        """A journaled delivery left the session (acknowledged, refused, dropped or expired)."""
        if delivery.seq and session.durable:
            self._journal.append(DeleteDelivery(session.client_id, delivery.seq))

    def _send_inflight(self, conn: Connection, session: Session, delivery: Delivery, now: float) -> int:
        """Send a QoS 1/2 delivery with a fresh packet id and return it; 0 when it was dropped instead
        (expired, or too large for the client)."""
        pid = session.allocate_packet_id()
        data = self._encode_delivery(conn, delivery, pid, False, now)
        if data is None or len(data) > conn.max_packet_size_out:
            # MQTT 5 3.1.2.11.4: a message larger than the client's Maximum Packet Size is discarded.
            session.dropped_messages += 1
            self.counters.messages_dropped += 1
            return 0
        session.inflight[pid] = delivery
        self.counters.messages_sent += 1
        self._write(conn.conn_id, data)
        return pid

    def _encode_delivery(self, conn: Connection, delivery: Delivery, pid: int, dup: bool,
                         now: float) -> bytes | None:
        """The PUBLISH bytes for this connection, or None when the message expired."""
        message = delivery.message
        props = NO_PROPERTIES
        if conn.protocol_level == MQTT_5:
            props = message.properties
            if message.expires_at is not None:
                remaining = message.expires_at - now
                if remaining <= 0:
                    return None
                props = replace(props, message_expiry_interval=math.ceil(remaining))
            if delivery.subscription_ids:
                props = replace(props, subscription_identifiers=delivery.subscription_ids)
        elif message.expires_at is not None and message.expires_at <= now:
            return None
        return encode_publish(message.topic, message.payload, delivery.qos, delivery.retain, dup,
                              pid if delivery.qos else None, conn.protocol_level, props)

    def _pump(self, conn: Connection, session: Session, now: float) -> None:
        """Move queued deliveries out while the client's Receive Maximum and its socket allow."""
        pending = session.pending
        journal = self._journal
        while pending and len(session.inflight) < conn.inflight_window and not conn.congested:
            delivery = pending.popleft()
            if delivery.qos == 0:
                data = self._encode_delivery(conn, delivery, 0, False, now)
                if data is not None and len(data) <= conn.max_packet_size_out:
                    self.counters.messages_sent += 1
                    self._write(conn.conn_id, data)
                self._settled(session, delivery)
            else:
                pid = self._send_inflight(conn, session, delivery, now)
                if delivery.seq and session.durable:
                    if pid:
                        journal.append(MarkSent(session.client_id, delivery.seq, pid))
                    else:
                        journal.append(DeleteDelivery(session.client_id, delivery.seq))

    def _resend_inflight(self, conn: Connection, session: Session, now: float) -> None:
        """On session resumption, resend unacknowledged PUBLISHes (DUP set) and PUBRELs, in order,
        with their original packet ids (MQTT-4.4.0-1). Messages that expired meanwhile are dropped."""
        for pid, delivery in list(session.inflight.items()):
            if delivery.released:
                self._send(conn, PubRel(pid))
                continue
            data = self._encode_delivery(conn, delivery, pid, True, now)
            if data is None or len(data) > conn.max_packet_size_out:
                del session.inflight[pid]
                self.counters.messages_dropped += 1
                self._settled(session, delivery)
                continue
            self.counters.messages_sent += 1
            self._write(conn.conn_id, data)

    # ---------------------------------------------------------------- acknowledgements from a client

    def _on_puback(self, conn: Connection, pkt: PubAck, now: float) -> None:
        session = conn.session
        assert session is not None
        delivery = session.inflight.get(pkt.packet_id)
        if delivery is None or delivery.qos != 1:
            return  # unknown or already settled (a late duplicate): nothing to do
        del session.inflight[pkt.packet_id]
        if delivery.seq:
            self._settled(session, delivery)
        if session.pending:
            self._pump(conn, session, now)

    def _on_pubrec(self, conn: Connection, pkt: PubRec, now: float) -> None:
        session = conn.session
        assert session is not None
        delivery = session.inflight.get(pkt.packet_id)
        if delivery is None or delivery.qos != 2:
            self._send(conn, PubRel(pkt.packet_id, self._not_found(conn)))
            return
        if pkt.reason_code >= 0x80:
            # The client refused the message: the exchange ends here (MQTT 5 4.3.3).
            del session.inflight[pkt.packet_id]
            self._settled(session, delivery)
            self._pump(conn, session, now)
            return
        if not delivery.released:
            delivery.released = True
            if delivery.seq and session.durable:
                self._journal.append(MarkReleased(session.client_id, delivery.seq))
        self._send(conn, PubRel(pkt.packet_id))

    def _on_pubcomp(self, conn: Connection, pkt: PubComp, now: float) -> None:
        session = conn.session
        assert session is not None
        delivery = session.inflight.get(pkt.packet_id)
        if delivery is None or not delivery.released:
            return
        del session.inflight[pkt.packet_id]
        self._settled(session, delivery)
        if session.pending:
            self._pump(conn, session, now)

    def _on_pubrel(self, conn: Connection, pkt: PubRel) -> None:
        session = conn.session
        assert session is not None
        code = 0 if self._forget_inbound_qos2(session, pkt.packet_id) else self._not_found(conn)
        # PUBCOMP frees the id for the client's next message, so it waits until the id's deletion is
        # durable; for an unknown id too, which may be a resent PUBREL whose first copy deleted the id
        # in a batch that is not committed yet. Most of the time that batch is long committed.
        self._ack(conn, 3, pkt.packet_id, code, session.inbound_qos2_batch, 0)

    def _forget_inbound_qos2(self, session: Session, pid: int) -> bool:
        """Free an inbound QoS 2 packet id (journaled for a durable session); False if it was unknown."""
        if session.inbound_qos2.pop(pid, None) is None:
            return False
        if session.durable:
            self._journal.append(DeleteInboundQos2(session.client_id, pid))
            session.inbound_qos2_batch = self._batch
        return True

    @staticmethod
    def _not_found(conn: Connection) -> int:
        """Reason code for an ack naming a packet id we do not know (3.1.1 acks have no code)."""
        return ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if conn.protocol_level == MQTT_5 else 0

    # ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE

    def _on_subscribe(self, conn: Connection, pkt: Subscribe, now: float) -> None:
        settings = self.settings
        session = conn.session
        client = conn.client
        assert session is not None and client is not None
        v5 = conn.protocol_level == MQTT_5
        ids = pkt.properties.subscription_identifiers
        sub_id = ids[0] if ids else None
        if sub_id is not None and not settings.subscription_identifier_available:
            raise RemoteProtocolError("subscription identifiers are not supported",
                                      ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED)
        codes: list[int] = []
        retained_for: list[tuple[SubscriptionEntry, str]] = []
        for sub in pkt.subscriptions:
            flt = sub.topic_filter
            try:
                validate_topic_filter(flt)
                group, inner = parse_shared(flt)
            except TopicError:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else SUBACK_FAILURE_311)
                continue
            if group is not None:
                if sub.no_local:
                    raise RemoteProtocolError("No Local on a shared subscription", ReasonCode.PROTOCOL_ERROR)
                if not settings.shared_subscription_available:
                    codes.append(ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if v5 else SUBACK_FAILURE_311)
                    continue
            if not settings.wildcard_subscription_available and ("+" in inner or "#" in inner):
                codes.append(ReasonCode.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED if v5 else SUBACK_FAILURE_311)
                continue
            if self._authorizer is not None and not self._authorizer.can_subscribe(client, flt):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else SUBACK_FAILURE_311)
                continue
            qos = min(sub.qos, settings.maximum_qos)
            entry = SubscriptionEntry(client.client_id, flt, qos, sub.no_local, sub.retain_as_published,
                                      sub.retain_handling, sub_id)
            old = session.subscriptions.get(flt)
            if old is not None:
                self._router.remove(old)
            session.subscriptions[flt] = entry
            self._router.add(entry)
            codes.append(qos)
            # Retained messages are never sent for shared subscriptions (MQTT 5 4.8.2).
            wanted = sub.retain_handling == 0 or (sub.retain_handling == 1 and old is None)
            if group is None and wanted and len(self._retained):
                retained_for.append((entry, inner))
        self._send(conn, SubAck(pkt.packet_id, tuple(codes)))
        for entry, flt in retained_for:
            ids_out = (entry.subscription_id,) if entry.subscription_id is not None else ()
            for message in self._retained.matching(flt, now):
                self._deliver(session, Delivery(message, min(entry.qos, message.qos), True, ids_out), now)
        self._save_session(session)

    def _on_unsubscribe(self, conn: Connection, pkt: Unsubscribe) -> None:
        session = conn.session
        assert session is not None
        codes: list[int] = []
        for flt in pkt.topic_filters:
            entry = session.subscriptions.pop(flt, None)
            if entry is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
            else:
                self._router.remove(entry)
                codes.append(ReasonCode.SUCCESS)
        self._send(conn, UnsubAck(pkt.packet_id, tuple(codes) if conn.protocol_level == MQTT_5 else ()))
        self._save_session(session)

    # ---------------------------------------------------------------- DISCONNECT, close, wills, sessions

    def _on_disconnect(self, conn: Connection, pkt: Disconnect, now: float) -> None:
        session = conn.session
        assert session is not None
        keep_will = False
        if conn.protocol_level == MQTT_5:
            expiry = pkt.properties.session_expiry_interval
            if expiry is not None:
                if conn.connect_expiry_s == 0 and expiry != 0:
                    raise RemoteProtocolError("DISCONNECT sets a Session Expiry Interval after CONNECT had 0",
                                              ReasonCode.PROTOCOL_ERROR)
                cap = self.settings.max_session_expiry_s
                session.expiry_interval_s = expiry if cap is None else min(expiry, cap)
            keep_will = pkt.reason_code == ReasonCode.DISCONNECT_WITH_WILL
        self._close(conn, now, disconnect_reason=None, publish_will=keep_will)

    def _connection_deadline(self, conn: Connection, now: float) -> None:
        if conn.state is _State.AWAITING_CONNECT or conn.state is _State.AUTHENTICATING:
            due = conn.opened_at + self.settings.connect_timeout_s
            if due <= now:
                self._close(conn, now, disconnect_reason=None, publish_will=False)
            else:
                self._schedule_connection(conn, due)
        elif conn.keepalive_window_s is not None:
            due = conn.last_rx + conn.keepalive_window_s
            if due <= now:
                self._close(conn, now, disconnect_reason=ReasonCode.KEEP_ALIVE_TIMEOUT, publish_will=True)
            else:
                self._schedule_connection(conn, due)

    def _close(self, conn: Connection, now: float, *, disconnect_reason: int | None, publish_will: bool,
               tell_listener: bool = True) -> None:
        """End a connection: optional DISCONNECT (MQTT 5, after CONNACK only), will, session detach."""
        if conn.state is _State.CLOSED:
            return
        if (disconnect_reason is not None and conn.state is _State.CONNECTED
                and conn.protocol_level == MQTT_5):
            self._send(conn, Disconnect(disconnect_reason))
        conn.state = _State.CLOSED
        conn.deadline = None
        del self._conns[conn.conn_id]
        session = conn.session
        if conn.held:
            # Unsent acknowledgements die with the connection: the client resends those PUBLISHes.
            for entry in conn.held:
                if entry.ticket:
                    self._tickets.pop(entry.ticket, None)
                    if entry.kind == 2 and session is not None:
                        # The hook's verdict on this QoS 2 message is lost with the ticket: the resend
                        # must go to the hook again, not be acknowledged as a success unseen.
                        self._forget_inbound_qos2(session, entry.packet_id)
            conn.held = None
            self._held_conns.discard(conn.conn_id)
        if tell_listener:
            self._closes.append(conn.conn_id)
        else:
            self._writes.pop(conn.conn_id, None)  # the connection is gone: nowhere to write
        if session is None or session.conn_id != conn.conn_id:
            return
        session.conn_id = None
        if publish_will and conn.will is not None:
            assert conn.client is not None
            self._will_due(conn.client, conn.will, session, now)
        if session.expiry_interval_s == 0:
            self._end_session(session, now)
        else:
            self._start_expiry(session, now)
            self._save_session(session)

    def _will_due(self, client: ClientInfo, will: Will, session: Session, now: float) -> None:
        """Publish a will now, or when its Will Delay Interval ends (or its session, if sooner)."""
        props = will.properties
        expires_at = None
        delay_s = 0
        if props is not NO_PROPERTIES:
            delay_s = props.will_delay_interval or 0
            if props.message_expiry_interval is not None:
                expires_at = now + delay_s + props.message_expiry_interval
            props = replace(props, will_delay_interval=None)
        message = Message(will.topic, will.payload, will.qos, will.retain, props, expires_at,
                          client.client_id)
        if delay_s == 0 or session.expiry_interval_s == 0:
            self._publish_will(client, message, now)
            return
        due = now + delay_s
        self._delayed_wills[client.client_id] = (due, client, message)
        self._push_deadline(due, _DL_WILL, client.client_id)

    def _publish_will(self, client: ClientInfo, message: Message, now: float) -> None:
        if self._authorizer is not None and not self._authorizer.can_publish(client, message.topic):
            return
        self._accept(client, message, now)

    def _start_expiry(self, session: Session, now: float) -> None:
        if session.expiry_interval_s == SESSION_NEVER_EXPIRES:
            session.expires_at = None
            return
        session.expires_at = now + session.expiry_interval_s
        self._push_deadline(session.expires_at, _DL_SESSION, session.client_id)

    def _end_session(self, session: Session, now: float) -> None:
        """Forget a session: its subscriptions, queue and persisted copy; a delayed will goes out now."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        for entry in session.subscriptions.values():
            self._router.remove(entry)
        session.subscriptions.clear()
        if session.durable:
            session.durable = False
            self._journal.append(DeleteSession(session.client_id))
        will = self._delayed_wills.pop(session.client_id, None)
        if will is not None:
            self._publish_will(will[1], will[2], now)

    def _save_session(self, session: Session) -> None:
        if session.durable:
            expires_at = session.expires_at if session.conn_id is None else None
            self._journal.append(SaveSession(SessionRecord(
                session.client_id, session.protocol_level, session.expiry_interval_s,
                tuple(session.subscriptions.values()), expires_at)))

    # ---------------------------------------------------------------- output and timers

    def _send(self, conn: Connection, packet: Packet) -> None:
        # A LocalProtocolError here is a broker bug (we built an invalid packet): it propagates.
        self._write(conn.conn_id, encode(packet, conn.protocol_level))

    def _send_raw(self, conn: Connection, data: bytes) -> None:
        self._write(conn.conn_id, data)

    def _write(self, conn_id: int, data: bytes) -> None:
        chunks = self._writes.get(conn_id)
        if chunks is None:
            self._writes[conn_id] = [data]
        else:
            chunks.append(data)

    def _schedule_connection(self, conn: Connection, when: float) -> None:
        conn.deadline = when
        self._push_deadline(when, _DL_CONNECTION, conn.conn_id)

    def _push_deadline(self, when: float, kind: int, key: int | str) -> None:
        self._deadline_seq += 1
        heapq.heappush(self._deadlines, (when, self._deadline_seq, kind, key))

