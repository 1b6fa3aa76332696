"""Our Uplink (session + TCP transport + supervisor) against a real Mosquitto broker on loopback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest

from hil.net import free_port, wait_tcp_listening
from tests.conftest import require_binary
from uplink.client import Transport, Uplink, UplinkClosed, UplinkConfig, tcp_transport_factory
from uplink.mqtt.packets import MQTT_5, MQTT_311, Publish, ReasonCode

pytestmark = pytest.mark.integration

LEVELS = pytest.mark.parametrize("level", [MQTT_311, MQTT_5], ids=["v311", "v5"])
STEP_TIMEOUT_S = 20.0  # a generous ceiling so that a hang fails the test instead of stalling the suite


class Mosquitto:
    """A Mosquitto process of our own on a fixed loopback port, which the test can stop and restart."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        for _ in range(50):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                wait_tcp_listening(self.port, pid=self.proc.pid, timeout_s=0.2)
            except TimeoutError:
                continue
            return
        raise TimeoutError(f"mosquitto is not listening on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(require_binary("mosquitto"), tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def config(broker: Mosquitto, client_id: str, level: int = MQTT_5, **overrides: object) -> UplinkConfig:
    return UplinkConfig(
        host="127.0.0.1",
        port=broker.port,
        client_id=client_id,
        protocol_level=level,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        connect_timeout_s=5.0,
        **overrides,  # type: ignore[arg-type]
    )


async def next_message(messages: AsyncIterator[Publish]) -> Publish:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await anext(messages)


async def closed_outcome(operation: Awaitable[int]) -> int | UplinkClosed:
    """The operation's result, or the UplinkClosed it raised (a task must not fail its TaskGroup)."""
    try:
        return await operation
    except UplinkClosed as exc:
        return exc


@LEVELS
async def test_publishes_at_every_qos_come_back_on_our_own_subscription(
    mosquitto: Mosquitto, level: int
) -> None:
    uplink = Uplink(config(mosquitto, f"self-{level}", level))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.wait_connected()
            granted = await uplink.subscribe([("fg/self/#", 2)])
            assert granted == (2,)
            inbound = uplink.inbound()
            for qos in (0, 1, 2):
                topic, payload = f"fg/self/q{qos}", f"payload {qos}".encode()
                assert await uplink.publish(topic, payload, qos=qos) == 0
                message = await next_message(inbound)
                assert (message.topic, message.payload, message.qos) == (topic, payload, qos)
        await uplink.close()
    assert not uplink.connected


async def test_many_qos1_publishes_pipeline_within_the_brokers_receive_maximum(mosquitto: Mosquitto) -> None:
    uplink = Uplink(config(mosquitto, "pipeline"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.wait_connected()
            codes = await asyncio.gather(*(uplink.publish("fg/pipe", b"%d" % i, qos=1) for i in range(2000)))
        # Success with "no matching subscribers" (0x10): nobody listens on fg/pipe.
        assert codes == [ReasonCode.NO_MATCHING_SUBSCRIBERS] * 2000
        # Mosquitto announces a Receive Maximum (its max_inflight_messages); we never exceed it.
        assert uplink.session.inflight_window == uplink.session.server_receive_maximum < 65535
        await uplink.close()


async def test_unsubscribe_stops_delivery(mosquitto: Mosquitto) -> None:
    uplink = Uplink(config(mosquitto, "unsub"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.subscribe([("fg/a", 1), ("fg/b", 1)])
            assert await uplink.unsubscribe(["fg/a"]) == (0,)
            await uplink.publish("fg/a", b"dropped", qos=1)
            await uplink.publish("fg/b", b"kept", qos=1)
            message = await next_message(uplink.inbound())
            assert (message.topic, message.payload) == ("fg/b", b"kept")
        await uplink.close()


@LEVELS
async def test_after_a_broker_restart_the_uplink_reconnects_and_delivers_the_publishes_that_were_waiting(
    mosquitto: Mosquitto, level: int
) -> None:
    # The publisher's only path to the broker goes through this gate, so the test decides when it may
    # reconnect: after the observer has re-subscribed on the restarted (memory-only) broker.
    gate = asyncio.Event()
    gate.set()

    async def gated_transport(cfg: UplinkConfig) -> Transport:
        await gate.wait()
        return await tcp_transport_factory(cfg)

    publisher = Uplink(config(mosquitto, f"pub-{level}", level), transport_factory=gated_transport)
    observer = Uplink(config(mosquitto, f"obs-{level}", level))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(publisher.run(), name="publisher")
        tg.create_task(observer.run(), name="observer")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await observer.subscribe([("fg/restart/#", 1)])
            await publisher.wait_connected()
            assert await publisher.publish("fg/restart/before", b"before", qos=1) == 0
            observed = observer.inbound()
            assert (await next_message(observed)).payload == b"before"

            gate.clear()
            await asyncio.to_thread(mosquitto.stop)
            await publisher.wait_disconnected()
            await observer.wait_disconnected()
            waiting = [
                tg.create_task(publisher.publish("fg/restart/after", b"%d" % i, qos=qos), name=f"publish-{i}")
                for i, qos in enumerate([1, 2, 1, 2, 1, 1])
            ]
            await asyncio.sleep(0)
            assert not any(t.done() for t in waiting)

            await asyncio.to_thread(mosquitto.start)
            await observer.wait_connected()
            assert observer.reconnects == 1
            # The restarted broker kept nothing: the observer re-subscribed by itself. Prove it is live.
            await observer.publish("fg/restart/probe", b"probe", qos=1)
            assert (await next_message(observed)).payload == b"probe"

            gate.set()
            assert await asyncio.gather(*waiting) == [0] * len(waiting)
            payloads = sorted([(await next_message(observed)).payload for _ in waiting])
            assert payloads == sorted(b"%d" % i for i in range(len(waiting)))
        assert publisher.reconnects == 1
        await publisher.close()
        await observer.close()


async def test_close_fails_publishes_that_can_no_longer_complete(mosquitto: Mosquitto) -> None:
    uplink = Uplink(config(mosquitto, "closer"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        await asyncio.wait_for(uplink.wait_connected(), STEP_TIMEOUT_S)
        await asyncio.to_thread(mosquitto.stop)
        await uplink.wait_disconnected()
        pending = tg.create_task(closed_outcome(uplink.publish("fg/x", b"never", qos=1)), name="pending")
        await asyncio.sleep(0)
        await uplink.close()
        assert isinstance(await pending, UplinkClosed)
        with pytest.raises(UplinkClosed):
            await uplink.publish("fg/x", b"after close", qos=1)


def write_tls_material(directory: Path, common_name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / f"{common_name}-ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for path in paths:
        path.chmod(0o644)  # mosquitto may drop root privileges before reading them
    return paths


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    binary = require_binary("mosquitto")
    # Mosquitto started as root drops to its own user before reading certificates, and pytest's
    # tmp_path lives under a root-only directory: the throwaway TLS files go to a world-readable one.
    shared = Path(tempfile.mkdtemp(prefix="fieldgate-tls-"))
    shared.chmod(0o755)
    ca, cert, key = write_tls_material(shared, "fieldgate-test-ca")
    broker = Mosquitto(binary, tmp_path)
    broker.conf.write_text(
        f"listener {broker.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"certfile {cert}\nkeyfile {key}\n"
    )
    try:
        broker.start()
        yield broker, ca
    finally:
        broker.stop()
        shutil.rmtree(shared, ignore_errors=True)


async def test_tls_connects_when_the_broker_certificate_chains_to_our_ca(
    tls_mosquitto: tuple[Mosquitto, Path],
) -> None:
    broker, ca = tls_mosquitto
    uplink = Uplink(config(broker, "tls-ok", tls=True, ca_file=str(ca)))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await uplink.wait_connected()
            await uplink.subscribe([("fg/tls", 1)])
            assert await uplink.publish("fg/tls", b"secret", qos=1) == 0
            assert (await next_message(uplink.inbound())).payload == b"secret"
        await uplink.close()


async def test_tls_refuses_a_broker_whose_certificate_we_cannot_verify(
    tls_mosquitto: tuple[Mosquitto, Path], tmp_path: Path
) -> None:
    broker, _ = tls_mosquitto
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = write_tls_material(other, "someone-else")
    attempts = 0

    async def counting(cfg: UplinkConfig) -> Transport:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            verified.set()
        return await tcp_transport_factory(cfg)

    verified = asyncio.Event()
    uplink = Uplink(config(broker, "tls-bad", tls=True, ca_file=str(other_ca)), transport_factory=counting)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uplink.run(), name="uplink")
        await asyncio.wait_for(verified.wait(), STEP_TIMEOUT_S)
        assert not uplink.connected
        await uplink.close()
