"""Owns the in-process measure of POST /mutate: the Flask app called as WSGI, no gunicorn, no TLS.

    .venv/bin/python -m bench.inprocess [--log-level info|warning] [--passes 200]

The bench's 1,000 reviews (bench/inputs.py), the app from ``create_app`` with the namespaces
file, metrics in multiprocess mode as under gunicorn, log lines on stderr (send it to a file:
``2>/tmp/pk.log``). Prints the per-request CPU time (``time.process_time``) over passes of 100
requests: the 10th percentile, the quartile and the median, since other processes on the machine
only ever add to it.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 100


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--passes", type=int, default=200)
    args = parser.parse_args(argv)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="pk-metrics-"))
    from app.config import load_settings
    from app.factory import create_app
    from app.logs import configure_logging
    from bench import inputs

    configure_logging(args.log_level)
    work = Path(tempfile.mkdtemp(prefix="pk-inprocess-"))
    namespaces = inputs.write_namespaces_yaml(work / "namespaces.json")
    app = create_app(load_settings({"namespaces_file": str(namespaces), "cert_dir": str(work)},
                                   environ={}))
    bodies = inputs.review_bodies(inputs.namespace_names())
    base = {"REQUEST_METHOD": "POST", "PATH_INFO": "/mutate", "SCRIPT_NAME": "",
            "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8443",
            "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_TYPE": "application/json",
            "HTTP_HOST": "127.0.0.1:8443", "wsgi.url_scheme": "https", "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
            "wsgi.run_once": False}
    environs = [dict(base, CONTENT_LENGTH=str(len(body))) for body in bodies]
    statuses: list[str] = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    def serve(first: int, count: int) -> None:
        for environ, body in zip(environs[first:first + count], bodies[first:first + count], strict=True):
            environ["wsgi.input"] = io.BytesIO(body)
            out = app.wsgi_app(environ, start_response)
            b"".join(out)
            out.close()

    serve(0, len(bodies))  # warm-up, and every answer must be a 200
    if any(not s.startswith("200") for s in statuses):
        raise SystemExit(f"unexpected statuses: {sorted(set(statuses))}")
    samples = []
    for n in range(args.passes):
        first = n * CHUNK % len(bodies)
        gc.collect()
        gc.disable()
        began = time.process_time()
        serve(first, CHUNK)
        samples.append((time.process_time() - began) / CHUNK * 1e6)
        gc.enable()
    samples.sort()
    p10, p25, p50 = (samples[int(len(samples) * q)] for q in (0.1, 0.25, 0.5))
    print(f"POST /mutate in-process, log level {args.log_level}: µs/request p10 {p10:.1f}, "
          f"p25 {p25:.1f}, median {p50:.1f}")


if __name__ == "__main__":
    main()
