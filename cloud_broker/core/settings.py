"""The broker core's typed, frozen settings: limits and capabilities it announces in CONNACK."""

from __future__ import annotations

from dataclasses import dataclass

from uplink.mqtt.packets import MAX_PACKET_SIZE

SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 Session Expiry Interval meaning "never"


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """What the broker allows and announces. Defaults are the broker's defaults; `validate` runs once."""

    allow_anonymous: bool = False
    # Largest packet we accept (announced as Maximum Packet Size in MQTT 5 CONNACK).
    max_packet_size_bytes: int = 1_048_576
    # How many unacknowledged QoS 1/2 PUBLISHes a client may have towards us (Receive Maximum).
    receive_maximum: int = 1024
    # Topic aliases a client may use towards us; 0 disables them.
    topic_alias_maximum: int = 64
    maximum_qos: int = 2
    retain_available: bool = True
    wildcard_subscription_available: bool = True
    shared_subscription_available: bool = True
    subscription_identifier_available: bool = True
    # Cap on unacknowledged QoS 1/2 deliveries towards one client: min(client's Receive Maximum, this).
    # MQTT 3.1.1 clients announce nothing, so they get this window.
    max_inflight_messages: int = 1000
    # Messages queued per session (offline, or beyond the client's Receive Maximum); new ones drop beyond.
    max_queued_messages: int = 1000
    # Whether QoS 0 messages are queued for offline persistent sessions (Mosquitto's default: no).
    queue_qos0_offline: bool = False
    # Upper bound on a client's Session Expiry Interval; None keeps what the client asks for.
    max_session_expiry_s: int | None = None
    # A connection is dropped after keepalive * multiplier seconds of silence (MQTT: 1.5).
    keepalive_multiplier: float = 1.5
    # When set, overrides the client's keepalive (MQTT 5 Server Keep Alive).
    server_keep_alive_s: int | None = None
    # Time a fresh connection has to send CONNECT.
    connect_timeout_s: float = 10.0
    max_client_id_length: int = 256

    def validate(self) -> None:
        """Raise ValueError naming the bad field; called once when the broker is built."""
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError("receive_maximum: must be 1..65535")
        if not 0 <= self.topic_alias_maximum <= 65535:
            raise ValueError("topic_alias_maximum: must be 0..65535")
        if not 16 <= self.max_packet_size_bytes <= MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size_bytes: must be 16..{MAX_PACKET_SIZE}")
        if self.maximum_qos not in (0, 1, 2):
            raise ValueError("maximum_qos: must be 0, 1 or 2")
        if not 1 <= self.max_inflight_messages <= 65535:
            raise ValueError("max_inflight_messages: must be 1..65535")
        if self.max_queued_messages < 0:
            raise ValueError("max_queued_messages: must be >= 0")
        expiry = self.max_session_expiry_s
        if expiry is not None and not 0 <= expiry <= SESSION_NEVER_EXPIRES:
            raise ValueError("max_session_expiry_s: must be 0..4294967295")
        if self.keepalive_multiplier < 1.0:
            raise ValueError("keepalive_multiplier: must be >= 1.0")
        if self.server_keep_alive_s is not None and not 0 <= self.server_keep_alive_s <= 65535:
            raise ValueError("server_keep_alive_s: must be 0..65535")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s: must be > 0")
        if not 1 <= self.max_client_id_length <= 65535:
            raise ValueError("max_client_id_length: must be 1..65535")
