"""Typed, frozen OPC UA server and point configuration, validated once at load.

Addressing: a point is located EITHER by `node_id`, in the OPC UA string form (Part 6 §5.3.1.10:
`i=2258`, `ns=2;s=Well01.TubingPressure`, `ns=3;g=<guid>`, `ns=4;b=<base64>`, or `nsu=<uri>;s=...`),
OR by `browse_path`, a `/`-separated list of `<namespace index>:<BrowseName>` elements followed from the
Objects folder along hierarchical references, e.g. `2:Station/2:Well01/2:TubingPressure`. Browse paths
are translated to NodeIds once per connection (TranslateBrowsePathsToNodeIds), because a server may
assign different numeric ids after a restart. BrowseNames containing `/` cannot be addressed by path.

Acquisition: `mode = "subscribe"` creates one subscription per server with one monitored item per
point (sampling interval and absolute deadband filter evaluated by the server); points the server
refuses to monitor, and every point when the server refuses subscriptions, are polled instead.
`mode = "poll"` reads all points with the Read service every `sampling_interval_s` (or the server's
`poll_interval_s`); the absolute deadband is then applied by the driver against the last reported value.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

SecurityPolicy = Literal["None", "Basic256Sha256"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]
AcquisitionMode = Literal["subscribe", "poll"]

_NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?[isgb]=.+$", re.DOTALL)
_PATH_ELEMENT = re.compile(r"^(\d+):(.+)$", re.DOTALL)


def parse_browse_path(path: str) -> tuple[tuple[int, str], ...]:
    """`2:Station/2:Well01` -> ((2, "Station"), (2, "Well01")); ValueError on a malformed element."""
    elements: list[tuple[int, str]] = []
    for raw in path.split("/"):
        match = _PATH_ELEMENT.match(raw)
        if match is None:
            raise ValueError(f"browse_path element {raw!r} is not '<namespace index>:<BrowseName>'")
        elements.append((int(match.group(1)), match.group(2)))
    return tuple(elements)


class OpcUaPoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One variable on a server, located by `node_id` or by `browse_path` (exactly one of them)."""

    name: str
    node_id: str | None = None
    browse_path: str | None = None
    # Requested server sampling interval; None lets the server sample at the publishing interval
    # (OPC UA's -1). In poll mode it is the poll period of the point (default: server poll_interval_s).
    sampling_interval_s: float | None = None
    deadband_abs: float | None = None  # report only when |value - last reported| > deadband_abs
    queue_size: int = 1  # server-side notification queue per monitored item (1 = latest value only)
    unit: str = ""
    writable: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if "/" in self.name:
            raise ValueError(f"{self.name}: point names must not contain '/' (used as server/point)")
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError(f"{self.name}: give exactly one of node_id or browse_path")
        if self.node_id is not None and not _NODE_ID.match(self.node_id):
            raise ValueError(f"{self.name}: node_id {self.node_id!r} is not like 'ns=2;s=Name' or 'i=2258'")
        if self.browse_path is not None:
            try:
                parse_browse_path(self.browse_path)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        if self.sampling_interval_s is not None and self.sampling_interval_s <= 0:
            raise ValueError(f"{self.name}: sampling_interval_s must be > 0")
        if self.deadband_abs is not None and self.deadband_abs < 0:
            raise ValueError(f"{self.name}: deadband_abs must be >= 0")
        if self.queue_size < 1:
            raise ValueError(f"{self.name}: queue_size must be >= 1")

    def path_elements(self) -> tuple[tuple[int, str], ...]:
        """Parsed browse path; empty when the point is addressed by node_id."""
        return parse_browse_path(self.browse_path) if self.browse_path is not None else ()


class OpcUaServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One OPC UA server (endpoint, security, identity) and the points read from it."""

    name: str
    endpoint: str  # opc.tcp://host:port/path
    security_policy: SecurityPolicy = "None"
    security_mode: SecurityMode = "None"
    username: str | None = None
    password: str | None = None
    # Where the client application instance certificate and key live; generated on first use.
    cert_dir: str | None = None
    # ApplicationUri written into (and checked against) the client certificate; None derives
    # "urn:<hostname>:fieldgate:edge-agent" at connect time.
    application_uri: str | None = None
    # DER or PEM file of the server certificate to pin. None accepts the certificate the server
    # presents in GetEndpoints (the channel is still encrypted, but the server is not authenticated).
    server_certificate: str | None = None
    points: tuple[OpcUaPoint, ...] = ()
    mode: AcquisitionMode = "subscribe"
    publishing_interval_s: float = 1.0
    poll_interval_s: float = 1.0
    timeout_s: float = 5.0  # per service request
    keepalive_s: float = 5.0  # how often a quiet connection is probed (ServerStatus read)
    session_timeout_s: float = 60.0
    reconnect_min_s: float = 1.0  # first back-off after a failed or lost connection; doubles ...
    reconnect_max_s: float = 60.0  # ... up to this
    max_nodes_per_read: int = 500  # Read requests are split to respect server operation limits

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if "/" in self.name:
            raise ValueError("name must not contain '/' (used as server/point)")
        if not self.endpoint.startswith("opc.tcp://"):
            raise ValueError(f"endpoint {self.endpoint!r} must start with opc.tcp://")
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError("security_policy and security_mode must both be None or both be set")
        if self.security_policy != "None" and not self.cert_dir:
            raise ValueError("cert_dir is required with a security policy (client certificate lives there)")
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        for field in (
            "publishing_interval_s",
            "poll_interval_s",
            "timeout_s",
            "keepalive_s",
            "session_timeout_s",
            "reconnect_min_s",
        ):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.max_nodes_per_read < 1:
            raise ValueError("max_nodes_per_read must be >= 1")
        names = [p.name for p in self.points]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate point names: {dup}")

    def point(self, name: str) -> OpcUaPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"server {self.name} has no point {name!r}")
