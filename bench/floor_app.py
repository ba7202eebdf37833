"""Owns the floors: the same Flask + gunicorn + TLS stack as poolkeeper with a trivial handler.

- ``create_app()``, the no-op floor: reads the body (any handler must) but does not parse it and
  answers a fixed "allowed", so what it costs is the server stack alone: TLS, HTTP, gunicorn's
  gthread worker, Flask routing, the response.
- ``create_decode_app()``, the decode floor: reads the body, parses it with orjson and answers
  "allowed" for the review's uid: the least any webhook that looks at the object must do.
"""

from __future__ import annotations

import orjson
from flask import Flask, Response, request

JSON = "application/json"
FIXED = orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                      "response": {"uid": "00000000-0000-0000-0000-000000000000",
                                   "allowed": True}})


def _app(name: str) -> Flask:
    app = Flask(name)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", 200, mimetype="text/plain")

    return app


def create_app() -> Flask:
    app = _app("poolkeeper-bench-floor")

    @app.post("/mutate")
    def mutate() -> Response:
        request.get_data()
        return Response(FIXED, 200, mimetype=JSON)

    return app


def create_decode_app() -> Flask:
    app = _app("poolkeeper-bench-decode")

    @app.post("/mutate")
    def mutate() -> Response:
        review = orjson.loads(request.get_data())
        uid = review["request"]["uid"]
        return Response(orjson.dumps({"apiVersion": "admission.k8s.io/v1",
                                      "kind": "AdmissionReview",
                                      "response": {"uid": uid, "allowed": True}}),
                        200, mimetype=JSON)

    return app
