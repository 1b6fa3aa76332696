"""Prometheus exposition for the agent: a snapshot of its counters, rendered on GET /metrics by asyncio.

The adapter for prometheus_client (its exceptions and types stay here). Nothing is counted twice: the
agent's parts keep their own stats objects; a scrape takes one `Snapshot` of them (the queue's stats are
read through the async facade, so a scrape never blocks the loop on SQLite) and renders metric families
from it. The HTTP side is a minimal asyncio server (HTTP/1.0-style: one request per connection), not
prometheus_client's thread server, so there is no extra thread and the task is owned like every other.
prometheus_client is imported only when a scrape renders: an agent with the endpoint off runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format
ACK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
POLL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class DeviceCounters:
    """Per-device reading outcomes as the pipeline saw them (a poll is one reading per point)."""

    good: int = 0
    uncertain: int = 0
    bad: int = 0
    last_good_monotonic_s: float | None = None


@dataclass
class AckHistogram:
    """Publish -> PUBACK time as the agent saw it (includes waiting for the inflight window)."""

    buckets_s: tuple[float, ...] = ACK_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(ACK_BUCKETS_S) + 1))
    total_s: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(self.buckets_s) and seconds > self.buckets_s[i]:
            i += 1
        self.counts[i] += 1
        self.total_s += seconds
        self.n += 1


@dataclass
class PollStats:
    """One device's polls (a poll-group read or a card capture): outcomes and how long they took."""

    ok: int = 0
    failed: int = 0
    duration: AckHistogram = field(
        default_factory=lambda: AckHistogram(POLL_BUCKETS_S, [0] * (len(POLL_BUCKETS_S) + 1))
    )

    def observe(self, duration_s: float, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.duration.observe(duration_s)


def _histogram_buckets(h: AckHistogram) -> list[tuple[str, int]]:
    cumulative, buckets = 0, []
    for bound, count in zip((*h.buckets_s, float("inf")), h.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets


@dataclass(frozen=True)
class Snapshot:
    agent_id: str
    config_version: str
    uptime_s: float
    devices: dict[str, DeviceCounters]
    now_monotonic_s: float
    queue_depth: int
    queue_bytes: int
    queue_oldest_age_s: float | None
    queue_appended_total: int
    queue_evicted_total: int
    link_up: bool
    transport: str
    reconnects: int
    publish_ack: AckHistogram
    bytes_published: int
    batches_published: int
    records_settled: int
    publishes_refused: int
    readings_in: int
    readings_dropped: int
    commands_by_code: dict[str, int]
    clock_synced: bool
    clock_steps: int
    healthy: bool
    file_transfers: dict[str, int] = field(default_factory=dict)
    queue_gaps_pending: int = 0
    queue_written_bytes: int = 0
    queue_write_amplification: float | None = None
    queue_written_bytes_per_hour: float | None = None
    gaps_announced: int = 0
    historical_batches: int = 0
    configured_transport: str = "tcp"  # [uplink] transport: "tcp", "quic" or "auto"
    quic_migrations: int = 0
    quic_fallbacks: int = 0  # QUIC attempts that failed (handshake, blocked UDP) and fell to TCP or waited
    file_stream: str = "none"  # where file segments go: "stream" (QUIC data stream), "control", "none"
    device_polls: dict[str, PollStats] = field(default_factory=dict)


def families(s: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (names prefixed fieldgate_agent_)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    p = "fieldgate_agent_"
    info = GaugeMetricFamily(
        p + "info", "Agent identity and running config version", labels=["agent", "config_version"]
    )
    info.add_metric([s.agent_id, s.config_version], 1)
    yield info
    yield GaugeMetricFamily(p + "uptime_seconds", "Seconds since the agent started", value=s.uptime_s)

    polls = CounterMetricFamily(
        p + "device_readings",
        "Readings per device by quality (GOOD = poll success, BAD = poll error)",
        labels=["device", "quality"],
    )
    age = GaugeMetricFamily(
        p + "device_last_good_age_seconds",
        "Seconds since the device last produced a GOOD reading",
        labels=["device"],
    )
    for name, d in sorted(s.devices.items()):
        polls.add_metric([name, "GOOD"], d.good)
        polls.add_metric([name, "UNCERTAIN"], d.uncertain)
        polls.add_metric([name, "BAD"], d.bad)
        if d.last_good_monotonic_s is not None:
            age.add_metric([name], max(0.0, s.now_monotonic_s - d.last_good_monotonic_s))
    yield polls
    yield age
    yield CounterMetricFamily(
        p + "readings_received", "Readings handed to the pipeline by drivers", value=s.readings_in
    )
    yield CounterMetricFamily(
        p + "readings_dropped", "Readings dropped because the queue did not keep up", value=s.readings_dropped
    )

    yield GaugeMetricFamily(
        p + "queue_depth_records", "Records waiting in the durable queue", value=s.queue_depth
    )
    yield GaugeMetricFamily(
        p + "queue_bytes", "Payload bytes waiting in the durable queue", value=s.queue_bytes
    )
    oldest = GaugeMetricFamily(
        p + "queue_oldest_age_seconds",
        "Data age of the oldest queued record (0 when empty)",
        value=s.queue_oldest_age_s or 0.0,
    )
    yield oldest
    yield CounterMetricFamily(
        p + "queue_appended_records", "Records ever appended to this store", value=s.queue_appended_total
    )
    yield CounterMetricFamily(
        p + "queue_evicted_records",
        "Records evicted by queue bounds (never delivered)",
        value=s.queue_evicted_total,
    )

    yield GaugeMetricFamily(
        p + "queue_gaps_pending",
        "Gaps (evicted or lost records) not yet announced to the cloud",
        value=s.queue_gaps_pending,
    )
    yield CounterMetricFamily(
        p + "queue_written_bytes",
        "Bytes the store wrote to storage since it opened (flash wear)",
        value=s.queue_written_bytes,
    )
    if s.queue_write_amplification is not None:
        yield GaugeMetricFamily(
            p + "queue_write_amplification",
            "Bytes written to storage per payload byte appended, since the store opened",
            value=s.queue_write_amplification,
        )
    if s.queue_written_bytes_per_hour is not None:
        yield GaugeMetricFamily(
            p + "queue_written_bytes_per_hour",
            "Storage write rate of the store since it opened",
            value=s.queue_written_bytes_per_hour,
        )
    yield CounterMetricFamily(
        p + "gaps_announced", "Gap notices acknowledged by the broker", value=s.gaps_announced
    )
    yield CounterMetricFamily(
        p + "historical_batches",
        "Backlog batches (older than the live window) acknowledged by the broker",
        value=s.historical_batches,
    )

    link = GaugeMetricFamily(p + "link_up", "1 while the uplink is connected", labels=["transport"])
    link.add_metric([s.transport], 1 if s.link_up else 0)
    yield link
    transport = GaugeMetricFamily(
        p + "link_transport",
        "1 for the transport carrying the MQTT session now (none: no connection); "
        "configured: [uplink] transport",
        labels=["transport", "configured"],
    )
    transport.add_metric([s.transport, s.configured_transport], 1)
    yield transport
    yield CounterMetricFamily(p + "link_reconnects", "Reconnects of the uplink", value=s.reconnects)
    yield CounterMetricFamily(
        p + "quic_migrations", "QUIC connection migrations (the MQTT session kept)", value=s.quic_migrations
    )
    yield CounterMetricFamily(
        p + "quic_fallbacks",
        "QUIC connection attempts that failed (UDP blocked, handshake timeout) on the current link",
        value=s.quic_fallbacks,
    )
    stream = GaugeMetricFamily(
        p + "file_stream",
        "Where file segments are published now (stream: a QUIC data stream)",
        labels=["mode"],
    )
    stream.add_metric([s.file_stream], 1)
    yield stream
    ack = HistogramMetricFamily(
        p + "publish_ack_seconds", "QoS 1 publish to PUBACK, as the agent waited for it (an RTT upper bound)"
    )
    ack.add_metric([], _histogram_buckets(s.publish_ack), s.publish_ack.total_s)
    yield ack
    polls = CounterMetricFamily(
        p + "device_polls",
        "Device polls (poll-group reads and card captures) by result",
        labels=["device", "result"],
    )
    poll_s = HistogramMetricFamily(
        p + "device_poll_seconds",
        "Time one device poll (poll-group read or card capture) took",
        labels=["device"],
    )
    for name, ps in sorted(s.device_polls.items()):
        polls.add_metric([name, "ok"], ps.ok)
        polls.add_metric([name, "error"], ps.failed)
        poll_s.add_metric([name], _histogram_buckets(ps.duration), ps.duration.total_s)
    yield polls
    yield poll_s
    yield CounterMetricFamily(
        p + "sent_bytes", "Batch payload bytes acknowledged by the broker", value=s.bytes_published
    )
    yield CounterMetricFamily(
        p + "sent_batches", "Batches acknowledged by the broker", value=s.batches_published
    )
    yield CounterMetricFamily(
        p + "settled_records", "Records delivered and removed from the queue", value=s.records_settled
    )
    yield CounterMetricFamily(
        p + "refused_publishes", "Publishes the broker refused (retried later)", value=s.publishes_refused
    )
    files = CounterMetricFamily(p + "file_transfers", "File transfers by result", labels=["result"])
    for result, n in sorted(s.file_transfers.items()):
        files.add_metric([result], n)
    yield files
    cmds = CounterMetricFamily(p + "commands", "Commands answered, by result code", labels=["code"])
    for code, n in sorted(s.commands_by_code.items()):
        cmds.add_metric([code], n)
    yield cmds
    yield GaugeMetricFamily(
        p + "clock_synced", "1 once the wall clock was seen synchronized", value=1 if s.clock_synced else 0
    )
    yield CounterMetricFamily(p + "clock_steps", "Wall-clock steps detected", value=s.clock_steps)
    yield GaugeMetricFamily(
        p + "healthy", "1 while the watchdog judges the agent healthy", value=1 if s.healthy else 0
    )


class _Families:
    def __init__(self, s: Snapshot) -> None:
        self._s = s

    def collect(self) -> Iterator[Metric]:
        return families(self._s)


def render(s: Snapshot) -> bytes:
    """The text exposition format (version 0.0.4) of one snapshot."""
    from prometheus_client.exposition import generate_latest

    registry: Any = _Families(s)  # generate_latest only calls collect()
    return bytes(generate_latest(registry))


async def serve_metrics(
    host: str, port: int, snapshot: Callable[[], Awaitable[Snapshot]], *, on_bound: Callable[[int], None]
) -> None:
    """Serve GET /metrics on host:port until cancelled; `on_bound` gets the bound port (port 0 picks one)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
            elif line[1].split("?", 1)[0] != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE, render(await snapshot())
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            if line and line[0] != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            log.debug("metrics: dropped a request: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
    bound = server.sockets[0].getsockname()[1]
    on_bound(int(bound))
    log.info("metrics: serving http://%s:%d/metrics", host, bound)
    try:
        async with server:
            await server.serve_forever()
    finally:
        server.close()
