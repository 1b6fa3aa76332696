"""Create (once) and reuse the self-signed application instance certificate an OPC UA peer presents.

OPC UA Part 6 §6.2.2 requires an RSA certificate whose subjectAltName carries the ApplicationUri (and
the host's DNS name), with digitalSignature, nonRepudiation, keyEncipherment and dataEncipherment key
usage. The key is written with mode 0600 in a 0700 directory, atomically (temp file + rename), so a
power cut never leaves a half-written key that a later start would reject. Sync file I/O: call it
through `asyncio.to_thread` from the event loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = "cert.der"
KEY_FILE = "key.pem"
KEY_BITS = 2048  # Basic256Sha256 allows 2048..4096; 2048 keeps handshakes cheap on ARM boxes
VALID_DAYS = 3650
RENEW_BEFORE_DAYS = 30


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _usable(cert_path: Path, key_path: Path, application_uri: str, now: dt.datetime) -> bool:
    """An existing pair is reused when both parse, match each other and the URI, and are not expiring."""
    try:
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    public = cert.public_key()
    if not isinstance(key, rsa.RSAPrivateKey) or not isinstance(public, rsa.RSAPublicKey):
        return False
    if public.public_numbers() != key.public_key().public_numbers():
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if application_uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
        return False
    return cert.not_valid_after_utc - now > dt.timedelta(days=RENEW_BEFORE_DAYS)


def ensure_certificate(
    cert_dir: str | Path,
    application_uri: str,
    hostname: str,
    *,
    server: bool = False,
    common_name: str = "fieldgate edge agent",
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """(certificate DER path, private key PEM path) in cert_dir, generating them when missing or stale."""
    directory = Path(cert_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    now = now or dt.datetime.now(dt.UTC)
    if _usable(cert_path, key_path, application_uri, now):
        # An operator may have loosened the mode by hand; the key must stay owner-only.
        os.chmod(key_path, 0o600)
        return cert_path, key_path

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fieldgate"),
        ]
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))  # tolerate a peer whose clock is a little behind
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(application_uri), x509.DNSName(hostname)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash between the two writes leaves a key without a matching cert, which
    # `_usable` rejects, so the next start regenerates both instead of pairing mismatched files.
    _write_atomic(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        0o600,
    )
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return cert_path, key_path
