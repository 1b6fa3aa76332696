"""Userspace network impairment proxy for HIL rigs: a UDP or TCP relay that loses, delays, throttles,
blackholes and rebinds traffic between a client and its upstream server.

Theory of operation. This kernel has no `tc netem`, so impairment happens in a relay the client talks to
instead of the server: client -> proxy (127.0.0.1:free port) -> upstream. Each direction ("up": client to
server, "down": server to client) has its own `LinkShaper`, a pure model of one link direction that is
handed a packet size and the time and answers "drop (why)" or "deliver at due_s". The model, in order:

1. loss: drawn from its own seeded `random.Random`, so a run is reproducible and the loss pattern does not
   change when delay or jitter change;
2. bandwidth: a token bucket (rate_bytes_s, burst_bytes); a packet leaves the bucket once its bytes are
   credited, so back-to-back packets queue behind each other (queueing delay). UDP packets that find more
   than queue_limit_bytes already queued are tail-dropped, as a router buffer would;
3. propagation: delay_s plus uniform jitter in [-jitter_s, +jitter_s] (never below zero). UDP packets may
   overtake each other when jitter exceeds their spacing (`reorder=True`, the default); TCP never reorders.

The relays are thin: they read, ask the shaper, and send when the injected `Clock` reaches the due time.
A `ManualClock` lets tests step time by hand: nothing is delivered before the test advances the clock.

TCP cannot lose bytes, and this proxy terminates TCP on both sides, so a lost segment cannot trigger a real
retransmission or a congestion-window cut. We emulate the cost a loss has on a real TCP stream: the relayed
byte stream is cut into chunks of at most `tcp_chunk_bytes`; each chunk counts as ceil(size/segment_bytes)
segments, each lost with the loss probability; a chunk with at least one lost segment is delivered one
retransmission penalty later (default: max(200 ms Linux minimum RTO, 2*delay + 4*jitter), an RTO-ish
timeout), and because order is kept, every later byte waits behind it (head-of-line blocking). The relay
buffers at most `tcp_buffer_bytes` per direction and connection before it stops reading, so the latency
also throttles throughput the way a TCP window does. What is not modelled: the congestion-window collapse
after losses. TCP through this proxy therefore fares somewhat better under loss than real TCP would.

Blackholes (a tunnel, a dead cell) drop every UDP datagram arriving or due during the window and stall TCP
(nothing is delivered and, once buffers fill, nothing is read; a connection accepted during a blackhole is
not dialled upstream until it ends). Rebind emulates NAT rebinding or a handover: UDP flows move to a new
outbound socket (new local port, optionally another loopback address such as 127.0.0.2) while the client
keeps its own socket, so the server sees the client's address change mid-connection; TCP connections are
cut with RST (a TCP connection cannot survive an address change) and new ones dial from the new address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import math
import random
import signal
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

UDP_MAX_DATAGRAM_BYTES = 65535
LINUX_MIN_RTO_S = 0.2
_UDP_READS_PER_WAKEUP = 256  # datagrams drained per readiness callback, so one busy flow cannot starve others
_TCP_READ_BYTES = 65536
# large socket buffers (the kernel caps them at net.core.[rw]mem_max) so bursts are lost by the model, not
# by an overflowing relay socket
_UDP_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------------------------- time


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds and timers; the proxy reads time only through this seam."""

    def now_s(self) -> float: ...

    def call_at(self, when_s: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """The running event loop's monotonic clock (the default)."""

    def now_s(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when_s: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when_s, callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told to; timers fire, in time order, inside `advance()`."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = start_s
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count()

    def now_s(self) -> float:
        return self._now_s

    def call_at(self, when_s: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _ManualTimer(callback)
        heapq.heappush(self._timers, (when_s, next(self._seq), timer))
        return timer

    def advance(self, dt_s: float) -> None:
        self.advance_to(self._now_s + dt_s)

    def advance_to(self, when_s: float) -> None:
        # now_s steps to each timer's time before it fires, so callbacks that schedule again see their time
        while self._timers and self._timers[0][0] <= when_s:
            at_s, _, timer = heapq.heappop(self._timers)
            self._now_s = max(self._now_s, at_s)
            if not timer.cancelled:
                timer.callback()
        self._now_s = max(self._now_s, when_s)


# ------------------------------------------------------------------------------------------ config


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}")


class Direction(StrEnum):
    UP = "up"  # client -> upstream server
    DOWN = "down"  # upstream server -> client


@dataclass(frozen=True, slots=True)
class LinkImpairment:
    """How one direction of the link misbehaves. Defaults: a perfect link."""

    loss_pct: float = 0.0
    delay_s: float = 0.0  # one way
    jitter_s: float = 0.0  # uniform +/- around delay_s
    rate_bytes_s: float | None = None  # None: no bandwidth cap
    burst_bytes: int = 16 * 1024
    queue_limit_bytes: int = 256 * 1024  # UDP tail drop beyond this backlog (only with a rate cap)
    reorder: bool = True  # UDP: jitter may reorder datagrams; TCP never reorders
    tcp_segment_bytes: int = 1448  # loss is drawn per segment of a TCP chunk
    tcp_chunk_bytes: int = 16 * 1024
    tcp_loss_penalty_s: float | None = None  # None: max(LINUX_MIN_RTO_S, 2*delay_s + 4*jitter_s)
    tcp_buffer_bytes: int = 256 * 1024  # per connection and direction, like a TCP window

    def __post_init__(self) -> None:
        _check(0.0 <= self.loss_pct <= 100.0, "loss_pct", "must be within 0..100")
        _check(self.delay_s >= 0.0, "delay_s", "must be >= 0")
        _check(self.jitter_s >= 0.0, "jitter_s", "must be >= 0")
        _check(self.rate_bytes_s is None or self.rate_bytes_s > 0, "rate_bytes_s", "must be > 0 or None")
        for name in ("burst_bytes", "queue_limit_bytes", "tcp_segment_bytes", "tcp_chunk_bytes",
                     "tcp_buffer_bytes"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(self.tcp_loss_penalty_s is None or self.tcp_loss_penalty_s >= 0.0, "tcp_loss_penalty_s",
               "must be >= 0 or None")

    @property
    def loss_penalty_s(self) -> float:
        if self.tcp_loss_penalty_s is not None:
            return self.tcp_loss_penalty_s
        return max(LINUX_MIN_RTO_S, 2 * self.delay_s + 4 * self.jitter_s)


@dataclass(frozen=True, slots=True)
class Profile:
    """A whole impairment scenario as data: both directions plus scheduled blackholes and rebinds.

    Scheduled events count from the moment the profile is applied (`set_profile` or proxy start).
    """

    name: str = "clear"
    up: LinkImpairment = LinkImpairment()
    down: LinkImpairment = LinkImpairment()
    blackhole_after_s: float | None = None  # first window starts this long after apply; None: none
    blackhole_s: float = 0.0
    blackhole_every_s: float | None = None  # None: one window only
    rebind_every_s: float | None = None
    rebind_hosts: tuple[str, ...] = ()  # each rebind moves to the next one; empty: keep the host, new port
    handover_gap_s: float = 0.0  # blackhole this long at each scheduled rebind (radio handover gap)

    def __post_init__(self) -> None:
        after_s, every_s = self.blackhole_after_s, self.blackhole_every_s
        _check(after_s is None or after_s >= 0, "blackhole_after_s", "must be >= 0")
        _check(self.blackhole_s >= 0, "blackhole_s", "must be >= 0")
        _check(every_s is None or every_s > self.blackhole_s, "blackhole_every_s",
               "must be longer than blackhole_s")
        _check(self.rebind_every_s is None or self.rebind_every_s > 0, "rebind_every_s", "must be > 0")
        _check(self.handover_gap_s >= 0, "handover_gap_s", "must be >= 0")

    def link(self, direction: Direction) -> LinkImpairment:
        return self.up if direction is Direction.UP else self.down


def symmetric(**link: object) -> tuple[LinkImpairment, LinkImpairment]:
    """The same impairment in both directions (keyword arguments of LinkImpairment)."""
    one = LinkImpairment(**link)  # type: ignore[arg-type]
    return one, one


def clear() -> Profile:
    """No impairment."""
    return Profile()


def lossy(loss_pct: float, rtt_ms: float, jitter_ms: float = 0.0) -> Profile:
    """A lossy long link: loss_pct in each direction, rtt_ms split evenly between the two directions."""
    up, down = symmetric(loss_pct=loss_pct, delay_s=rtt_ms / 2000.0, jitter_s=jitter_ms / 1000.0)
    return Profile(name=f"lossy({loss_pct}%,{rtt_ms}ms)", up=up, down=down)


def tunnel(blackhole_s: float, after_s: float = 1.0, every_s: float | None = None,
           rtt_ms: float = 0.0) -> Profile:
    """A tunnel: total loss of connectivity for blackhole_s, starting after_s from now (repeating every_s)."""
    up, down = symmetric(delay_s=rtt_ms / 2000.0)
    return Profile(name=f"tunnel({blackhole_s}s)", up=up, down=down, blackhole_after_s=after_s,
                   blackhole_s=blackhole_s, blackhole_every_s=every_s)


def handover(every_s: float, hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2"), gap_s: float = 0.0,
             rtt_ms: float = 0.0) -> Profile:
    """Handovers: the client's address changes every every_s (alternating hosts), with an optional gap."""
    up, down = symmetric(delay_s=rtt_ms / 2000.0)
    return Profile(name=f"handover({every_s}s)", up=up, down=down, rebind_every_s=every_s, rebind_hosts=hosts,
                   handover_gap_s=gap_s)


def cellular(rtt_ms: float = 150.0, jitter_ms: float = 40.0, loss_pct: float = 1.0, up_kbps: float = 1000.0,
             down_kbps: float = 4000.0, handover_every_s: float | None = None) -> Profile:
    """A mediocre cellular link: asymmetric rates, jitter, some loss, optional handovers."""
    def one(kbps: float) -> LinkImpairment:
        return LinkImpairment(loss_pct=loss_pct, delay_s=rtt_ms / 2000.0, jitter_s=jitter_ms / 1000.0,
                              rate_bytes_s=kbps * 1000.0 / 8.0)

    return Profile(name="cellular", up=one(up_kbps), down=one(down_kbps), rebind_every_s=handover_every_s)


# ------------------------------------------------------------------------------------ pure models


class DropReason(StrEnum):
    LOSS = "loss"
    QUEUE = "queue"  # bandwidth-cap buffer full
    BLACKHOLE = "blackhole"
    ERROR = "error"  # the local send failed (e.g. socket buffer full)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A shaper's answer for one packet: deliver at due_s, or drop for a reason."""

    due_s: float | None
    drop: DropReason | None = None
    penalty_s: float = 0.0  # TCP loss emulation: extra delay included in due_s


class LinkShaper:
    """One direction of the link model (pure: sizes and times in, verdicts out); shared by all flows."""

    def __init__(self, impairment: LinkImpairment, seed: int | str, direction: Direction) -> None:
        self.impairment = impairment
        # separate streams so the loss pattern for a seed does not depend on jitter draws and vice versa
        self._loss_rng = random.Random(f"{seed}/{direction}/loss")
        self._jitter_rng = random.Random(f"{seed}/{direction}/jitter")
        self._tokens = float(impairment.burst_bytes)
        self._bucket_s = -math.inf

    def backlog_bytes(self, now_s: float) -> float:
        """Bytes admitted but not yet through the bandwidth cap at now_s."""
        rate = self.impairment.rate_bytes_s
        return 0.0 if rate is None else max(0.0, self._bucket_s - now_s) * rate

    def admit_datagram(self, size_bytes: int, now_s: float, not_before_s: float = -math.inf) -> Verdict:
        """Verdict for a datagram arriving at now_s; not_before_s keeps a flow in order when reorder=False."""
        imp = self.impairment
        if imp.loss_pct and self._loss_rng.random() * 100.0 < imp.loss_pct:
            return Verdict(None, DropReason.LOSS)
        if imp.rate_bytes_s is not None and self.backlog_bytes(now_s) + size_bytes > imp.queue_limit_bytes:
            return Verdict(None, DropReason.QUEUE)
        due_s = self._depart(size_bytes, now_s) + self._propagation_s()
        if not imp.reorder:
            due_s = max(due_s, not_before_s)
        return Verdict(due_s)

    def admit_chunk(self, size_bytes: int, now_s: float, not_before_s: float = -math.inf) -> Verdict:
        """Verdict for a TCP chunk: never dropped; late by one penalty if any of its segments was "lost"."""
        imp = self.impairment
        penalty_s = 0.0
        if imp.loss_pct:
            segments = -(-size_bytes // imp.tcp_segment_bytes)
            # draw every segment (no short-circuit) so the random stream depends only on the sizes seen
            lost = [self._loss_rng.random() * 100.0 < imp.loss_pct for _ in range(segments)]
            if any(lost):
                penalty_s = imp.loss_penalty_s
        due_s = self._depart(size_bytes, now_s) + self._propagation_s() + penalty_s
        return Verdict(max(due_s, not_before_s), penalty_s=penalty_s)

    def _depart(self, size_bytes: int, now_s: float) -> float:
        rate = self.impairment.rate_bytes_s
        if rate is None:
            return now_s
        start_s = max(now_s, self._bucket_s)
        if self._bucket_s != -math.inf:
            refill = (start_s - self._bucket_s) * rate
            self._tokens = min(float(self.impairment.burst_bytes), self._tokens + refill)
        self._bucket_s = start_s
        if self._tokens >= size_bytes:
            self._tokens -= size_bytes
            return start_s
        depart_s = start_s + (size_bytes - self._tokens) / rate
        self._tokens = 0.0
        self._bucket_s = depart_s
        return depart_s

    def _propagation_s(self) -> float:
        imp = self.impairment
        if not imp.jitter_s:
            return imp.delay_s
        return max(0.0, imp.delay_s + self._jitter_rng.uniform(-imp.jitter_s, imp.jitter_s))


class BlackholeWindows:
    """When the link is dark: scheduled windows of a profile plus on-demand blackholes (pure)."""

    def __init__(self) -> None:
        self._manual_until_s = -math.inf
        self._first_s: float | None = None
        self._length_s = 0.0
        self._every_s: float | None = None

    def schedule(self, profile: Profile, applied_at_s: float) -> None:
        if profile.blackhole_after_s is None or profile.blackhole_s <= 0:
            self._first_s = None
            return
        self._first_s = applied_at_s + profile.blackhole_after_s
        self._length_s = profile.blackhole_s
        self._every_s = profile.blackhole_every_s

    def start(self, now_s: float, duration_s: float | None) -> None:
        """Go dark from now_s for duration_s (None: until `end`)."""
        until_s = math.inf if duration_s is None else now_s + duration_s
        self._manual_until_s = max(self._manual_until_s, until_s)

    def end(self, now_s: float) -> None:
        """End an on-demand blackhole now (scheduled windows stay as scheduled)."""
        self._manual_until_s = now_s

    def dark_until(self, now_s: float) -> float:
        """End of the blackhole covering now_s (may be inf), or now_s when the link is up."""
        until_s = self._manual_until_s if self._manual_until_s > now_s else now_s
        if self._first_s is not None and now_s >= self._first_s:
            k = 0 if self._every_s is None else math.floor((now_s - self._first_s) / self._every_s)
            start_s = self._first_s + k * (self._every_s or 0.0)
            if now_s < start_s + self._length_s:
                until_s = max(until_s, start_s + self._length_s)
        return until_s

    def is_dark(self, now_s: float) -> bool:
        return self.dark_until(now_s) > now_s


# ------------------------------------------------------------------------------------------- stats


@dataclass(slots=True)
class DirectionStats:
    """Counters of one direction. A packet is a datagram (UDP) or a relayed chunk (TCP)."""

    received_packets: int = 0
    received_bytes: int = 0
    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    dropped_packets: dict[DropReason, int] = field(default_factory=dict)
    dropped_bytes: int = 0
    penalized_chunks: int = 0  # TCP chunks delayed by the loss emulation

    def dropped(self, reason: DropReason | None = None) -> int:
        if reason is None:
            return sum(self.dropped_packets.values())
        return self.dropped_packets.get(reason, 0)

    def count_drop(self, reason: DropReason, size_bytes: int) -> None:
        self.dropped_packets[reason] = self.dropped_packets.get(reason, 0) + 1
        self.dropped_bytes += size_bytes

    def copy(self) -> DirectionStats:
        return dataclasses.replace(self, dropped_packets=dict(self.dropped_packets))


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of the proxy's counters."""

    up: DirectionStats
    down: DirectionStats
    rebinds: int
    flows: int  # UDP client addresses seen
    connections_accepted: int
    connections_open: int
    connections_cut: int
    connect_failures: int
    dark: bool

    def line(self) -> str:
        """One human-readable line (the CLI prints these)."""
        def d(s: DirectionStats) -> str:
            return (f"fwd={s.forwarded_packets}/{s.forwarded_bytes}B drop={s.dropped()}"
                    f"(loss={s.dropped(DropReason.LOSS)} bh={s.dropped(DropReason.BLACKHOLE)}"
                    f" q={s.dropped(DropReason.QUEUE)}) pen={s.penalized_chunks}")
        return (f"up {d(self.up)} | down {d(self.down)} | rebinds={self.rebinds} flows={self.flows}"
                f" conns={self.connections_open}/{self.connections_accepted} cut={self.connections_cut}"
                f" dark={int(self.dark)}")


# ------------------------------------------------------------------------------------------- proxy

Address = tuple[str, int]


@dataclass(slots=True)
class _UdpFlow:
    client: Address
    sock: socket.socket
    last_due_s: dict[Direction, float] = field(
        default_factory=lambda: {Direction.UP: -math.inf, Direction.DOWN: -math.inf})


class _StreamQueue:
    """One TCP direction's bytes in flight: (due_s, chunk | None for EOF), bounded by tcp_buffer_bytes."""

    def __init__(self) -> None:
        self.items: deque[tuple[float, bytes | None]] = deque()
        self.size_bytes = 0
        self.last_due_s = -math.inf
        self.changed = asyncio.Event()

    def put(self, due_s: float, chunk: bytes | None) -> None:
        self.items.append((due_s, chunk))
        self.size_bytes += len(chunk or b"")
        self.last_due_s = due_s
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()


@dataclass(eq=False, slots=True)
class _TcpConn:
    index: int
    task: asyncio.Task[None] | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class ImpairmentProxy:
    """An asyncio UDP or TCP relay from `address` to `upstream`, impaired by a `Profile`.

    Use `async with ImpairmentProxy(("127.0.0.1", port), kind="udp", profile=lossy(5, 100)) as proxy:` and
    point the client at `proxy.address`. Everything can change at run time (`set_profile`, `blackhole`,
    `rebind`); `stats()` returns the counters.
    """

    def __init__(self, upstream: Address, *, kind: Literal["udp", "tcp"], listen: Address = ("127.0.0.1", 0),
                 profile: Profile | None = None, seed: int | str = 0, clock: Clock | None = None,
                 outbound_host: str | None = None) -> None:
        if kind not in ("udp", "tcp"):
            raise ValueError(f"kind must be 'udp' or 'tcp', not {kind!r}")
        self.kind = kind
        self.upstream = upstream
        self._upstream_ip: Address = upstream
        self._listen = listen
        self.clock: Clock = clock or LoopClock()
        self.seed = seed
        self._profile = profile or Profile()
        self._shapers = {d: LinkShaper(self._profile.link(d), seed, d) for d in Direction}
        self._blackholes = BlackholeWindows()
        self._stats = {d: DirectionStats() for d in Direction}
        self._rebinds = 0
        loopback = upstream[0].startswith("127.") or upstream[0] == "localhost"
        self._outbound_host = outbound_host or ("127.0.0.1" if loopback else "0.0.0.0")
        self._rebind_timer: TimerHandle | None = None
        self._timers: set[TimerHandle] = set()
        self._wakers: set[asyncio.Future[None]] = set()
        self._stats_changed = asyncio.Event()
        self._closed = False
        self._address: Address | None = None
        # UDP
        self._listen_sock: socket.socket | None = None
        self._flows: dict[Address, _UdpFlow] = {}
        # TCP
        self._server: asyncio.Server | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._conns: set[_TcpConn] = set()
        self._conn_seq = itertools.count(1)
        self._accepted = 0
        self._cut = 0
        self._connect_failures = 0

    # ---- lifecycle

    async def __aenter__(self) -> ImpairmentProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> Address:
        """Where clients connect (the listening address, port resolved)."""
        if self._address is None:
            raise RuntimeError("the proxy is not started")
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    async def start(self) -> None:
        """Bind the listening socket; from now on traffic is relayed."""
        loop = asyncio.get_running_loop()
        if self.kind == "udp":
            # datagrams from upstream are matched by address, so compare against its numeric form
            infos = await loop.getaddrinfo(*self.upstream, family=socket.AF_INET, type=socket.SOCK_DGRAM)
            self._upstream_ip = (str(infos[0][4][0]), int(infos[0][4][1]))
            sock = _udp_socket(self._listen)
            self._listen_sock = sock
            self._address = sock.getsockname()[:2]
            loop.add_reader(sock, self._on_client_readable)
        else:
            ready = loop.create_future()
            self._runner = asyncio.create_task(self._run_tcp(ready), name=f"impair-tcp-{self._listen[1]}")
            await ready
        self._apply_schedule()

    async def close(self) -> None:
        """Stop relaying: cancel pending deliveries, close every socket and connection."""
        if self._closed:
            return
        self._closed = True
        for timer in [*self._timers, *filter(None, [self._rebind_timer])]:
            timer.cancel()
        self._timers.clear()
        self._poke()
        loop = asyncio.get_running_loop()
        if self._listen_sock is not None:
            loop.remove_reader(self._listen_sock)
            self._listen_sock.close()
        for flow in self._flows.values():
            loop.remove_reader(flow.sock)
            flow.sock.close()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.wait([self._runner])  # asyncio.wait: our own cancellation must not be swallowed
            error = None if self._runner.cancelled() else self._runner.exception()
            if error is not None:
                raise error

    # ---- run-time control

    @property
    def profile(self) -> Profile:
        return self._profile

    def set_profile(self, profile: Profile) -> None:
        """Switch to another profile now; scheduled events restart from now. Queued packets keep their due."""
        self._profile = profile
        for d in Direction:
            self._shapers[d].impairment = profile.link(d)
        self._apply_schedule()
        self._poke()

    def update(self, direction: Direction | None = None, **link: object) -> None:
        """Change link parameters of one direction (or both), e.g. `proxy.update(loss_pct=5)`."""
        p = self._profile
        up = dataclasses.replace(p.up, **link) if direction in (None, Direction.UP) else p.up  # type: ignore[arg-type]
        down = dataclasses.replace(p.down, **link) if direction in (None, Direction.DOWN) else p.down  # type: ignore[arg-type]
        self._profile = dataclasses.replace(p, up=up, down=down)
        for d in Direction:
            self._shapers[d].impairment = self._profile.link(d)

    def blackhole(self, duration_s: float | None) -> None:
        """Go dark now for duration_s seconds (None: until `end_blackhole()`)."""
        self._blackholes.start(self.clock.now_s(), duration_s)
        self._poke()

    def end_blackhole(self) -> None:
        self._blackholes.end(self.clock.now_s())
        self._poke()

    def is_dark(self) -> bool:
        return self._blackholes.is_dark(self.clock.now_s())

    def rebind(self, host: str | None = None) -> None:
        """Change the proxy's outbound address: UDP flows move to a new local port (and host, if given or
        if the profile cycles hosts); TCP connections are cut with RST and new ones dial from the new host."""
        hosts = self._profile.rebind_hosts
        if host is None and hosts:
            # the host after the current one, so every scheduled rebind really changes the address
            i = hosts.index(self._outbound_host) + 1 if self._outbound_host in hosts else 0
            host = hosts[i % len(hosts)]
        if host is not None:
            self._outbound_host = host
        self._rebinds += 1
        self._stats_changed.set()
        if self.kind == "udp":
            loop = asyncio.get_running_loop()
            for flow in self._flows.values():
                # bind the new socket before closing the old one, so the kernel cannot hand out the same port
                new = self._udp_outbound_socket()
                loop.remove_reader(flow.sock)
                flow.sock.close()
                flow.sock = new
                loop.add_reader(new, self._on_upstream_readable, flow)
        else:
            for conn in list(self._conns):
                self._cut_connection(conn)

    def outbound_addresses(self) -> list[Address]:
        """The local addresses the upstream server currently sees (UDP flows; TCP connections)."""
        if self.kind == "udp":
            return [flow.sock.getsockname()[:2] for flow in self._flows.values()]
        return [w.get_extra_info("sockname")[:2] for c in self._conns for w in c.writers[1:2]]

    async def wait_stats(self, predicate: Callable[[ProxyStats], bool],
                         timeout_s: float = 10.0) -> ProxyStats:
        """Wait until the counters satisfy predicate (a sync point for tests and rigs); TimeoutError after
        timeout_s of real time."""
        async with asyncio.timeout(timeout_s):
            while not predicate(stats := self.stats()):
                self._stats_changed.clear()
                await self._stats_changed.wait()
        return stats

    def stats(self) -> ProxyStats:
        return ProxyStats(
            up=self._stats[Direction.UP].copy(), down=self._stats[Direction.DOWN].copy(),
            rebinds=self._rebinds,
            flows=len(self._flows), connections_accepted=self._accepted, connections_open=len(self._conns),
            connections_cut=self._cut, connect_failures=self._connect_failures,
            dark=self._blackholes.is_dark(self.clock.now_s()))

    # ---- schedule and time

    def _apply_schedule(self) -> None:
        now_s = self.clock.now_s()
        self._blackholes.schedule(self._profile, now_s)
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None
        if self._profile.rebind_every_s is not None and not self._closed:
            self._arm_rebind(now_s + self._profile.rebind_every_s)

    def _arm_rebind(self, at_s: float) -> None:
        def fire() -> None:
            if self._closed:
                return
            if self._profile.handover_gap_s:
                self._blackholes.start(self.clock.now_s(), self._profile.handover_gap_s)
            self.rebind()
            self._poke()
            if self._profile.rebind_every_s is not None:
                self._arm_rebind(at_s + self._profile.rebind_every_s)

        self._rebind_timer = self.clock.call_at(at_s, fire)

    def _call_at(self, when_s: float, callback: Callable[[], None]) -> None:
        handles: list[TimerHandle] = []

        def run() -> None:
            self._timers.discard(handles[0])
            callback()

        handles.append(self.clock.call_at(when_s, run))
        self._timers.add(handles[0])

    def _poke(self) -> None:
        """Wake TCP writers: a blackhole or profile changed, so their wait may be over (or longer)."""
        for fut in self._wakers:
            if not fut.done():
                fut.set_result(None)

    async def _sleep_until(self, when_s: float) -> None:
        """Sleep on the proxy clock until when_s (may be inf) or until poked."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        handle = None if when_s == math.inf else self.clock.call_at(when_s, wake)
        self._wakers.add(fut)
        try:
            await fut
        finally:
            self._wakers.discard(fut)
            if handle is not None:
                handle.cancel()

    async def _wait_deliverable(self, due_s: float) -> None:
        """Return once the clock reached due_s and the link is not dark (TCP stalls through blackholes)."""
        while True:
            now_s = self.clock.now_s()
            wake_s = max(due_s, self._blackholes.dark_until(now_s))
            if wake_s <= now_s:
                return
            await self._sleep_until(wake_s)

    # ---- UDP relay

    def _udp_outbound_socket(self) -> socket.socket:
        return _udp_socket((self._outbound_host, 0))

    def _on_client_readable(self) -> None:
        assert self._listen_sock is not None
        for _ in range(_UDP_READS_PER_WAKEUP):
            try:
                data, addr = self._listen_sock.recvfrom(UDP_MAX_DATAGRAM_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the socket (e.g. a client went away); nothing to relay
            client = addr[:2]
            flow = self._flows.get(client)
            if flow is None:
                flow = _UdpFlow(client, self._udp_outbound_socket())
                self._flows[client] = flow
                asyncio.get_running_loop().add_reader(flow.sock, self._on_upstream_readable, flow)
            self._admit_datagram(flow, Direction.UP, data)

    def _on_upstream_readable(self, flow: _UdpFlow) -> None:
        sock = flow.sock
        for _ in range(_UDP_READS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(UDP_MAX_DATAGRAM_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP port unreachable from a restarting server: the datagram is lost, as on a wire
            if addr[:2] == self._upstream_ip:  # a NAT forwards only what comes from the mapped server
                self._admit_datagram(flow, Direction.DOWN, data)

    def _admit_datagram(self, flow: _UdpFlow, direction: Direction, data: bytes) -> None:
        self._stats_changed.set()
        now_s = self.clock.now_s()
        stats = self._stats[direction]
        stats.received_packets += 1
        stats.received_bytes += len(data)
        if self._blackholes.is_dark(now_s):
            stats.count_drop(DropReason.BLACKHOLE, len(data))
            return
        verdict = self._shapers[direction].admit_datagram(len(data), now_s, flow.last_due_s[direction])
        if verdict.due_s is None:
            assert verdict.drop is not None
            stats.count_drop(verdict.drop, len(data))
            return
        flow.last_due_s[direction] = max(flow.last_due_s[direction], verdict.due_s)
        if verdict.due_s <= now_s:
            self._send_datagram(flow, direction, data)
        else:
            self._call_at(verdict.due_s, lambda: self._send_datagram(flow, direction, data))

    def _send_datagram(self, flow: _UdpFlow, direction: Direction, data: bytes) -> None:
        if self._closed:
            return
        self._stats_changed.set()
        stats = self._stats[direction]
        if self._blackholes.is_dark(self.clock.now_s()):  # in flight when the tunnel started: lost
            stats.count_drop(DropReason.BLACKHOLE, len(data))
            return
        try:
            if direction is Direction.UP:
                # the flow's current socket: after a rebind, the new one
                flow.sock.sendto(data, self._upstream_ip)
            else:
                assert self._listen_sock is not None
                self._listen_sock.sendto(data, flow.client)
        except OSError:  # full socket buffer or unreachable: lost, as on a wire
            stats.count_drop(DropReason.ERROR, len(data))
            return
        stats.forwarded_packets += 1
        stats.forwarded_bytes += len(data)

    # ---- TCP relay

    async def _run_tcp(self, ready: asyncio.Future[None]) -> None:
        try:
            server = await asyncio.start_server(self._on_tcp_client, self._listen[0], self._listen[1])
        except OSError as exc:
            ready.set_exception(exc)
            return
        self._server = server
        self._address = server.sockets[0].getsockname()[:2]
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                ready.set_result(None)
                # until close() cancels us; the group then cancels every connection
                await asyncio.Event().wait()
        finally:
            self._tg = None
            server.close()

    def _on_tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a plain callback (not a coroutine), so the connection task belongs to our TaskGroup
        if self._tg is None or self._closed:
            writer.transport.abort()
            return
        index = next(self._conn_seq)
        self._accepted += 1
        self._stats_changed.set()
        conn = _TcpConn(index)
        conn.writers.append(writer)
        conn.task = self._tg.create_task(self._serve_tcp(conn, reader, writer),
                                         name=f"impair-tcp-conn-{index}")
        self._conns.add(conn)

    async def _serve_tcp(self, conn: _TcpConn, c_reader: asyncio.StreamReader,
                         c_writer: asyncio.StreamWriter) -> None:
        try:
            await self._wait_deliverable(self.clock.now_s())  # a SYN into a blackhole goes nowhere
            try:
                s_reader, s_writer = await asyncio.open_connection(
                    self.upstream[0], self.upstream[1], local_addr=(self._outbound_host, 0))
            except OSError:
                self._connect_failures += 1
                self._stats_changed.set()
                _abort_with_rst(c_writer)  # the client learns it as a refused/reset connection
                return
            conn.writers.append(s_writer)
            reset = False
            try:
                async with asyncio.TaskGroup() as tg:
                    for direction, src, dst in ((Direction.UP, c_reader, s_writer),
                                                (Direction.DOWN, s_reader, c_writer)):
                        queue = _StreamQueue()
                        tg.create_task(self._tcp_read(src, queue, direction),
                                       name=f"impair-tcp-conn-{conn.index}-{direction}-read")
                        tg.create_task(self._tcp_write(dst, queue, direction),
                                       name=f"impair-tcp-conn-{conn.index}-{direction}-write")
            except* OSError:
                # one side reset (or its socket failed): pass the reset on to the other side rather than a
                # clean close; the failure stays within this connection, the proxy keeps serving
                reset = True
            if reset:
                for w in conn.writers:
                    _abort_with_rst(w)
                return
            for w in conn.writers:
                w.close()
            for w in conn.writers:
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
        finally:
            self._conns.discard(conn)
            self._stats_changed.set()
            for w in conn.writers:
                if not w.transport.is_closing():
                    w.transport.abort()

    async def _tcp_read(self, reader: asyncio.StreamReader, queue: _StreamQueue,
                        direction: Direction) -> None:
        shaper = self._shapers[direction]
        stats = self._stats[direction]
        while True:
            await queue.wait_for(lambda: queue.size_bytes < shaper.impairment.tcp_buffer_bytes)
            data = await reader.read(_TCP_READ_BYTES)
            if not data:
                queue.put(max(self.clock.now_s(), queue.last_due_s), None)
                return
            step = shaper.impairment.tcp_chunk_bytes
            for i in range(0, len(data), step):
                chunk = data[i:i + step]
                stats.received_packets += 1
                stats.received_bytes += len(chunk)
                verdict = shaper.admit_chunk(len(chunk), self.clock.now_s(), queue.last_due_s)
                assert verdict.due_s is not None
                if verdict.penalty_s:
                    stats.penalized_chunks += 1
                queue.put(verdict.due_s, chunk)
            self._stats_changed.set()

    async def _tcp_write(self, writer: asyncio.StreamWriter, queue: _StreamQueue,
                         direction: Direction) -> None:
        stats = self._stats[direction]
        while True:
            await queue.wait_for(lambda: bool(queue.items))
            await self._wait_deliverable(queue.items[0][0])
            now_s = self.clock.now_s()
            # everything already due goes out in one write; order is kept because due times never decrease
            out: list[bytes] = []
            eof = False
            while queue.items and queue.items[0][0] <= now_s:
                _, chunk = queue.items.popleft()
                if chunk is None:
                    eof = True
                    break
                out.append(chunk)
            if out:
                data = b"".join(out)
                writer.write(data)
                await writer.drain()
                queue.size_bytes -= len(data)
                queue.changed.set()
                stats.forwarded_packets += len(out)
                stats.forwarded_bytes += len(data)
                self._stats_changed.set()
            if eof:
                if writer.can_write_eof():
                    writer.write_eof()
                return

    def _cut_connection(self, conn: _TcpConn) -> None:
        for w in conn.writers:
            _abort_with_rst(w)
        if conn.task is not None:
            conn.task.cancel()
        self._conns.discard(conn)
        self._cut += 1
        self._stats_changed.set()


def _udp_socket(local: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UDP_SOCKET_BUFFER_BYTES)
        sock.bind(local)
    except OSError:
        sock.close()
        raise
    return sock


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with RST (SO_LINGER 0 then abort), as a handover or reset would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------------------------- CLI


def _host_port(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile the `edge-hil impair` flags describe (the same link in both directions)."""
    rate = None if args.rate_kbps is None else args.rate_kbps * 1000.0 / 8.0
    up, down = symmetric(loss_pct=args.loss_pct, delay_s=args.delay_ms / 1000.0,
                         jitter_s=args.jitter_ms / 1000.0, rate_bytes_s=rate)
    return Profile(name="cli", up=up, down=down, rebind_every_s=args.rebind_every_s,
                   rebind_hosts=tuple(args.rebind_hosts or ()),
                   blackhole_after_s=(args.blackhole_after_s if args.blackhole_after_s is not None
                                      else args.blackhole_every_s or 0.0) if args.blackhole_s else None,
                   blackhole_s=args.blackhole_s or 0.0, blackhole_every_s=args.blackhole_every_s)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`edge-hil impair`: its arguments; `main` (also `func`) is the async entry point `main(args)`."""
    p = subparsers.add_parser("impair", help="relay UDP or TCP through an impaired link (loss, delay, ...)")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0), help="HOST:PORT (port 0: any free)")
    p.add_argument("--upstream", type=_host_port, required=True, help="HOST:PORT of the real server")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--udp", dest="kind", action="store_const", const="udp")
    kind.add_argument("--tcp", dest="kind", action="store_const", const="tcp")
    p.add_argument("--loss-pct", type=float, default=0.0, help="per direction")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one way, per direction (RTT adds twice this)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--rate-kbps", type=float, default=None, help="bandwidth cap per direction, kbit/s")
    p.add_argument("--rebind-every-s", type=float, default=None)
    p.add_argument("--rebind-hosts", nargs="*", help="outbound hosts to cycle through: 127.0.0.1 127.0.0.2")
    p.add_argument("--blackhole-s", type=float, default=0.0, help="blackhole window length")
    p.add_argument("--blackhole-every-s", type=float, default=None, help="blackhole period (None: once)")
    p.add_argument("--blackhole-after-s", type=float, default=None,
                   help="first blackhole this long after start (default: one period, or at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-every-s", type=float, default=1.0)
    p.set_defaults(main=main, func=main)
    return p


async def main(args: argparse.Namespace) -> int:
    """Relay until SIGINT/SIGTERM, printing the listening line, then a counters line periodically."""
    profile = profile_from_args(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ImpairmentProxy(args.upstream, kind=args.kind, listen=args.listen, profile=profile,
                               seed=args.seed) as proxy:
        host, port = proxy.address
        up_host, up_port = args.upstream
        print(f"impair {args.kind} listening {host}:{port} -> {up_host}:{up_port}", flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.stats_every_s):
                    await stop.wait()
            print(f"impair {proxy.stats().line()}", flush=True)
    return 0
