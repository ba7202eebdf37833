"""Owns the gunicorn configuration; loaded as ``gunicorn -c python:app.server.conf``.

Settings come from the ``POOLKEEPER_*`` environment (``poolkeeper serve`` sets it from its
options), so the container and the CLI run the same configuration.
"""

import glob
import os
import shutil
import sys
import tempfile
from typing import Any

from app.certs import cert_paths
from app.config import ConfigError, load_settings
from app.logs import configure_logging
from app.rules import SHIPPED_RULES, load_rules
from app.server import sidecar
from app.server.logger import JSONGunicornLogger
from app.server.tls import SSLContextHook

# Metrics from every worker are summed through files in one directory (prometheus_client's
# multiprocess mode). The variable must be set before prometheus_client is first imported (none
# of the modules above imports it; app.metrics is imported in the hooks below), and the
# directory must start empty: leftovers of an earlier run would be counted again.
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="poolkeeper-metrics-")
else:
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for _stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(_stale)

try:
    _settings = load_settings()
    # Invalid settings or rules stop the container here, once, in one message naming each problem
    # (`poolkeeper serve` checks them before it gets here; the image's entry point is gunicorn).
    # Left to the workers, each would fail its boot with a traceback and gunicorn would give up.
    load_rules(_settings.rules_dir or SHIPPED_RULES)
except ConfigError as e:
    sys.stderr.write(f"poolkeeper: {e}\n")
    sys.exit(2)
configure_logging(_settings.log_level)

# Each worker builds its app (settings from the environment); post_worker_init starts its threads.
wsgi_app = "app.server.wsgi:application()"
# IPv6 literals need brackets in a bind address.
bind = [f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host
        else f"{_settings.host}:{_settings.port}"]

# gthread keeps connections alive: the API server reuses them, and a worker that closed each one
# would pay a full TLS handshake (~5 ms of CPU here) per review, far above the decision itself.
# app.server.worker's subclass reads every request whole in the worker's poller, within time
# limits, before a thread gets it: idle and slow connections hold no thread.
worker_class = "app.server.worker.ThreadWorker"
workers = _settings.resolved_workers()
threads = _settings.threads
keepalive = _settings.keepalive
# Connections per worker; at the cap a worker logs it and stops accepting until one closes, so
# new connections go to the other workers. The API server keeps up to 25 idle connections per
# webhook host (k8s.io/apimachinery SetTransportDefaults) plus one per concurrent call.
worker_connections = 500

# TLS 1.2+; the context is built once per worker and rebuilt when tls.crt/tls.key change on disk,
# so a rotated certificate is served without a restart.
certfile, keyfile = cert_paths(_settings.cert_dir)
ssl_context = SSLContextHook(certfile, keyfile)

# The API server gives up after the webhook's timeoutSeconds (1..30, default 10); a worker stuck
# far beyond that is restarted.
timeout = 30
graceful_timeout = 20

# No gunicornc control socket: nothing uses it, and servers started side by side (tests) would
# collide on its default path under ~/.gunicorn/.
control_socket_disable = True

# The worker heartbeat file must live on a writable tmpfs with a read-only root filesystem.
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# Request lines and headers of the API server are small; app.server.worker caps the whole head
# at 64 KiB and bodies at 7 MiB (413).
limit_request_line = 8190
limit_request_fields = 100

accesslog = None  # one JSON line per admission comes from the app instead
errorlog = "-"
loglevel = _settings.log_level
# gunicorn's own lines in the same JSON shape as poolkeeper's (see JSONGunicornLogger for why
# not logconfig_dict).
logger_class = JSONGunicornLogger


def on_starting(server: Any) -> None:
    # In the master before gunicorn binds (it refuses TLS without tls.crt) and forks: with
    # --manage-certs a pair from the Secret, and the metrics port's socket (app/server/sidecar.py).
    sidecar.prepare(_settings)


def post_worker_init(worker: Any) -> None:
    # The app was built (load_wsgi) without starting anything; its threads (namespace watch,
    # event sender) start here, in the worker process, after the fork.
    worker.wsgi.extensions["poolkeeper"].start()
    # GET /metrics on the metrics port; with --manage-certs the certificate manager, in one
    # worker at a time (app/server/sidecar.py).
    sidecar.start_in_worker(_settings, worker.wsgi.extensions["poolkeeper"])


def worker_exit(server: Any, worker: Any) -> None:
    # In the worker, after a graceful stop: release the audit Lease (a candidate takes over at
    # once instead of after its duration) and delete this process's replica record.
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("poolkeeper")
    if services is not None:
        services.stop()


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges (cache size, watch age) must not count any more.
    from app import metrics

    metrics.worker_exited(worker.pid)


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
