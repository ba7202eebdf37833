"""Owns poolkeeper's certificates: a throw-away CA and the serving pair it signs.

``create_certificates`` writes three files into one directory:

``ca.crt``   the CA; base64 of this PEM is the webhook's ``clientConfig.caBundle``
``tls.key``  the serving key (PKCS#8 PEM, mode 0600)
``tls.crt``  the serving certificate, signed by the CA

The CA's private key is never written: it signs the serving certificate and is dropped. Every
creation (first run, ``force=True``, or renewal of an invalid/expiring pair) therefore makes a
new CA, and the caBundle of the MutatingWebhookConfiguration must be updated with it.

Write order (a server such as :class:`app.server.tls.ReloadingTLSContext` may be watching the
directory): each file is written to a temporary file in the same directory, fsynced and moved
into place with ``os.replace`` (atomic on POSIX), in the order ``ca.crt``, ``tls.key``,
``tls.crt``. ``tls.crt`` is the commit point: a reader that sees the new ``tls.crt`` also sees
the new ``tls.key`` (and ``ca.crt``), because they were replaced before it. A reader that
looks between the two replaces sees the old certificate with the new key; loading that pair
fails (OpenSSL checks that key and certificate match) and the reader keeps its previous
pair until ``tls.crt`` changes too. The serving pair is never half-written, and never a
mismatched pair that loads.

An existing pair is kept (``CertResult.created`` is False) when it is still good: all three
files parse, ``tls.key`` matches ``tls.crt``, ``tls.crt`` was issued and signed by ``ca.crt``,
its SANs cover the names :func:`serving_names` gives, and it is valid now and not within the
renewal window (the last 30 days, or the last third of its lifetime if that is shorter).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


def cert_paths(cert_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """cert_dir/tls.crt and cert_dir/tls.key (the kubernetes.io/tls Secret key names)."""
    cert_dir = os.fspath(cert_dir)
    return os.path.join(cert_dir, CERT_FILE), os.path.join(cert_dir, KEY_FILE)

# IP SANs, so https://127.0.0.1:8443 and https://[::1]:8443 work for local runs and tests.
SERVING_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

# Renew when less than this is left (capped at a third of the lifetime for short-lived pairs).
RENEW_BEFORE = dt.timedelta(days=30)

# Allow for clocks a little behind ours (API server, other nodes).
CLOCK_SKEW = dt.timedelta(minutes=5)

# Service names are DNS-1035 labels, namespaces DNS-1123 labels, both <= 63 characters
# (k8s.io/apimachinery/pkg/util/validation IsDNS1035Label / IsDNS1123Label).
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class CertificateError(Exception):
    """A certificate file is missing, unreadable or does not fit; the message says which."""


class CertificateFileError(CertificateError):
    """A file is missing, unreadable, or not the PEM it should be."""


class KeyMismatchError(CertificateError):
    """tls.key is not the private key of tls.crt."""


class ChainError(CertificateError):
    """tls.crt was not issued or not signed by ca.crt."""


class NamesError(CertificateError):
    """tls.crt's subjectAltNames do not cover the service's names."""


class ExpiryError(CertificateError):
    """tls.crt is expired, not yet valid, or inside its renewal window."""


@dataclass(frozen=True)
class CertResult:
    ca_file: str
    cert_file: str
    key_file: str
    created: bool  # False: a valid existing pair was kept
    not_after: dt.datetime  # tls.crt's notAfter, timezone-aware UTC
    ca_bundle: str  # base64 of ca.crt's PEM: clientConfig.caBundle
    reason: str  # why it was created, or that the existing pair was kept

    def summary(self) -> str:
        verb = "created" if self.created else "kept existing"
        return (f"{verb} {self.cert_file} (valid until {self.not_after:%Y-%m-%d %H:%M} UTC): "
                f"{self.reason}")


def serving_names(service: str, namespace: str) -> list[str]:
    """DNS SANs of the serving certificate; the API server calls ``NAME.NS.svc``."""
    _check_names(service, namespace)
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local", "localhost"]


def create_certificates(out_dir: str | os.PathLike[str], service: str, namespace: str,
                        days: int = 365, force: bool = False, *,
                        now: dt.datetime | None = None) -> CertResult:
    """Write ca.crt, tls.key and tls.crt into ``out_dir`` unless a good pair is already there.

    ``now`` (timezone-aware) replaces the current time, for tests.
    """
    _check_names(service, namespace)
    if days < 1:
        raise ValueError(f"days: {days} must be >= 1")
    now = _utc(now)
    out_dir = os.fspath(out_dir)
    ca_path, cert_path, key_path = _paths(out_dir)

    if force:
        reason = "forced (--force)"
    else:
        try:
            not_after = check_certificates(out_dir, service, namespace, now=now)
        except CertificateError as e:
            reason = f"replacing: {e}" if _any_exists(ca_path, cert_path, key_path) else \
                f"no certificates in {out_dir}"
        else:
            return CertResult(ca_path, cert_path, key_path, False, not_after,
                              _ca_bundle(_read(ca_path)),
                              "existing pair is valid and covers the service names")

    ca_pem, cert_pem, key_pem, not_after = issue_pair(service, namespace, days, now)
    write_pair(out_dir, ca_pem, cert_pem, key_pem)
    return CertResult(ca_path, cert_path, key_path, True, not_after, _ca_bundle(ca_pem), reason)


def check_certificates(out_dir: str | os.PathLike[str], service: str, namespace: str, *,
                       now: dt.datetime | None = None) -> dt.datetime:
    """Return tls.crt's notAfter if the pair in ``out_dir`` is good; raise a CertificateError."""
    ca_path, cert_path, key_path = _paths(os.fspath(out_dir))
    return check_pair(_read(ca_path), _read(cert_path), _read(key_path), service, namespace,
                      now=now, names=(ca_path, cert_path, key_path))


