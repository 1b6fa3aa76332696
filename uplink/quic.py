"""MQTT over QUIC client transport (aioquic, EMQX-compatible): one QUIC connection, its streams and policy.

This is the one edge module that imports aioquic; its errors are translated here (into OSError
subclasses, the family `uplink.client.Uplink` retries on) and nowhere else.

Theory of operation
-------------------
`open_quic(host, settings, ...)` opens a `QuicLink`: a UDP socket, an aioquic `QuicConnection` with
ALPN "mqtt", TLS 1.3 verifying the server against `ca_file` (SNI = `server_name` or the host), and
our own asyncio datagram protocol that turns aioquic events into per-stream byte queues.

- Control stream: the first client bidi stream (id 0). `QuicLink.control` is the `Transport` the
  Uplink drives (CONNECT first; PINGREQ/DISCONNECT stay on it). Its `close()` ends the connection:
  FIN, a bounded wait for the peer to acknowledge our last bytes, then CONNECTION_CLOSE with
  application error 0 when the last thing we wrote was a DISCONNECT, 1 (control stream down)
  otherwise - the EMQX close codes (`APP_ERROR_*`).
- Data streams: `open_data_stream()` opens further client bidi streams (never unidirectional) for
  traffic that must not queue behind telemetry (files). The server keeps MQTT state per stream.
- Server-initiated streams are refused: we advertise a limit of 0 and stop any that appear.
- Keepalive: QUIC `max_idle_timeout` is at least 3x the MQTT keepalive (as emqtt does), and a QUIC
  PING goes out whenever we sent nothing for `ping_interval_s`, below typical NAT UDP timeouts, so
  the mapping stays open even when MQTT is quiet.
- 0-RTT: every TLS session ticket the server issues is persisted to `ticket_file` (temp file, fsync,
  rename, mode 0600: the resumption secret is a credential). A new link with a valid ticket returns
  before the handshake completes, so the Uplink's CONNECT leaves in 0-RTT early data. If the server
  rejects early data, aioquic resends those stream bytes under 1-RTT keys: nothing is lost.
- Migration: `rebind()` moves the connection to a fresh local UDP port (a new socket, a new
  connection ID per RFC 9000 section 9.5, a PING to trigger path validation). The server follows the
  new address; the MQTT session does not notice. NAT rebinding (our address changes under us) needs
  nothing from us: the server validates the new path by itself.
- Back-pressure: aioquic buffers stream data without limit, so `send` queues all of its bytes first
  (the Transport contract) and then waits until the stream's unacknowledged bytes drop below
  `stream_high_water_bytes`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import math
import os
import socket
import tempfile
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicProtocolVersion
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import CipherSuite, Epoch, SessionTicket

log = logging.getLogger(__name__)

ALPN = "mqtt"
DEFAULT_QUIC_PORT = 14567

# EMQX close codes (emqx_quic.hrl): CONNECTION_CLOSE application error codes.
APP_ERROR_NORMAL = 0
APP_ERROR_CTRL_STREAM_DOWN = 1
APP_ERROR_OVERLOADED = 2

CONTROL_STREAM_ID = 0
_DISCONNECT_TYPE = 14
_CLOSE_FLUSH_TIMEOUT_S = 1.0


class QuicHandshakeError(ConnectionError):
    """The QUIC handshake failed or timed out (UDP blocked, wrong ALPN, bad certificate): fall back."""


class QuicOverloaded(ConnectionError):
    """The server refused the connection as overloaded (application error 2): back off longer."""


class QuicStreamError(ConnectionResetError):
    """The stream or its connection ended abnormally; `code` is the peer's error code if it sent one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class QuicSettings:
    """How to reach the broker over QUIC. Validated at construction; field names are the error paths."""

    port: int = DEFAULT_QUIC_PORT
    ca_file: str | None = None  # None: the certifi bundle (aioquic's default trust store)
    server_name: str | None = None  # SNI and certificate name; None: the host we connect to
    cert_file: str | None = None  # client certificate for brokers that demand mTLS
    key_file: str | None = None
    ticket_file: str | None = None  # where the TLS session ticket is kept for 0-RTT; None: not kept
    early_data: bool = True  # send CONNECT in 0-RTT when a ticket allows it
    idle_timeout_s: float | None = None  # QUIC max_idle_timeout; None: 3x the MQTT keepalive
    ping_interval_s: float = 15.0  # QUIC PING when idle; below NAT UDP timeouts (often 30 s)
    handshake_timeout_s: float = 10.0
    max_data_streams: int = 9  # EMQX allows 10 concurrent bidi streams: 1 control + 9 data
    stream_high_water_bytes: int = 1 << 20
    # "loss-tolerant": losses without queueing delay do not shrink the window (radio links);
    # "reno"/"cubic": aioquic's classic loss-based controllers.
    congestion_control: Literal["loss-tolerant", "reno", "cubic"] = "loss-tolerant"
    max_stream_data_bytes: int = 1 << 20  # initial per-stream receive window (aioquic doubles it)
    max_data_bytes: int = 4 << 20  # initial connection receive window
    # UDP socket buffers: the kernel default (~208 KiB, ~90 full datagrams) overflows on one burst
    # of a busy event loop, and those drops read as congestion. The kernel caps it at [rw]mem_max.
    socket_buffer_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be 1..65535, got {self.port}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: a client certificate needs both cert_file and key_file")
        if self.idle_timeout_s is not None and not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s: must be > 0, got {self.idle_timeout_s}")
        if not self.ping_interval_s > 0:
            raise ValueError(f"ping_interval_s: must be > 0, got {self.ping_interval_s}")
        if not self.handshake_timeout_s > 0:
            raise ValueError(f"handshake_timeout_s: must be > 0, got {self.handshake_timeout_s}")
        if not 0 <= self.max_data_streams <= 1000:
            raise ValueError(f"max_data_streams: must be 0..1000, got {self.max_data_streams}")
        if self.stream_high_water_bytes < 1024:
            raise ValueError("stream_high_water_bytes: must be >= 1024")
        if self.socket_buffer_bytes < 0:
            raise ValueError("socket_buffer_bytes: must be >= 0 (0: the kernel default)")
        if self.congestion_control not in ("loss-tolerant", "reno", "cubic"):
            raise ValueError("congestion_control: must be 'loss-tolerant', 'reno' or 'cubic'")

    def idle_timeout_for(self, keep_alive_s: int) -> float:
        """max_idle_timeout: the configured one, else 3x the MQTT keepalive (60 s without keepalive)."""
        if self.idle_timeout_s is not None:
            return self.idle_timeout_s
        return 3.0 * keep_alive_s if keep_alive_s > 0 else 60.0


