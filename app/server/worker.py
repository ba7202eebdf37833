"""Owns the gunicorn worker class: gthread, where a connection holds a thread only while it has a
request to read; and closing a connection after a refused (413) body.

gunicorn's gthread worker (27.x) hands every new connection to a thread, which does the TLS
handshake and then blocks reading the first request. A client that completes the handshake and
then sends nothing holds that thread until it hangs up. The API server does this: Go's HTTP
transport dials a spare connection when calls overlap and parks it, handshaken and unused, in its
idle pool (so do port scanners and TCP load-balancer checks). `threads` such connections stop a
worker: requests on its other connections wait, the API server gives up after the webhook's
`timeoutSeconds`, and `failurePolicy: Fail` turns that into rejected pods.

Here a TLS connection goes back to the worker's poller whenever it has nothing to read (before the
handshake and after it; between requests gunicorn does so already), and the handshake has a
deadline. Plain HTTP and HTTP/2 connections are left to gunicorn.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from typing import Any

from gunicorn import http
from gunicorn import sock as gsock
from gunicorn.workers import gthread

from ..config import MAX_BODY_BYTES

# A client gets this long for its whole TLS handshake once its first bytes have arrived.
HANDSHAKE_TIMEOUT = 5.0  # seconds


def _readable(sock) -> bool:
    """Whether a read would not block now: data, or the peer hung up (poll, not select: no
    FD_SETSIZE limit)."""
    if getattr(sock, "pending", None) and sock.pending():
        return True  # decrypted bytes already inside the TLS object: the poller cannot see them
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class ThreadWorker(gthread.ThreadWorker):

    def handle(self, conn):
        if conn.initialized or not self.cfg.is_ssl or "h2" in self.cfg.http_protocols:
            return super().handle(conn)
        if not _readable(conn.sock):
            return gthread._DEFER  # the poller hands it back when the ClientHello arrives
        raw = conn.sock
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            tls = gsock.ssl_wrap_socket(raw, self.cfg)
            if not self.cfg.do_handshake_on_connect:
                tls.do_handshake()
        except (OSError, ValueError) as e:  # ssl.SSLError and socket timeouts are OSErrors
            # A client that hung up (a TCP probe, a scanner) is routine; a refused protocol or an
            # unknown CA (a caBundle that does not match) is worth a line at INFO.
            quiet = isinstance(e, (ssl.SSLEOFError, ConnectionError))
            (self.log.debug if quiet else self.log.info)(
                "TLS handshake with %s failed: %s", conn.client, e)
            raw.close()
            return False
        conn.sock = tls
        conn.parser = http.get_parser(self.cfg, tls, conn.client)
        conn.initialized = True
        if _readable(tls):
            return super().handle(conn)  # the request is here: read it on this thread
        return gthread._DEFER  # handshaken but idle: wait in the poller, not on a thread

    def _cap_keepalive(self, deadline):
        # On stop gunicorn gives kept-alive connections a short linger but leaves connections that
        # wait in the poller for their first request (idle spares of the API server) to their
        # keepalive timeout, so a stop took the whole graceful_timeout. They get the same linger.
        super()._cap_keepalive(deadline)
        for conn in self.pending_conns:
            conn.timeout = min(conn.timeout, deadline)


# -- closing a connection after a 413 -------------------------------------------------------------
# gunicorn drops a Connection header set by the application, so the transport cannot ask for the
# connection to be closed itself: gunicorn's pre_request hook (app.server.conf) remembers the
# request being served on this thread, and :func:`discard_or_close` (the app's ``on_too_large``)
# closes it after the response unless the rest of the body could be read and dropped.

_served = threading.local()


def remember_request(request: Any) -> None:
    _served.request = request


# After a 413 the client may still be sending: read and drop the rest (bounded) so it can read
# the answer instead of meeting a reset, and so the connection stays usable. A client that
# stalls (announced a body it does not send) or sends too much gets the 413 and a closed
# connection.
DRAIN_IDLE_SECONDS = 1.0
DRAIN_TOTAL_SECONDS = 10.0
DRAIN_MAX_BYTES = 4 * MAX_BODY_BYTES


def discard_or_close(environ: dict[str, Any]) -> None:
    """Read and drop the rest of a refused body; close the connection when that fails."""
    if not _discard_rest_of_body(environ):
        served = getattr(_served, "request", None)
        if served is not None:
            served.force_close()


def _discard_rest_of_body(environ: dict[str, Any]) -> bool:
    """True when the whole body was read, so the connection can serve the next request."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    stream = environ["wsgi.input"]
    previous = sock.gettimeout()
    sock.settimeout(DRAIN_IDLE_SECONDS)
    deadline = time.monotonic() + DRAIN_TOTAL_SECONDS
    drained = 0
    try:
        while drained <= DRAIN_MAX_BYTES and time.monotonic() < deadline:
            chunk = stream.read(256 * 1024)
            if not chunk:
                return True
            drained += len(chunk)
        return False
    except Exception:  # a timeout, a reset or a malformed chunk: the connection is done
        return False
    finally:
        try:
            sock.settimeout(previous)
        except OSError:
            pass
