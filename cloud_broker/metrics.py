"""Prometheus exposition for the broker: `Broker.stats()` rendered on GET /metrics, served by asyncio.

The adapter for prometheus_client on the cloud side. Gauges (connections, sessions, subscriptions, retained,
queued messages) and counters since start (messages in/out, drops, refusals, auth failures, bytes) come
from one `stats()` call per scrape; rates are Prometheus' job (`rate(fieldgate_broker_messages_received_total
[5m])`). Wire it from the server with `serve_metrics(host, port, server.broker.stats, on_bound=...)` as a
named task (see the operations report for the lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
PREFIX = "fieldgate_broker_"

GAUGES: dict[str, str] = {
    "connections": "Open network connections (connected or still in CONNECT)",
    "clients_connected": "Clients past CONNACK",
    "sessions": "Sessions held (connected and persistent offline ones)",
    "subscriptions": "Topic filters subscribed",
    "retained": "Retained messages",
    "messages_queued": "Messages queued or in flight to clients",
}
COUNTERS: dict[str, str] = {
    "connections_total": "Connections accepted since start",
    "messages_received": "PUBLISH packets accepted from clients",
    "messages_sent": "PUBLISH packets written to clients (resends included)",
    "messages_dropped": "Messages dropped: queue full, too large for the client, or expired",
    "qos0_dropped_congested": "QoS 0 messages dropped for congested clients",
    "publish_refused": "Publishes refused as not authorized",
    "publish_quota_exceeded": "Publishes no subscriber could take (queues full): 0x97 at MQTT 5, "
    "a disconnect without ack at 3.1.1",
    "protocol_violations": "Connections closed for a protocol violation",
    "auth_failures": "Connection attempts refused by authentication",
    "bytes_received": "Bytes received from clients",
    "bytes_sent": "Bytes written to clients",
}


def families(stats: Mapping[str, int]) -> Iterator[Metric]:
    """Known stats by name; a stat this module does not know yet is exported as an untyped gauge."""
    for name, doc in GAUGES.items():
        if name in stats:
            yield GaugeMetricFamily(PREFIX + name, doc, value=stats[name])
    for name, doc in COUNTERS.items():
        if name in stats:
            metric = "connections_accepted" if name == "connections_total" else name  # not the gauge's name
            yield CounterMetricFamily(PREFIX + metric, doc, value=stats[name])
    for name in sorted(set(stats) - set(GAUGES) - set(COUNTERS)):
        yield GaugeMetricFamily(PREFIX + name, f"broker stat {name}", value=stats[name])


class _Families:
    def __init__(self, stats: Mapping[str, int]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        return families(self._stats)


def render(stats: Mapping[str, int]) -> bytes:
    """The text exposition format (version 0.0.4) of one stats snapshot."""
    return generate_latest(_Families(stats))  # type: ignore[arg-type,unused-ignore]


async def serve_metrics(
    host: str, port: int, stats: Callable[[], Mapping[str, int]], *, on_bound: Callable[[int], None]
) -> None:
    """Serve GET /metrics on host:port until cancelled; `on_bound` gets the bound port (0 picks one)."""

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
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, render(stats())
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
    bound = int(server.sockets[0].getsockname()[1])
    on_bound(bound)
    log.info("metrics: serving http://%s:%d/metrics", host, bound)
    async with server:
        await server.serve_forever()
