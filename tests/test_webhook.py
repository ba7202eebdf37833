"""The HTTP layer without a server: create_app(...).test_client() over the whole error table.

Real gunicorn over TLS (tests/test_server.py, tests/test_transport.py) keeps what needs a
server: TLS, framing, slow clients, workers. These build the app from explicit settings and a
file source in milliseconds.
"""

from __future__ import annotations

import base64
import json

import pytest

from app.config import MAX_BODY_BYTES, Settings
from app.factory import create_app
from app.namespaces import NamespaceLookupError
from app.namespaces.file import FileNamespaces
from app.rules import SHIPPED_RULES, RuleStore
from app.watch import FileWatcher

from .support import TESTDATA, pod, review_doc

JSON = {"Content-Type": "application/json"}


class FailingSource:
    """A namespace source whose lookups cannot be answered (the API server is gone)."""

    def namespace(self, name):
        raise NamespaceLookupError(f"cannot look up namespace {name!r}: the API server is down")

    labels = namespace

    def ready(self):
        return False

    def start(self):
        pass

    def stop(self):
        pass


@pytest.fixture
def make_client(tmp_path):
    def make(source=None):
        watcher = FileWatcher()  # never started: nothing runs in the background
        app = create_app(Settings(cert_dir=str(tmp_path)),
                         source=source or FileNamespaces(TESTDATA / "namespaces.yaml"),
                         rules=RuleStore(SHIPPED_RULES, watcher=watcher), watcher=watcher)
        return app.test_client()
    return make


@pytest.fixture
def client(make_client):
    return make_client()


def post(client, doc, path="/mutate"):
    return client.post(path, data=json.dumps(doc), headers=JSON)


def error_of(response):
    body = response.get_json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    assert body["response"]["allowed"] is False
    assert body["response"]["status"]["code"] == response.status_code
    return body["response"]["status"]["message"]


def test_webhook_create_app_starts_nothing_until_the_first_request(make_client):
    client = make_client()
    services = client.application.extensions["poolkeeper"]
    assert services.started is False
    assert client.get("/readyz").status_code == 200
    assert services.started is True
    services.stop()