# ---------------------------------------------------------------------------------------------------
# Congestion control for lossy radio links


class LossTolerantCongestionControl(CubicCongestionControl):
    """CUBIC, but a loss only counts as congestion when the RTT shows a queue.

    Why: loss-based controllers (Reno, CUBIC) read every lost packet as congestion and settle at
    MSS/RTT * 1.22/sqrt(p): about 70 KB/s at 5 % loss and 100 ms, whatever the radio could carry.
    On cellular and satellite links most loss is corruption and handovers, not queue overflow, and a
    real bottleneck announces itself by queueing delay first. So (the idea behind TCP Westwood+ and
    BBR): losses while the smoothed RTT is within `QUEUE_FACTOR` of the minimum RTT leave the window
    alone; losses with a standing queue are a congestion event handled as CUBIC does (window x0.7,
    then cubic regrowth); slow start ends when the RTT starts rising (HyStart) or at such a loss;
    persistent congestion still collapses the window.

    Why CUBIC and not Reno growth (measured, `edge-hil bench uplink`): real queue overflows do happen
    - in slow start a burst overruns a CPU-bound receiver's socket buffer - and Reno then halves and
    regrows one MSS per RTT: at 100 ms from 240 KB back to 600 KB takes ~30 s, so a 20 MB drain at 0 %
    loss took 8-9 s at ~2.5 MB/s and the results at 5 % depended on whether such an overflow
    happened early (the noisy 1.71 ratio). CUBIC's regrowth is independent of the RTT and returns to
    the previous maximum within seconds.
    """

    QUEUE_FACTOR = 1.25
    QUEUE_FLOOR_S = 0.010  # ignore RTT noise below this much queueing delay

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._rtt_min_s = math.inf
        self._srtt_s = 0.0
        self.random_losses = 0
        self.congestion_losses = 0

    def _queueing(self) -> bool:
        if self._rtt_min_s == math.inf:
            return True  # no RTT yet: be conventional
        return self._srtt_s - self._rtt_min_s > max(
            (self.QUEUE_FACTOR - 1.0) * self._rtt_min_s, self.QUEUE_FLOOR_S)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        packets = list(packets)
        if not packets:
            return
        if self._queueing():
            if (packets[-1].sent_time or 0.0) > self._congestion_recovery_start_time:
                self.congestion_losses += 1  # a new congestion event (CUBIC ignores the rest)
            super().on_packets_lost(now=now, packets=packets)
            return
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
        self.random_losses += 1

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        self._rtt_min_s = min(self._rtt_min_s, rtt)
        self._srtt_s = rtt if self._srtt_s == 0.0 else 0.875 * self._srtt_s + 0.125 * rtt
        super().on_rtt_measurement(now=now, rtt=rtt)


