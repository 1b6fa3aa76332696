"""Typed agent configuration: TOML -> frozen msgspec structs, validated once, errors named by path.

Defaults live here, in the model. `load_config` raises `ConfigError` whose message names the bad
field as a dotted path (`uplink.port: expected int, got str`), which `edge-agent check` prints.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from agent.files.config import FilesSection
from drivers.modbus.config import ModbusDevice, a11_card_spec, a11_points
from drivers.opcua.config import OpcUaServer
from drivers.serial.config import SerialPortConfig
from uplink.schema.commands import load_public_key
from uplink.schema.topics import DEFAULT_PREFIX, validate_agent_id

EX_CONFIG = 78  # sysexits.h: configuration error; systemd units use it to stop restart loops


class ConfigError(ValueError):
    """The configuration is invalid; `path` names the field (dotted), `reason` says what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class AgentSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    data_dir: str = "/var/lib/edge-agent"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    drain_on_stop_s: float = 5.0  # on a clean stop, keep forwarding the backlog this long before exiting

    def __post_init__(self) -> None:
        validate_agent_id(self.id)
        if not 0 <= self.drain_on_stop_s <= 3600:
            raise ValueError("drain_on_stop_s must be within 0..3600")


RecordClass = Literal["alarm", "event", "card", "telemetry", "bulk"]  # store_forward.model.Priority names
MIB = 1024 * 1024
MIN_BATCH_BYTES = 1024  # below this every lease is one record: a typo, not a tuning
MAX_PACKET_BYTES = 268_435_455  # the largest MQTT packet (a 4-byte Remaining Length)


class QueueSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The durable queue (README.md, durability contract): durability, bounds, eviction, backlog lane.

    Bounds are off by default except the free-disk floor: a box that is offline for weeks evicts the
    least important records (bulk, then telemetry, cards, events) rather than filling its flash, and
    every eviction reaches the cloud as an explicit gap. Alarms are never evicted unless `evict_alarms`.
    """

    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    group_commit_max_records: int = 512
    group_commit_max_delay_s: float = 0.005
    integrity: Literal["off", "quick", "full"] = "quick"  # check run when the store opens
    max_bytes: int | None = None  # payload bytes kept at most
    max_records: int | None = None
    max_age_s: float | None = None  # records older than this (since enqueued) are evicted
    min_free_disk_bytes: int | None = 64 * MIB  # free-disk floor (file system + the store's free pages)
    thin: tuple[RecordClass, ...] = ()  # classes evicted by thinning (every other record) not oldest-first
    evict_alarms: bool = False
    evict_interval_s: float = 1.0  # bounds are enforced at most this often (and whenever the store idles)
    live_window_s: float = 60.0  # a record younger than this is live and goes before the backlog
    backlog_bytes_per_s: float | None = None  # average drain rate of the backlog (None: unlimited)
    backlog_burst_bytes: int = 256 * 1024
    reserve_bytes: int = 256 * 1024  # ballast file released on a full disk so delivery can still delete

    def __post_init__(self) -> None:
        if not 1 <= self.group_commit_max_records <= 100_000:
            raise ValueError("group_commit_max_records must be within 1..100000")
        if not 0 <= self.group_commit_max_delay_s <= 1:
            raise ValueError("group_commit_max_delay_s must be within 0..1 s")
        for name in ("max_bytes", "max_records", "min_free_disk_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ValueError("max_age_s must be > 0")
        if len(set(self.thin)) != len(self.thin):
            raise ValueError("thin lists a class twice")
        if not 0 <= self.evict_interval_s <= 3600:
            raise ValueError("evict_interval_s must be within 0..3600 s")
        if not 0 <= self.live_window_s <= 30 * 86400:
            raise ValueError("live_window_s must be within 0 s..30 days")
        if self.backlog_bytes_per_s is not None and not self.backlog_bytes_per_s > 0:
            raise ValueError("backlog_bytes_per_s must be > 0 (omit it for no limit)")
        if self.backlog_burst_bytes < 1:
            raise ValueError("backlog_burst_bytes must be >= 1")
        if self.reserve_bytes < 0:
            raise ValueError("reserve_bytes must be >= 0")


Transport = Literal["quic", "tcp", "auto"]


class QuicSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[uplink.quic]`: MQTT over QUIC (EMQX-compatible) to `uplink.host`; see uplink.quic.QuicSettings.

    The server certificate is verified against `uplink.ca_file` (None: the system trust store).
    """

    port: int = 14567
    server_name: str | None = None  # SNI and certificate name; None: uplink.host
    ticket_file: str | None = None  # TLS session ticket for 0-RTT; None: <agent.data_dir>/quic-ticket.json
    early_data: bool = True  # CONNECT in 0-RTT when a ticket allows it
    ping_interval_s: float = 15.0  # QUIC PING when idle, below NAT UDP timeouts (often 30 s)
    idle_timeout_s: float | None = None  # QUIC max_idle_timeout; None: 3x uplink.keep_alive_s
    handshake_timeout_s: float = 10.0  # a handshake that takes longer counts as "QUIC blocked"
    max_data_streams: int = 9  # EMQX allows 10 concurrent bidi streams: 1 control + 9 data
    congestion_control: Literal["loss-tolerant", "reno", "cubic"] = "loss-tolerant"
    socket_buffer_bytes: int = 4 * MIB  # UDP SO_RCVBUF/SO_SNDBUF (the kernel caps it at [rw]mem_max)
    cert_file: str | None = None  # client certificate, for brokers that demand mTLS
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError("port must be within 1..65535")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate needs both)")
        if not 0 < self.ping_interval_s <= 3600:
            raise ValueError("ping_interval_s must be within 0..3600 s (exclusive of 0)")
        if self.idle_timeout_s is not None and not 0 < self.idle_timeout_s <= 86400:
            raise ValueError("idle_timeout_s must be within 0..86400 s (exclusive of 0)")
        if not 0 < self.handshake_timeout_s <= 120:
            raise ValueError("handshake_timeout_s must be within 0..120 s (exclusive of 0)")
        if not 0 <= self.max_data_streams <= 1000:
            raise ValueError("max_data_streams must be within 0..1000")
        if not 0 <= self.socket_buffer_bytes <= 256 * MIB:
            raise ValueError("socket_buffer_bytes must be within 0..256 MiB (0: the kernel default)")
        if self.server_name == "":
            raise ValueError("server_name must not be empty (omit it to use uplink.host)")


class FailoverSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[uplink.failover]`: how `transport = "auto"` leaves QUIC for TCP/TLS and comes back."""

    probe_initial_s: float = 30.0  # QUIC is re-probed this long after it failed, doubling up to probe_max_s
    probe_max_s: float = 600.0
    fleet_spread_window_s: float = 0.0  # after a lost link, reconnect at a per-agent offset within this

    def __post_init__(self) -> None:
        if not 0 < self.probe_initial_s <= self.probe_max_s:
            raise ValueError("probe_initial_s must be > 0 and <= probe_max_s")
        if self.probe_max_s > 86400:
            raise ValueError("probe_max_s must be <= 86400 s")
        if not 0 <= self.fleet_spread_window_s <= 3600:
            raise ValueError("fleet_spread_window_s must be within 0..3600 s")


class UplinkSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[uplink]`: the broker. `transport`: "tcp" (MQTT over TCP, or TLS with `tls`), "quic" (MQTT over
    QUIC only, `[uplink.quic]`), "auto" (QUIC first, TCP/TLS on `port` when QUIC cannot be had, QUIC
    re-probed per `[uplink.failover]`)."""

    host: str
    port: int = 1883  # MQTT over TCP/TLS (transport "tcp", and the fallback of "auto")
    transport: Transport = "tcp"
    quic: QuicSection = QuicSection()
    failover: FailoverSection = FailoverSection()
    protocol_level: Literal[4, 5] = 5
    keep_alive_s: int = 30
    tls: bool = False
    ca_file: str | None = None
    # Our client certificate for brokers that demand mutual TLS: presented over TLS (tls = true) and
    # over QUIC (unless [uplink.quic] names its own).
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = None  # defaults to agent.id
    topic_prefix: str = DEFAULT_PREFIX
    batch_max_records: int = 200
    # Stored payload bytes per lease. A batch whose encoded PUBLISH is over the broker's Maximum Packet
    # Size is split by the forwarder anyway; this bounds memory and the work redone on a refusal.
    batch_max_bytes: int = 256 * 1024
    max_inflight_batches: int = 8
    # PUBACK 0x10 "no matching subscribers" is a success code: the broker took the message, and where
    # the cloud ingests through rules or integrations nobody subscribes. True settles such records (the
    # default: a store must not fill up retrying what the broker accepted). False keeps them and retries
    # with back-off: for deployments whose only ingest is a subscriber that may be briefly away.
    settle_on_no_subscribers: bool = True
    encoding: Literal["msgpack", "json"] = "msgpack"
    compression: Literal["none", "zstd"] = "none"
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError("port must be within 1..65535")
        if not 0 <= self.keep_alive_s <= 65535:
            raise ValueError("keep_alive_s must be within 0..65535")
        if not 1 <= self.batch_max_records <= 10_000:
            raise ValueError("batch_max_records must be within 1..10000")
        if not MIN_BATCH_BYTES <= self.batch_max_bytes <= MAX_PACKET_BYTES:
            raise ValueError(f"batch_max_bytes must be within {MIN_BATCH_BYTES}..{MAX_PACKET_BYTES}")
        if not 1 <= self.max_inflight_batches <= 1024:
            raise ValueError("max_inflight_batches must be within 1..1024")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate needs both)")
        if self.cert_file is not None and not self.tls and self.transport == "tcp":
            raise ValueError("cert_file needs tls = true or a QUIC transport (plain TCP has no TLS)")
        if not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", self.topic_prefix):
            raise ValueError(
                "topic_prefix must be plain topic levels (no wildcards, no leading or trailing '/')"
            )


class PipelineSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    flush_interval_s: float = 0.05
    max_pending_readings: int = 100_000  # beyond this, emit() drops the oldest and counts it

    def __post_init__(self) -> None:
        if not 0.001 <= self.flush_interval_s <= 10:
            raise ValueError("flush_interval_s must be within 0.001..10 s")


class CommandsSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Remote commands (uplink.schema.commands): who may control the agent, and the config health gate."""

    enabled: bool = True
    # Control commands (config.apply, point.write, agent.restart) must carry an Ed25519 signature by one of
    # trusted_keys (key id -> base64 of the 32-byte public key, or a PEM text); replays are refused.
    require_signed_control: bool = False
    trusted_keys: dict[str, str] = msgspec.field(default_factory=dict)
    max_validity_s: float = 24 * 3600.0  # a signed command may not expire further ahead than this
    health_gate_s: float = 20.0  # a changed device must read GOOD / a changed uplink reconnect within this
    answers_kept: int = 256  # final answers remembered by command id (re-delivered command -> same answer)

    def __post_init__(self) -> None:
        if self.require_signed_control and not self.trusted_keys:
            raise ValueError("require_signed_control needs at least one entry in trusted_keys")
        if not 0.5 <= self.health_gate_s <= 600:
            raise ValueError("health_gate_s must be within 0.5..600 s")
        if not 60 <= self.max_validity_s <= 30 * 86400:
            raise ValueError("max_validity_s must be within 60 s..30 days")
        if not 1 <= self.answers_kept <= 100_000:
            raise ValueError("answers_kept must be within 1..100000")
        for key_id, text in self.trusted_keys.items():
            try:
                load_public_key(text.encode())
            except ValueError as exc:
                raise ValueError(f"trusted_keys.{key_id}: {exc}") from None


class StatusSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    interval_s: float = 60.0  # the retained birth message is refreshed this often (queue depth, uptime)

    def __post_init__(self) -> None:
        if not 1 <= self.interval_s <= 86400:
            raise ValueError("interval_s must be within 1..86400 s")


class MetricsSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prometheus endpoint (GET /metrics). Off unless a port is given; port 0 picks a free one."""

    host: str = "127.0.0.1"
    port: int | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535")


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent: AgentSection
    uplink: UplinkSection
    version: str | None = None  # set by whoever pushes a config; reported in the status message
    queue: QueueSection = QueueSection()
    pipeline: PipelineSection = PipelineSection()
    commands: CommandsSection = CommandsSection()
    status: StatusSection = StatusSection()
    metrics: MetricsSection = MetricsSection()
    files: FilesSection = FilesSection()
    modbus: tuple[ModbusDevice, ...] = ()
    opcua: tuple[OpcUaServer, ...] = ()
    serial: tuple[SerialPortConfig, ...] = ()

    def __post_init__(self) -> None:
        # Device names are the `device` of every reading and the first half of "device/point" in
        # point.write: unique across all buses, or a reading could not say where it came from.
        seen: set[str] = set()
        for section, names in (
            ("modbus", [d.name for d in self.modbus]),
            ("opcua", [s.name for s in self.opcua]),
            ("serial", [p.name for p in self.serial]),
        ):
            for i, name in enumerate(names):
                if name in seen:
                    raise ValueError(f"{section}[{i}].name {name!r} is used by another device")
                seen.add(name)

    @property
    def device_names(self) -> tuple[str, ...]:
        return (
            tuple(d.name for d in self.modbus)
            + tuple(s.name for s in self.opcua)
            + tuple(p.name for p in self.serial)
        )

    @property
    def client_id(self) -> str:
        return self.uplink.client_id or self.agent.id

    @property
    def queue_path(self) -> Path:
        return Path(self.agent.data_dir) / "queue.db"


_AT_RE = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)


def _path_of(raw: str) -> str:
    return raw.lstrip(".")


PROFILES = ("a11",)


def _expand_profiles(data: dict[str, object]) -> dict[str, object]:
    """`profile = "a11"` on a modbus device stands for the A11 beam-pump map and card.

    Points given explicitly are added to (or, by name, replace) the profile's points; a `card` table
    overrides single fields of the profile's card.
    """
    devices = data.get("modbus")
    if not isinstance(devices, list):
        return data
    expanded: list[object] = []
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict) or "profile" not in dev:
            expanded.append(dev)
            continue
        dev = dict(dev)
        profile = dev.pop("profile")
        if profile not in PROFILES:
            raise ConfigError(
                f"modbus[{i}].profile", f"unknown profile {profile!r} (known: {', '.join(PROFILES)})"
            )
        own_points = dev.get("points", [])
        if not isinstance(own_points, list):
            raise ConfigError(f"modbus[{i}].points", "expected an array of tables")
        own_names = {p.get("name") for p in own_points if isinstance(p, dict)}
        base_points = [msgspec.to_builtins(p) for p in a11_points() if p.name not in own_names]
        dev["points"] = base_points + own_points
        card = dev.get("card", {})
        if card is not False:
            if not isinstance(card, dict):
                raise ConfigError(f"modbus[{i}].card", "expected a table (or false for no card)")
            dev["card"] = {**msgspec.to_builtins(a11_card_spec()), **card}
        else:
            dev.pop("card")
        expanded.append(dev)
    return {**data, "modbus": expanded}


def parse_config(data: dict[str, object]) -> AgentConfig:
    """Validate a parsed TOML document; raise ConfigError naming the bad field."""
    try:
        return msgspec.convert(_expand_profiles(data), AgentConfig)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _AT_RE.match(text)
        msg, path = (m.group("msg"), _path_of(m.group("path"))) if m else (text, "")
        field = re.match(r"Object missing required field `([^`]+)`", msg)
        if field:
            return_path = f"{path}.{field.group(1)}" if path else field.group(1)
            raise ConfigError(return_path, "required field is missing") from None
        unknown = re.match(r"Object contains unknown field `([^`]+)`", msg)
        if unknown:
            return_path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise ConfigError(return_path, "unknown field (check the spelling)") from None
        raise ConfigError(path, msg[:1].lower() + msg[1:]) from None


def parse_toml(text: str, *, source: str = "config") -> AgentConfig:
    """Validate a TOML document given as text (a pushed config); ConfigError naming the bad field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{source} is not valid TOML: {exc}") from None
    return parse_config(data)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
    return parse_toml(text, source=str(p))
