"""Test support for MQTT over QUIC: a throwaway PKI and an in-process broker with QUIC, TCP and TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_broker.config import ListenerConfig
from cloud_broker.core.broker import Broker
from cloud_broker.core.settings import CoreSettings
from cloud_broker.listeners import tcp
from cloud_broker.listeners.base import BoundListener, ServerListener
from cloud_broker.listeners.quic import QuicListener, listener_config, start_quic_listener
from cloud_broker.server import BrokerHub


@dataclass(frozen=True)
class Pki:
    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str
    client_key_file: str
    other_ca_file: str  # a CA that signed nothing we use: verification against it must fail


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("fieldgate test CA")
    srv_key, srv_cert = _leaf(ca_key, ca_cert, "localhost", server=True)
    cli_key, cli_cert = _leaf(ca_key, ca_cert, "well-0001", server=False)
    _, other_cert = _ca("someone else's CA")
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "other-ca.pem").write_bytes(other_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(srv_cert.public_bytes(pem))
    _write_key(directory / "server.key", srv_key)
    (directory / "client.pem").write_bytes(cli_cert.public_bytes(pem))
    _write_key(directory / "client.key", cli_key)
    return Pki(str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key"),
               str(directory / "client.pem"), str(directory / "client.key"), str(directory / "other-ca.pem"))



@dataclass(eq=False)
class RunningBroker:
    broker: Broker
    hub: BrokerHub
    quic: QuicListener
    tcp: ServerListener
    tls: ServerListener | None

    @property
    def quic_port(self) -> int:
        return self.quic.port

    @property
    def tcp_port(self) -> int:
        return self.tcp.addresses[0][1]

    @property
    def tls_port(self) -> int:
        assert self.tls is not None
        return self.tls.addresses[0][1]

    async def close(self) -> None:
        """As BrokerServer.close: stop accepting, DISCONNECT everyone, wait for the listeners."""
        listeners: list[BoundListener] = [self.quic, self.tcp, *([self.tls] if self.tls is not None else [])]
        for listener in listeners:
            listener.close()
        self.hub.shutdown()
        for listener in listeners:
            await listener.wait_closed()


async def start_broker(pki: Pki, *, quic_port: int = 0, settings: CoreSettings | None = None,
                       tls: bool = True, **quic_options: object) -> RunningBroker:
    """An in-process broker: QUIC on quic_port, TCP and (optionally) TLS on free ports, all on 127.0.0.1."""
    loop = asyncio.get_running_loop()
    broker = Broker(settings or CoreSettings(allow_anonymous=True))
    hub = BrokerHub(broker, loop)
    client_ca = quic_options.pop("client_ca_file", None)
    require = bool(quic_options.pop("verify_client", False))
    base = ListenerConfig(kind="quic", host="127.0.0.1", port=quic_port, cert_file=pki.cert_file,
                          key_file=pki.key_file, ca_file=client_ca,  # type: ignore[arg-type]
                          require_client_cert=require)
    quic = await start_quic_listener(hub, listener_config(base, **quic_options))
    tcp_listener = await tcp.start(hub, ListenerConfig(kind="tcp", host="127.0.0.1", port=0))
    tls_listener = None
    if tls:
        tls_listener = await tcp.start(hub, ListenerConfig(kind="tls", host="127.0.0.1", port=0,
                                                           cert_file=pki.cert_file, key_file=pki.key_file))
    return RunningBroker(broker, hub, quic, tcp_listener, tls_listener)


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll predicate (state owned by another party: a broker core, a file) until true, bounded."""
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():  # noqa: ASYNC110 - not an event we own
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout_s}s") from None
