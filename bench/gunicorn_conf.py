"""Owns the gunicorn configuration of the floor and OPA servers: poolkeeper's own, another app.

Everything (bind from POOLKEEPER_HOST/PORT, gthread workers and threads, keep-alive, the per-worker
TLS context, timeouts, no --preload) comes from ``app.gunicorn_conf``, the file ``poolkeeper serve``
uses; only ``wsgi_app`` is replaced by ``$BENCH_WSGI_APP``.
"""

import os

from app.gunicorn_conf import *  # noqa: F401,F403

wsgi_app = os.environ["BENCH_WSGI_APP"]