def check_pair(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, service: str, namespace: str, *,
               now: dt.datetime | None = None, renewal_window: bool = True,
               names: tuple[str, str, str] = (CA_FILE, CERT_FILE, KEY_FILE)) -> dt.datetime:
    """Return the certificate's notAfter if CA, certificate and key (PEM) are a good pair for the
    service; raise a CertificateError. ``names`` name the three in messages; without
    ``renewal_window`` a pair inside its last 30 days (or third) still counts as good."""
    now = _utc(now)
    ca_path, cert_path, key_path = names
    ca = parse_certificate(ca_pem, ca_path)
    cert = parse_certificate(cert_pem, cert_path)
    key = _parse_private_key(key_pem, key_path)

    if key.public_key() != cert.public_key():
        raise KeyMismatchError(f"{key_path} is not the private key of {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        detail = str(e) or "signature does not verify"
        raise ChainError(f"{cert_path} is not signed by {ca_path}: {detail}") from e

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise NamesError(f"{cert_path} has no subjectAltName extension") from None
    missing = [n for n in serving_names(service, namespace)
               if n not in san.get_values_for_type(x509.DNSName)]
    missing += [str(ip) for ip in SERVING_IPS if ip not in san.get_values_for_type(x509.IPAddress)]
    if missing:
        raise NamesError(f"{cert_path} does not cover {', '.join(missing)}")

    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        raise ExpiryError(f"{cert_path} is not valid before {not_before:%Y-%m-%d %H:%M} UTC")
    if now >= not_after:
        raise ExpiryError(f"{cert_path} expired at {not_after:%Y-%m-%d %H:%M} UTC")
    renew_before = min(RENEW_BEFORE, (not_after - not_before) / 3)
    if renewal_window and not_after - now < renew_before:
        raise ExpiryError(f"{cert_path} expires at {not_after:%Y-%m-%d %H:%M} UTC, "
                          f"within the renewal window of {_days(renew_before)}")
    if ca.not_valid_after_utc < not_after or now >= ca.not_valid_after_utc:
        raise ExpiryError(f"{ca_path} expires before {cert_path}")
    return not_after


def certificate_expiry(path: str | os.PathLike[str]) -> dt.datetime:
    """notAfter of the (first) certificate in the PEM file ``path``, timezone-aware UTC."""
    return load_certificate(path).not_valid_after_utc


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    return parse_certificate(_read(path), os.fspath(path))


def parse_certificate(pem: bytes, name: str = CERT_FILE) -> x509.Certificate:
    """The (first) certificate in ``pem``; ``name`` says what it is in the error."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise CertificateFileError(f"{name} is not a PEM certificate: {e}") from e


def _parse_private_key(pem: bytes, name: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateFileError(f"{name} is not an unencrypted PEM private key: {e}") from e
    return key  # type: ignore[return-value]


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateFileError(f"{os.fspath(path)} does not exist") from None
    except OSError as e:
        raise CertificateFileError(f"cannot read {os.fspath(path)}: {e.strerror}") from e


def write_pair(out_dir: str | os.PathLike[str], ca_pem: bytes, cert_pem: bytes,
               key_pem: bytes) -> None:
    """Write ca.crt, tls.key and tls.crt into ``out_dir`` atomically, tls.crt last (see the
    module docstring), creating the directory if needed."""
    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise CertificateFileError(f"cannot create directory {out_dir}: {e.strerror}") from e
    ca_path, cert_path, key_path = _paths(out_dir)
    _write_atomic(ca_path, ca_pem, 0o644)
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert_pem, 0o644)


def issue_pair(service: str, namespace: str, days: int,
               now: dt.datetime) -> tuple[bytes, bytes, bytes, dt.datetime]:
    """A new CA and a serving certificate it signs, valid ``days`` from ``now`` (UTC, aware):
    (ca.crt PEM, tls.crt PEM, tls.key PEM, notAfter). The CA's key is dropped."""
    not_before = now - CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "poolkeeper"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"poolkeeper CA for {service}.{namespace}.svc"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    dns = serving_names(service, namespace)
    host = f"{service}.{namespace}.svc"  # the name the API server dials
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in dns] + [x509.IPAddress(ip) for ip in SERVING_IPS]),
            critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (ca.public_bytes(serialization.Encoding.PEM),
            cert.public_bytes(serialization.Encoding.PEM), key_pem, cert.not_valid_after_utc)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never a part."""
    directory = os.path.dirname(path) or "."
    try:
        # mkstemp creates the file 0600, so the key is never readable by others, not even briefly.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise CertificateFileError(f"cannot write into {directory}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CertificateFileError(f"cannot write {path}: {e.strerror}") from e
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every filesystem; the rename is still atomic
    finally:
        os.close(fd)


def _paths(out_dir: str) -> tuple[str, str, str]:
    return (os.path.join(out_dir, CA_FILE), os.path.join(out_dir, CERT_FILE),
            os.path.join(out_dir, KEY_FILE))


def _ca_bundle(ca_pem: bytes) -> str:
    return base64.b64encode(ca_pem).decode("ascii")


def _any_exists(*paths: str) -> bool:
    return any(os.path.lexists(p) for p in paths)


def _check_names(service: str, namespace: str) -> None:
    if not _DNS1035_LABEL.match(service or ""):
        raise ValueError(f"service: {service!r} is not a valid Service name "
                         "(lowercase letters, digits and '-', starting with a letter, <= 63)")
    if not _DNS1123_LABEL.match(namespace or ""):
        raise ValueError(f"namespace: {namespace!r} is not a valid namespace name "
                         "(lowercase letters, digits and '-', <= 63)")


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def _days(delta: dt.timedelta) -> str:
    if delta >= dt.timedelta(days=1):
        return f"{delta.days} days"
    return f"{int(delta.total_seconds() // 3600)} hours"
