"""Owns HTTP: the Flask app factory, the endpoints and the mapping of every failure to a status.

The only module that imports Flask. It decodes the body, calls :func:`app.admission.admit`,
encodes the result. Every answer to ``POST /mutate`` is an AdmissionReview (JSON), errors too:

==========================================================  ======  ============================
situation                                                   HTTP    response
==========================================================  ======  ============================
rules allow, maybe with a patch or warnings                 200     ``allowed: true``
a rule refuses                                              200     ``allowed: false``, code 403
content type is not JSON                                    415     status 415, what to send
body over 7 MiB (the connection is closed after it)         413     status 413
body not JSON, not an AdmissionReview v1, no request.uid,   400     status 400, what is wrong
no request.object on CREATE/UPDATE, a malformed field
namespace labels cannot be known (API server unreachable    500     status 500: the webhook's
past the staleness limit), or a bug                                 failurePolicy decides
==========================================================  ======  ============================

A 500 is deliberate: controller-runtime answers 200+deny there, which bypasses failurePolicy.
"""

from __future__ import annotations

import logging
import threading
import time
import orjson
from flask import Flask, Response, request

from . import admission
from .config import MAX_BODY_BYTES, Settings, load_settings
from .namespaces import NamespaceLookupError, NamespaceSource, namespace_source
from .patching import ObjectShapeError
from .review import ReviewError, encode_review, errored, parse_review
from .rules import SHIPPED_RULES, WEBHOOKS, RuleStore

log = logging.getLogger("poolkeeper.webhook")
admission_log = logging.getLogger("poolkeeper.admission")

JSON = "application/json"

# gunicorn's pre_request hook stores the request being served here (see gunicorn_conf.py), so a
# 413 can close the connection: gunicorn drops a Connection header set by the application.
_served = threading.local()


def remember_server_request(server_request) -> None:
    _served.request = server_request


def _close_connection_after_response() -> None:
    server_request = getattr(_served, "request", None)
    if server_request is not None:
        server_request.force_close()


def create_app(settings: Settings | None = None, *, source: NamespaceSource | None = None,
               rules: RuleStore | None = None) -> Flask:
    """Build the app; with no arguments, settings come from the ``POOLKEEPER_*`` environment."""
    settings = settings or load_settings()
    rules = rules or RuleStore(settings.rules_dir or SHIPPED_RULES)
    source = source or namespace_source(settings)
    source.start()

    app = Flask("poolkeeper")
    app.config["MAX_CONTENT_LENGTH"] = None  # checked below, so the answer is an AdmissionReview
    app.extensions["poolkeeper"] = {"settings": settings, "source": source, "rules": rules}

    # /mutate runs every rule; /mutate/<webhook> only the rules served there, so each webhook
    # configuration (placement fails closed, defaults fail open) runs its own rules.
    @app.post("/mutate", defaults={"webhook": None})
    @app.post("/mutate/<webhook>")
    def mutate(webhook: str | None) -> Response:
        started = time.perf_counter()
        if webhook is not None and webhook not in WEBHOOKS:
            return _error(404, f"no webhook path /mutate/{webhook}: use /mutate or one of "
                               + ", ".join(f"/mutate/{w}" for w in WEBHOOKS))
        if request.mimetype != JSON:
            return _error(415, f"content type {request.mimetype or 'none'!r} is not supported: "
                               f"send the AdmissionReview as {JSON}")
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return _too_large(length)
        body = request.stream.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            return _too_large(None)
        try:
            review_request = parse_review(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the body is not valid JSON: {exc}")
        except ReviewError as exc:
            return _error(400, str(exc), exc.uid)
        try:
            decision = admission.admit(review_request, source.labels, rules.rules(webhook))
        except ObjectShapeError as exc:
            return _error(400, f"request.object is malformed: {exc}", review_request.uid)
        except NamespaceLookupError as exc:
            log.error("namespace lookup failed for %s: %s", review_request.namespace, exc)
            return _error(500, f"cannot judge the request: {exc}", review_request.uid)
        except Exception:  # a bug: answer 500 so failurePolicy decides, keep the worker alive
            log.exception("internal error on request %s", review_request.uid)
            return _error(500, "internal error in poolkeeper; see its logs", review_request.uid)
        response = decision.response
        if admission_log.isEnabledFor(logging.INFO):
            admission_log.info("%s", orjson.dumps({
                "uid": review_request.uid, "kind": review_request.kind.kind,
                "namespace": review_request.namespace, "name": review_request.display_name,
                "operation": review_request.operation, "user": review_request.user,
                "dryRun": review_request.dry_run,
                "decision": ("denied" if not response.allowed else
                             "patched" if response.patch else "allowed"),
                "rules": list(decision.rules), "patchOps": len(response.patch),
                "ms": round((time.perf_counter() - started) * 1000, 3)}).decode())
        return Response(encode_review(review_request.uid, response), 200, mimetype=JSON)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", 200, mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        if source.ready():
            return Response("ok\n", 200, mimetype="text/plain")
        return Response("namespace source has not completed its first listing\n", 503,
                        mimetype="text/plain")

    @app.errorhandler(404)
    @app.errorhandler(405)
    def not_routed(exc) -> Response:
        return Response(orjson.dumps({"error": f"{request.method} {request.path}: {exc.name}",
                                      "endpoints": ["POST /mutate", "POST /mutate/<webhook>",
                                                    "GET /healthz", "GET /readyz"]}),
                        exc.code, mimetype=JSON)

    return app


def _error(code: int, message: str, uid: str = "") -> Response:
    return Response(encode_review(uid, errored(code, message)), code, mimetype=JSON)


# After a 413 the client may still be sending: read and drop the rest (bounded) so it can read
# the answer instead of meeting a reset, and so the connection stays usable. A client that
# stalls (announced a body it does not send) or sends too much gets the 413 and a closed
# connection.
DRAIN_IDLE_SECONDS = 1.0
DRAIN_TOTAL_SECONDS = 10.0
DRAIN_MAX_BYTES = 4 * MAX_BODY_BYTES


def _discard_rest_of_body() -> bool:
    """True when the whole body was read, so the connection can serve the next request."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    stream = request.environ["wsgi.input"]
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


def _too_large(length: int | None) -> Response:
    if not _discard_rest_of_body():
        _close_connection_after_response()
    size = f"{length} bytes" if length is not None else "more than that"
    return _error(413, f"the body is {size}; poolkeeper accepts at most {MAX_BODY_BYTES} bytes "
                       "(two objects at the API server's 3 MiB limit plus the envelope)")
