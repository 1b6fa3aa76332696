"""The `cloud-broker` process with TLS (client certificates), WebSocket, device credentials from
`cloud-broker device add`, the ACL and `$SYS`, driven by paho-mqtt (an independent client)."""

from __future__ import annotations

import datetime
import queue
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from hil.net import free_port, wait_tcp_listening
from tests.integration.broker_raw_client import CLI, RawClient
from uplink.mqtt.packets import MQTT_5, MQTT_311, PubAck, ReasonCode

pytestmark = pytest.mark.integration

WAIT_S = 5.0


# ------------------------------------------------------------------------------------------ certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          san: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san is not None:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("fieldgate test CA", ca_key, None, ca_key, ca=True)
    _write(d / "ca", ca)
    server_key = _key()
    _write(d / "server", _cert("127.0.0.1", server_key, ca.subject, ca_key, san="127.0.0.1"), server_key)
    for device in ("well-7", "stranger"):
        k = _key()
        _write(d / device, _cert(device, k, ca.subject, ca_key), k)
    return d


# ------------------------------------------------------------------------------------------ the broker


@pytest.fixture(scope="module")
def broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("data")
    pw = data / "pw.txt"
    pw.write_text("s3cret\n")
    for name, role in (("well-7", "device"), ("ops", "operator")):
        res = subprocess.run([CLI, "device", "add", name, "--data", str(data), "--password-file", str(pw),
                              "--role", role], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
    generated = subprocess.run([CLI, "device", "add", "well-9", "--data", str(data)],
                               capture_output=True, text=True, timeout=30)
    password9 = generated.stdout.split("password: ")[1].strip()
    listed = subprocess.run([CLI, "device", "list", "--data", str(data)], capture_output=True, text=True)
    assert listed.stdout.split() == ["ops", "operator", "well-7", "device", "well-9", "device"]
    ports = {kind: free_port() for kind in ("tcp", "tls", "ws")}
    cfg = data / "broker.toml"
    cfg.write_text(f"""
data_dir = "{data}"
log_level = "warning"
[[listeners]]
kind = "tcp"
host = "127.0.0.1"
port = {ports["tcp"]}
[[listeners]]
kind = "tls"
host = "127.0.0.1"
port = {ports["tls"]}
cert_file = "{pki / "server.crt"}"
key_file = "{pki / "server.key"}"
ca_file = "{pki / "ca.crt"}"
[[listeners]]
kind = "ws"
host = "127.0.0.1"
port = {ports["ws"]}
[sys]
interval_s = 0.2
[auth]
free_failures = 2
backoff_base_s = 30.0
""")
    proc = subprocess.Popen([CLI, "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for port in ports.values():
            wait_tcp_listening(port, pid=proc.pid)
        yield {"ports": ports, "pki": pki, "password9": password9}
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


class Paho:
    def __init__(self, port: int, client_id: str, *, protocol: Any = mqtt.MQTTv5, transport: str = "tcp",
                 username: str | None = None, password: str | None = None, tls: dict[str, str] | None = None
                 ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()
        c = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                      transport=transport, reconnect_on_failure=False)  # type: ignore[arg-type]
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set(ca_certs=tls["ca"], certfile=tls.get("cert"), keyfile=tls.get("key"))
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc.value)
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.put((mid, rc.value))
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()

    def connected(self) -> int:
        return self.connack.get(timeout=WAIT_S)

    def suback(self, topic: str, qos: int = 1) -> list[int]:
        got: queue.Queue[list[int]] = queue.Queue()
        self.client.on_subscribe = lambda _c, _u, _m, codes, _p: got.put([c.value for c in codes])
        self.client.subscribe(topic, qos)
        return got.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        info = self.client.publish(topic, payload, qos=qos)
        mid, code = self.acks.get(timeout=WAIT_S)
        assert mid == info.mid
        return code

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Paho]]:
    made: list[Paho] = []
    yield made
    for c in made:
        c.close()


def test_a_device_logs_in_with_its_password_and_publishes_only_in_its_own_tree(
        broker: dict[str, Any], clients: list[Paho]) -> None:
    dev = Paho(broker["ports"]["tcp"], "well-7", username="well-7", password="s3cret")
    clients.append(dev)
    assert dev.connected() == 0
    ops = Paho(broker["ports"]["tcp"], "ops-1", username="ops", password="s3cret")
    clients.append(ops)
    assert ops.connected() == 0
    assert ops.suback("fg/v1/+/data/#") == [1]
    assert dev.publish("fg/v1/well-7/data/telemetry", b"ok") == 0
    msg = ops.messages.get(timeout=WAIT_S)
    assert (msg.topic, msg.payload) == ("fg/v1/well-7/data/telemetry", b"ok")
    assert dev.publish("fg/v1/well-8/data/telemetry", b"forged") == ReasonCode.NOT_AUTHORIZED
    assert dev.publish("fg/v1/well-7/cmd", b"self-command") == ReasonCode.NOT_AUTHORIZED
    assert dev.suback("fg/v1/#") == [ReasonCode.NOT_AUTHORIZED]
    assert dev.suback("fg/v1/well-7/cmd") == [1]
    assert ops.publish("fg/v1/well-7/cmd", b"card-now") == 0
    assert dev.messages.get(timeout=WAIT_S).payload == b"card-now"


