"""The broker core serves the valid packets that precede a violation in one read, then the violation."""

from __future__ import annotations

from cloud_broker.core.broker import Broker
from cloud_broker.core.model import AuthResult
from cloud_broker.core.settings import CoreSettings
from tests.unit.test_broker_core import Rig, sub
from uplink.mqtt.codec import encode
from uplink.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
    Disconnect,
    Publish,
    ReasonCode,
)

GARBAGE = b"\x00\x00"  # packet type 0 is reserved: a malformed packet (0x81)


def test_connect_then_garbage_in_one_read_gets_connack_0_then_disconnect_0x81() -> None:
    rig = Rig()
    c = rig.open(MQTT_5)
    rig.send_raw(c, encode(Connect("c", protocol_level=MQTT_5), MQTT_5) + GARBAGE)
    out = rig.take(c)
    assert len(out) == 2, out
    assert isinstance(out[0], ConnAck) and out[0].reason_code == ReasonCode.SUCCESS
    assert out[1] == Disconnect(ReasonCode.MALFORMED_PACKET)
    assert c.closed


def test_a_publish_before_garbage_in_the_same_read_is_still_delivered() -> None:
    rig = Rig()
    watcher, c = rig.connect("watcher"), rig.connect("c")
    sub(rig, watcher, "t/#")
    rig.take(watcher)
    rig.send_raw(c, encode(Publish("t/1", b"kept"), MQTT_5) + GARBAGE)
    assert [p.payload for p in rig.take(watcher) if isinstance(p, Publish)] == [b"kept"]
    assert rig.take(c) == [Disconnect(ReasonCode.MALFORMED_PACKET)] and c.closed


def test_an_mqtt_311_connect_then_garbage_is_accepted_then_closed_without_disconnect() -> None:
    rig = Rig()
    c = rig.open(MQTT_311)
    rig.send_raw(c, encode(Connect("c", protocol_level=MQTT_311), MQTT_311) + GARBAGE)
    out = rig.take(c)
    assert len(out) == 1 and isinstance(out[0], ConnAck) and out[0].reason_code == 0
    assert c.closed


def test_garbage_behind_a_connect_being_authenticated_is_answered_after_its_connack() -> None:
    rig = Rig(Broker(CoreSettings(), deferred_auth=True))
    c = rig.open(MQTT_5)
    rig.send_raw(c, encode(Connect("dev1", protocol_level=MQTT_5, username="dev1", password=b"pw"), MQTT_5)
                 + GARBAGE)
    assert rig.take(c) == [] and not c.closed  # nothing may precede the CONNACK
    rig.send_raw(c, b"more bytes from a client whose stream is already broken")
    [request] = rig.broker.drain_auth_requests()
    rig.broker.auth_completed(request.conn_id, AuthResult(0, "dev1", "device"), rig.now)
    rig.send_raw(c, b"")  # pump the output
    out = rig.take(c)
    assert len(out) == 2, out
    assert isinstance(out[0], ConnAck) and out[0].reason_code == ReasonCode.SUCCESS
    assert out[1] == Disconnect(ReasonCode.MALFORMED_PACKET)
    assert c.closed
    assert rig.broker.stats()["protocol_violations"] == 1


def test_a_refused_connect_with_garbage_behind_it_gets_only_the_refusal() -> None:
    rig = Rig(Broker(CoreSettings(), deferred_auth=True))
    c = rig.open(MQTT_5)
    rig.send_raw(c, encode(Connect("dev1", protocol_level=MQTT_5, username="dev1", password=b"no"), MQTT_5)
                 + GARBAGE)
    [request] = rig.broker.drain_auth_requests()
    rig.broker.auth_completed(request.conn_id, AuthResult(ReasonCode.BAD_USER_NAME_OR_PASSWORD), rig.now)
    rig.send_raw(c, b"")
    out = rig.take(c)
    assert len(out) == 1 and isinstance(out[0], ConnAck)
    assert out[0].reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD and c.closed
