"""Tests for app.server.tls: the cached server context, its reload on rotation, and the gunicorn hook."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from app.certs import cert_paths, create_certificates
from app.server.tls import ReloadingTLSContext, SSLContextHook, TLSContextError
from app.watch import FileWatcher

SERVICE, NAMESPACE = "poolkeeper", "poolkeeper-system"
SERVICE_HOST = "poolkeeper.poolkeeper-system.svc"
TIMEOUT = 10  # seconds; a bound on every socket operation, never asserted on


class TLSServer:
    """A threaded TLS server on 127.0.0.1 that, like gunicorn, asks ``context_for_connection``
    for a context for every accepted socket, sends b"ok" after the handshake and closes."""

    def __init__(self, context_for_connection) -> None:
        self._context_for_connection = context_for_connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.errors: list[BaseException] = []  # server-side handshake failures, in order
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve)

    def __enter__(self) -> TLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        # Wake the blocking accept() with one last connection, then wait for the thread.
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT):
            pass
        self._thread.join(TIMEOUT)
        self._listener.close()
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        self._listener.settimeout(TIMEOUT)
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                self.errors.append(e)
                return
            with conn:
                if self._stopping.is_set():
                    return
                conn.settimeout(TIMEOUT)
                try:
                    with self._context_for_connection().wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (OSError, ssl.SSLError) as e:
                    self.errors.append(e)

    def handshake(self, client_ctx: ssl.SSLContext, server_hostname: str = SERVICE_HOST) -> bytes:
        """Connect, verify, read b"ok"; return the DER certificate the server presented."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
                return tls.getpeercert(binary_form=True)


def client_for(ca_pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca_pem.decode("ascii"))


def der_of(cert_file) -> bytes:
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def pair(tmp_path):
    out = tmp_path / "tls"
    create_certificates(out, SERVICE, NAMESPACE)
    return out


