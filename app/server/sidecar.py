"""Owns what runs beside the webhook in each pod: the plain-HTTP metrics port, and (with
``--manage-certs``) the certificate manager, one per pod.

gunicorn forks its workers from the master, and a thread or a kubernetes client must not cross a
fork (a lock held by another thread stays locked in the child; sockets and pools are shared).
So the master only does what must happen before the first fork, with no thread left behind:

- :func:`prepare` (gunicorn's ``on_starting``, before it binds its own port: it refuses to start
  TLS without tls.crt): with ``--manage-certs`` and no pair in ``--cert-dir`` yet, the manager's
  :meth:`~app.certmanager.CertManager.bootstrap` with a client it closes again, so a pod that
  starts before the Secret exists creates it (or reads the one another replica created) and
  starts serving; then it binds the metrics port's socket, which every worker inherits.
- :func:`start_in_worker` (``post_worker_init``, in each worker): a thread serving ``GET
  /metrics`` on that shared socket (the kernel hands each connection to one worker; any worker's
  exposition sums all of them), and a thread that waits for an exclusive ``flock`` on a file in the
  certificate directory and, once this worker holds it, creates its kubernetes client and runs
  the manager. One worker per pod manages; when it exits, the kernel drops its lock and another
  waiting worker takes over at once.
"""

from __future__ import annotations

import fcntl
import http.server
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..certs import cert_paths
from ..config import ConfigError, Settings

if TYPE_CHECKING:
    from ..factory import Services

log = logging.getLogger("poolkeeper.server")

BOOTSTRAP_TIMEOUT = 25.0  # seconds; below the liveness probe's patience (10 s + 3 x 10 s)
LOCK_FILE = ".certmanager.lock"
METRICS_PATH = "/metrics"

_metrics_socket: socket.socket | None = None  # bound in the master, inherited by the workers


def prepare(settings: Settings) -> None:
    """In the gunicorn master, before it binds and forks: the serving pair, the metrics
    socket. Exits (status 1) when either is impossible, with the reason."""
    if settings.manage_certs and not all(os.path.isfile(p) for p in cert_paths(settings.cert_dir)):
        _bootstrap(settings)
    if settings.metrics_port:
        _bind_metrics(settings)


def _bootstrap(settings: Settings) -> None:
    from ..certmanager import CertManager, CertManagerError
    from ..kube import load_api_client

    try:
        api = load_api_client(settings.kubeconfig)
    except ConfigError as e:  # --manage-certs needs the API server
        log.error("poolkeeper cannot start: --manage-certs: %s", e)
        sys.exit(1)
    try:
        CertManager(api, settings).bootstrap(BOOTSTRAP_TIMEOUT)
    except CertManagerError as e:
        log.error("poolkeeper cannot start: %s", e)
        sys.exit(1)
    finally:
        api.close()
    if threading.active_count() > 1:  # nothing may run across gunicorn's forks
        log.warning("threads left after the certificate bootstrap: %s",
                    [t.name for t in threading.enumerate()])


def _bind_metrics(settings: Settings) -> None:
    global _metrics_socket
    if _metrics_socket is not None:
        return  # gunicorn re-read its configuration (SIGHUP): the workers keep the socket
    host = settings.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, settings.metrics_port))
    except OSError as e:
        sock.close()
        log.error("poolkeeper cannot start: metrics port %s:%d: %s", host, settings.metrics_port,
                  e.strerror or e)
        sys.exit(1)
    sock.listen(64)
    # Every worker polls it and accepts: the one that loses a race gets EAGAIN, not a block.
    sock.setblocking(False)
    sock.set_inheritable(True)
    _metrics_socket = sock
    log.info("metrics at http://%s:%d%s", host, settings.metrics_port, METRICS_PATH)


def start_in_worker(settings: Settings, services: Services) -> None:
    """In each gunicorn worker, after the fork: the metrics server (scrape-time values from the
    worker's ``services``) and the manager's election."""
    if _metrics_socket is not None:
        server = _MetricsServer(_metrics_socket, services)
        threading.Thread(target=server.serve_forever, name="poolkeeper-metrics",
                         daemon=True).start()
    if settings.manage_certs:
        threading.Thread(target=_manage_when_elected, args=(settings,),
                         name="poolkeeper-cert-manager", daemon=True).start()


def _manage_when_elected(settings: Settings) -> None:
    path = os.path.join(settings.cert_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until this worker is the pod's manager; held for life
    log.info("worker %d manages the certificates and caBundle", os.getpid())
    from ..certmanager import CertManager
    from ..kube import load_api_client

    while True:
        api = None
        try:
            api = load_api_client(settings.kubeconfig)
            CertManager(api, settings).run()
        except Exception:  # a bug or a broken kubeconfig: log, and try again
            log.exception("certificate manager stopped; restarting it in 5s")
        finally:
            if api is not None:
                api.close()
        time.sleep(5.0)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    server: _MetricsServer
    timeout = 10  # seconds a client may take for its request
    server_version = "poolkeeper"

    def do_GET(self) -> None:  # http.server's name
        from .. import metrics

        if self.path.partition("?")[0] != METRICS_PATH:
            self._answer(404, b"only GET /metrics is served on this port\n", "text/plain")
            return
        services = self.server.services
        self._answer(200, metrics.exposition(services.cert_file, services.rules.digest),
                     metrics.CONTENT_TYPE)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the base's signature
        pass  # a scrape every 30 s is not worth a line


class _MetricsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, services: Services) -> None:
        # The socket is the master's, already bound and listening: no bind here.
        super().__init__(sock.getsockname()[:2], _MetricsHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.services = services

    def server_close(self) -> None:
        pass  # the socket belongs to the master
