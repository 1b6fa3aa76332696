"""Typed cloud-broker configuration: TOML or CLI flags -> frozen msgspec structs, errors named by path.

Defaults live here, in the model. `cloud_broker/broker.example.toml` shows and explains every key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from cloud_broker.core.settings import SESSION_NEVER_EXPIRES, CoreSettings
from cloud_broker.files.config import FileTransferConfig
from uplink.mqtt.packets import MAX_PACKET_SIZE

EX_CONFIG = 78  # sysexits.h: configuration error; systemd units use it to stop restart loops



class ConfigError(ValueError):
    """The configuration is invalid; `path` names the field (dotted), `reason` says what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class QuicOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """QUIC transport tunables of one "quic" listener (`quic = { ... }` in its `[[listeners]]` entry)."""

    max_streams_bidi: int = 10  # concurrent client bidi streams: the control stream + data streams
    idle_timeout_s: float = 0.0  # 0: ours is off and the client's max_idle_timeout governs
    max_connections: int = 100_000  # above this, new connections are refused (application error 2)
    # UDP SO_RCVBUF/SO_SNDBUF. The kernel default (~208 KiB) overflows on one burst at high rates and
    # the drops (RcvbufErrors) read as loss to every sender. The kernel caps it at net.core.[rw]mem_max.
    socket_buffer_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.socket_buffer_bytes <= 256 * 1024 * 1024:
            raise ValueError("socket_buffer_bytes must be within 0..256 MiB (0: the kernel default)")
        if not 1 <= self.max_streams_bidi <= 1000:
            raise ValueError("max_streams_bidi must be within 1..1000")
        if self.idle_timeout_s < 0:
            raise ValueError("idle_timeout_s must be >= 0 (0 disables it)")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")


class ListenerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One bound socket. TLS settings apply to kinds "tls" and "wss" (and "quic", which needs a cert)."""

    kind: Literal["tcp", "tls", "ws", "wss", "quic"] = "tcp"
    host: str = "127.0.0.1"  # loopback unless configured: exposing the broker is a deliberate choice
    port: int = 1883
    cert_file: str | None = None  # PEM server certificate chain
    key_file: str | None = None  # PEM private key
    ca_file: str | None = None  # PEM CAs that sign client certificates; set to ask for client certificates
    require_client_cert: bool = False  # with ca_file: refuse TLS clients without a valid certificate
    ws_path: str = "/mqtt"  # the HTTP path WebSocket clients upgrade on
    quic: QuicOptions = QuicOptions()  # kind "quic" only

    def __post_init__(self) -> None:
        from cloud_broker.listeners import available_kinds

        if self.kind not in available_kinds():
            raise ValueError(f"the {self.kind.upper()} listener is not available in this build "
                             f"(available: {', '.join(available_kinds())})")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535 (0 picks a free port)")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.kind in ("tls", "wss", "quic") and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"a {self.kind} listener needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        if not self.ws_path.startswith("/"):
            raise ValueError("ws_path must start with '/'")
        if self.kind != "quic" and self.quic != QuicOptions():
            raise ValueError(f"quic options apply to quic listeners only, not {self.kind}")


class LimitsSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_packet_size_bytes: int = 1_048_576
    receive_maximum: int = 1024
    topic_alias_maximum: int = 64
    maximum_qos: int = 2
    max_inflight_messages: int = 1000
    max_queued_messages: int = 1000
    max_session_expiry_s: int | None = None
    keepalive_multiplier: float = 1.5
    server_keep_alive_s: int | None = None
    connect_timeout_s: float = 10.0
    max_client_id_length: int = 256

    def __post_init__(self) -> None:
        if not 16 <= self.max_packet_size_bytes <= MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size_bytes must be within 16..{MAX_PACKET_SIZE}")
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError("receive_maximum must be within 1..65535")
        if not 0 <= self.topic_alias_maximum <= 65535:
            raise ValueError("topic_alias_maximum must be within 0..65535")
        if self.maximum_qos not in (0, 1, 2):
            raise ValueError("maximum_qos must be 0, 1 or 2")
        if not 1 <= self.max_inflight_messages <= 65535:
            raise ValueError("max_inflight_messages must be within 1..65535")
        if self.max_queued_messages < 0:
            raise ValueError("max_queued_messages must be >= 0")
        expiry = self.max_session_expiry_s
        if expiry is not None and not 0 <= expiry <= SESSION_NEVER_EXPIRES:
            raise ValueError(f"max_session_expiry_s must be within 0..{SESSION_NEVER_EXPIRES}")
        if self.keepalive_multiplier < 1.0:
            raise ValueError("keepalive_multiplier must be >= 1.0")
        if self.server_keep_alive_s is not None and not 0 <= self.server_keep_alive_s <= 65535:
            raise ValueError("server_keep_alive_s must be within 0..65535")
        if not 0 < self.connect_timeout_s <= 3600:
            raise ValueError("connect_timeout_s must be within 0..3600 s (exclusive of 0)")
        if not 1 <= self.max_client_id_length <= 65535:
            raise ValueError("max_client_id_length must be within 1..65535")


class FeaturesSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    retain_available: bool = True
    wildcard_subscription_available: bool = True
    shared_subscription_available: bool = True
    subscription_identifier_available: bool = True
    queue_qos0_offline: bool = False


class PersistenceSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # "sqlite": state survives restarts and SIGKILL (needs data_dir); "memory": nothing survives.
    backend: Literal["sqlite", "memory"] = "sqlite"
    # "full": a commit survives power loss; "normal": survives a crash of the broker process only.
    synchronous: Literal["full", "normal"] = "full"


class AuthSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Device credentials file; relative paths are inside data_dir. Managed by `cloud-broker device`.
    credentials_file: str = "devices.json"
    # A verified TLS client certificate's subject CN is the client's identity (its user name).
    certificate_identity: bool = True
    # Accept a verified certificate whose CN is not in the credentials file, with role "device".
    accept_unregistered_certificates: bool = False
    # Failed logins: this many are free per user name (free_failures_per_ip per client IP), then each
    # costs backoff_base_s * 2^n seconds of refusal (CONNACK 0x9F), at most backoff_max_s.
    free_failures: int = 3
    free_failures_per_ip: int = 20
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.free_failures < 1 or self.free_failures_per_ip < 1:
            raise ValueError("free_failures and free_failures_per_ip must be >= 1")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise ValueError("backoff_base_s must be > 0 and <= backoff_max_s")


class AclRuleConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: str = "*"  # "device", "operator", "anonymous" or "*"
    action: Literal["publish", "subscribe", "all"] = "all"
    topic: str
    permission: Literal["allow", "deny"] = "allow"

    def __post_init__(self) -> None:
        from uplink.mqtt.topics import TopicError, validate_topic_filter

        try:
            validate_topic_filter(self.topic.replace("${clientid}", "x").replace("${username}", "x"))
        except TopicError as exc:
            raise ValueError(f"topic: {exc}") from None


class AclSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    # Empty: the built-in rules (devices: their own fg/v1/{user}/ tree but not its cmd topic;
    # operators: publish fg/v1/+/cmd, subscribe everything; anonymous: everything).
    rules: tuple[AclRuleConfig, ...] = ()


class SysSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Publish retained $SYS/broker/... statistics every interval_s seconds; 0 turns them off.
    interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.interval_s < 0:
            raise ValueError("interval_s must be >= 0")


class BackpressureSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # A connection whose unsent output passes high_water_bytes is congested: QoS 0 messages for it are
    # dropped (counted), QoS 1/2 ones wait in its session queue, and it is not read from until its
    # output falls below low_water_bytes. Congested longer than slow_consumer_timeout_s: disconnected.
    high_water_bytes: int = 1_048_576
    low_water_bytes: int = 262_144
    slow_consumer_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.low_water_bytes < self.high_water_bytes:
            raise ValueError("low_water_bytes must be >= 0 and below high_water_bytes")
        if self.slow_consumer_timeout_s <= 0:
            raise ValueError("slow_consumer_timeout_s must be > 0")


class MetricsSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Prometheus exposition of the broker's statistics on http://host:port/metrics.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9883  # 0 picks a free port (printed when listening)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535 (0 picks a free port)")


class BrokerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    # Where durable state lives (broker.sqlite3, devices.json); created at start when missing.
    data_dir: str | None = None
    allow_anonymous: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    limits: LimitsSection = LimitsSection()
    features: FeaturesSection = FeaturesSection()
    persistence: PersistenceSection = PersistenceSection()
    auth: AuthSection = AuthSection()
    acl: AclSection = AclSection()
    sys: SysSection = SysSection()
    backpressure: BackpressureSection = BackpressureSection()
    metrics: MetricsSection = MetricsSection()
    file_transfer: FileTransferConfig = FileTransferConfig()

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ValueError("listeners must name at least one listener")
        if self.file_transfer.enable and self.data_dir is None:
            # Segments must reach disk before their PUBACK, and the GC and exports need a home too.
            raise ValueError("file_transfer.enable: file transfer needs data_dir (segments and exported "
                             "files are kept below it)")

    def credentials_path(self) -> Path | None:
        p = Path(self.auth.credentials_file)
        if p.is_absolute():
            return p
        return Path(self.data_dir) / p if self.data_dir is not None else None

    def durable(self) -> bool:
        """Whether state is kept in SQLite (backend sqlite and a data_dir to keep it in)."""
        return self.persistence.backend == "sqlite" and self.data_dir is not None

    def core_settings(self) -> CoreSettings:
        """The pure core's settings from this config."""
        lim, feat = self.limits, self.features
        return CoreSettings(
            allow_anonymous=self.allow_anonymous,
            max_packet_size_bytes=lim.max_packet_size_bytes,
            receive_maximum=lim.receive_maximum,
            topic_alias_maximum=lim.topic_alias_maximum,
            maximum_qos=lim.maximum_qos,
            retain_available=feat.retain_available,
            wildcard_subscription_available=feat.wildcard_subscription_available,
            shared_subscription_available=feat.shared_subscription_available,
            subscription_identifier_available=feat.subscription_identifier_available,
            max_inflight_messages=lim.max_inflight_messages,
            max_queued_messages=lim.max_queued_messages,
            queue_qos0_offline=feat.queue_qos0_offline,
            max_session_expiry_s=lim.max_session_expiry_s,
            keepalive_multiplier=lim.keepalive_multiplier,
            server_keep_alive_s=lim.server_keep_alive_s,
            connect_timeout_s=lim.connect_timeout_s,
            max_client_id_length=lim.max_client_id_length,
        )


