"""Tests for app.certs: what create_certificates writes, when it keeps a pair, that TLS works."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from app import certs
from app.certs import (
    CertificateFileError,
    ChainError,
    ExpiryError,
    KeyMismatchError,
    NamesError,
    certificate_expiry,
    check_certificates,
    create_certificates,
)

SERVICE, NAMESPACE = "poolkeeper", "poolkeeper-system"
SERVICE_HOST = "poolkeeper.poolkeeper-system.svc"
EXPECTED_DNS = {"poolkeeper", "poolkeeper.poolkeeper-system", "poolkeeper.poolkeeper-system.svc",
                "poolkeeper.poolkeeper-system.svc.cluster.local", "localhost"}
TIMEOUT = 10  # seconds; a bound on every socket operation, never asserted on


def load_cert(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def load_key(path):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def snapshot(directory) -> dict[str, tuple[bytes, int]]:
    result = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            result[name] = (f.read(), os.stat(path).st_mtime_ns)
    return result


@pytest.fixture
def created(tmp_path):
    out = tmp_path / "tls"
    return out, create_certificates(out, SERVICE, NAMESPACE)


def test_create_certificates_writes_the_three_files_and_creates_the_dir(created):
    out, result = created
    assert sorted(os.listdir(out)) == ["ca.crt", "tls.crt", "tls.key"]  # no temp files left
    assert result.created
    assert (result.ca_file, result.cert_file, result.key_file) == (
        str(out / "ca.crt"), str(out / "tls.crt"), str(out / "tls.key"))
    assert result.reason == f"no certificates in {out}"
    assert "created" in result.summary()


def test_create_certificates_key_is_private(created):
    out, _ = created
    assert stat.S_IMODE(os.stat(out / "tls.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "tls.crt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(out / "ca.crt").st_mode) == 0o644


def test_create_certificates_chain_verifies(created):
    out, result = created
    ca, leaf = load_cert(out / "ca.crt"), load_cert(out / "tls.crt")
    assert leaf.issuer == ca.subject
    assert ca.issuer == ca.subject  # self-signed
    leaf.verify_directly_issued_by(ca)  # raises on a bad signature
    ca.verify_directly_issued_by(ca)
    # An independent path validator (RFC 5280 / CABF profile) agrees, for every name.
    verifier_time = result.not_after - dt.timedelta(days=1)
    for name in EXPECTED_DNS:
        verifier = (PolicyBuilder().store(Store([ca])).time(verifier_time)
                    .build_server_verifier(x509.DNSName(name)))
        chain = verifier.verify(leaf, [])
        assert chain[-1] == ca
    verifier = (PolicyBuilder().store(Store([ca])).time(verifier_time)
                .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    verifier.verify(leaf, [])


def test_create_certificates_ca_and_leaf_extensions(created):
    out, _ = created
    ca, leaf = load_cert(out / "ca.crt"), load_cert(out / "tls.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert not leaf_bc.value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [SERVICE_HOST]


def test_create_certificates_sans_cover_service_names(created):
    out, _ = created
    san = load_cert(out / "tls.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(san.value.get_values_for_type(x509.DNSName)) == EXPECTED_DNS
    assert ipaddress.ip_address("127.0.0.1") in san.value.get_values_for_type(x509.IPAddress)


def test_create_certificates_uses_p256_keys(created):
    out, _ = created
    ca, leaf, key = load_cert(out / "ca.crt"), load_cert(out / "tls.crt"), load_key(out / "tls.key")
    for public in (ca.public_key(), leaf.public_key(), key.public_key()):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
    assert key.public_key() == leaf.public_key()


def test_create_certificates_ca_bundle_is_base64_of_ca_crt(created):
    out, result = created
    assert base64.b64decode(result.ca_bundle, validate=True) == (out / "ca.crt").read_bytes()


def test_create_certificates_reports_not_after(created):
    out, result = created
    assert result.not_after == certificate_expiry(out / "tls.crt")
    assert result.not_after.tzinfo is not None
    lifetime = result.not_after - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365)


def test_create_certificates_keeps_a_valid_pair(created):
    out, first = created
    before = snapshot(out)
    second = create_certificates(out, SERVICE, NAMESPACE)
    assert not second.created
    assert snapshot(out) == before
    assert second.not_after == first.not_after
    assert second.ca_bundle == first.ca_bundle
    assert "kept existing" in second.summary()


def test_create_certificates_force_replaces_the_pair(created):
    out, first = created
    before = snapshot(out)
    second = create_certificates(out, SERVICE, NAMESPACE, force=True)
    after = snapshot(out)
    assert second.created and second.reason.startswith("forced")
    for name in ("ca.crt", "tls.crt", "tls.key"):
        assert after[name][0] != before[name][0]
    assert second.ca_bundle != first.ca_bundle
    check_certificates(out, SERVICE, NAMESPACE)  # the new set is consistent


def test_create_certificates_replaces_mismatched_key(created, tmp_path):
    out, _ = created
    other = create_certificates(tmp_path / "other", SERVICE, NAMESPACE)
    (out / "tls.key").write_bytes(Path(other.key_file).read_bytes())
    with pytest.raises(KeyMismatchError, match="tls.key is not the private key of .*tls.crt"):
        check_certificates(out, SERVICE, NAMESPACE)
    result = create_certificates(out, SERVICE, NAMESPACE)
    assert result.created and "is not the private key" in result.reason
    assert load_key(out / "tls.key").public_key() == load_cert(out / "tls.crt").public_key()
    check_certificates(out, SERVICE, NAMESPACE)


def test_create_certificates_replaces_pair_from_another_ca(created, tmp_path):
    out, _ = created
    other = create_certificates(tmp_path / "other", SERVICE, NAMESPACE)
    (out / "ca.crt").write_bytes(Path(other.ca_file).read_bytes())
    with pytest.raises(ChainError, match="is not signed by"):
        check_certificates(out, SERVICE, NAMESPACE)
    assert create_certificates(out, SERVICE, NAMESPACE).created
    check_certificates(out, SERVICE, NAMESPACE)


def test_create_certificates_replaces_pair_for_another_service(created):
    out, _ = created
    with pytest.raises(NamesError, match="does not cover other, other.poolkeeper-system"):
        check_certificates(out, "other", NAMESPACE)
    result = create_certificates(out, "other", NAMESPACE)
    assert result.created
    san = load_cert(out / "tls.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "other.poolkeeper-system.svc" in san.value.get_values_for_type(x509.DNSName)


def test_create_certificates_replaces_expiring_pair(tmp_path):
    out = tmp_path / "tls"
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=350)
    old = create_certificates(out, SERVICE, NAMESPACE, days=365, now=long_ago)
    with pytest.raises(ExpiryError, match="within the renewal window of 30 days"):
        check_certificates(out, SERVICE, NAMESPACE)
    new = create_certificates(out, SERVICE, NAMESPACE)
    assert new.created and "renewal window" in new.reason
    assert new.not_after > old.not_after + dt.timedelta(days=300)
    assert certificate_expiry(out / "tls.crt") == new.not_after


def test_create_certificates_replaces_expired_pair(tmp_path):
    out = tmp_path / "tls"
    create_certificates(out, SERVICE, NAMESPACE, days=10,
                        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=20))
    with pytest.raises(ExpiryError, match="expired at"):
        check_certificates(out, SERVICE, NAMESPACE)
    assert create_certificates(out, SERVICE, NAMESPACE).created


def test_create_certificates_keeps_short_lived_pair_outside_its_window(tmp_path):
    # A 3-day pair renews in its last day (a third of its lifetime), not 30 days ahead.
    out = tmp_path / "tls"
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    create_certificates(out, SERVICE, NAMESPACE, days=3, now=start)
    assert create_certificates(out, SERVICE, NAMESPACE, now=start + dt.timedelta(days=1)).created is False
    later = start + dt.timedelta(days=2, hours=1)
    assert create_certificates(out, SERVICE, NAMESPACE, now=later).created


def test_create_certificates_replaces_not_yet_valid_pair(tmp_path):
    out = tmp_path / "tls"
    create_certificates(out, SERVICE, NAMESPACE,
                        now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    with pytest.raises(ExpiryError, match="not valid before"):
        check_certificates(out, SERVICE, NAMESPACE)


def test_create_certificates_replaces_corrupt_files(created):
    out, _ = created
    (out / "tls.crt").write_text("not a certificate\n")
    with pytest.raises(CertificateFileError, match=r"tls.crt is not a PEM certificate"):
        check_certificates(out, SERVICE, NAMESPACE)
    assert create_certificates(out, SERVICE, NAMESPACE).created
    (out / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CertificateFileError, match=r"tls.key is not an unencrypted PEM"):
        check_certificates(out, SERVICE, NAMESPACE)
    assert create_certificates(out, SERVICE, NAMESPACE).created
    check_certificates(out, SERVICE, NAMESPACE)


def test_create_certificates_replaces_incomplete_set(created):
    out, _ = created
    (out / "ca.crt").unlink()
    with pytest.raises(CertificateFileError, match=r"ca.crt does not exist"):
        check_certificates(out, SERVICE, NAMESPACE)
    result = create_certificates(out, SERVICE, NAMESPACE)
    assert result.created and "ca.crt does not exist" in result.reason


def test_create_certificates_writes_key_before_cert(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(certs.os, "replace", recording_replace)
    create_certificates(tmp_path, SERVICE, NAMESPACE)
    assert replaced == ["ca.crt", "tls.key", "tls.crt"]


def test_create_certificates_rejects_invalid_names(tmp_path):
    with pytest.raises(ValueError, match="service: 'Pool_Keeper' is not a valid Service name"):
        create_certificates(tmp_path, "Pool_Keeper", NAMESPACE)
    with pytest.raises(ValueError, match="namespace: 'a.b' is not a valid namespace name"):
        create_certificates(tmp_path, SERVICE, "a.b")
    with pytest.raises(ValueError, match="days: 0 must be >= 1"):
        create_certificates(tmp_path, SERVICE, NAMESPACE, days=0)
    assert os.listdir(tmp_path) == []


def test_certificate_expiry_reports_unreadable_files(tmp_path):
    with pytest.raises(CertificateFileError, match=r"missing.crt does not exist"):
        certificate_expiry(tmp_path / "missing.crt")
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"\x00\x01")
    with pytest.raises(CertificateFileError, match=r"garbage.crt is not a PEM certificate"):
        certificate_expiry(garbage)


def tls_handshake(out, server_hostname: str) -> tuple[BaseException | None, bytes | None]:
    """Serve one connection from a plain ssl server using the pair; return the client's error
    (None on success) and the DER certificate the client saw."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / "tls.crt", out / "tls.key")
    client_ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    server_errors: list[BaseException] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(TIMEOUT)
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as e:  # the client refused us: expected in some tests
                server_errors.append(e)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    assert tls.recv(2) == b"ok"
                    return None, tls.getpeercert(binary_form=True)
        except ssl.SSLError as e:
            return e, None
        finally:
            thread.join(TIMEOUT)
            assert not thread.is_alive()


def test_certificates_serve_tls_for_the_service_name(created):
    out, _ = created
    error, der = tls_handshake(out, SERVICE_HOST)
    assert error is None
    assert x509.load_der_x509_certificate(der) == load_cert(out / "tls.crt")


def test_certificates_refuse_a_wrong_hostname(created):
    out, _ = created
    error, _ = tls_handshake(out, "other.poolkeeper-system.svc")
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in error.verify_message
