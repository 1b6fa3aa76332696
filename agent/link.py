"""The agent's uplink as `[uplink]` says: TCP/TLS, QUIC, or QUIC with TCP fallback, plus its file stream.

`build_link(cfg, will)` returns an `AgentLink`: the `Uplink` (telemetry, status, commands on the
control connection), the `FailoverTransportFactory` under it when the transport is "quic" or "auto"
(None for "tcp"), and `files_link()`, which makes the link file transfer should use: a
`DataStreamUplink` (a QUIC data stream of the current connection, so a file never queues ahead of
telemetry; over TCP its work moves onto the control connection) or the Uplink itself for "tcp".
`AgentLink.run()` owns the background tasks: the Uplink's supervisor and, for "auto", the QUIC prober.

Receive Maximum split: the data stream keeps its own window of `files.max_inflight_segments`; the
control connection gets the rest of a broker's default Receive Maximum (1024). EMQX keeps a window per
stream and would not need it; brokers that count one window per connection (older releases of ours)
would answer DISCONNECT 0x93 when telemetry and file segments together exceed it. The split costs
nothing in practice (the forwarder keeps at most `uplink.max_inflight_batches` in flight).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.config import AgentConfig
from uplink.client import Uplink, UplinkConfig
from uplink.failover import FailoverConfig, FailoverTransportFactory
from uplink.mqtt.packets import Will
from uplink.mqtt.stream_session import DataStreamConfig, PacketIdRegistry
from uplink.quic import QuicSettings
from uplink.streams import DataStreamUplink

BROKER_RECEIVE_MAXIMUM = 1024  # our broker's default (and EMQX's max_inflight ceiling in practice)
TICKET_FILE_NAME = "quic-ticket.json"

ActiveTransport = Literal["quic", "tcp"]


def quic_settings(cfg: AgentConfig) -> QuicSettings:
    """`[uplink.quic]` (with `uplink.ca_file` as the trust anchor) as the QUIC transport's settings."""
    u, q = cfg.uplink, cfg.uplink.quic
    ticket = q.ticket_file if q.ticket_file is not None else str(Path(cfg.agent.data_dir) / TICKET_FILE_NAME)
    return QuicSettings(
        port=q.port,
        ca_file=u.ca_file,
        server_name=q.server_name,
        cert_file=q.cert_file if q.cert_file is not None else u.cert_file,
        key_file=q.key_file if q.cert_file is not None else u.key_file,
        ticket_file=ticket,
        early_data=q.early_data,
        idle_timeout_s=q.idle_timeout_s,
        ping_interval_s=q.ping_interval_s,
        handshake_timeout_s=q.handshake_timeout_s,
        max_data_streams=q.max_data_streams,
        congestion_control=q.congestion_control,
        socket_buffer_bytes=q.socket_buffer_bytes,
    )


def failover_config(cfg: AgentConfig) -> FailoverConfig:
    """The link policy of transport "quic" (QUIC only) or "auto" (QUIC, TCP/TLS fallback)."""
    f = cfg.uplink.failover
    return FailoverConfig(
        quic=quic_settings(cfg),
        quic_enabled=True,
        tcp_enabled=cfg.uplink.transport == "auto",
        probe_initial_s=f.probe_initial_s,
        probe_max_s=f.probe_max_s,
        fleet_spread_window_s=f.fleet_spread_window_s,
    )


def control_max_inflight(cfg: AgentConfig) -> int:
    """The control connection's window: what the file data stream leaves of a 1024 Receive Maximum."""
    if cfg.uplink.transport == "tcp":
        return 65535  # files share the one connection and its window: the broker's limit governs
    return max(1, BROKER_RECEIVE_MAXIMUM - cfg.files.max_inflight_segments)


def uplink_config(cfg: AgentConfig, will: Will | None = None) -> UplinkConfig:
    u = cfg.uplink
    return UplinkConfig(
        host=u.host,
        port=u.port,
        client_id=cfg.client_id,
        protocol_level=u.protocol_level,
        keep_alive_s=u.keep_alive_s,
        username=u.username,
        password=u.password.encode() if u.password is not None else None,
        tls=u.tls,
        # ca_file also anchors QUIC's TLS; the TCP side only uses it with tls.
        ca_file=u.ca_file if u.tls else None,
        cert_file=u.cert_file if u.tls else None,
        key_file=u.key_file if u.tls else None,
        will=will,
        reconnect_initial_s=u.reconnect_initial_s,
        reconnect_max_s=u.reconnect_max_s,
        max_inflight=control_max_inflight(cfg),
    )


@dataclass(eq=False)
class AgentLink:
    """One configured link: the Uplink, the failover under it (None for "tcp") and its counters."""

    cfg: AgentConfig
    uplink: Uplink
    failover: FailoverTransportFactory | None
    # Packet ids unique across the connection (A6): every data stream of this Uplink shares one registry.
    registry: PacketIdRegistry = field(default_factory=PacketIdRegistry)

    @property
    def transport(self) -> ActiveTransport | None:
        """Which transport carries the session now (None while there is no connection)."""
        if not self.uplink.connected:
            return None
        if self.failover is None:
            return "tcp"
        return self.failover.active

    @property
    def quic_migrations(self) -> int:
        """Connection migrations of the current QUIC link (our own rebinds; NAT rebinding is the
        server's business and invisible here)."""
        link = self.failover.quic_link if self.failover is not None else None
        return link.migrations if link is not None else 0

    def files_link(self) -> Uplink | DataStreamUplink:
        """A new link for file transfer on this Uplink (one per Uplink; `run()` it when it is a stream)."""
        failover = self.failover
        if failover is None:
            return self.uplink
        return DataStreamUplink(
            self.uplink,
            lambda: failover.quic_link,
            DataStreamConfig(
                protocol_level=self.cfg.uplink.protocol_level,
                max_inflight=self.cfg.files.max_inflight_segments,
                topic_alias_maximum=self.uplink.session.config.topic_alias_maximum,
            ),
            registry=self.registry,
            name="files",
        )

    async def run(self) -> None:
        """The Uplink's supervisor and, for "auto", the QUIC prober; until cancelled or closed."""
        async with asyncio.TaskGroup() as tg:
            prober = None
            if self.failover is not None and self.failover.config.tcp_enabled:
                prober = tg.create_task(self.failover.run_prober(), name="uplink-quic-prober")
            try:
                await self.uplink.run()
            finally:
                if prober is not None:
                    prober.cancel()  # it runs until cancelled; the Uplink is closed


def build_link(cfg: AgentConfig, will: Will | None = None) -> AgentLink:
    """The Uplink and its transport for `cfg.uplink` (see the module docstring)."""
    failover = None
    if cfg.uplink.transport != "tcp":
        failover = FailoverTransportFactory(failover_config(cfg))
    uplink = Uplink(uplink_config(cfg, will), transport_factory=failover)
    return AgentLink(cfg, uplink, failover)