_AT_RE = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)


def parse_config(data: dict[str, object]) -> BrokerConfig:
    """Validate a parsed TOML document (or the same shape built from flags); raise ConfigError by path."""
    try:
        return msgspec.convert(data, BrokerConfig)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _AT_RE.match(text)
        if not m:
            # BrokerConfig's own cross-section checks name their field as "section.key: reason".
            named = re.match(r"^([a-z_]+(?:\.[a-z_]+)+): (.*)$", text, re.S)
            if named:
                raise ConfigError(named.group(1), named.group(2)) from None
            raise ConfigError("", text) from None
        msg, path = m.group("msg"), m.group("path").lstrip(".")
        field = re.match(r"Object missing required field `([^`]+)`", msg)
        if field:
            raise ConfigError(f"{path}.{field.group(1)}" if path else field.group(1),
                              "required field is missing") from None
        unknown = re.match(r"Object contains unknown field `([^`]+)`", msg)
        if unknown:
            raise ConfigError(f"{path}.{unknown.group(1)}" if path else unknown.group(1),
                              "unknown field (check the spelling)") from None
        raise ConfigError(path, msg[:1].lower() + msg[1:]) from None


def load_config(path: str | Path) -> BrokerConfig:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
    return parse_config(data)


def parse_endpoint(text: str, flag: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) from a command-line flag; ConfigError naming the flag."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(flag, f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if port > 65535:
        raise ConfigError(flag, f"port {port} is out of range 0..65535")
    return host, port
