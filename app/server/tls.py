"""Owns the server-side TLS context: one cached SSLContext per process, rebuilt on rotation.

gunicorn (27) calls its ``ssl_context(conf, default_ssl_context_factory)`` hook for every
accepted connection (``gunicorn.sock.ssl_wrap_socket``, from each gthread worker thread), and
the default factory re-reads and re-parses tls.crt and tls.key each time. The hook from
:func:`gunicorn_ssl_context_hook` returns a cached context instead. The process's file watcher
(:mod:`app.watch`) stats the two files once a second off the request path; when either changed
(mtime, size or inode, following symlinks, so a Kubernetes Secret volume's ``..data`` swap
counts) it builds a new context. Connections already open keep the context they were wrapped
with.

A new pair that does not load (half-rotated, corrupt, key and certificate not matching) is
logged once at ERROR on ``poolkeeper.tls`` and the previous context keeps serving; the files
are retried as soon as they change again. :mod:`app.certs` writes tls.key before tls.crt, so a
load that sees the new certificate also sees its key.

TLS 1.2 offers only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305), the suites
the API server's Go client prefers; TLS 1.3's suites are all AEAD and left as OpenSSL has them.

Only cert_file/key_file are used: gunicorn's ``ca_certs``, ``cert_reqs`` (client
certificates), ``ciphers`` and HTTP/2 ALPN settings are not applied (a warning says so when
they are set). The API server does not present a client certificate unless configured to.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Hashable
from typing import Any

from ..watch import FileWatcher, paths_signature, process_watcher

log = logging.getLogger("poolkeeper.tls")

# TLS 1.2 suites (OpenSSL names): forward secrecy (ECDHE) and AEAD only. Python's default list
# also has CBC suites with SHA-2 MACs (ECDHE-ECDSA-AES256-SHA384, ...) and DHE; set_ciphers()
# does not touch the TLS 1.3 suites.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


class TLSContextError(Exception):
    """The certificate pair could not be loaded and there is no previous context to fall back on."""


def build_server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for the pair: TLS 1.2 minimum, ECDHE + AEAD suites on 1.2 (1.3 as
    OpenSSL has them), no compression, no renegotiation."""
    # PROTOCOL_TLS_SERVER carries Python's defaults (OP_NO_COMPRESSION, server cipher
    # preference); the minimum is set explicitly so it does not depend on the system's OpenSSL
    # configuration, and the 1.2 suites because the default list has CBC ones. No trust store:
    # clients are not verified.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    # A TLS 1.2 client may ask for a new handshake mid-connection: costly for the server and
    # never done by the API server.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


class ReloadingTLSContext:
    """A server SSLContext for ``cert_file``/``key_file`` that follows the files on disk.

    ``context()`` is a plain attribute read, safe from any thread. ``watcher`` (default: this
    process's) notices changed files; tests pass their own and call its ``check()``. The first
    load happens in the constructor and raises :class:`TLSContextError` if it fails.
    """

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                 watcher: FileWatcher | None = None) -> None:
        self.cert_file = os.fspath(cert_file)
        self.key_file = os.fspath(key_file)
        self.generation = 0  # successful loads so far
        signature = self._stat()
        try:
            self._context = build_server_context(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TLSContextError(f"cannot load {self.cert_file} and {self.key_file}: "
                                  f"{_describe(e)}") from e
        self.generation = 1
        own = watcher is None
        watcher = process_watcher() if watcher is None else watcher
        watcher.watch(f"TLS pair {self.cert_file}", self._stat, self._reload, initial=signature)
        if own:
            watcher.start()  # the first connection of a worker: its watcher may not run yet

    def context(self) -> ssl.SSLContext:
        """The current context."""
        return self._context

    def _reload(self) -> None:
        # Whatever loads is a consistent pair, because load_cert_chain refuses a key that does
        # not match the certificate; a half-rotated pair is retried when the files change again.
        try:
            context = build_server_context(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError, ValueError) as e:
            log.error("cannot load TLS pair %s / %s, still serving the previous certificate "
                      "(retrying when the files change): %s", self.cert_file, self.key_file,
                      _describe(e))
            return
        self._context = context
        self.generation += 1
        log.info("loaded new TLS certificate from %s", self.cert_file)

    def _stat(self) -> Hashable:
        return paths_signature((self.cert_file, self.key_file))


class SSLContextHook:
    """gunicorn's ``ssl_context`` setting: ``ssl_context = SSLContextHook(cert, key)``.

    One :class:`ReloadingTLSContext` per process, created on the first connection in that
    process: gunicorn forks its workers after reading the config, and an object inherited from
    the arbiter must not be shared, so it is keyed on ``os.getpid()``. No lock here: two threads
    racing on a worker's first connection at worst build one extra context.
    """

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                 watcher: FileWatcher | None = None) -> None:
        self.cert_file, self.key_file = os.fspath(cert_file), os.fspath(key_file)
        self._watcher = watcher
        self._current: tuple[int, ReloadingTLSContext] | None = None

    def __call__(self, conf: Any,
                 default_ssl_context_factory: Callable[[], ssl.SSLContext] | None,
                 ) -> ssl.SSLContext:
        pid = os.getpid()
        held = self._current
        if held is None or held[0] != pid:
            _warn_ignored_settings(conf)
            held = (pid, ReloadingTLSContext(self.cert_file, self.key_file, self._watcher))
            self._current = held
        return held[1].context()

    def reloading_context(self) -> ReloadingTLSContext | None:
        """This process's ReloadingTLSContext, if a connection created it (for tests)."""
        held = self._current
        return held[1] if held is not None and held[0] == os.getpid() else None


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


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"{e.reason} ({e.library or 'ssl'})"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__