LOSS_TOLERANT = "loss-tolerant"
register_congestion_control(LOSS_TOLERANT, LossTolerantCongestionControl)


# ---------------------------------------------------------------------------------------------------
# Session ticket persistence


def ticket_to_json(ticket: SessionTicket) -> bytes:
    """A SessionTicket as JSON (bytes base64, times ISO 8601). No pickle: the file is only data."""
    b64 = base64.b64encode
    doc = {
        "age_add": ticket.age_add,
        "cipher_suite": int(ticket.cipher_suite),
        "not_valid_after": ticket.not_valid_after.isoformat(),
        "not_valid_before": ticket.not_valid_before.isoformat(),
        "resumption_secret": b64(ticket.resumption_secret).decode(),
        "server_name": ticket.server_name,
        "ticket": b64(ticket.ticket).decode(),
        "max_early_data_size": ticket.max_early_data_size,
        "other_extensions": [[t, b64(v).decode()] for t, v in ticket.other_extensions],
    }
    return json.dumps(doc, sort_keys=True).encode()


def ticket_from_json(data: bytes) -> SessionTicket:
    """The inverse of ticket_to_json; ValueError (or KeyError/TypeError) for anything malformed."""
    doc = json.loads(data)
    dec = base64.b64decode
    return SessionTicket(
        age_add=int(doc["age_add"]),
        cipher_suite=CipherSuite(int(doc["cipher_suite"])),
        not_valid_after=datetime.datetime.fromisoformat(doc["not_valid_after"]),
        not_valid_before=datetime.datetime.fromisoformat(doc["not_valid_before"]),
        resumption_secret=dec(doc["resumption_secret"]),
        server_name=str(doc["server_name"]),
        ticket=dec(doc["ticket"]),
        max_early_data_size=doc["max_early_data_size"],
        other_extensions=[(int(t), dec(v)) for t, v in doc["other_extensions"]],
    )


def write_ticket_file(path: str, ticket: SessionTicket) -> None:
    """Atomically replace path with the ticket: temp file in the same directory, fsync, rename, fsync dir.

    A power cut leaves either the old ticket or the new one, never a torn file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ticket-", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ticket_to_json(ticket))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_ticket_file(path: str) -> SessionTicket | None:
    """The persisted ticket if present, well formed and still valid; None otherwise (logged)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("quic: cannot read session ticket %s: %s", path, exc)
        return None
    try:
        ticket = ticket_from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("quic: ignoring malformed session ticket %s: %s", path, exc)
        return None
    return ticket if ticket.is_valid else None


# ---------------------------------------------------------------------------------------------------
# Streams


