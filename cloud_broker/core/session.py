"""Server-side MQTT session state: subscriptions, in-flight and queued deliveries, packet ids.

Theory of operation: a Session outlives connections. While attached (`conn_id` set) deliveries go
out at once up to the client's Receive Maximum of unacknowledged QoS 1/2 messages; the rest wait in
`pending` in arrival order. While detached, QoS 1/2 deliveries (and QoS 0 when configured) wait in
`pending` until the client comes back or the session expires. The session never touches bytes:
the broker encodes what it takes from here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cloud_broker.core.model import Message, StoredDelivery, SubscriptionEntry
from uplink.mqtt.packets import MAX_PACKET_ID


@dataclass(slots=True)
class Delivery:
    """One message on its way to this session's client, with the subscriber-side options applied."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...] = ()
    # QoS 2 outbound: PUBREC received and PUBREL sent; only PUBCOMP is still awaited.
    released: bool = False
    # Journal key within the session (0: not journaled, e.g. a QoS 0 message sent at once).
    seq: int = 0


class Session:
    """One client id's session. Mutated only by the Broker."""

    __slots__ = (
        "_next_packet_id",
        "client_id",
        "conn_id",
        "dropped_messages",
        "durable",
        "expires_at",
        "expiry_interval_s",
        "inbound_qos2",
        "inbound_qos2_batch",
        "inflight",
        "max_queued",
        "next_seq",
        "pending",
        "protocol_level",
        "subscriptions",
    )

    def __init__(self, client_id: str, protocol_level: int, expiry_interval_s: int, max_queued: int) -> None:
        self.client_id = client_id
        self.protocol_level = protocol_level
        self.expiry_interval_s = expiry_interval_s
        self.max_queued = max_queued
        self.conn_id: int | None = None
        self.expires_at: float | None = None  # monotonic, set while detached
        self.subscriptions: dict[str, SubscriptionEntry] = {}
        # Outbound QoS 1/2 awaiting PUBACK / PUBREC / PUBCOMP, in send order (dicts keep insertion order).
        self.inflight: dict[int, Delivery] = {}
        self.pending: deque[Delivery] = deque()
        # Inbound QoS 2 packet ids whose PUBREL has not arrived: a re-sent PUBLISH is not routed twice.
        # Each maps to the journal batch that holds the first copy's routing and the id itself (0: none,
        # or restored from storage): a resend's PUBREC waits for that batch like the first one did.
        self.inbound_qos2: dict[int, int] = {}
        # The last journal batch that saved or deleted one of this session's inbound QoS 2 ids. A PUBCOMP
        # waits for it: once the client has PUBCOMP it may reuse the id, and a restart that brought the
        # id back would take the new message for a resend and drop it.
        self.inbound_qos2_batch = 0
        self.dropped_messages = 0
        self._next_packet_id = 1
        # Whether this session's state is journaled (the broker journals and the session outlives its
        # connection); its deliveries then carry a `seq`.
        self.durable = False
        self.next_seq = 1

    def allocate_packet_id(self) -> int:
        """A packet id not in flight. Callers keep len(inflight) below 65535 (Receive Maximum does)."""
        pid = self._next_packet_id
        while pid in self.inflight:
            pid = pid % MAX_PACKET_ID + 1
        self._next_packet_id = pid % MAX_PACKET_ID + 1
        return pid

    def enqueue(self, delivery: Delivery) -> bool:
        """Queue a delivery; False (and counted as dropped) when the queue is full."""
        if len(self.pending) >= self.max_queued:
            self.dropped_messages += 1
            return False
        self.pending.append(delivery)
        return True

    def queued_deliveries(self) -> tuple[StoredDelivery, ...]:
        """In-flight then pending deliveries, as stored."""
        return tuple(
            StoredDelivery(d.message, d.qos, d.retain, d.subscription_ids)
            for d in (*self.inflight.values(), *self.pending)
        )
