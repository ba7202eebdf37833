"""Owns the floor: the same Flask + gunicorn + TLS stack whose handler answers a fixed "allowed".

It reads the body (any handler must) but does not parse it, so what it costs is the server stack
alone: TLS, HTTP, gunicorn's gthread worker, Flask routing, the response.
"""

from __future__ import annotations

import orjson
from flask import Flask, Response, request

JSON = "application/json"
FIXED = orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                      "response": {"uid": "00000000-0000-0000-0000-000000000000",
                                   "allowed": True}})


def create_app() -> Flask:
    app = Flask("poolkeeper-bench-floor")

    @app.post("/mutate")
    def mutate() -> Response:
        request.get_data()
        return Response(FIXED, 200, mimetype=JSON)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", 200, mimetype="text/plain")

    return app
