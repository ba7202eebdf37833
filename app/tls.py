"""Owns the server-side TLS context: one cached SSLContext per process, rebuilt on rotation.

gunicorn (27) calls its ``ssl_context(conf, default_ssl_context_factory)`` hook for every
accepted connection (``gunicorn.sock.ssl_wrap_socket``, from each gthread worker thread), and
the default factory re-reads and re-parses tls.crt and tls.key each time. The hook from
:func:`gunicorn_ssl_context_hook` returns a cached context instead and only stats the two
files, at most once per ``check_interval`` seconds; when either changed (mtime, size or inode,
following symlinks, so a Kubernetes Secret volume's ``..data`` swap counts) it builds a new
context. Connections already open keep the context they were wrapped with.

A new pair that does not load (half-rotated, corrupt, key and certificate not matching) is
logged once at ERROR on ``poolkeeper.tls`` and the previous context keeps serving; the files
are retried as soon as they change again. :mod:`app.certs` writes tls.key before tls.crt, so a
load that sees the new certificate also sees its key.

Only cert_file/key_file are used: gunicorn's ``ca_certs``, ``cert_reqs`` (client
certificates), ``ciphers`` and HTTP/2 ALPN settings are not applied (a warning says so when
they are set). The API server does not present a client certificate unless configured to.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from typing import Any, Callable

log = logging.getLogger("poolkeeper.tls")

# At most one pair of stat() calls per process per interval, whatever the connection rate.
CHECK_INTERVAL = 1.0  # seconds

_Signature = tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]


class TLSContextError(Exception):
    """The certificate pair could not be loaded and there is no previous context to fall back on."""


def cert_paths(cert_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """cert_dir/tls.crt and cert_dir/tls.key (the kubernetes.io/tls Secret key names)."""
    cert_dir = os.fspath(cert_dir)
    return os.path.join(cert_dir, "tls.crt"), os.path.join(cert_dir, "tls.key")


def build_server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for the pair: TLS 1.2 minimum, no compression, Python's default ciphers."""
    # PROTOCOL_TLS_SERVER already carries Python's secure defaults (forward-secret AEAD ciphers,
    # OP_NO_COMPRESSION, server cipher preference); the minimum is set explicitly so it does not
    # depend on the system's OpenSSL configuration. No trust store: clients are not verified.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


class ReloadingTLSContext:
    """A server SSLContext for ``cert_file``/``key_file`` that follows the files on disk.

    ``context()`` is cheap and thread-safe. ``clock`` (monotonic seconds) is injectable for tests.
    The first load happens in the constructor and raises :class:`TLSContextError` if it fails.
    """

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                 clock: Callable[[], float] = time.monotonic,
                 check_interval: float = CHECK_INTERVAL) -> None:
        self.cert_file = os.fspath(cert_file)
        self.key_file = os.fspath(key_file)
        self._clock = clock
        self._check_interval = check_interval
        self._lock = threading.Lock()
        self._failed: _Signature | None = None  # signature of a pair that did not load
        self.generation = 0  # successful loads so far
        signature = self._stat()
        try:
            self._context = build_server_context(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TLSContextError(f"cannot load {self.cert_file} and {self.key_file}: "
                                  f"{_describe(e)}") from e
        self._signature = signature
        self.generation = 1
        self._next_check = clock() + check_interval

    def context(self) -> ssl.SSLContext:
        """The current context; re-checks the files if ``check_interval`` has passed."""
        if self._clock() < self._next_check:
            return self._context
        # One thread checks; the others keep using the current context instead of waiting.
        if not self._lock.acquire(blocking=False):
            return self._context
        try:
            now = self._clock()
            if now >= self._next_check:
                self._reload_if_changed()
                self._next_check = self._clock() + self._check_interval
            return self._context
        finally:
            self._lock.release()

    def _reload_if_changed(self) -> None:
        # Stat before loading: if the files change during the load, the next check sees a
        # different signature and loads again. Whatever loads is a consistent pair, because
        # load_cert_chain refuses a key that does not match the certificate.
        signature = self._stat()
        if signature == self._signature or signature == self._failed:
            return
        try:
            context = build_server_context(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._failed = signature
            log.error("cannot load TLS pair %s / %s, still serving the previous certificate "
                      "(retrying when the files change): %s", self.cert_file, self.key_file,
                      _describe(e))
            return
        self._context = context
        self._signature = signature
        self._failed = None
        self.generation += 1
        log.info("loaded new TLS certificate from %s", self.cert_file)

    def _stat(self) -> _Signature:
        return _file_signature(self.cert_file), _file_signature(self.key_file)


def gunicorn_ssl_context_hook(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                              clock: Callable[[], float] = time.monotonic,
                              ) -> Callable[[Any, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """gunicorn's ``ssl_context`` setting: ``ssl_context = gunicorn_ssl_context_hook(cert, key)``.

    One :class:`ReloadingTLSContext` per process, created on the first connection in that
    process: gunicorn forks its workers after reading the config, and an object (with its lock)
    inherited from the arbiter must not be shared, so it is keyed on ``os.getpid()``. No lock
    here: two threads racing on a worker's first connection at worst build one extra context.
    """
    cert_file, key_file = os.fspath(cert_file), os.fspath(key_file)
    current: list[tuple[int, ReloadingTLSContext]] = []

    def ssl_context(conf: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext],
                    ) -> ssl.SSLContext:
        pid = os.getpid()
        held = current[0] if current else None
        if held is None or held[0] != pid:
            _warn_ignored_settings(conf)
            held = (pid, ReloadingTLSContext(cert_file, key_file, clock=clock))
            current[:] = [held]
        return held[1].context()

    def reloading_context() -> ReloadingTLSContext | None:
        """This process's ReloadingTLSContext, if a connection created it (for tests, metrics)."""
        return current[0][1] if current and current[0][0] == os.getpid() else None

    ssl_context.reloading_context = reloading_context  # type: ignore[attr-defined]
    return ssl_context


def _warn_ignored_settings(conf: Any) -> None:
    ignored = []
    if getattr(conf, "ca_certs", None):
        ignored.append("ca_certs")
    if getattr(conf, "cert_reqs", ssl.CERT_NONE) not in (ssl.CERT_NONE, None):
        ignored.append("cert_reqs")
    if getattr(conf, "ciphers", None):
        ignored.append("ciphers")
    if "h2" in (getattr(conf, "http_protocols", None) or ()):
        ignored.append("http_protocols=h2 (ALPN)")
    if ignored:
        log.warning("gunicorn TLS settings not applied by poolkeeper's ssl_context hook: %s",
                    ", ".join(ignored))


def _file_signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: Secret volumes swap ..data underneath
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"{e.reason} ({e.library or 'ssl'})"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__