def test_an_mqtt311_device_gets_suback_0x80_and_its_forbidden_publish_is_dropped(
        broker: dict[str, Any], clients: list[Paho]) -> None:
    dev = RawClient(broker["ports"]["tcp"], MQTT_311)
    assert dev.connect("well-9", username="well-9", password=broker["password9"].encode()).reason_code == 0
    assert dev.subscribe("fg/v1/well-7/#").reason_codes == (0x80,)
    assert dev.subscribe("fg/v1/well-9/#").reason_codes == (1,)
    assert isinstance(dev.publish_acked("fg/v1/well-7/data/x", b"forged", 1, pid=5), PubAck)
    assert dev.publish_acked("fg/v1/well-9/data/x", b"mine", 1, pid=6) == PubAck(6)
    delivered = [p.payload for p in dev.drain() if hasattr(p, "payload")]
    assert delivered == [b"mine"]
    dev.close()


def test_wrong_passwords_are_refused_then_rate_limited_and_anonymous_clients_are_refused(
        broker: dict[str, Any]) -> None:
    port = broker["ports"]["tcp"]
    codes = []
    for _ in range(3):
        c = RawClient(port, MQTT_5)
        codes.append(c.connect("x", username="guesser", password=b"guess").reason_code)
        c.close()
    assert codes == [ReasonCode.BAD_USER_NAME_OR_PASSWORD] * 2 + [ReasonCode.CONNECTION_RATE_EXCEEDED]
    anonymous = RawClient(port, MQTT_5)
    assert anonymous.connect("anon").reason_code == ReasonCode.NOT_AUTHORIZED


def test_a_tls_client_certificate_is_the_devices_identity(broker: dict[str, Any],
                                                          clients: list[Paho]) -> None:
    pki = broker["pki"]
    port = broker["ports"]["tls"]
    dev = Paho(port, "well-7-tls", tls={"ca": str(pki / "ca.crt"), "cert": str(pki / "well-7.crt"),
                                        "key": str(pki / "well-7.key")})
    clients.append(dev)
    assert dev.connected() == 0
    assert dev.publish("fg/v1/well-7/status", b"up") == ReasonCode.NO_MATCHING_SUBSCRIBERS
    assert dev.publish("fg/v1/well-8/status", b"up") == ReasonCode.NOT_AUTHORIZED
    stranger = Paho(port, "s", tls={"ca": str(pki / "ca.crt"), "cert": str(pki / "stranger.crt"),
                                    "key": str(pki / "stranger.key")})
    clients.append(stranger)
    assert stranger.connected() == ReasonCode.NOT_AUTHORIZED
    with_password = Paho(port, "ops-tls", username="ops", password="s3cret", tls={"ca": str(pki / "ca.crt")})
    clients.append(with_password)
    assert with_password.connected() == 0


def test_a_tls_client_that_does_not_trust_the_server_gets_no_session(broker: dict[str, Any]) -> None:
    ctx = ssl.create_default_context()  # system CAs: our test CA is not among them
    raw = RawClient(broker["ports"]["tls"], MQTT_5)
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(raw.sock, server_hostname="127.0.0.1")
    raw.close()


def test_mqtt_over_websocket_on_path_mqtt(broker: dict[str, Any], clients: list[Paho]) -> None:
    port = broker["ports"]["ws"]
    sub = Paho(port, "ws-ops", transport="websockets", username="ops", password="s3cret")
    clients.append(sub)
    assert sub.connected() == 0
    assert sub.suback("fg/v1/well-7/#") == [1]
    pub = Paho(port, "ws-dev", transport="websockets", username="well-7", password="s3cret",
               protocol=mqtt.MQTTv311)
    clients.append(pub)
    assert pub.connected() == 0
    pub.publish("fg/v1/well-7/data/t", b"over-ws")
    assert sub.messages.get(timeout=WAIT_S).payload == b"over-ws"


def test_a_websocket_upgrade_on_another_path_is_refused(broker: dict[str, Any]) -> None:
    raw = RawClient(broker["ports"]["ws"], MQTT_5)
    raw.send_raw(b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
    raw.sock.settimeout(WAIT_S)
    assert raw.sock.recv(100).startswith(b"HTTP/1.1 404")
    raw.close()


def test_sys_statistics_are_published_retained(broker: dict[str, Any], clients: list[Paho]) -> None:
    ops = Paho(broker["ports"]["tcp"], "ops-sys", username="ops", password="s3cret")
    clients.append(ops)
    assert ops.connected() == 0
    assert ops.suback("$SYS/broker/#", 0) == [0]
    seen: dict[str, bytes] = {}
    # The retained copies arrive first; the next tick counts this very client.
    while not ({"$SYS/broker/clients/connected", "$SYS/broker/uptime", "$SYS/broker/messages/received",
                "$SYS/broker/bytes/sent", "$SYS/broker/version"} <= set(seen)
               and int(seen["$SYS/broker/clients/connected"]) >= 1):
        msg = ops.messages.get(timeout=WAIT_S)
        seen[msg.topic] = msg.payload
    assert seen["$SYS/broker/uptime"].endswith(b" seconds")
