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
no such path under /mutate/                                 404     status 404, the paths
namespace labels cannot be known (API server unreachable    500     status 500: the webhook's
past the staleness limit), or a bug                                 failurePolicy decides
==========================================================  ======  ============================

A 500 is deliberate: controller-runtime answers 200+deny there, which bypasses failurePolicy.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import orjson
from flask import Flask, Response, request

from . import admission, metrics
from .config import MAX_BODY_BYTES, Settings, load_settings
from .events import EventRecorder, api_poster
from .namespaces import KubeNamespaces, NamespaceLookupError, NamespaceSource, namespace_source
from .patching import ObjectShapeError
from .review import AdmissionRequest, ReviewError, encode_review, errored, parse_review
from .tls import cert_paths
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


class _Rejected(Exception):
    """A request poolkeeper answers with an error status instead of a decision."""

    def __init__(self, code: int, message: str, request: AdmissionRequest | None = None,
                 uid: str = ""):
        super().__init__(message)
        self.code, self.message, self.request = code, message, request
        self.uid = request.uid if request else uid


def create_app(settings: Settings | None = None, *, source: NamespaceSource | None = None,
               rules: RuleStore | None = None, events: EventRecorder | None = None) -> Flask:
    """Build the app; with no arguments, settings come from the ``POOLKEEPER_*`` environment.

    Events are sent when namespaces come from the API server (not from a file), unless an
    explicit recorder is given.
    """
    settings = settings or load_settings()
    rules = rules or RuleStore(settings.rules_dir or SHIPPED_RULES)
    source = source or namespace_source(settings)
    if events is None and isinstance(source, KubeNamespaces):
        events = EventRecorder(api_poster(source.api_client))
    source.start()
    if events is not None:
        events.start()
    cert_file = cert_paths(settings.cert_dir)[0]

    app = Flask("poolkeeper")
    app.config["MAX_CONTENT_LENGTH"] = None  # checked below, so the answer is an AdmissionReview
    app.extensions["poolkeeper"] = {"settings": settings, "source": source, "rules": rules,
                                    "events": events}

    def decide(webhook: str | None) -> tuple[AdmissionRequest, admission.Decision]:
        if webhook is not None and webhook not in WEBHOOKS:
            raise _Rejected(404, f"no webhook path /mutate/{webhook}: use /mutate or one of "
                                 + ", ".join(f"/mutate/{w}" for w in WEBHOOKS))
        if request.mimetype != JSON:
            raise _Rejected(415, f"content type {request.mimetype or 'none'!r} is not "
                                 f"supported: send the AdmissionReview as {JSON}")
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise _too_large(length)
        body = request.stream.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise _too_large(None)
        try:
            review_request = parse_review(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            raise _Rejected(400, f"the body is not valid JSON: {exc}") from None
        except ReviewError as exc:
            raise _Rejected(400, str(exc), uid=exc.uid) from None
        try:
            return review_request, admission.admit(review_request, source.labels,
                                                   rules.rules(webhook))
        except ObjectShapeError as exc:
            raise _Rejected(400, f"request.object is malformed: {exc}", review_request) from None
        except NamespaceLookupError as exc:
            raise _Rejected(500, f"cannot judge the request: {exc}", review_request) from None
        except Exception:  # a bug: answer 500 so failurePolicy decides, keep the worker alive
            log.exception("internal error on request %s", review_request.uid)
            raise _Rejected(500, "internal error in poolkeeper; see its logs",
                            review_request) from None

    # /mutate runs every rule; /mutate/<webhook> only the rules served there, so each webhook
    # configuration (placement fails closed, defaults fail open) runs its own rules.
    @app.post("/mutate", defaults={"webhook": None})
    @app.post("/mutate/<webhook>")
    def mutate(webhook: str | None) -> Response:
        started = time.perf_counter()
        try:
            review_request, decision = decide(webhook)
        except _Rejected as rejected:
            seconds = time.perf_counter() - started
            _observe(rejected.request, "error", seconds, status=rejected.code,
                     error=rejected.message)
            return _error(rejected.code, rejected.message, rejected.uid)
        response = decision.response
        outcome = ("denied" if not response.allowed else
                   "patched" if response.patch else "allowed")
        if decision.actions:
            # the team a rule acted on: a namespaced object's namespace, a Namespace's own name
            team = review_request.namespace or (
                review_request.display_name if review_request.kind.kind == "Namespace" else "")
            for action in decision.actions:
                metrics.RULE_ACTIONS.labels(action.rule, team, action.effect).inc()
        if events is not None and decision.actions:
            events.record(review_request, decision)
        _observe(review_request, outcome, time.perf_counter() - started,
                 rules=list(decision.rules), patchOps=len(response.patch))
        return Response(encode_review(review_request.uid, response), 200, mimetype=JSON)

    @app.get("/metrics")
    def scrape() -> Response:
        return Response(metrics.exposition(cert_file), 200, mimetype=metrics.CONTENT_TYPE)

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
                                                    "GET /healthz", "GET /readyz",
                                                    "GET /metrics"]}),
                        exc.code, mimetype=JSON)

    return app


def _observe(review_request: AdmissionRequest | None, outcome: str, seconds: float,
             **fields) -> None:
    """Count the review, time it, and write its one log line (never the object itself)."""
    kind = review_request.kind.kind if review_request else "unknown"
    operation = review_request.operation if review_request else "unknown"
    metrics.ADMISSION_REQUESTS.labels(kind, operation, outcome).inc()
    metrics.ADMISSION_DURATION.observe(seconds)
    level = logging.WARNING if outcome == "error" else logging.INFO
    if not admission_log.isEnabledFor(level):
        return
    ms = round(seconds * 1000, 3)
    if review_request:
        entry = {"uid": review_request.uid, "kind": kind, "operation": operation,
                 "namespace": review_request.namespace, "name": review_request.display_name,
                 "user": review_request.user, "dryRun": review_request.dry_run,
                 "decision": outcome, **fields, "ms": ms}
    else:
        entry = {"uid": "", "kind": kind, "operation": operation, "decision": outcome,
                 **fields, "ms": ms}
    # What admission_log.log(level, "review", extra=...) does, less its walk up the stack to
    # find the caller (this line is the caller).
    admission_log.handle(admission_log.makeRecord(
        admission_log.name, level, __file__, sys._getframe().f_lineno, "review", (), None,
        "_observe", {"fields": entry}))


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


def _too_large(length: int | None) -> _Rejected:
    if not _discard_rest_of_body():
        _close_connection_after_response()
    size = f"{length} bytes" if length is not None else "more than that"
    return _Rejected(413, f"the body is {size}; poolkeeper accepts at most {MAX_BODY_BYTES} "
                          "bytes (two objects at the API server's 3 MiB limit plus the envelope)")
