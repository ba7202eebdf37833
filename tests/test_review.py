"""The AdmissionReview v1 model: parsing every malformed shape, and the one encoder."""

from __future__ import annotations

import base64

import orjson
import pytest

from app.review import (
    AdmissionResponse,
    ReviewError,
    allowed,
    denied,
    encode_review,
    errored,
    parse_review,
    patched,
)

from .support import pod, review_doc


def test_review_parses_a_deployment_pod(deployment_pod_review):
    request = parse_review(deployment_pod_review)
    assert request.gvk.kind == "Pod" and request.gvk.group == "" and request.operation == "CREATE"
    assert request.namespace == "team-payments" and request.name == ""
    assert request.display_name.endswith("*") and request.user
    assert request.old_object is None and request.dry_run is False


def test_review_display_name_prefers_the_name():
    assert parse_review(review_doc(pod(name="web"))).display_name == "web"
    obj = pod()
    del obj["metadata"]["name"]
    assert parse_review(review_doc(obj)).display_name == ""


def test_review_dry_run_is_read():
    assert parse_review(review_doc(pod(), dry_run=True)).dry_run is True


def broken(mutator):
    doc = review_doc(pod())
    mutator(doc)
    return doc


@pytest.mark.parametrize("doc, fragment", [
    ([], "JSON object"),
    ("text", "JSON object"),
    ({"kind": "Pod"}, 'kind must be "AdmissionReview"'),
    (broken(lambda d: d.update(apiVersion="admission.k8s.io/v1beta1")), "admission.k8s.io/v1"),
    (broken(lambda d: d.pop("request")), "AdmissionReview.request is missing"),
    (broken(lambda d: d.update(request=[])), "must be a JSON object"),
    (broken(lambda d: d["request"].pop("uid")), "request.uid is missing"),
    (broken(lambda d: d["request"].update(uid="")), "request.uid is empty"),
    (broken(lambda d: d["request"].update(uid=7)), "request.uid must be a string"),
    (broken(lambda d: d["request"].pop("kind")), "request.kind is missing"),
    (broken(lambda d: d["request"]["kind"].pop("kind")), "request.kind.kind is missing"),
    (broken(lambda d: d["request"].update(operation="PATCH")), "not one of CREATE"),
    (broken(lambda d: d["request"].pop("object")), "request.object is missing"),
    (broken(lambda d: d["request"].update(object="x")), "request.object must be a JSON object"),
    (broken(lambda d: d["request"].update(operation="UPDATE")), "request.oldObject is missing"),
])
def test_review_malformed_bodies_say_what_is_wrong(doc, fragment):
    with pytest.raises(ReviewError, match=fragment):
        parse_review(doc)


def test_review_error_keeps_the_uid_when_known():
    doc = review_doc(pod())
    doc["request"].pop("object")
    with pytest.raises(ReviewError) as info:
        parse_review(doc)
    assert info.value.uid == "uid-1"


def test_review_delete_needs_no_object():
    doc = review_doc(None, "DELETE", old=pod())
    request = parse_review(doc)
    assert request.object is None and request.old_object["kind"] == "Pod"


def decode(body: bytes) -> dict:
    return orjson.loads(body)


def test_review_encode_allowed_has_no_patch_fields():
    out = decode(encode_review("u1", allowed()))
    assert out == {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": "u1", "allowed": True}}


def test_review_encode_patch_is_base64_json_patch():
    ops = [{"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "p"}}]
    out = decode(encode_review("u2", patched(ops, ["careful"], {"pool": "p"})))["response"]
    assert out["patchType"] == "JSONPatch"
    assert orjson.loads(base64.b64decode(out["patch"])) == ops
    assert out["warnings"] == ["careful"] and out["auditAnnotations"] == {"pool": "p"}


def test_review_encode_denial_carries_status():
    out = decode(encode_review("u3", denied(403, "no")))["response"]
    assert out == {"uid": "u3", "allowed": False,
                   "status": {"code": 403, "message": "no", "reason": "Forbidden"}}


def test_review_denial_codes_below_400_are_refused():
    with pytest.raises(ValueError):
        denied(200, "x")


def test_review_errored_response():
    assert errored(500, "down") == AdmissionResponse(allowed=False, code=500, message="down")
