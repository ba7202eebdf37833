"""Owns HTTP: the endpoints (a Flask Blueprint) and the mapping of every failure to a status.

It decodes the body, calls :func:`app.admission.admit`, encodes the result, and writes the one
log line per review; :mod:`app.factory` wires what it needs (``Services``). Every answer to
``POST /mutate`` is an AdmissionReview (JSON), errors too:

==========================================================  ======  ============================
situation                                                   HTTP    response
==========================================================  ======  ============================
rules allow, maybe with a patch or warnings                 200     ``allowed: true``
a rule refuses                                              200     ``allowed: false``, code 403
content type is not JSON                                    415     status 415, what to send
body over 7 MiB (the server refuses it before the app; the   413     status 413
connection is closed after it)
body not JSON, not an AdmissionReview v1, no request.uid,   400     status 400, what is wrong
no request.object on CREATE/UPDATE, a malformed field
no such path under /mutate/                                 404     status 404, the paths
namespace labels cannot be known (API server unreachable    500     status 500: the webhook's
past the staleness limit) or a bug, in a rule with                  failurePolicy decides
``onError: fail`` (every PoolPlacement) or outside the rules
the same in a rule with ``onError: ignore``                 200     that rule skipped, a warning
==========================================================  ======  ============================

A 500 is deliberate: controller-runtime answers 200+deny there, which bypasses failurePolicy.

Requests gunicorn's parser refuses never reach the app: :mod:`app.server.worker` answers them
with the same AdmissionReview errors (400; 413 for a head or body too large) and closes the
connection.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from . import admission, metrics
from .config import MAX_BODY_BYTES
from .kinds import OBJECT_KINDS
from .namespaces import NamespaceLookupError
from .patching import ObjectShapeError
from .review import AdmissionRequest, ReviewError, encode_review, errored, parse_review
from .rules import PATHS
from .text import clip, quote

if TYPE_CHECKING:
    from .factory import Services

log = logging.getLogger("poolkeeper.webhook")
admission_log = logging.getLogger("poolkeeper.admission")

JSON = "application/json"
# GET /metrics is on its own plain-HTTP port (app/server/sidecar.py), where a NetworkPolicy
# admits only Prometheus.
ENDPOINTS = ["POST /mutate", "POST /mutate/<path>", "GET /healthz", "GET /readyz"]

EXTENSION = "poolkeeper"  # app.extensions[EXTENSION] holds the Services
blueprint = Blueprint("poolkeeper", __name__)


def flask_app(services: Services) -> Flask:
    """The Flask app serving the blueprint with ``services``."""
    app = Flask("poolkeeper")
    app.config["MAX_CONTENT_LENGTH"] = None  # checked in _judge, so the answer is a review
    # /mutate//placement is an unknown path (a 404 review), not werkzeug's HTML 308 redirect
    app.url_map.merge_slashes = False
    app.extensions[EXTENSION] = services
    app.register_blueprint(blueprint)
    return app


class RequestError(Exception):
    """A request poolkeeper answers with an error status instead of a decision."""

    def __init__(self, code: int, message: str, request: AdmissionRequest | None = None,
                 uid: str = ""):
        super().__init__(message)
        self.code, self.message, self.request = code, message, request
        self.uid = request.uid if request else uid


def _services() -> Services:
    services: Services = current_app.extensions[EXTENSION]
    if not services.started:
        services.start()  # outside gunicorn (no post_worker_init): start on first use
    return services


# /mutate runs every rule; /mutate/<path> only the rules served there (app.rules.PATHS), so each
# webhook configuration runs its own: /mutate/pods placement and the defaults in one call for
# pooled namespaces (fails closed), /mutate/defaults the defaults elsewhere (fails open).
@blueprint.post("/mutate", defaults={"path": None})
@blueprint.post("/mutate/", defaults={"path": ""})
@blueprint.post("/mutate/<path:path>")
def mutate(path: str | None) -> Response:
    started = time.perf_counter()
    services = _services()
    try:
        review_request, decision = _judge(services, path)
    except RequestError as rejected:
        _observe(rejected.request, "error", time.perf_counter() - started,
                 {"status": rejected.code, "error": rejected.message})
        return _error(rejected.code, rejected.message, rejected.uid)
    response = decision.response
    outcome = ("denied" if not response.allowed else
               "patched" if response.patch else "allowed")
    if decision.actions:
        services.acted(review_request, decision)
    # the same rules as auditAnnotations and poolkeeper_rule_actions_total give, by effect
    fields: dict[str, object] = {"rules": list(decision.rules_that("mutated"))}
    for effect in ("warned", "denied"):
        if acted := decision.rules_that(effect):
            fields[effect] = list(acted)
    fields["patchOps"] = len(response.patch)
    if decision.errors:
        fields["skippedRules"] = _skipped(review_request, decision)
    _observe(review_request, outcome, time.perf_counter() - started, fields)
    return Response(encode_review(review_request.uid, response), 200, mimetype=JSON)


def _skipped(review_request: AdmissionRequest, decision: admission.Decision) -> list[str]:
    """Log and count the rules skipped after they raised (onError: ignore); their names."""
    names = []
    for failure in decision.errors:
        metrics.RULE_ERRORS.labels(failure.rule).inc()
        if isinstance(failure.error, NamespaceLookupError):  # an outage: no traceback to read
            log.warning("rule %s was skipped on request %s (onError: ignore): %s", failure.rule,
                        clip(review_request.uid), failure.error)
        else:
            log.error("rule %s failed on request %s and was skipped (onError: ignore)",
                      failure.rule, clip(review_request.uid), exc_info=failure.error)
        names.append(failure.rule)
    return names


def _judge(services: Services, path: str | None) -> tuple[AdmissionRequest,
                                                          admission.Decision]:
    if path is not None and path not in PATHS:
        raise RequestError(404, f"no webhook path {quote('/mutate/' + path)}: use /mutate or "
                                "one of " + ", ".join(f"/mutate/{p}" for p in PATHS))
    if request.mimetype != JSON:
        raise RequestError(415, f"content type {request.mimetype or 'none'!r} is not "
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
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    except ReviewError as exc:
        raise RequestError(400, str(exc), uid=clip(exc.uid)) from None
    except RecursionError:
        raise RequestError(400, _TOO_DEEP) from None
    try:
        nodes = services.nodes.pools if services.nodes is not None else None
        return review_request, admission.admit(review_request, services.source.namespace,
                                               services.rules.rules(path), nodes)
    except ObjectShapeError as exc:
        raise RequestError(400, f"request.object is malformed: {exc}", review_request) from None
    except RecursionError:  # only input nests deep enough: poolkeeper's own code is flat
        raise RequestError(400, _TOO_DEEP, review_request) from None
    except NamespaceLookupError as exc:
        raise RequestError(500, f"cannot judge the request: {exc}", review_request) from None
    except Exception:  # a bug: answer 500 so failurePolicy decides, keep the worker alive
        log.exception("internal error on request %s", clip(review_request.uid))
        raise RequestError(500, "internal error in poolkeeper; see its logs",
                           review_request) from None


_TOO_DEEP = ("request.object is malformed: it nests lists or objects deeper than any Kubernetes "
             "object does")


def _too_large(length: int | None) -> RequestError:
    # Under gunicorn, app.server.worker refuses such a body before the app sees it (and closes
    # the connection); this keeps the limit under any other server.
    size = f"{length} bytes" if length is not None else "more than that"
    return RequestError(413, f"the body is {size}; poolkeeper accepts at most {MAX_BODY_BYTES} "
                             "bytes (two objects at the API server's 3 MiB limit plus the "
                             "envelope)")


@blueprint.get("/healthz")
def healthz() -> Response:
    return Response("ok\n", 200, mimetype="text/plain")


@blueprint.get("/readyz")
def readyz() -> Response:
    services = _services()
    if services.source.ready():
        # which rules this worker enforces: `poolkeeper status` compares the replicas
        return Response(f"ok\nrules {services.rules.digest}\n", 200, mimetype="text/plain")
    return Response("namespace source has not completed its first listing\n", 503,
                    mimetype="text/plain")


@blueprint.app_errorhandler(404)
@blueprint.app_errorhandler(405)
def not_routed(exc: HTTPException) -> Response:
    if request.method == "POST" and request.path.startswith("/mutate"):  # a client of /mutate
        return _error(404, f"no webhook path {quote(request.path)}: use /mutate or one of "
                           + ", ".join(f"/mutate/{w}" for w in PATHS))
    return Response(orjson.dumps({"error": f"{request.method} {quote(request.path)}: {exc.name}",
                                  "endpoints": ENDPOINTS}),
                    exc.code, mimetype=JSON)


@blueprint.app_errorhandler(Exception)
def failed(exc: Exception) -> Response:
    """Anything that escaped the handlers (a bug, or a framing error surfacing from the server
    while the body is read) still gets an AdmissionReview, never an HTML page."""
    if isinstance(exc, HTTPException):  # e.g. a malformed chunked body: 400 from werkzeug
        code = exc.code or 400
        return _error(code, f"the request cannot be read: {exc.name}")
    log.exception("internal error outside admission")
    return _error(500, "internal error in poolkeeper; see its logs")


def _observe(review_request: AdmissionRequest | None, outcome: str, seconds: float,
             fields: dict[str, object]) -> None:
    """Count the review, time it, and write its one log line (never the object itself)."""
    kind = review_request.gvk.kind if review_request else "unknown"
    operation = review_request.operation if review_request else "unknown"
    # the kind label only takes kinds poolkeeper knows: forged reviews name any kind they like
    label = kind if kind in OBJECT_KINDS or review_request is None else "other"
    metrics.observe_review(label, operation, outcome, seconds)
    level = logging.WARNING if outcome == "error" else logging.INFO
    if not admission_log.isEnabledFor(level):
        return
    ms = round(seconds * 1000, 3)
    if review_request:  # user values clipped: a forged review's fields may be megabytes
        entry = {"uid": clip(review_request.uid), "kind": clip(kind, 63), "operation": operation,
                 "namespace": clip(review_request.namespace),
                 "name": clip(review_request.display_name), "user": clip(review_request.user),
                 "dryRun": review_request.dry_run, "decision": outcome, **fields, "ms": ms}
    else:
        entry = {"uid": "", "kind": kind, "operation": operation, "decision": outcome,
                 **fields, "ms": ms}
    # What admission_log.log(level, "review", extra=...) does, less its walk up the stack to find
    # the caller: the line is always this one, and JSONFormatter prints no source location.
    admission_log.handle(admission_log.makeRecord(
        admission_log.name, level, __file__, 0, "review", (), None, "_observe",
        {"fields": entry}))


def _error(code: int, message: str, uid: str = "") -> Response:
    return Response(encode_review(uid, errored(code, message)), code, mimetype=JSON)
