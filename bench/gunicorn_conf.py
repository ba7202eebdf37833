"""Owns the gunicorn configuration of the floors and the OPA server: poolkeeper's own, another app.

Everything (bind from POOLKEEPER_HOST/PORT, gthread workers and threads, keep-alive, the per-worker
TLS context, timeouts, no --preload) comes from ``app.server.conf``, the file ``poolkeeper serve``
uses; only ``wsgi_app`` is replaced by ``$BENCH_WSGI_APP``, and there are no poolkeeper threads
to start in the worker.
"""

import os

from app.server.conf import *  # noqa: F403

wsgi_app = os.environ["BENCH_WSGI_APP"]


def post_worker_init(worker):
    """The floor, decode and OPA apps start nothing."""
