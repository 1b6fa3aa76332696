"""MQTT over QUIC listener (aioquic, EMQX-compatible): QUIC connections and streams in, hub connections out.

This is the one broker module that imports aioquic. It holds no MQTT session logic: each QUIC
connection becomes one connection of the broker hub (exactly like a TCP connection), and a small
per-connection shim maps the QUIC streams onto it.

Theory of operation
-------------------
Transport (B1, B2): UDP, ALPN "mqtt" only (other or no ALPN fails the TLS handshake with
no_application_protocol), TLS 1.3 with the three TLS 1.3 suites, QUIC v1. Client certificates are
optional; with `verify_client=True` a certificate chaining to `client_ca_file` is mandatory.
Transport parameters: `max_streams_bidi` (10) concurrent client bidi streams, `max_streams_uni`
(1, and any unidirectional stream is stopped), idle timeout (0 = disabled: the client's governs),
a handshake timer, migration allowed (aioquic validates a client's new path and follows it), and
single-use session tickets with 0-RTT (resumption is plain TLS; MQTT auth runs as usual, B10).

Streams (B3-B6): client bidi stream 0 is the control stream - the first client bidi stream by
definition, so reordered 0-RTT packets cannot make a data stream "first". The hub connection opens
when the control stream shows data or the handshake completes; the core's connect timeout then
covers "no CONNECT". Later bidi streams are data streams: parked (bytes buffered up to
`park_limit_bytes`, else reset) until a successful CONNACK passes, then fed.

The shim. The core serves one MQTT connection; EMQX semantics are per stream: acks go back on the
stream that carried the PUBLISH, deliveries on the stream where the SUBSCRIBE arrived, packet ids
and topic aliases are per stream. The shim keeps that contract on top of one core connection:
- Client->core requests (PUBLISH QoS>0, PUBREL, SUBSCRIBE, UNSUBSCRIBE) get a core packet id:
  the client's own id when it is free (always the case for a control-stream-only client, so such a
  client sees the core unchanged), otherwise a free one; the answer (PUBACK/PUBREC/PUBCOMP,
  SUBACK/UNSUBACK) goes back on the originating stream with the client's id.
- Deliveries: a filter belongs to the stream that subscribed it last; a PUBLISH from the core goes
  to the stream owning the newest matching filter (the control stream if none). Its packet id is
  the core's (unique on the connection, so unique per stream); the client's acks for it are only
  accepted on that stream (an ack on another stream is dropped, as in EMQX).
- Data-stream packets are decoded per stream (own decoder and alias table), inbound topic aliases
  resolved, then re-encoded for the core. Control-stream packets are only framed and inspected
  (their bytes pass unchanged unless a packet id must be renumbered).
- A data stream that dies (FIN, reset, protocol error, CONNECT/PINGREQ/DISCONNECT/AUTH on it: B5)
  loses its subscriptions (the shim unsubscribes them in the core) and nothing else: the
  connection lives on (B6). Deliveries in flight on it stay in the session and are resent after
  the next reconnect (never lost, unlike EMQX). Divergences from EMQX: one subscription per filter
  per session (not one per stream), and QoS state of data streams lives in the one core session.
- Receive Maximum is per stream, as in EMQX (B5): each stream may have Receive Maximum
  unacknowledged QoS 1/2 PUBLISHes of its own. The shim counts them per stream (from forwarding to
  the core's PUBACK, or PUBCOMP / failed PUBREC for QoS 2) and enforces the limit: a data stream
  over it is reset with 0x93, the control stream gets the connection closed with DISCONNECT 0x93, as
  the core does for a plain connection. The core, told at `open` that the connection carries
  `max_streams_bidi` windows, allows that many windows on the one session (bounded by the packet
  identifier space) and never answers 0x93 itself for a QUIC connection within them.

Close codes (B8, B9): the core closing the connection after the client's DISCONNECT with reason 0
(or after a peer FIN of the control stream) -> CONNECTION_CLOSE application error 0; any other end
-> 1; a core DISCONNECT 0x8E/0x98 (taken over, administrative) is followed by STOP_SENDING with that
code on the control stream and a <= 3 s grace for the peer to close. Over `max_connections`, a new
connection is closed with error 2 before its handshake completes. A peer abort of the control
stream ends the MQTT connection (the will is published) and is mirrored with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicProtocolVersion
from aioquic.tls import AlertBadCertificate, CipherSuite, SessionTicket, verify_certificate

from cloud_broker.listeners.base import ConnectionHub
from cloud_broker.listeners.udp import BatchedDatagramTransport
from uplink.mqtt.codec import Decoder, encode
from uplink.mqtt.errors import ProtocolError
from uplink.mqtt.packets import (
    MAX_PACKET_SIZE,
    MQTT_5,
    Auth,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    Subscribe,
    Unsubscribe,
)
from uplink.mqtt.topics import topic_matches

if TYPE_CHECKING:
    from cloud_broker.config import ListenerConfig

log = logging.getLogger("cloud_broker.listeners.quic")

ALPN = "mqtt"
DEFAULT_QUIC_PORT = 14567
APP_ERROR_NORMAL = 0
APP_ERROR_CTRL_STREAM_DOWN = 1
APP_ERROR_OVERLOADED = 2
CONTROL_STREAM_ID = 0
_TAKEOVER_GRACE_S = 3.0
_FLUSH_GRACE_S = 3.0
_MAX_PACKET_ID = 0xFFFF

# MQTT packet types (high nibble of the first byte).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 1, 2, 3, 4, 5, 6, 7
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK, _DISCONNECT = 8, 9, 10, 11, 14


@dataclass(frozen=True)
class QuicListenerConfig:
    """A QUIC listener. Validated at construction; field names are the error paths."""

    cert_file: str
    key_file: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_QUIC_PORT
    key_password: str | None = None
    client_ca_file: str | None = None  # set: client certificates are requested and verified against it
    verify_client: bool = False  # True: a valid client certificate is mandatory
    max_streams_bidi: int = 10
    max_streams_uni: int = 1
    idle_timeout_s: float = 0.0  # 0: disabled (the client's max_idle_timeout governs)
    handshake_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0  # no control stream within this after the handshake: close
    resumption: bool = True  # session tickets + 0-RTT
    max_connections: int = 100_000  # above this, new connections are refused with app error 2
    park_limit_bytes: int = 1 << 20  # per data stream, buffered until CONNACK
    max_packet_size_bytes: int = MAX_PACKET_SIZE  # framing limit for the control-stream inspector
    # UDP SO_RCVBUF/SO_SNDBUF of the listening socket (0: the kernel default, ~208 KiB, which overflows
    # on bursts at high rates: kernel RcvbufErrors that every client reads as loss). Capped by the
    # kernel at net.core.rmem_max/wmem_max.
    socket_buffer_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        if self.verify_client and self.client_ca_file is None:
            raise ValueError("client_ca_file: required when verify_client is true")
        if not 1 <= self.max_streams_bidi <= 1000:
            raise ValueError("max_streams_bidi: must be 1..1000")
        if not 0 <= self.max_streams_uni <= 1:
            raise ValueError("max_streams_uni: must be 0 or 1 (unidirectional streams carry no MQTT)")
        if self.idle_timeout_s < 0:
            raise ValueError("idle_timeout_s: must be >= 0 (0 disables it)")
        if not self.handshake_timeout_s > 0:
            raise ValueError("handshake_timeout_s: must be > 0")
        if not self.connect_timeout_s > 0:
            raise ValueError("connect_timeout_s: must be > 0")
        if self.max_connections < 1:
            raise ValueError("max_connections: must be >= 1")
        if self.socket_buffer_bytes < 0:
            raise ValueError("socket_buffer_bytes: must be >= 0 (0: the kernel default)")


def server_configuration(config: QuicListenerConfig) -> QuicConfiguration:
    """aioquic server configuration: ALPN mqtt, TLS 1.3 suites, QUIC v1, our certificate."""
    # aioquic has no "disabled" idle timeout (0 would mean 3 PTOs): a day lets the client's govern.
    idle_s = config.idle_timeout_s if config.idle_timeout_s > 0 else 86400.0
    qc = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        idle_timeout=idle_s,
        congestion_control_algorithm="cubic",
        max_data=4 << 20,
    )
    qc.supported_versions = [QuicProtocolVersion.VERSION_1]
    qc.cipher_suites = [CipherSuite.AES_256_GCM_SHA384, CipherSuite.AES_128_GCM_SHA256,
                        CipherSuite.CHACHA20_POLY1305_SHA256]
    qc.load_cert_chain(config.cert_file, config.key_file, config.key_password)
    if config.client_ca_file is not None:
        qc.load_verify_locations(cafile=config.client_ca_file)
    return qc


# ---------------------------------------------------------------------------------------------------
# Framing helpers (fixed header only; the core does the real decoding)


def _split_packets(buf: bytearray, max_size: int) -> tuple[list[tuple[int, int, bytes]], bool]:
    """Whole packets at the front of buf as (first byte, header length, raw bytes); removes them.

    Returns (packets, broken): broken means the rest of buf cannot be framed (bad length or above
    max_size) and should be handed on untouched for the core to reject.
    """
    out: list[tuple[int, int, bytes]] = []
    pos, n = 0, len(buf)
    broken = False
    while pos < n:
        length, shift, i = 0, 0, pos + 1
        complete = False
        while i < n:
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                complete = True
                break
            shift += 7
            if shift > 21:
                broken = True
                break
        if broken or not complete:
            break
        total = i - pos + length
        if total > max_size:
            broken = True
            break
        if pos + total > n:
            break
        out.append((buf[pos], i - pos, bytes(buf[pos:pos + total])))
        pos += total
    del buf[:pos]
    return out, broken


def _pid_at(raw: bytes, offset: int) -> int | None:
    if offset + 2 > len(raw):
        return None
    return (raw[offset] << 8) | raw[offset + 1]


def _with_pid(raw: bytes, offset: int, pid: int) -> bytes:
    return raw[:offset] + bytes(((pid >> 8) & 0xFF, pid & 0xFF)) + raw[offset + 2:]


def _publish_pid_offset(first: int, hlen: int, raw: bytes) -> int | None:
    """Offset of a PUBLISH's packet id (QoS > 0), or None."""
    if (first >> 1) & 3 == 0 or hlen + 2 > len(raw):
        return None
    topic_len = (raw[hlen] << 8) | raw[hlen + 1]
    return hlen + 2 + topic_len