def test_webhook_patches_a_pod(client, deployment_pod_review):
    response = post(client, deployment_pod_review, "/mutate/placement")
    assert response.status_code == 200 and response.mimetype == "application/json"
    answer = response.get_json()["response"]
    assert answer["allowed"] is True and answer["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(answer["patch"])) == [
        {"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "pool1"}}]


def test_webhook_denial_is_200_with_allowed_false(client):
    response = post(client, review_doc(pod({"agentpool": "pool2"}, namespace="team-payments")))
    answer = response.get_json()["response"]
    assert response.status_code == 200 and answer["allowed"] is False
    assert answer["status"]["code"] == 403 and "pinned to node pool" in answer["status"]["message"]


@pytest.mark.parametrize("body, headers, status, fragment", [
    (b"{not json", JSON, 400, "not valid JSON"),
    (b"\xff\xfe", JSON, 400, "not valid JSON"),
    (b"[]", JSON, 400, "JSON object"),
    (b"{}", JSON, 400, "AdmissionReview"),
    (b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
    (b"{}", {}, 415, "application/json"),
])
def test_webhook_bad_bodies_get_a_review_with_the_status(client, body, headers, status, fragment):
    response = client.post("/mutate", data=body, headers=headers)
    assert response.status_code == status
    assert fragment in error_of(response)


@pytest.mark.parametrize("breakage, fragment", [
    (lambda d: d.update(apiVersion="admission.k8s.io/v1beta1"), "admission.k8s.io/v1"),
    (lambda d: d["request"].pop("uid"), "request.uid is missing"),
    (lambda d: d["request"].pop("object"), "request.object is missing"),
    (lambda d: d["request"]["object"]["spec"].update(nodeSelector="pool1"),
     "nodeSelector must be an object"),
])
def test_webhook_malformed_reviews_get_400(client, breakage, fragment):
    doc = review_doc(pod(namespace="team-payments"))
    breakage(doc)
    response = post(client, doc)
    assert response.status_code == 400 and fragment in error_of(response)


def test_webhook_malformed_object_keeps_the_uid(client):
    doc = review_doc(pod(namespace="team-payments"), uid="uid-77")
    doc["request"]["object"]["spec"]["nodeSelector"] = "pool1"
    assert post(client, doc).get_json()["response"]["uid"] == "uid-77"


def test_webhook_oversized_body_gets_413(client):
    body = b'{"pad": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    response = client.post("/mutate", data=body, headers=JSON)
    assert response.status_code == 413 and "at most" in error_of(response)


def test_webhook_unknown_webhook_path_gets_404_review(client):
    response = post(client, review_doc(pod()), "/mutate/nope")
    assert response.status_code == 404 and "/mutate/placement" in error_of(response)


def test_webhook_lookup_impossible_is_500_so_failure_policy_decides(make_client):
    client = make_client(FailingSource())
    response = post(client, review_doc(pod(namespace="team-payments")), "/mutate/placement")
    assert response.status_code == 500 and "the API server is down" in error_of(response)
    assert client.get("/readyz").status_code == 503


def test_webhook_a_bug_is_500_and_the_app_keeps_serving(make_client, monkeypatch):
    client = make_client()
    from app import admission

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(admission, "admit", broken)
    response = post(client, review_doc(pod(namespace="team-payments")))
    assert response.status_code == 500 and "internal error" in error_of(response)
    monkeypatch.undo()
    assert post(client, review_doc(pod(namespace="team-payments"))).status_code == 200


def test_webhook_delete_and_unhandled_kinds_are_allowed(client):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}}
    assert post(client, review_doc(cm)).get_json()["response"] == {"uid": "uid-1",
                                                                   "allowed": True}
    delete = review_doc(None, "DELETE", old=pod(namespace="team-payments"))
    assert post(client, delete).get_json()["response"] == {"uid": "uid-1", "allowed": True}


def test_webhook_other_paths_and_methods_list_the_endpoints(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and "POST /mutate" in missing.get_json()["endpoints"]
    assert client.get("/mutate").status_code == 405


def test_webhook_health_here_and_metrics_on_their_own_port(client):
    assert client.get("/healthz").data == b"ok\n"
    assert client.get("/readyz").status_code == 200
    # GET /metrics is served on the metrics port only (tests/test_metrics.py), which a
    # NetworkPolicy can open to Prometheus alone; the webhook port is open to every client.
    scrape = client.get("/metrics")
    assert scrape.status_code == 404 and "GET /metrics" not in scrape.get_json()["endpoints"]


def test_webhook_log_line_annotations_and_metrics_agree_on_what_each_rule_did(tmp_path, caplog):
    import logging
    import shutil

    from prometheus_client import REGISTRY

    rules = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, rules)
    path = rules / "remove-cpu-limits.yaml"
    path.write_text(path.read_text().replace("enforcement: enforce", "enforcement: warn"))
    watcher = FileWatcher()
    client = create_app(Settings(cert_dir=str(tmp_path)),
                        source=FileNamespaces(TESTDATA / "namespaces.yaml", watcher=watcher),
                        rules=RuleStore(rules, watcher=watcher), watcher=watcher).test_client()
    doc = review_doc(pod(namespace="team-payments"), uid="agree-1")
    doc["request"]["object"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1"}}

    def count(effect: str) -> float:
        return REGISTRY.get_sample_value("poolkeeper_rule_actions_total", {
            "rule": "remove-cpu-limits", "namespace": "team-payments", "effect": effect}) or 0.0

    before = {effect: count(effect) for effect in ("mutated", "warned")}
    with caplog.at_level(logging.INFO, "poolkeeper.admission"):
        answer = post(client, doc).get_json()["response"]
    (entry,) = [r.fields for r in caplog.records if r.name == "poolkeeper.admission"]
    assert answer["auditAnnotations"] == {"pool": "pool1", "rules": "agentpool-node-selector",
                                          "warned": "remove-cpu-limits"}
    assert entry["decision"] == "patched"
    assert entry["rules"] == ["agentpool-node-selector"] and entry["warned"] == ["remove-cpu-limits"]
    assert count("warned") - before["warned"] == 1 and count("mutated") == before["mutated"]


def test_webhook_readyz_names_the_rules_digest(client):
    # (and the metrics port's poolkeeper_rules_info: tests/test_metrics.py)
    from app.rules import load_rule_set

    digest = load_rule_set(SHIPPED_RULES).digest
    assert client.get("/readyz").data == f"ok\nrules {digest}\n".encode()
