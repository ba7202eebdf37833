"""Owns the OPA server of the bench: the sample's Rego policy behind the same Flask + gunicorn + TLS.

The handler reads the body, hands it to OPA's Go evaluator as it arrived (``OpaPolicy.evaluate_raw``)
and encodes the AdmissionReview the policy produced. The 1,000 namespaces come from the JSON file
named by ``BENCH_OPA_DATA`` (``data.kubernetes.namespaces``).

gunicorn runs ``create_app()`` in each worker after the fork (no ``--preload``), which is where
the Go runtime must start.
"""

from __future__ import annotations

import os

import orjson
from flask import Flask, Response, request

from bench.opa import OpaPolicy, load_namespaces

JSON = "application/json"
MAX_BODY_BYTES = 7 * 1024 * 1024


def create_app() -> Flask:
    policy = OpaPolicy(load_namespaces(os.environ["BENCH_OPA_DATA"]))
    app = Flask("poolkeeper-bench-opa")

    @app.post("/mutate")
    def mutate() -> Response:
        body = request.stream.read(MAX_BODY_BYTES + 1)
        try:
            review = policy.evaluate_raw(body)
        except Exception as exc:  # an OPA error is a 500, as poolkeeper's would be
            return Response(orjson.dumps({"error": str(exc)}), 500, mimetype=JSON)
        return Response(orjson.dumps(review), 200, mimetype=JSON)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", 200, mimetype="text/plain")

    return app