# ---------------------------------------------------------------------------------------------------
# Per-connection state


@dataclass
class _Request:
    """A client request forwarded to the core under core_pid: where its answer must go."""

    stream_id: int | None  # None: the shim's own (unsubscribing a dead stream): answer swallowed
    client_pid: int
    filters: tuple[str, ...] = ()
    publish: bool = False  # a QoS 1/2 PUBLISH: counts against its stream's Receive Maximum


class _DataStream:
    __slots__ = ("aliases", "buffer", "decoder", "parked", "parked_bytes", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.parked: list[bytes] = []
        self.parked_bytes = 0
        self.decoder: Decoder | None = None
        self.aliases: dict[int, str] = {}
        self.buffer = bytearray()


class _TicketStore:
    """Single-use session tickets (a ticket resumes once: the best replay defence 0-RTT allows here)
    with the client identity verified on the connection that earned it."""

    def __init__(self, limit: int = 100_000) -> None:
        self._tickets: dict[bytes, tuple[SessionTicket, str | None]] = {}
        self._limit = limit

    def add(self, ticket: SessionTicket, identity: str | None) -> None:
        if len(self._tickets) >= self._limit:
            self._tickets.pop(next(iter(self._tickets)))
        self._tickets[ticket.ticket] = (ticket, identity)

    def set_identity(self, label: bytes, identity: str | None) -> None:
        entry = self._tickets.get(label)
        if entry is not None:
            self._tickets[label] = (entry[0], identity)

    def discard(self, label: bytes) -> None:
        self._tickets.pop(label, None)

    def take(self, label: bytes) -> tuple[SessionTicket, str | None] | None:
        return self._tickets.pop(label, None)


def _identity_of(cert: Any) -> str | None:
    """The identity of a verified client certificate: its subject common name (as the TLS listener)."""
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class _MqttQuicProtocol(QuicConnectionProtocol):
    """One QUIC connection from a client: streams <-> one broker hub connection (see module doc)."""

    def __init__(self, quic: QuicConnection, listener: QuicListener) -> None:
        super().__init__(quic)
        self._listener = listener
        cfg = listener.config
        self._cfg = cfg
        # B2: stream limits (aioquic hard-codes 128; its Limit is raised as streams finish).
        quic._local_max_streams_bidi.value = cfg.max_streams_bidi
        quic._local_max_streams_uni.value = cfg.max_streams_uni
        self._tickets_issued: list[bytes] = []
        self.identity: str | None = None
        self.resumed_identity: str | None = None
        if cfg.resumption:
            # Per-connection wrappers: the store must know which connection earned/used a ticket.
            quic._session_ticket_handler = self._ticket_issued
            quic._session_ticket_fetcher = self._ticket_fetched
        if cfg.client_ca_file is not None:
            self._request_client_certificate(quic)
        self.conn_id: int | None = None
        self.peer = "quic:?"
        self.handshake_done = False
        self.early_data_accepted = False
        self.session_resumed = False
        self._reject_overloaded = (not listener.accepting
                                   or listener.connection_count >= cfg.max_connections)
        self._first_datagram = True
        self._level: int | None = None
        self._connected = False  # a successful CONNACK passed
        self._ended = False  # hub connection ended (by the core or the peer)
        self._closing = False
        self._ctrl_buffer = bytearray()
        self._ctrl_broken = False
        self._ctrl_seen = False
        self._client_disconnect_rc: int | None = None
        self._server_disconnect_rc: int | None = None
        self._peer_fin = False
        self._data: dict[int, _DataStream] = {}
        self._requests: dict[int, _Request] = {}  # core pid -> request
        self._open_publishes: Counter[int] = Counter()  # stream -> unacknowledged QoS 1/2 PUBLISHes
        self._request_keys: dict[tuple[int, int], int] = {}  # (stream, client pid) -> core pid
        self._next_pid = 1
        self._deliveries: dict[int, int] = {}  # core delivery pid -> stream it went out on
        self._owner: dict[str, int] = {}  # topic filter -> stream that subscribed it last
        self._data_owned = 0  # filters owned by data streams (0: every delivery goes to control)
        self._timers: list[asyncio.TimerHandle] = []
        self._close_code: tuple[int, str] | None = None
        self.paused = False  # the hub stopped reading us (our output is congested)
        self._paused_input: list[tuple[int, bytes, bool]] = []
        self._congested = False
        self.terminated = asyncio.Event()
        listener.created(self)
        self._handshake_timer = self._loop.call_later(cfg.handshake_timeout_s, self._handshake_expired)

    # -- aioquic hooks --------------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._first_datagram:
            self._first_datagram = False
            host = f"[{addr[0]}]" if ":" in str(addr[0]) else addr[0]
            self.peer = f"quic:{host}:{addr[1]}"
        if self._reject_overloaded:
            if not self._closing:
                # Refuse before the handshake (EMQX: app error 2 at accept): aioquic must parse the
                # Initial to have keys for the close, but a pending close sends only CONNECTION_CLOSE,
                # never our handshake flight. On the wire: transport APPLICATION_ERROR (RFC 9000 10.2.3).
                self._closing = True
                why = (f"{self._listener.connection_count} connections (max_connections)"
                       if self._listener.accepting else "shutting down")
                log.warning("quic: refusing %s: %s", self.peer, why)
                self._quic.receive_datagram(data, addr, now=self._loop.time())  # type: ignore[arg-type]
                self._quic.close(error_code=APP_ERROR_OVERLOADED, reason_phrase="overloaded")
                self._process_events()
                self.transmit()
            return
        # aioquic's own datagram_received also transmits; we leave that to the end of the batch
        # (`batch_done`), so one ACK and one flight of answers cover every datagram of a wake-up.
        self._quic.receive_datagram(data, addr, now=self._loop.time())  # type: ignore[arg-type]
        self._process_events()
        self._listener.flush_later(self)

    def batch_done(self) -> None:
        """The end of a receive batch that carried datagrams for us: send, then check our state."""
        self.transmit()
        if self._congested:
            self._check_congestion()
        self._maybe_finish_close()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        self._maybe_finish_close()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset | events.StopSendingReceived):
            self._on_stream_abort(event.stream_id, event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            self._on_handshake(event)
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event)

    # -- handshake, identity, tickets ----------------------------------------------------------

    def _request_client_certificate(self, quic: QuicConnection) -> None:
        # aioquic requests a client certificate only through this flag, on a TLS context it creates
        # when the first Initial arrives: set it right after creation.
        initialize = quic._initialize

        def _initialize(peer_cid: bytes) -> None:
            initialize(peer_cid)
            quic.tls._request_client_certificate = True

        quic._initialize = _initialize  # type: ignore[method-assign]

    def _ticket_issued(self, ticket: SessionTicket) -> None:
        # Issued after the client's Finished, before our HandshakeCompleted check of its chain: the
        # identity is filled in (or the ticket dropped) there.
        self._tickets_issued.append(ticket.ticket)
        self._listener.tickets.add(ticket, self.identity)

    def _ticket_fetched(self, label: bytes) -> SessionTicket | None:
        entry = self._listener.tickets.take(label)
        if entry is None:
            return None
        ticket, identity = entry
        if self._cfg.verify_client and identity is None:
            return None  # never verified: make the client do a full handshake with its certificate
        # Without a certificate requirement, a certificate-less ticket resumes as certificate-less.
        self.resumed_identity = identity
        self.identity = identity
        return ticket

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        self.handshake_done = True
        self.early_data_accepted = event.early_data_accepted
        self.session_resumed = event.session_resumed
        self._handshake_timer.cancel()
        cert = self._quic.tls._peer_certificate if self._cfg.client_ca_file is not None else None
        if self._cfg.client_ca_file is not None and not event.session_resumed and (
                cert is not None or self._cfg.verify_client):
            tls = self._quic.tls
            try:
                if cert is None:
                    raise AlertBadCertificate("no client certificate")
                verify_certificate(cert, tls._peer_certificate_chain, cafile=self._cfg.client_ca_file)
            except AlertBadCertificate as exc:
                log.warning("quic: %s: client certificate refused: %s", self.peer, exc)
                for label in self._tickets_issued:
                    self._listener.tickets.discard(label)
                self._closing = True
                self._quic.close(error_code=QuicErrorCode.CRYPTO_ERROR + 42, frame_type=0x06,
                                 reason_phrase="bad client certificate")
                self.transmit()
                return
            self.identity = _identity_of(cert)
            for label in self._tickets_issued:
                self._listener.tickets.set_identity(label, self.identity)
        self._open_hub()
        if self.conn_id is not None and self._ctrl_buffer:
            self._feed_control(b"")
        self._arm(self._cfg.connect_timeout_s, self._control_expired)

    def _handshake_expired(self) -> None:
        if not self.handshake_done and not self._closing:
            log.info("quic: %s: no handshake within %.1fs", self.peer, self._cfg.handshake_timeout_s)
            self._closing = True
            self.close(error_code=APP_ERROR_CTRL_STREAM_DOWN, reason_phrase="handshake timeout")

    def _control_expired(self) -> None:
        # B3: the core's connect timeout runs from _open_hub; this only guards a connection that
        # never even opened the control stream.
        if not self._ctrl_seen and not self._closing:
            self._close_connection(APP_ERROR_CTRL_STREAM_DOWN, "no control stream")

    def _open_hub(self) -> None:
        if self.conn_id is not None or self._ended or self._closing:
            return
        if self._cfg.client_ca_file is not None and not self.handshake_done and self.resumed_identity is None:
            return  # the certificate (if any) is checked at handshake completion: CONNECT waits
        # One Receive Maximum window per stream (B5), enforced here; the core allows them all.
        self.conn_id = self._listener.hub.open(_Sink(self), self.peer, self.identity,
                                               receive_windows=self._cfg.max_streams_bidi)
        self._listener.opened(self)

    # -- client -> core ---------------------------------------------------------------------------

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self._ended or self._closing:
            return
        if self.paused:
            # aioquic grants flow-control credit on receipt, not on consumption: this queue is what
            # holds a client that publishes faster than it reads its acknowledgements.
            self._paused_input.append((stream_id, data, end_stream))
            return
        if stream_id % 4 == 2:  # client unidirectional: no MQTT there (B4)
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(stream_id, 0)
            return
        if stream_id == CONTROL_STREAM_ID:
            self._ctrl_seen = True
            if self.conn_id is None:
                self._open_hub()
            self._feed_control(data)
            if end_stream:
                self._on_control_fin()
            return
        stream = self._data.get(stream_id)
        if stream is None:
            stream = self._data[stream_id] = _DataStream(stream_id)
        if not self._connected:
            stream.parked.append(data)
            stream.parked_bytes += len(data)
            if stream.parked_bytes > self._cfg.park_limit_bytes:
                self._kill_stream(stream_id, ReasonCode.QUOTA_EXCEEDED, "parked too much")
            elif end_stream:
                stream.parked.append(b"")  # FIN marker
            return
        self._feed_data(stream, data)
        if end_stream:
            self._end_data_stream(stream_id, None)

    def _feed_control(self, data: bytes) -> None:
        if self.conn_id is None:
            self._ctrl_buffer += data  # until the hub connection opens (mTLS identity pending)
            return
        if self._ctrl_broken:
            if data:
                self._listener.hub.received(self.conn_id, data)
            return
        self._ctrl_buffer += data
        packets, broken = _split_packets(self._ctrl_buffer, self._cfg.max_packet_size_bytes)
        out = [self._inspect_control(first, hlen, raw) for first, hlen, raw in packets]
        if broken:
            # Unframeable: hand the rest over as is; the core rejects it and closes the connection.
            self._ctrl_broken = True
            out.append(bytes(self._ctrl_buffer))
            self._ctrl_buffer.clear()
        payload = b"".join(o for o in out if o)
        if payload and self.conn_id is not None:
            self._listener.hub.received(self.conn_id, payload)

    def _inspect_control(self, first: int, hlen: int, raw: bytes) -> bytes | None:
        kind = first >> 4
        if kind == _PUBLISH:
            offset = _publish_pid_offset(first, hlen, raw)
            if offset is not None:
                pid = _pid_at(raw, offset)
                if pid is not None:
                    try:
                        core = self._map_request(CONTROL_STREAM_ID, pid, (), publish=True)
                    except ProtocolError as exc:
                        # The core would have said the same had it counted this stream alone.
                        log.info("quic: %s: %s", self.peer, exc)
                        if self.conn_id is not None:
                            self._listener.hub.violation(self.conn_id, exc.reason_code)
                        return None
                    if core != pid:
                        raw = _with_pid(raw, offset, core)
        elif kind == _PUBREL:
            pid = _pid_at(raw, hlen)
            if pid is not None:
                core = self._request_keys.get((CONTROL_STREAM_ID, pid), pid)
                if core != pid:
                    raw = _with_pid(raw, hlen, core)
        elif kind in (_PUBACK, _PUBREC, _PUBCOMP):
            pid = _pid_at(raw, hlen)
            if pid is not None and not self._delivery_ack(CONTROL_STREAM_ID, kind, pid, raw, hlen):
                return None
        elif kind in (_SUBSCRIBE, _UNSUBSCRIBE):
            pid = _pid_at(raw, hlen)
            filters = self._filters_of(raw)
            if pid is not None:
                core = self._map_request(CONTROL_STREAM_ID, pid, filters)
                if kind == _SUBSCRIBE:
                    self._own(filters, CONTROL_STREAM_ID)
                if core != pid:
                    raw = _with_pid(raw, hlen, core)
        elif kind == _CONNECT and self._level is None:
            with contextlib.suppress(ProtocolError):
                for packet in Decoder(None).feed(raw):
                    if isinstance(packet, Connect):
                        self._level = packet.protocol_level
        elif kind == _DISCONNECT:
            self._client_disconnect_rc = raw[hlen] if len(raw) > hlen else 0
        return raw

    def _filters_of(self, raw: bytes) -> tuple[str, ...]:
        if self._level is None:
            return ()
        try:
            packets = Decoder(self._level).feed(raw)
        except ProtocolError:
            return ()  # the core will reject it
        for packet in packets:
            if isinstance(packet, Subscribe):
                return tuple(s.topic_filter for s in packet.subscriptions)
            if isinstance(packet, Unsubscribe):
                return tuple(packet.topic_filters)
        return ()

    def _delivery_ack(self, stream_id: int, kind: int, pid: int, raw: bytes, hlen: int) -> bool:
        """Whether the client's ack for a delivery may reach the core (it came on the right stream)."""
        owner = self._deliveries.get(pid)
        if owner is None:
            # Not sent on this connection (a resend the core made before we tracked it): let the
            # control stream settle it; a data stream never may.
            return stream_id == CONTROL_STREAM_ID
        if owner != stream_id:
            log.debug("quic: %s: ack for %d on stream %d, sent on %d: dropped", self.peer, pid,
                      stream_id, owner)
            return False
        rc = raw[hlen + 2] if len(raw) > hlen + 2 else 0
        if kind != _PUBREC or rc >= 0x80:
            del self._deliveries[pid]
        return True

    def _map_request(self, stream_id: int, client_pid: int, filters: tuple[str, ...],
                     publish: bool = False) -> int:
        """The core packet id for a client request; ProtocolError 0x93 when a QoS 1/2 PUBLISH would
        exceed its stream's Receive Maximum (each stream has its own window, as in EMQX)."""
        key = (stream_id, client_pid)
        core = self._request_keys.get(key)
        if core is not None:
            return core  # a resend (DUP) of a request still open
        if publish and self._open_publishes[stream_id] >= self._listener.hub.receive_maximum:
            raise ProtocolError(f"more unacknowledged QoS 1/2 PUBLISHes on stream {stream_id} than "
                                f"Receive Maximum", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
        core = client_pid if client_pid not in self._requests else self._free_pid()
        if publish:
            self._open_publishes[stream_id] += 1
        self._requests[core] = _Request(stream_id, client_pid, filters, publish)
        self._request_keys[key] = core
        return core

    def _free_pid(self) -> int:
        for _ in range(_MAX_PACKET_ID):
            pid = self._next_pid
            self._next_pid = pid % _MAX_PACKET_ID + 1
            if pid not in self._requests:
                return pid
        raise ProtocolError("no free packet identifier", ReasonCode.QUOTA_EXCEEDED)

    def _forget_request(self, core: int) -> _Request | None:
        request = self._requests.pop(core, None)
        if request is not None and request.stream_id is not None:
            self._request_keys.pop((request.stream_id, request.client_pid), None)
            if request.publish:
                left = self._open_publishes[request.stream_id] - 1
                if left > 0:
                    self._open_publishes[request.stream_id] = left
                else:
                    del self._open_publishes[request.stream_id]
        return request

    def _feed_data(self, stream: _DataStream, data: bytes) -> None:
        if self.conn_id is None or self._level is None:
            return
        if stream.decoder is None:
            stream.decoder = Decoder(self._level, self._cfg.max_packet_size_bytes)
        try:
            packets = stream.decoder.feed(data)
        except ProtocolError as exc:
            self._kill_stream(stream.stream_id, exc.reason_code, str(exc))
            return
        out: list[bytes] = []
        for packet in packets:
            try:
                encoded = self._data_packet(stream, packet)
            except ProtocolError as exc:
                self._kill_stream(stream.stream_id, exc.reason_code, str(exc))
                break
            if encoded:
                out.append(encoded)
        if out and self.conn_id is not None:
            self._listener.hub.received(self.conn_id, b"".join(out))

    def _data_packet(self, stream: _DataStream, packet: Packet) -> bytes | None:
        level = self._level
        assert level is not None
        sid = stream.stream_id
        if isinstance(packet, Publish):
            alias = packet.properties.topic_alias
            if alias is not None:  # per-stream aliases: resolve here, the core sees full topics
                if packet.topic:
                    stream.aliases[alias] = packet.topic
                    topic = packet.topic
                else:
                    known = stream.aliases.get(alias)
                    if known is None:
                        raise ProtocolError(f"topic alias {alias} unknown on this stream",
                                            ReasonCode.PROTOCOL_ERROR)
                    topic = known
                packet = replace(packet, topic=topic,
                                 properties=replace(packet.properties, topic_alias=None))
            if packet.packet_id is not None:
                packet = replace(packet, packet_id=self._map_request(sid, packet.packet_id, (), publish=True))
            return encode(packet, level)
        if isinstance(packet, PubRel):
            core = self._request_keys.get((sid, packet.packet_id))
            if core is None:
                code = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if level == MQTT_5 else 0
                self._write_stream(sid, encode(PubComp(packet.packet_id, code), level))
                return None
            return encode(replace(packet, packet_id=core), level)
        if isinstance(packet, PubAck | PubRec | PubComp):
            kind = (_PUBACK if isinstance(packet, PubAck)
                    else _PUBREC if isinstance(packet, PubRec) else _PUBCOMP)
            raw = encode(packet, level)
            hlen = 2  # acks are short: one byte of remaining length
            return raw if self._delivery_ack(sid, kind, packet.packet_id, raw, hlen) else None
        if isinstance(packet, Subscribe | Unsubscribe):
            if isinstance(packet, Subscribe):
                filters = tuple(s.topic_filter for s in packet.subscriptions)
            else:
                filters = tuple(packet.topic_filters)
            core = self._map_request(sid, packet.packet_id, filters)
            if isinstance(packet, Subscribe):
                self._own(filters, sid)
            return encode(replace(packet, packet_id=core), level)
        if isinstance(packet, Connect | PingReq | Disconnect | Auth):
            raise ProtocolError(f"{packet.type.name} on a data stream", ReasonCode.PROTOCOL_ERROR)
        raise ProtocolError(f"{packet.type.name} from a client", ReasonCode.PROTOCOL_ERROR)

    def _own(self, filters: tuple[str, ...], stream_id: int) -> None:
        for flt in filters:
            old = self._owner.pop(flt, None)
            if old is not None and old != CONTROL_STREAM_ID:
                self._data_owned -= 1
            self._owner[flt] = stream_id  # re-inserted last: the newest subscription wins
            if stream_id != CONTROL_STREAM_ID:
                self._data_owned += 1

    def _disown(self, flt: str) -> None:
        old = self._owner.pop(flt, None)
        if old is not None and old != CONTROL_STREAM_ID:
            self._data_owned -= 1

    # -- core -> client -----------------------------------------------------------------------------

    def sink_write(self, data: bytes) -> None:
        """Route the core's output (whole packets) to the streams they belong to."""
        if self._closing or self._quic._close_event is not None:
            return
        if not self._data and not self._requests_need_routing():
            # Fast path: only the control stream exists and no id was ever renumbered.
            self._track_output_fast(data)
            self._write_stream(CONTROL_STREAM_ID, data)
            return
        buf = bytearray(data)
        packets, _ = _split_packets(buf, MAX_PACKET_SIZE + 5)
        ctrl: list[bytes] = []
        for first, hlen, raw in packets:
            target, out = self._route_output(first, hlen, raw)
            if target is None or out is None:
                continue
            if target == CONTROL_STREAM_ID:
                ctrl.append(out)
            else:
                self._write_stream(target, out)
        if buf:
            ctrl.append(bytes(buf))
        if ctrl:
            self._write_stream(CONTROL_STREAM_ID, b"".join(ctrl))

    def _requests_need_routing(self) -> bool:
        # Renumbered control-stream requests exist only when data streams existed: the slow path
        # is needed exactly while some request is not identity-mapped.
        return any(core != r.client_pid or r.stream_id != CONTROL_STREAM_ID
                   for core, r in self._requests.items())

    def _track_output_fast(self, data: bytes) -> None:
        buf = bytearray(data)
        packets, _ = _split_packets(buf, MAX_PACKET_SIZE + 5)
        for first, hlen, raw in packets:
            self._route_output(first, hlen, raw)

    def _route_output(self, first: int, hlen: int, raw: bytes) -> tuple[int | None, bytes | None]:
        kind = first >> 4
        if kind == _PUBLISH:
            target = self._route_topic(raw, hlen) if self._data_owned else CONTROL_STREAM_ID
            offset = _publish_pid_offset(first, hlen, raw)
            if offset is not None:
                pid = _pid_at(raw, offset)
                if pid is not None:
                    self._deliveries[pid] = target
            return target, raw
        if kind in (_PUBACK, _PUBREC, _PUBCOMP, _SUBACK, _UNSUBACK):
            core = _pid_at(raw, hlen)
            if core is None:
                return CONTROL_STREAM_ID, raw
            request = self._requests.get(core)
            if request is None:
                return CONTROL_STREAM_ID, raw
            rc = raw[hlen + 2] if len(raw) > hlen + 2 else 0
            if kind == _SUBACK:
                self._forget_request(core)
                self._suback_codes(request, raw)
            elif kind == _UNSUBACK:
                self._forget_request(core)
                for flt in request.filters:
                    self._disown(flt)
            elif kind != _PUBREC or rc >= 0x80:
                self._forget_request(core)
            if request.stream_id is None:
                return None, None  # the shim's own UNSUBSCRIBE
            if request.stream_id != CONTROL_STREAM_ID and request.stream_id not in self._data:
                return None, None  # its stream died
            out = raw if core == request.client_pid else _with_pid(raw, hlen, request.client_pid)
            return request.stream_id, out
        if kind == _PUBREL:
            pid = _pid_at(raw, hlen)
            target = self._deliveries.get(pid, CONTROL_STREAM_ID) if pid is not None else CONTROL_STREAM_ID
            if target != CONTROL_STREAM_ID and target not in self._data:
                return None, None
            return target, raw
        if kind == _CONNACK:
            if len(raw) > hlen + 1 and raw[hlen + 1] == 0 and not self._connected:
                self._connected = True
                self._loop.call_soon(self._activate_parked)
            return CONTROL_STREAM_ID, raw
        if kind == _DISCONNECT:
            self._server_disconnect_rc = raw[hlen] if len(raw) > hlen else 0
        return CONTROL_STREAM_ID, raw

    def _route_topic(self, raw: bytes, hlen: int) -> int:
        if hlen + 2 > len(raw):
            return CONTROL_STREAM_ID
        topic_len = (raw[hlen] << 8) | raw[hlen + 1]
        try:
            topic = raw[hlen + 2:hlen + 2 + topic_len].decode("utf-8")
        except UnicodeDecodeError:
            return CONTROL_STREAM_ID
        for flt, owner in reversed(self._owner.items()):
            with contextlib.suppress(ProtocolError):
                if topic_matches(flt, topic):
                    return owner if owner == CONTROL_STREAM_ID or owner in self._data else CONTROL_STREAM_ID
        return CONTROL_STREAM_ID

    def _suback_codes(self, request: _Request, raw: bytes) -> None:
        if self._level is None:
            return
        try:
            packets = Decoder(self._level).feed(raw)
        except ProtocolError:
            return
        for packet in packets:
            codes = getattr(packet, "reason_codes", ())
            for flt, code in zip(request.filters, codes, strict=False):
                if code >= 0x80 and self._owner.get(flt) == request.stream_id:
                    self._disown(flt)

    def _activate_parked(self) -> None:
        for stream in list(self._data.values()):
            parked, stream.parked = stream.parked, []
            stream.parked_bytes = 0
            for chunk in parked:
                if stream.stream_id not in self._data:
                    break
                if chunk == b"":
                    self._end_data_stream(stream.stream_id, None)
                else:
                    self._feed_data(stream, chunk)

    def _write_stream(self, stream_id: int, data: bytes) -> None:
        try:
            self._quic.send_stream_data(stream_id, data)
        except ValueError as exc:  # the stream finished or was reset meanwhile
            log.debug("quic: %s: cannot write stream %d: %s", self.peer, stream_id, exc)
            return
        self._transmit_soon()
        if not self._congested:
            self._check_congestion()

    def _unacked_bytes(self) -> int:
        total = 0
        for stream in self._quic._streams.values():
            total += stream.sender._buffer_stop - stream.sender._buffer_start
        return total

    def _check_congestion(self) -> None:
        """Tell the hub when our unacknowledged output crosses its water marks (back-pressure)."""
        if self.conn_id is None:
            return
        hub = self._listener.hub
        unacked = self._unacked_bytes()
        if not self._congested and unacked > hub.high_water_bytes:
            self._congested = True
            hub.congested(self.conn_id, True)
        elif self._congested and unacked < hub.low_water_bytes:
            self._congested = False
            hub.congested(self.conn_id, False)

    def resume(self) -> None:
        self.paused = False
        while self._paused_input and not self.paused:
            stream_id, data, end_stream = self._paused_input.pop(0)
            self._on_stream_data(stream_id, data, end_stream)

    # -- stream and connection ends ---------------------------------------------------------------

    def _on_control_fin(self) -> None:
        # B8: a peer FIN on the control stream ends the MQTT connection (will published if no
        # DISCONNECT came); we FIN back and close normally.
        self._peer_fin = True
        self._end_hub()
        self._close_connection(APP_ERROR_NORMAL, "control stream finished")

    def _on_stream_abort(self, stream_id: int, code: int) -> None:
        if stream_id == CONTROL_STREAM_ID:
            # Mirror the abort with the same code; the MQTT connection ends abnormally.
            self._abort(stream_id, code)
            self._end_hub()
            self._close_connection(APP_ERROR_CTRL_STREAM_DOWN, "control stream aborted", flush=False)
        elif stream_id in self._data:
            self._abort(stream_id, code)
            self._end_data_stream(stream_id, code)

    def _kill_stream(self, stream_id: int, code: int, why: str) -> None:
        log.info("quic: %s: data stream %d reset (0x%x): %s", self.peer, stream_id, code, why)
        self._abort(stream_id, code)
        self._end_data_stream(stream_id, code)

    def _abort(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(ValueError):
            self._quic.reset_stream(stream_id, code)
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, code)
        self._transmit_soon()

    def _end_data_stream(self, stream_id: int, code: int | None) -> None:
        """B6: the data stream is gone; drop its subscriptions and per-stream request state."""
        stream = self._data.pop(stream_id, None)
        if stream is None:
            return
        if code is None:
            with contextlib.suppress(ValueError):
                self._quic.send_stream_data(stream_id, b"", end_stream=True)
                self._transmit_soon()
        for core, request in list(self._requests.items()):
            if request.stream_id == stream_id:
                self._forget_request(core)
                self._requests[core] = _Request(None, core)  # keep the id busy until the core answers
        owned = tuple(flt for flt, owner in self._owner.items() if owner == stream_id)
        for flt in owned:
            self._disown(flt)
        if owned and self.conn_id is not None and self._level is not None and not self._ended:
            core = self._free_pid()
            self._requests[core] = _Request(None, core, owned)
            self._listener.hub.received(self.conn_id, encode(Unsubscribe(core, owned), self._level))

    def _end_hub(self) -> None:
        """Tell the core the connection is gone (unless the core ended it first)."""
        if self.conn_id is None or self._ended:
            self._ended = True
            return
        for stream_id in list(self._data):
            self._end_data_stream(stream_id, 0)
        self._ended = True
        conn_id, self.conn_id = self.conn_id, None
        self._listener.hub.lost(conn_id)
        self._listener.closed(self)

    def sink_close(self) -> None:
        """The core closed the connection (after its last bytes): pick the close code (B8, B9)."""
        if self._ended:
            return
        self._ended = True
        self.conn_id = None
        self._listener.closed(self)
        rc = self._server_disconnect_rc
        if rc in (ReasonCode.SESSION_TAKEN_OVER, ReasonCode.ADMINISTRATIVE_ACTION):
            # B9: DISCONNECT is on its way; STOP_SENDING carries the reason; the peer gets <= 3 s.
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(CONTROL_STREAM_ID, int(rc))
            self._close_connection(APP_ERROR_CTRL_STREAM_DOWN, "session taken over",
                                   grace_s=_TAKEOVER_GRACE_S)
            return
        normal = rc is None and self._client_disconnect_rc == 0
        self._close_connection(APP_ERROR_NORMAL if normal else APP_ERROR_CTRL_STREAM_DOWN,
                               "normal" if normal else "control stream down")

    def _close_connection(self, code: int, why: str, *, flush: bool = True,
                          grace_s: float = _FLUSH_GRACE_S) -> None:
        """FIN the control stream, let the last bytes be acknowledged (bounded), then close."""
        if self._closing:
            return
        self._closing = True
        self._close_code = (code, why)
        if not flush:
            self.close(error_code=code, reason_phrase=why)
            return
        for stream_id in [CONTROL_STREAM_ID, *self._data]:
            with contextlib.suppress(ValueError):
                self._quic.send_stream_data(stream_id, b"", end_stream=True)
        self._transmit_soon()
        self._arm(grace_s, self._close_now)
        self._maybe_finish_close()

    def _maybe_finish_close(self) -> None:
        if not self._closing or self._quic._close_event is not None or self._close_code is None:
            return
        for stream in self._quic._streams.values():
            if stream.sender._buffer_stop > stream.sender._buffer_start:
                return
        if self._server_disconnect_rc in (ReasonCode.SESSION_TAKEN_OVER, ReasonCode.ADMINISTRATIVE_ACTION):
            return  # the peer closes, or the grace timer does
        self._close_now()

    def _close_now(self) -> None:
        if self._quic._close_event is None and self._close_code is not None:
            code, why = self._close_code
            self.close(error_code=code, reason_phrase=why)

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        if event.frame_type is None and self._close_code is None and not self._closing:
            self._listener.peer_close_codes[event.error_code] += 1  # the client closed, with this code
        self._handshake_timer.cancel()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._end_hub()
        self._listener.terminated(self)
        self.terminated.set()

    def shutdown(self) -> None:
        """The listener is closing: end this connection gracefully (code 1 unless already ending)."""
        if not self._closing:
            self._end_hub()
            self._close_connection(APP_ERROR_CTRL_STREAM_DOWN, "server shutting down")

    def _arm(self, delay_s: float, callback: Any) -> None:
        self._timers.append(self._loop.call_later(delay_s, callback))


class _Sink:
    """The hub's view of a QUIC connection (write/close), routing through the protocol's shim."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: _MqttQuicProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol.sink_write(data)

    def close(self) -> None:
        self._protocol.sink_close()

    def pause_reading(self) -> None:
        self._protocol.paused = True

    def resume_reading(self) -> None:
        self._protocol.resume()


class _BatchingQuicServer(QuicServer):
    """aioquic's server (connection-id routing, retry, version negotiation) fed by our batched UDP
    transport: at the end of each receive batch the listener flushes the connections it touched."""

    def __init__(self, listener: QuicListener, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._listener = listener

    def batch_done(self) -> None:
        self._listener.batch_done()


class QuicListener:
    """A bound QUIC listener serving MQTT into a hub (a `BoundListener`). Create with `start`."""

    kind = "quic"

    def __init__(self, hub: ConnectionHub, config: QuicListenerConfig) -> None:
        self.hub = hub
        self.config = config
        self.accepting = True
        self.addresses: list[tuple[str, int]] = []
        # Application error codes of CONNECTION_CLOSEs received from clients (metrics, diagnosis).
        self.peer_close_codes: Counter[int] = Counter()
        self.tickets = _TicketStore()
        self.server: QuicServer | None = None
        self._connections: set[_MqttQuicProtocol] = set()  # with a hub connection
        self._all: set[_MqttQuicProtocol] = set()  # every QUIC connection not yet terminated
        self.host = config.host
        self.port = config.port
        self._touched: dict[_MqttQuicProtocol, None] = {}  # insertion-ordered set
        self.transport: BatchedDatagramTransport | None = None

    def flush_later(self, protocol: _MqttQuicProtocol) -> None:
        """protocol received datagrams in the current batch: flush it once at the batch's end."""
        self._touched[protocol] = None

    def batch_done(self) -> None:
        touched, self._touched = self._touched, {}
        for protocol in touched:
            protocol.batch_done()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def connections(self) -> tuple[_MqttQuicProtocol, ...]:
        return tuple(self._connections)

    def opened(self, protocol: _MqttQuicProtocol) -> None:
        self._connections.add(protocol)

    def closed(self, protocol: _MqttQuicProtocol) -> None:
        self._connections.discard(protocol)

    def created(self, protocol: _MqttQuicProtocol) -> None:
        self._all.add(protocol)

    def terminated(self, protocol: _MqttQuicProtocol) -> None:
        self._all.discard(protocol)

    def close(self) -> None:
        """Stop accepting connections. The hub's shutdown then closes the MQTT connections (MQTT 5
        clients get DISCONNECT 0x8B first); `wait_closed` ends what is left and releases the socket."""
        self.accepting = False

    async def wait_closed(self, timeout_s: float = _FLUSH_GRACE_S) -> None:
        """Close what is still open, wait (bounded) for the connections to end, release the socket."""
        self.accepting = False
        await asyncio.sleep(0)  # the hub's shutdown, if it runs right after close(), goes first
        for protocol in list(self._all):
            protocol.shutdown()
        pending = [p.terminated.wait() for p in list(self._all)]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*pending)
        if self.server is not None:
            self.server.close()
            self.server = None


