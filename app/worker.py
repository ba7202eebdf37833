"""Owns the gunicorn worker class: gthread, where a connection holds a thread only while it has a
request to read.

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

import select
import ssl

from gunicorn import http
from gunicorn import sock as gsock
from gunicorn.workers import gthread

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
