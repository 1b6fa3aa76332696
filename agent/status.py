"""The agent's retained status messages: the birth (online, refreshed), the will and the clean-stop death.

Theory of operation. The will is registered with every CONNECT (retained, QoS 1, state "offline", reason
"connection lost"), so the broker publishes it when the agent vanishes. Each time a link comes up the agent
publishes a retained birth (state "online" with versions, config version, uptime, transport, queue depth),
which replaces the will (or a previous death) for every later subscriber, and refreshes it every
`interval_s`. A clean stop publishes a retained "offline" with reason "stopped" before the DISCONNECT
(after a normal DISCONNECT the broker discards the will, so without it the birth would look current).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from importlib import metadata

from uplink.mqtt.packets import Properties, Will
from uplink.schema.commands import CONTENT_TYPE_STATUS, AgentStatus, encode_json

STATUS_PROPERTIES = Properties(content_type=CONTENT_TYPE_STATUS, payload_format_indicator=1)


def versions() -> dict[str, str]:
    """Software versions reported in the birth message."""
    try:
        agent = metadata.version("fieldgate")
    except metadata.PackageNotFoundError:
        agent = "unknown"
    return {"agent": agent, "python": platform.python_version(), "platform": sys.platform}


def will_for(agent_id: str, topic: str, *, use_properties: bool, wall_ns: Callable[[], int]) -> Will:
    # ts_ns is when the connection was made (the broker sends the will later, unchanged).
    payload = encode_json(
        AgentStatus(state="offline", agent=agent_id, ts_ns=wall_ns(), reason="connection lost")
    )
    props = STATUS_PROPERTIES if use_properties else Properties()
    return Will(topic=topic, payload=payload, qos=1, retain=True, properties=props)


def death(agent_id: str, *, reason: str, config_version: str | None, wall_ns: int) -> bytes:
    return encode_json(
        AgentStatus(
            state="offline", agent=agent_id, ts_ns=wall_ns, reason=reason, config_version=config_version
        )
    )