def listener_config(config: ListenerConfig, **tunables: Any) -> QuicListenerConfig:
    """The QUIC listener settings for a broker `ListenerConfig` (kind "quic"), QUIC tunables default."""
    assert config.cert_file is not None and config.key_file is not None  # checked by the config
    return QuicListenerConfig(cert_file=config.cert_file, key_file=config.key_file, host=config.host,
                              port=config.port, client_ca_file=config.ca_file,
                              verify_client=config.require_client_cert, **tunables)


async def start(hub: ConnectionHub, config: ListenerConfig) -> QuicListener:
    """The listener registry's entry point (`cloud_broker.listeners`): serve config into hub, with the
    QUIC tunables of its `quic` options."""
    options = config.quic
    return await start_quic_listener(hub, listener_config(
        config, max_streams_bidi=options.max_streams_bidi, idle_timeout_s=options.idle_timeout_s,
        max_connections=options.max_connections, socket_buffer_bytes=options.socket_buffer_bytes))


def _udp_socket(family: int, addr: Any, buffer_bytes: int) -> socket.socket:
    """The listening UDP socket, bound, with SO_RCVBUF/SO_SNDBUF of buffer_bytes (0: kernel default)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.bind(addr)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_quic_listener(hub: ConnectionHub, config: QuicListenerConfig) -> QuicListener:
    """Bind UDP host:port (0: a free port) and serve MQTT over QUIC into hub. OSError if it fails
    (including unreadable certificate or key files)."""
    try:
        configuration = server_configuration(config)
    except (ValueError, TypeError) as exc:
        raise OSError(f"QUIC listener: cannot load certificate/key: {exc}") from exc
    listener = QuicListener(hub, config)
    loop = asyncio.get_running_loop()

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> _MqttQuicProtocol:
        return _MqttQuicProtocol(quic, listener)

    infos = await loop.getaddrinfo(config.host, config.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"QUIC listener: cannot resolve {config.host}")
    family, _, _, _, addr = infos[0]
    server = _BatchingQuicServer(listener, configuration=configuration, create_protocol=create_protocol)
    transport = BatchedDatagramTransport(loop, _udp_socket(family, addr, config.socket_buffer_bytes), server)
    listener.server = server
    listener.transport = transport
    sockname = transport.get_extra_info("sockname")
    listener.host, listener.port = str(sockname[0]), int(sockname[1])
    listener.addresses.append((listener.host, listener.port))
    return listener


__all__ = [
    "ALPN",
    "APP_ERROR_CTRL_STREAM_DOWN",
    "APP_ERROR_NORMAL",
    "APP_ERROR_OVERLOADED",
    "DEFAULT_QUIC_PORT",
    "QuicListener",
    "QuicListenerConfig",
    "listener_config",
    "start",
    "start_quic_listener",
]
