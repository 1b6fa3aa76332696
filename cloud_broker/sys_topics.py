"""The broker's `$SYS/broker/...` statistics as retained messages, built from the core's stats."""

from __future__ import annotations

from cloud_broker.core.model import Message

# $SYS topic -> key in Broker.stats() (Mosquitto's names where one exists, so dashboards carry over).
SYS_TOPICS: dict[str, str] = {
    "$SYS/broker/clients/connected": "clients_connected",
    "$SYS/broker/clients/total": "sessions",
    "$SYS/broker/messages/received": "messages_received",
    "$SYS/broker/messages/sent": "messages_sent",
    "$SYS/broker/messages/dropped": "messages_dropped",
    "$SYS/broker/messages/dropped/qos0_congested": "qos0_dropped_congested",
    "$SYS/broker/publish/quota_exceeded": "publish_quota_exceeded",
    "$SYS/broker/store/messages/count": "messages_queued",
    "$SYS/broker/bytes/received": "bytes_received",
    "$SYS/broker/bytes/sent": "bytes_sent",
    "$SYS/broker/subscriptions/count": "subscriptions",
    "$SYS/broker/retained messages/count": "retained",
    "$SYS/broker/connections/total": "connections_total",
    "$SYS/broker/auth/failures": "auth_failures",
    "$SYS/broker/publish/refused": "publish_refused",
    "$SYS/broker/protocol/violations": "protocol_violations",
}


def sys_messages(stats: dict[str, int], uptime_s: float, version: str,
                 extra: dict[str, int] | None = None) -> list[Message]:
    """One retained QoS 0 message per statistic (decimal text payloads, like Mosquitto's)."""
    out = [
        Message("$SYS/broker/version", f"fieldgate cloud-broker {version}".encode(), 0, True),
        Message("$SYS/broker/uptime", f"{int(uptime_s)} seconds".encode(), 0, True),
    ]
    values = dict(stats)
    if extra:
        values.update(extra)
    for topic, key in SYS_TOPICS.items():
        if key in values:
            out.append(Message(topic, str(values[key]).encode(), 0, True))
    if extra:
        for key, value in extra.items():
            if key not in SYS_TOPICS.values():
                out.append(Message(f"$SYS/broker/{key}", str(value).encode(), 0, True))
    return out
