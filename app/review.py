"""Owns the AdmissionReview wire format (admission.k8s.io/v1): parsing requests, building responses.

Nothing here knows about HTTP or rules. :func:`parse_review` turns a decoded body into an
:class:`AdmissionRequest` or raises :class:`ReviewError` (the transport answers 400);
the response constructors (:func:`allowed`, :func:`denied`, :func:`patched`, :func:`errored`)
build an :class:`AdmissionResponse`; :func:`encode_review` is the one place that fills in
``uid``, ``apiVersion`` and ``kind`` and base64-encodes the patch. :func:`request_for` builds
the request the API server would send for an object (``poolkeeper mutate`` and golden cases).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .text import quote

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
MUTATING_OPERATIONS = ("CREATE", "UPDATE")


class ReviewError(ValueError):
    """The body is not a usable AdmissionReview; the message says what to fix (HTTP 400)."""

    def __init__(self, message: str, uid: str = ""):
        super().__init__(message)
        self.uid = uid


@dataclass(frozen=True, slots=True)
class GroupVersionKind:
    group: str
    version: str
    kind: str


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    gvk: GroupVersionKind  # request.kind on the wire
    operation: str
    namespace: str  # "" for cluster-scoped objects
    name: str  # "" when the object only has generateName
    object: dict | None  # None only on DELETE and CONNECT
    old_object: dict | None
    dry_run: bool = False
    user: str = ""
    sub_resource: str = ""

    @property
    def display_name(self) -> str:
        """The object's name, or its generateName followed by '*' (Deployment-created pods)."""
        if self.name:
            return self.name
        meta = (self.object or {}).get("metadata")
        generate = meta.get("generateName") if isinstance(meta, dict) else None
        return f"{generate}*" if isinstance(generate, str) and generate else ""


@dataclass(frozen=True, slots=True)
class AdmissionResponse:
    allowed: bool
    code: int | None = None
    message: str | None = None
    patch: tuple[dict, ...] = ()
    warnings: tuple[str, ...] = ()
    audit_annotations: Mapping[str, str] = field(default_factory=dict)


def allowed(warnings: Sequence[str] = ()) -> AdmissionResponse:
    return AdmissionResponse(allowed=True, warnings=tuple(warnings))


def patched(ops: Sequence[dict], warnings: Sequence[str] = (),
            audit_annotations: Mapping[str, str] | None = None) -> AdmissionResponse:
    return AdmissionResponse(allowed=True, patch=tuple(ops), warnings=tuple(warnings),
                             audit_annotations=dict(audit_annotations or {}))


def denied(code: int, message: str, warnings: Sequence[str] = ()) -> AdmissionResponse:
    # The API server turns a denial code below 400 into 400; keep ours meaningful.
    if code < 400:
        raise ValueError(f"denial code {code} must be >= 400")
    return AdmissionResponse(allowed=False, code=code, message=message, warnings=tuple(warnings))


def errored(code: int, message: str) -> AdmissionResponse:
    """An answer to a request poolkeeper could not judge; sent with the same HTTP status."""
    return AdmissionResponse(allowed=False, code=code, message=message)


def encode_review(uid: str, response: AdmissionResponse) -> bytes:
    body: dict[str, Any] = {"uid": uid, "allowed": response.allowed}
    if response.code is not None:
        body["status"] = {"code": response.code, "message": response.message or "",
                          "reason": _REASONS.get(response.code, "")}
    if response.patch:
        body["patchType"] = "JSONPatch"
        body["patch"] = base64.b64encode(orjson.dumps(response.patch)).decode("ascii")
    if response.warnings:
        body["warnings"] = list(response.warnings)
    if response.audit_annotations:
        body["auditAnnotations"] = dict(response.audit_annotations)
    return orjson.dumps({"apiVersion": API_VERSION, "kind": KIND, "response": body})


_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 413: "RequestEntityTooLarge",
            415: "UnsupportedMediaType", 500: "InternalError", 503: "ServiceUnavailable"}


def _field(mapping: Mapping[str, Any], key: str, typ: type, where: str, uid: str,
           required: bool = True) -> Any:
    value = mapping.get(key)
    if value is None:
        if required:
            raise ReviewError(f"{where}.{key} is missing", uid)
        return None
    if not isinstance(value, typ):
        raise ReviewError(f"{where}.{key} must be a {_TYPE_NAMES[typ]}, "
                          f"not {_TYPE_NAMES.get(type(value), type(value).__name__)}", uid)
    return value


_TYPE_NAMES = {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean",
               int: "number", float: "number"}


def parse_review(doc: Any) -> AdmissionRequest:
    """Validate a decoded AdmissionReview body and return its request."""
    if not isinstance(doc, dict):
        raise ReviewError("the body must be a JSON object holding an AdmissionReview")
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if kind != KIND:
        raise ReviewError(f"kind must be {quote(KIND)}, got {quote(kind)}: poolkeeper accepts "
                          "only AdmissionReview bodies, as the API server sends them")
    if api_version != API_VERSION:
        raise ReviewError(f"apiVersion {quote(api_version)} is not supported: poolkeeper speaks "
                          f"{quote(API_VERSION)}; set admissionReviewVersions: [v1] in the "
                          "webhook configuration")
    request = _field(doc, "request", dict, "AdmissionReview", "")
    uid = _field(request, "uid", str, "request", "")
    if not uid:
        raise ReviewError("request.uid is empty")
    gvk = _field(request, "kind", dict, "request", uid)
    operation = _field(request, "operation", str, "request", uid)
    if operation not in OPERATIONS:
        raise ReviewError(f"request.operation {quote(operation)} is not one of "
                          f"{', '.join(OPERATIONS)}",
                          uid)
    obj = _field(request, "object", dict, "request", uid, required=operation in MUTATING_OPERATIONS)
    old = _field(request, "oldObject", dict, "request", uid, required=operation == "UPDATE")
    user_info = _field(request, "userInfo", dict, "request", uid, required=False) or {}
    username = user_info.get("username")
    dry_run = request.get("dryRun")
    return AdmissionRequest(
        uid=uid,
        gvk=GroupVersionKind(
            group=_field(gvk, "group", str, "request.kind", uid, required=False) or "",
            version=_field(gvk, "version", str, "request.kind", uid),
            kind=_field(gvk, "kind", str, "request.kind", uid)),
        operation=operation,
        namespace=_field(request, "namespace", str, "request", uid, required=False) or "",
        name=_field(request, "name", str, "request", uid, required=False) or "",
        object=obj,
        old_object=old,
        dry_run=dry_run is True,
        user=username if isinstance(username, str) else "",
        sub_resource=_field(request, "subResource", str, "request", uid, required=False) or "",
    )


def request_for(obj: dict, old: dict | None = None, namespace: str | None = None,
                uid: str = "poolkeeper-test") -> AdmissionRequest:
    """The AdmissionRequest the API server would send for creating (or updating) ``obj``."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    group, _, version = str(api_version).rpartition("/")
    found = obj.get("metadata")
    metadata: dict = found if isinstance(found, dict) else {}
    ns = "" if kind == "Namespace" else (metadata.get("namespace") or namespace or "default")
    return AdmissionRequest(uid=uid, gvk=GroupVersionKind(group, version, str(kind)),
                            operation="UPDATE" if old is not None else "CREATE", namespace=ns,
                            name=metadata.get("name") or "", object=obj, old_object=old)