def test_cert_paths_are_tls_crt_and_tls_key(tmp_path):
    assert cert_paths(tmp_path) == (str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    assert cert_paths("/etc/poolkeeper/tls") == ("/etc/poolkeeper/tls/tls.crt",
                                                 "/etc/poolkeeper/tls/tls.key")


def test_reloading_context_is_cached_while_files_are_unchanged(pair):
    watcher = FileWatcher()
    tls = ReloadingTLSContext(*cert_paths(pair), watcher)
    first = tls.context()
    assert isinstance(first, ssl.SSLContext)
    for _ in range(3):
        watcher.check()
        assert tls.context() is first
    assert tls.generation == 1


def test_reloading_context_is_a_modern_server_context(pair):
    ctx = ReloadingTLSContext(*cert_paths(pair), FileWatcher()).context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.verify_mode == ssl.CERT_NONE  # the API server sends no client certificate


def test_reloading_context_offers_only_ecdhe_aead_suites_on_tls_1_2(pair):
    suites = ReloadingTLSContext(*cert_paths(pair), FileWatcher()).context().get_ciphers()
    tls12 = [s for s in suites if s["protocol"] == "TLSv1.2"]
    assert tls12 and all(s["kea"] == "kx-ecdhe" and s["aead"] for s in tls12), tls12
    assert {s["name"] for s in suites if s["protocol"] == "TLSv1.3"} >= {
        "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}


def test_reloading_context_serves_the_rotated_pair(pair):
    watcher = FileWatcher()
    tls = ReloadingTLSContext(*cert_paths(pair), watcher)
    old_ca = (pair / "ca.crt").read_bytes()
    old_ctx = tls.context()
    with TLSServer(tls.context) as server:
        assert server.handshake(client_for(old_ca)) == der_of(pair / "tls.crt")

        create_certificates(pair, SERVICE, NAMESPACE, force=True)
        new_ca = (pair / "ca.crt").read_bytes()
        assert new_ca != old_ca

        # Within the interval the cached context still serves the old pair.
        assert server.handshake(client_for(old_ca)) != der_of(pair / "tls.crt")
        watcher.check()
        assert server.handshake(client_for(new_ca)) == der_of(pair / "tls.crt")
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            server.handshake(client_for(old_ca))
    assert tls.context() is not old_ctx
    assert tls.generation == 2
    # The only server-side failure is the client that rejected the new certificate.
    assert len(server.errors) == 1 and isinstance(server.errors[0], ssl.SSLError)


def test_reloading_context_keeps_old_pair_when_new_key_is_corrupt(pair, caplog):
    watcher = FileWatcher()
    cert_file, key_file = cert_paths(pair)
    tls = ReloadingTLSContext(cert_file, key_file, watcher)
    old_ca = (pair / "ca.crt").read_bytes()
    old_der = der_of(cert_file)
    old_ctx = tls.context()

    create_certificates(pair, SERVICE, NAMESPACE, force=True)  # a new pair...
    Path(key_file).write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    watcher.check()
    with caplog.at_level(logging.ERROR, logger="poolkeeper.tls"):
        assert tls.context() is old_ctx  # ...whose key does not load
        watcher.check()
        assert tls.context() is old_ctx
    errors = [r for r in caplog.records
              if r.name == "poolkeeper.tls" and r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per broken pair, not once per check
    assert "still serving the previous certificate" in errors[0].getMessage()
    with TLSServer(tls.context) as server:
        assert server.handshake(client_for(old_ca)) == old_der
    assert tls.generation == 1

    # Fixing the files is picked up at the next check.
    fixed = create_certificates(pair, SERVICE, NAMESPACE, force=True)
    watcher.check()
    assert tls.context() is not old_ctx
    with TLSServer(tls.context) as server:
        assert server.handshake(client_for(Path(fixed.ca_file).read_bytes())) == der_of(cert_file)


def test_reloading_context_keeps_old_pair_during_a_half_rotation(pair, tmp_path):
    # New key in place, certificate not yet: the mismatched pair must not be served.
    watcher = FileWatcher()
    cert_file, key_file = cert_paths(pair)
    tls = ReloadingTLSContext(cert_file, key_file, watcher)
    old_ctx = tls.context()
    other = create_certificates(tmp_path / "other", SERVICE, NAMESPACE)
    os.replace(other.key_file, key_file)
    watcher.check()
    assert tls.context() is old_ctx
    os.replace(other.cert_file, cert_file)
    watcher.check()
    new_ctx = tls.context()
    assert new_ctx is not old_ctx
    with TLSServer(tls.context) as server:
        assert server.handshake(client_for(Path(other.ca_file).read_bytes())) == der_of(cert_file)


def test_reloading_context_is_safe_across_threads(pair):
    # gthread workers call the hook from several threads; rotation mid-flight must neither raise
    # nor hand out anything but a loaded context, and reloads once.
    watcher = FileWatcher()
    tls = ReloadingTLSContext(*cert_paths(pair), watcher)
    old_ctx = tls.context()
    start = threading.Barrier(9)
    seen: list[set[int]] = [set() for _ in range(8)]
    failures: list[BaseException] = []

    def call(index: int) -> None:
        try:
            start.wait(TIMEOUT)
            for _ in range(300):
                ctx = tls.context()
                assert isinstance(ctx, ssl.SSLContext)
                seen[index].add(id(ctx))
        except BaseException as e:  # reported below, not lost in the thread
            failures.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    start.wait(TIMEOUT)
    create_certificates(pair, SERVICE, NAMESPACE, force=True)
    for _ in range(5):
        watcher.check()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    watcher.check()
    new_ctx = tls.context()
    assert new_ctx is not old_ctx and tls.generation == 2
    assert set().union(*seen) <= {id(old_ctx), id(new_ctx)}


def test_reloading_context_follows_a_secret_volume_swap(tmp_path):
    # A mounted Secret: tls.crt -> ..data/tls.crt, and an update swaps the ..data symlink.
    volume = tmp_path / "volume"
    first = create_certificates(volume / "..v1", SERVICE, NAMESPACE)
    second = create_certificates(volume / "..v2", SERVICE, NAMESPACE)
    (volume / "..data").symlink_to("..v1")
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    watcher = FileWatcher()
    tls = ReloadingTLSContext(*cert_paths(volume), watcher)
    old_ctx = tls.context()

    (volume / "..data_tmp").symlink_to("..v2")
    os.replace(volume / "..data_tmp", volume / "..data")
    watcher.check()
    assert tls.context() is not old_ctx
    with TLSServer(tls.context) as server:
        presented = server.handshake(client_for(Path(second.ca_file).read_bytes()))
        with pytest.raises(ssl.SSLCertVerificationError):
            server.handshake(client_for(Path(first.ca_file).read_bytes()))
    assert presented == der_of(second.cert_file)


def test_reloading_context_refuses_to_start_without_a_pair(tmp_path):
    with pytest.raises(TLSContextError, match="cannot load .*tls.crt and .*tls.key"):
        ReloadingTLSContext(*cert_paths(tmp_path), FileWatcher())


def test_reloading_context_refuses_tls_1_1(pair):
    tls = ReloadingTLSContext(*cert_paths(pair), FileWatcher())
    ca = (pair / "ca.crt").read_bytes()
    old_client = client_for(ca)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
            old_client.minimum_version = ssl.TLSVersion.TLSv1
            old_client.maximum_version = ssl.TLSVersion.TLSv1_1
        old_client.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 allows TLS < 1.2 only at level 0
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"the local OpenSSL cannot build a TLS 1.1 client: {e}")

    with TLSServer(tls.context) as server:
        server.handshake(client_for(ca))  # control: the server is up and serving TLS 1.2+
        try:
            server.handshake(old_client)
        except ssl.SSLError as e:
            if e.reason == "NO_PROTOCOLS_AVAILABLE":  # the client gave up before sending anything
                pytest.skip(f"the local OpenSSL refuses to offer TLS 1.1: {e}")
            client_error = e
        else:
            pytest.fail("a TLS 1.1 client completed a handshake")
    assert isinstance(client_error, ssl.SSLError)
    # The refusal came from the server: it saw a hello it does not support.
    assert [getattr(e, "reason", None) for e in server.errors] == ["UNSUPPORTED_PROTOCOL"]


def test_gunicorn_hook_caches_one_context_per_process(pair, monkeypatch):
    watcher = FileWatcher()
    hook = SSLContextHook(*cert_paths(pair), watcher)
    factory_calls = []

    def default_factory():
        factory_calls.append(1)
        raise AssertionError("the default factory re-reads the files; the hook must not call it")

    conf = object()
    first = hook(conf, default_factory)
    watcher.check()
    assert hook(conf, default_factory) is first
    assert factory_calls == []
    reloading = hook.reloading_context()

    # A forked worker (another pid) builds its own object instead of sharing the parent's.
    monkeypatch.setattr(os, "getpid", lambda: -1)
    child = hook(conf, default_factory)
    assert child is not first
    assert hook.reloading_context() is not reloading
    with TLSServer(lambda: hook(conf, default_factory)) as server:
        presented = server.handshake(client_for((pair / "ca.crt").read_bytes()))
    assert presented == der_of(pair / "tls.crt")


def test_gunicorn_hook_follows_rotation(pair):
    watcher = FileWatcher()
    hook = SSLContextHook(*cert_paths(pair), watcher)
    first = hook(None, None)
    new = create_certificates(pair, SERVICE, NAMESPACE, force=True)
    watcher.check()
    with TLSServer(lambda: hook(None, None)) as server:
        assert server.handshake(client_for(Path(new.ca_file).read_bytes())) == der_of(new.cert_file)
    assert hook(None, None) is not first


def test_gunicorn_hook_warns_about_settings_it_does_not_apply(pair, caplog):
    class Conf:
        ca_certs = "/etc/ca.pem"
        cert_reqs = ssl.CERT_REQUIRED
        ciphers = None
        http_protocols = ["h2", "h1"]

    hook = SSLContextHook(*cert_paths(pair), FileWatcher())
    with caplog.at_level(logging.WARNING, logger="poolkeeper.tls"):
        hook(Conf(), None)
    assert "not applied by poolkeeper's ssl_context hook: ca_certs, cert_reqs, http_protocols=h2" \
        in caplog.text