def _last_packet_type(data: bytes) -> int | None:
    """The MQTT packet type of the last whole packet in data (which holds whole packets), or None."""
    pos, n, last = 0, len(data), None
    while pos < n:
        first = data[pos]
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= n or shift > 21:
                return None
            byte = data[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                break
            shift += 7
        last = first >> 4
        pos = i + length
    return last


class QuicStream:
    """One client-initiated bidi stream as an ordered byte stream (the uplink `Transport` shape).

    `recv` returns b"" after the peer's FIN and raises QuicStreamError after a reset or when the
    connection is gone. `send` queues every byte before it first suspends, then waits for room.
    """

    def __init__(self, link: QuicLink, stream_id: int) -> None:
        self.link = link
        self.stream_id = stream_id
        self.peer_stop_code: int | None = None  # STOP_SENDING error code from the peer (MQTT reason)
        self.peer_reset_code: int | None = None
        self.last_packet_type: int | None = None  # of the last bytes we wrote
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._eof = False
        self._error: QuicStreamError | None = None
        self._fin_sent = False

    @property
    def is_control(self) -> bool:
        return self.stream_id == CONTROL_STREAM_ID

    async def send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._fin_sent:
            raise QuicStreamError(f"stream {self.stream_id} is closed for sending")
        if not data:
            return
        self.link._send(self.stream_id, data)
        self.last_packet_type = _last_packet_type(data)
        while self.link._unacked_bytes(self.stream_id) > self.link.settings.stream_high_water_bytes:
            self._drained.clear()
            await self._drained.wait()
            if self._error is not None:
                raise self._error

    async def recv(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        return self._chunks.popleft()

    async def close(self) -> None:
        """Control stream: close the whole connection (see the module docstring). Data stream: FIN."""
        if self.is_control:
            await self.link.close()
            return
        if not self._fin_sent and self._error is None:
            self._fin_sent = True
            self.link._send(self.stream_id, b"", end_stream=True)

    def abort(self, error_code: int = 0) -> None:
        """Reset our sending side and ask the peer to stop sending (both with error_code)."""
        self.link._abort_stream(self.stream_id, error_code)
        self._fail(QuicStreamError(f"stream {self.stream_id} aborted locally", error_code))

    # -- fed by the link ----------------------------------------------------------------------

    def _feed(self, data: bytes, end_stream: bool) -> None:
        if data:
            self._chunks.append(data)
        if end_stream:
            self._eof = True
        self._readable.set()

    def _fail(self, error: QuicStreamError) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._drained.set()


# ---------------------------------------------------------------------------------------------------
# The connection


class _Protocol(QuicConnectionProtocol):
    """aioquic's asyncio glue with our event handling (no StreamReader per stream)."""

    def __init__(self, quic: QuicConnection, link: QuicLink) -> None:
        super().__init__(quic)
        self._link = link

    def quic_event_received(self, event: events.QuicEvent) -> None:
        self._link._on_event(event)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self._link._after_io()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        self._link._after_io()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: QUIC recovers by itself (loss detection, idle timeout).
        log.debug("quic: datagram error: %s", exc)


class QuicLink:
    """One QUIC connection to the broker: the control stream, data streams, migration, close codes."""

    def __init__(self, settings: QuicSettings, configuration: QuicConfiguration,
                 addr: tuple[Any, ...], family: int, keep_alive_s: int) -> None:
        self.settings = settings
        self.addr = addr
        self.handshake_completed = False
        self.session_resumed = False
        self.early_data_accepted = False
        self.early_data_attempted = False
        self.alpn: str | None = None
        self.terminated: events.ConnectionTerminated | None = None
        self.migrations = 0
        self._family = family
        self._loop = asyncio.get_running_loop()
        self._quic = QuicConnection(configuration=configuration,
                                    session_ticket_handler=self._on_session_ticket)
        # A2: we accept no server-initiated streams at all (EMQX never opens one).
        self._quic._local_max_streams_bidi.value = 0
        self._quic._local_max_streams_uni.value = 0
        self._protocol = _Protocol(self._quic, self)
        self._udp: asyncio.DatagramTransport | None = None
        self._streams: dict[int, QuicStream] = {}
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._closed = asyncio.Event()
        self._closing = False
        self._ticket_writes: set[asyncio.Future[None]] = set()
        self._last_send_s = self._loop.time()
        self._ping_uid = 0
        idle_s = settings.idle_timeout_for(keep_alive_s)
        self._ping_interval_s = min(settings.ping_interval_s, idle_s / 3.0)
        self._ping_timer: asyncio.TimerHandle | None = None
        self.control = QuicStream(self, CONTROL_STREAM_ID)
        self._streams[CONTROL_STREAM_ID] = self.control
        self._finished = False

    # -- public ----------------------------------------------------------------------------------

    @property
    def local_port(self) -> int:
        assert self._udp is not None
        return int(self._udp.get_extra_info("sockname")[1])

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def peer_app_error(self) -> int | None:
        """The application error code of the peer's CONNECTION_CLOSE, if it sent one."""
        t = self.terminated
        if t is None or t.frame_type is not None:
            return None
        return t.error_code

    @property
    def overloaded(self) -> bool:
        """The server turned us away as overloaded: app error 2, or (before the handshake, where an
        application close becomes a transport APPLICATION_ERROR per RFC 9000 10.2.3) that."""
        t = self.terminated
        if t is None:
            return False
        if t.frame_type is None:
            return t.error_code == APP_ERROR_OVERLOADED
        return not self.handshake_completed and t.error_code == QuicErrorCode.APPLICATION_ERROR

    async def wait_handshake(self, timeout_s: float) -> None:
        """Wait for the handshake; QuicHandshakeError (QuicOverloaded) if it fails or times out."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._handshake)
        except TimeoutError:
            raise QuicHandshakeError(f"no QUIC handshake within {timeout_s:.1f}s") from None

    async def open_data_stream(self) -> QuicStream:
        """A new client bidi stream for MQTT packets that must not wait behind the control stream.

        Raises QuicStreamError when the connection is closed or max_data_streams are open.
        """
        if self._closing or self.terminated is not None:
            raise QuicStreamError("connection is closed")
        open_data = sum(1 for s in self._streams.values() if not s.is_control)
        if open_data >= self.settings.max_data_streams:
            raise QuicStreamError(f"{open_data} data streams open (max_data_streams)")
        stream_id = self._quic.get_next_available_stream_id()
        if stream_id == CONTROL_STREAM_ID:
            # The control stream must be the first one the server sees (A3): claim it now.
            self._quic.send_stream_data(CONTROL_STREAM_ID, b"")
            stream_id = self._quic.get_next_available_stream_id()
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        self._quic.send_stream_data(stream_id, b"")
        self._protocol.transmit()
        return stream

    async def rebind(self) -> int:
        """Migrate to a new local UDP port (connection migration); returns the new port."""
        if self.terminated is not None:
            raise QuicStreamError("connection is closed")
        sock = self._new_socket()
        new, _ = await self._loop.create_datagram_endpoint(lambda: self._protocol, sock=sock)
        old, self._udp = self._udp, new
        if old is not None:
            old.close()
        self.migrations += 1
        # A fresh connection ID on the new path keeps the two paths unlinkable (RFC 9000 9.5); the
        # PING makes the server see (and validate) the new address now rather than at the next send.
        self._quic.change_connection_id()
        self._ping()
        return self.local_port

    async def close(self, error_code: int | None = None) -> None:
        """FIN the streams, give the last bytes a moment to be acknowledged, CONNECTION_CLOSE.

        error_code None: 0 if our last control-stream packet was a DISCONNECT, else 1.
        """
        if self._closing:
            await self._wait_closed_bounded()
            return
        self._closing = True
        if error_code is None:
            normal = self.control.last_packet_type == _DISCONNECT_TYPE
            error_code = APP_ERROR_NORMAL if normal else APP_ERROR_CTRL_STREAM_DOWN
        if self.terminated is None:
            for stream_id, stream in list(self._streams.items()):
                if stream._fin_sent:
                    continue  # a data stream its owner already finished
                # aioquic: ValueError (reset/unknown stream), RuntimeError (already finished).
                with contextlib.suppress(ValueError, AssertionError, RuntimeError):
                    self._quic.send_stream_data(stream_id, b"", end_stream=True)
            self._protocol.transmit()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT_S):
                    while self.terminated is None and any(
                        self._unacked_bytes(sid) for sid in self._streams
                    ):
                        self.control._drained.clear()
                        await self.control._drained.wait()
            self._protocol.close(error_code=error_code)
            await self._wait_closed_bounded()
        self._finish()
        if self._ticket_writes:
            await asyncio.gather(*self._ticket_writes, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------------

    def _new_socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            if self.settings.socket_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.socket_buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.socket_buffer_bytes)
            sock.bind(("::" if self._family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _start(self) -> None:
        self._udp, _ = await self._loop.create_datagram_endpoint(
            lambda: self._protocol, sock=self._new_socket())
        self._protocol.connect(self.addr)
        # aioquic derives 0-RTT keys during connect() only when the ticket allows early data.
        self.early_data_attempted = self._quic._cryptos[Epoch.ZERO_RTT].send.is_valid()
        self._arm_ping()

    async def _wait_closed_bounded(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT_S):
                await self._closed.wait()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._protocol._timer is not None:
            self._protocol._timer.cancel()
            self._protocol._timer = None
        if self._udp is not None:
            # Not now: we may be inside aioquic's event processing, which still transmits after us.
            self._loop.call_soon(self._udp.close)
        error = QuicStreamError("QUIC connection closed", self.peer_app_error)
        for stream in self._streams.values():
            stream._fail(error)
        if not self._handshake.done():
            self._handshake.set_exception(QuicHandshakeError("connection closed during the handshake"))
            self._handshake.exception()  # retrieved: nobody may be waiting
        self._closed.set()

    def _send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self.terminated is not None or self._closed.is_set():
            raise QuicStreamError("QUIC connection closed", self.peer_app_error)
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except (ValueError, RuntimeError) as exc:  # aioquic: stream finished or reset
            raise QuicStreamError(f"stream {stream_id}: {exc}") from exc
        self._last_send_s = self._loop.time()
        self._protocol._transmit_soon()

    def _abort_stream(self, stream_id: int, error_code: int) -> None:
        with contextlib.suppress(ValueError):
            self._quic.reset_stream(stream_id, error_code)
            self._quic.stop_stream(stream_id, error_code)
        self._streams.pop(stream_id, None)
        self._protocol._transmit_soon()

    def _unacked_bytes(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _after_io(self) -> None:
        """After datagrams or timers: wake senders whose acknowledged bytes made room."""
        high = self.settings.stream_high_water_bytes
        for stream_id, stream in self._streams.items():
            if not stream._drained.is_set() and (
                self._unacked_bytes(stream_id) <= high // 2
                or (self._closing and self._unacked_bytes(stream_id) == 0)
            ):
                stream._drained.set()
        if self._closing:
            self.control._drained.set()  # close() re-checks all streams

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                if event.stream_id % 2 == 1:  # server-initiated: refused (A2)
                    with contextlib.suppress(ValueError):
                        self._quic.stop_stream(event.stream_id, 0)
                return
            stream._feed(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream.peer_reset_code = event.error_code
                stream._fail(QuicStreamError(f"stream {event.stream_id} reset by the broker",
                                             event.error_code))
        elif isinstance(event, events.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                # On the control stream the code is an MQTT reason (0x8E taken over, 0x98 admin).
                stream.peer_stop_code = event.error_code
                log.info("quic: broker stopped stream %d with code 0x%x", event.stream_id,
                         event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_completed = True
            self.session_resumed = event.session_resumed
            self.early_data_accepted = event.early_data_accepted
            self.alpn = event.alpn_protocol
            if not self._handshake.done():
                self._handshake.set_result(None)
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            if not self.handshake_completed and not self._handshake.done():
                cls = QuicOverloaded if self.overloaded else QuicHandshakeError
                self._handshake.set_exception(
                    cls(f"QUIC handshake failed: code 0x{event.error_code:x} {event.reason_phrase}"))
                self._handshake.exception()
            self._finish()

    def _on_session_ticket(self, ticket: SessionTicket) -> None:
        path = self.settings.ticket_file
        if path is None:
            return
        future = self._loop.run_in_executor(None, write_ticket_file, path, ticket)
        self._ticket_writes.add(future)
        future.add_done_callback(self._ticket_written)

    def _ticket_written(self, future: asyncio.Future[None]) -> None:
        self._ticket_writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("quic: cannot persist session ticket: %s", future.exception())

    def _arm_ping(self) -> None:
        self._ping_timer = self._loop.call_later(self._ping_interval_s, self._on_ping_timer)

    def _on_ping_timer(self) -> None:
        self._ping_timer = None
        if self.terminated is not None or self._closed.is_set():
            return
        if self._loop.time() - self._last_send_s >= self._ping_interval_s * 0.9:
            self._ping()
        self._arm_ping()

    def _ping(self) -> None:
        self._ping_uid += 1
        self._quic.send_ping(self._ping_uid)
        self._last_send_s = self._loop.time()
        self._protocol.transmit()


def quic_configuration(settings: QuicSettings, host: str, keep_alive_s: int,
                       ticket: SessionTicket | None) -> QuicConfiguration:
    """The aioquic client configuration for settings (ALPN mqtt, TLS 1.3 verifying the server)."""
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=settings.server_name or host,
        idle_timeout=settings.idle_timeout_for(keep_alive_s),
        congestion_control_algorithm=settings.congestion_control,
        max_stream_data=settings.max_stream_data_bytes,
        max_data=settings.max_data_bytes,
    )
    # QUIC v1 only (A1): EMQX's msquic may or may not speak v2 depending on the release.
    configuration.supported_versions = [QuicProtocolVersion.VERSION_1]
    if settings.ca_file is not None:
        configuration.load_verify_locations(cafile=settings.ca_file)
    if settings.cert_file is not None:
        configuration.load_cert_chain(settings.cert_file, settings.key_file)
    if ticket is not None:
        configuration.session_ticket = ticket
    return configuration


async def open_quic(
    host: str,
    settings: QuicSettings,
    *,
    keep_alive_s: int = 60,
    connect_timeout_s: float | None = None,
    wait_handshake: bool | None = None,
) -> QuicLink:
    """Open a QUIC connection to host:settings.port and return the link (control stream ready).

    With a persisted ticket (and early_data) it returns at once, so the first bytes on the control
    stream travel as 0-RTT data; otherwise (or with wait_handshake=True) it waits for the handshake.
    Raises QuicHandshakeError / QuicOverloaded (ConnectionError, hence OSError) or OSError.
    """
    loop = asyncio.get_running_loop()
    timeout_s = connect_timeout_s if connect_timeout_s is not None else settings.handshake_timeout_s
    timeout_s = min(timeout_s, settings.handshake_timeout_s)
    infos = await loop.getaddrinfo(host, settings.port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    family, _, _, _, addr = infos[0]
    ticket = None
    if settings.ticket_file is not None and settings.early_data:
        ticket = await asyncio.to_thread(read_ticket_file, settings.ticket_file)
        if ticket is not None and ticket.server_name != (settings.server_name or host):
            ticket = None
    configuration = quic_configuration(settings, host, keep_alive_s, ticket)
    try:
        link = QuicLink(settings, configuration, tuple(addr), family, keep_alive_s)
        await link._start()
    except (ValueError, TypeError) as exc:  # aioquic: bad certificate/key files, bad configuration
        raise QuicHandshakeError(f"cannot set up QUIC: {exc}") from exc
    if wait_handshake is None:
        wait_handshake = not link.early_data_attempted
    if wait_handshake:
        try:
            await link.wait_handshake(timeout_s)
            await asyncio.sleep(0)  # a close that came with the server's flight is processed by now
            if link.terminated is not None:
                cls = QuicOverloaded if link.overloaded else QuicHandshakeError
                raise cls(f"the broker closed the connection at once (code 0x{link.terminated.error_code:x})")
        except BaseException:
            await link.close(APP_ERROR_CTRL_STREAM_DOWN)
            raise
    return link

