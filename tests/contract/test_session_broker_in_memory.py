"""Our client session and our broker core wired back to back in memory: no sockets, one fake clock.

Both sides are sans-I/O, so this test is the I/O layer: it moves bytes from each client session to the
broker core and back, completes the broker's journal at once (as a durable store would after commit),
and advances one clock. Whatever the two state machines agree on here, they agree on over any transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cloud_broker.core.broker import Broker
from cloud_broker.core.settings import CoreSettings
from uplink.mqtt.packets import MQTT_5, MQTT_311, Subscription
from uplink.mqtt.session import (
    ClientSession,
    Connected,
    Disconnected,
    Event,
    MessageReceived,
    PublishAcked,
    SessionConfig,
    Subscribed,
)


@dataclass
class Wire:
    broker: Broker
    now: float = 1000.0
    clients: dict[int, ClientSession] = field(default_factory=dict)
    events: dict[int, list[Event]] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)

    def attach(self, conn_id: int, session: ClientSession) -> None:
        self.clients[conn_id] = session
        self.events[conn_id] = []
        self.broker.connection_opened(conn_id, f"mem:{conn_id}", self.now)
        session.connect(self.now)
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            moved = False
            for cid, s in self.clients.items():
                if cid in self.closed:
                    continue
                data = s.data_to_send()
                if data:
                    moved = True
                    self.broker.data_received(cid, data, self.now)
            while self.broker.has_journal():
                batch, _ = self.broker.drain_journal()
                self.broker.journal_committed(batch, self.now)
            writes, closes = self.broker.drain()
            for cid, data in writes:
                moved = True
                if cid not in self.closed:
                    self.clients[cid].receive_data(data, self.now)
            for cid in closes:
                if cid not in self.closed:
                    self.closed.add(cid)
                    self.clients[cid].connection_lost()
            for cid, s in self.clients.items():
                while (ev := s.next_event()) is not None:
                    self.events[cid].append(ev)
            if not moved:
                return
        raise AssertionError("the wire never went quiet")

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.broker.handle_deadlines(self.now)
        for cid, s in self.clients.items():
            if cid not in self.closed:
                s.handle_deadline(self.now)
        self.pump()

    def of(self, cid: int, kind: type) -> list:
        return [e for e in self.events[cid] if isinstance(e, kind)]


def _session(cid: str, level: int, **kw: object) -> ClientSession:
    return ClientSession(SessionConfig(client_id=cid, protocol_level=level, keep_alive_s=30, **kw))  # type: ignore[arg-type]


@pytest.fixture
def wire() -> Wire:
    return Wire(Broker(CoreSettings(allow_anonymous=True)))


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_a_qos1_publish_reaches_a_wildcard_subscriber_and_is_acked(wire: Wire, level: int) -> None:
    wire.attach(1, _session("sub", level))
    wire.attach(2, _session("pub", level))
    assert wire.of(1, Connected) and wire.of(2, Connected)
    wire.clients[1].subscribe([Subscription("fg/v1/+/data/#", qos=1)])
    wire.pump()
    assert wire.of(1, Subscribed)[0].reason_codes == (1,)
    pid = wire.clients[2].publish("fg/v1/pad-7/data/card", b"829 values", qos=1)
    wire.pump()
    (ack,) = wire.of(2, PublishAcked)
    assert ack.packet_id == pid and ack.reason_code < 0x80
    (msg,) = wire.of(1, MessageReceived)
    assert (msg.publish.topic, msg.publish.payload, msg.publish.qos) == (
        "fg/v1/pad-7/data/card",
        b"829 values",
        1,
    )


def test_a_thousand_pipelined_publishes_arrive_once_each_in_order(wire: Wire) -> None:
    wire.attach(1, _session("sub", MQTT_5))
    wire.attach(2, _session("pub", MQTT_5))
    wire.clients[1].subscribe([Subscription("t/#", qos=1)])
    wire.pump()
    sent = 0
    while sent < 1000:
        while sent < 1000 and wire.clients[2].can_publish(1):
            wire.clients[2].publish(f"t/{sent % 7}", str(sent).encode(), qos=1)
            sent += 1
        wire.pump()
    assert len(wire.of(2, PublishAcked)) == 1000
    assert [int(m.publish.payload) for m in wire.of(1, MessageReceived)] == list(range(1000))


def test_qos2_is_delivered_exactly_once_end_to_end(wire: Wire) -> None:
    wire.attach(1, _session("sub", MQTT_5))
    wire.attach(2, _session("pub", MQTT_5))
    wire.clients[1].subscribe([Subscription("q2", qos=2)])
    wire.pump()
    wire.clients[2].publish("q2", b"x", qos=2)
    wire.pump()
    assert len(wire.of(1, MessageReceived)) == 1
    assert len(wire.of(2, PublishAcked)) == 1


def test_a_silent_client_is_dropped_by_the_broker_keepalive_and_its_will_published(wire: Wire) -> None:
    from uplink.mqtt.packets import Will

    wire.attach(1, _session("watcher", MQTT_5))
    wire.clients[1].subscribe([Subscription("fg/v1/pad-7/status", qos=1)])
    wire.pump()
    wire.attach(2, _session("pad-7", MQTT_5, will=Will("fg/v1/pad-7/status", b"offline", qos=1)))
    wire.closed.add(2)  # the agent's link dies silently: nothing it sends arrives any more
    for _ in range(10):
        wire.advance(10)  # the watcher keeps pinging; the broker waits 1.5 x 30 s for the agent
    wills = [m.publish.payload for m in wire.of(1, MessageReceived)]
    assert wills == [b"offline"]
    assert not wire.of(1, Disconnected)


def test_a_duplicate_client_id_takes_the_session_over(wire: Wire) -> None:
    wire.attach(1, _session("pad-7", MQTT_5))
    wire.attach(2, _session("pad-7", MQTT_5))
    (gone,) = wire.of(1, Disconnected)
    assert gone.reason_code == 0x8E and gone.by_server
    assert wire.clients[2].connected
