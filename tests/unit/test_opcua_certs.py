"""The client application certificate: created once, owner-only key, reused, renewed when unusable."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from cryptography import x509

from drivers.opcua.certs import ensure_certificate

URI = "urn:rtu-17:fieldgate:edge-agent"


def test_the_first_run_creates_a_certificate_with_the_application_uri_and_a_private_key(
    tmp_path: Path,
) -> None:
    cert_path, key_path = ensure_certificate(tmp_path / "opcua", URI, "rtu-17")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [URI]
    assert san.get_values_for_type(x509.DNSName) == ["rtu-17"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.data_encipherment
    assert usage.content_commitment  # nonRepudiation, required by Part 6 §6.2.2


def test_later_runs_reuse_the_same_certificate(tmp_path: Path) -> None:
    cert_path, _ = ensure_certificate(tmp_path, URI, "rtu-17")
    first = cert_path.read_bytes()
    ensure_certificate(tmp_path, URI, "rtu-17")
    assert cert_path.read_bytes() == first


def test_a_loosened_key_mode_is_tightened_again(tmp_path: Path) -> None:
    _, key_path = ensure_certificate(tmp_path, URI, "rtu-17")
    key_path.chmod(0o644)
    ensure_certificate(tmp_path, URI, "rtu-17")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_a_lost_key_or_a_changed_application_uri_yields_a_fresh_pair(tmp_path: Path) -> None:
    cert_path, key_path = ensure_certificate(tmp_path, URI, "rtu-17")
    first = cert_path.read_bytes()
    key_path.unlink()
    ensure_certificate(tmp_path, URI, "rtu-17")
    second = cert_path.read_bytes()
    assert second != first and key_path.exists()
    ensure_certificate(tmp_path, "urn:other", "rtu-17")
    assert cert_path.read_bytes() != second


def test_a_certificate_close_to_expiry_is_renewed(tmp_path: Path) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3650 - 10)
    cert_path, _ = ensure_certificate(tmp_path, URI, "rtu-17", now=long_ago)
    old = cert_path.read_bytes()
    ensure_certificate(tmp_path, URI, "rtu-17")
    assert cert_path.read_bytes() != old
