"""Component tests: real gunicorn over real TLS, verified against the generated CA."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import shutil
import socket
import ssl
import time
import warnings

import pytest
import requests

from app.certs import create_certificates
from app.config import MAX_BODY_BYTES

from .server import connections_per_worker, free_port, start_server
from .support import ROOT, TESTDATA, pod, review_doc


@pytest.fixture(scope="module")
def server(cert_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(cert_dir, log, "--namespaces", str(TESTDATA / "namespaces.yaml"))
    yield srv
    srv.stop()


@pytest.fixture
def session(server):
    with server.session() as s:
        yield s


def post(session, server, doc, path="/mutate", **kw):
    return session.post(server.url + path, data=json.dumps(doc),
                        headers={"Content-Type": "application/json"}, timeout=10, **kw)


def test_server_patches_a_deployment_pod(server, session, deployment_pod_review):
    response = post(session, server, deployment_pod_review, path="/mutate/placement")
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    answer = body["response"]
    assert answer["uid"] == deployment_pod_review["request"]["uid"]
    assert answer["allowed"] is True and answer["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(answer["patch"])) == [
        {"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "pool1"}}]


def ops_of(response) -> list:
    answer = response.json()["response"]
    return json.loads(base64.b64decode(answer["patch"])) if "patch" in answer else []


def test_server_paths_run_their_own_rules(server, session, deployment_pod_review):
    pool_op = {"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "pool1"}}
    cpu_ops = [{"op": "remove", "path": f"/spec/containers/{i}/resources/limits/cpu"}
               for i in (0, 1)]
    assert ops_of(post(session, server, deployment_pod_review)) == [pool_op, *cpu_ops]
    assert ops_of(post(session, server, deployment_pod_review, path="/mutate/pods")) == [
        pool_op, *cpu_ops]
    assert ops_of(post(session, server, deployment_pod_review, path="/mutate/placement")) == [
        pool_op]
    assert ops_of(post(session, server, deployment_pod_review, path="/mutate/defaults")) == cpu_ops
    assert ops_of(post(session, server, deployment_pod_review,
                       path="/mutate/namespaces")) == []
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "12345-web-prod", "labels": {}}}
    assert ops_of(post(session, server, review_doc(namespace), path="/mutate/namespaces")) == [
        {"op": "add", "path": "/metadata/labels/type", "value": "user-workload"},
        {"op": "add", "path": "/metadata/labels/systemid", "value": "12345"}]
    missing = post(session, server, deployment_pod_review, path="/mutate/other")
    assert missing.status_code == 404 and "/mutate/placement" in error_of(missing)


def test_server_denies_another_pool(server, session):
    response = post(session, server, review_doc(pod({"agentpool": "pool2"},
                                                    namespace="team-payments")))
    answer = response.json()["response"]
    assert response.status_code == 200 and answer["allowed"] is False
    assert answer["status"]["code"] == 403 and '"pool1"' in answer["status"]["message"]
    assert "patch" not in answer


def test_server_allows_without_patch_fields(server, session):
    answer = post(session, server, review_doc(pod({"agentpool": "pool1"},
                                                  namespace="team-payments"))).json()["response"]
    assert answer == {"uid": "uid-1", "allowed": True}


def test_server_unhandled_kind_and_delete_are_allowed(server, session):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}}
    assert post(session, server, review_doc(cm)).json()["response"] == {"uid": "uid-1",
                                                                         "allowed": True}
    delete = review_doc(None, "DELETE", old=pod(namespace="team-payments"))
    assert post(session, server, delete).json()["response"] == {"uid": "uid-1", "allowed": True}


def error_of(response):
    body = response.json()
    assert body["kind"] == "AdmissionReview" and body["response"]["allowed"] is False
    assert body["response"]["status"]["code"] == response.status_code
    return body["response"]["status"]["message"]


def test_server_rejects_bad_input_with_clear_errors_and_keeps_its_workers(server, session):
    workers = server.wait_for_workers(2)
    url = server.url + "/mutate"
    json_headers = {"Content-Type": "application/json"}
    cases = []
    cases.append((session.post(url, data=b"{not json", headers=json_headers), 400, "not valid JSON"))
    cases.append((session.post(url, data=b"\xff\xfe", headers=json_headers), 400, "not valid JSON"))
    cases.append((session.post(url, data=b"[]", headers=json_headers), 400, "JSON object"))
    cases.append((session.post(url, data=b"{}", headers=json_headers), 400, "AdmissionReview"))
    cases.append((session.post(url, data=b"{}", headers={"Content-Type": "text/plain"}), 415,
                  "application/json"))
    cases.append((session.post(url, data=b"{}"), 415, "application/json"))
    doc = review_doc(pod(namespace="team-payments"))
    doc["apiVersion"] = "admission.k8s.io/v1beta1"
    cases.append((post(session, server, doc), 400, "admission.k8s.io/v1"))
    doc = review_doc(pod(namespace="team-payments"))
    del doc["request"]["uid"]
    cases.append((post(session, server, doc), 400, "request.uid is missing"))
    doc = review_doc(pod(namespace="team-payments"))
    del doc["request"]["object"]
    cases.append((post(session, server, doc), 400, "request.object is missing"))
    doc = review_doc(pod(namespace="team-payments"))
    doc["request"]["object"]["spec"]["nodeSelector"] = "pool1"
    cases.append((post(session, server, doc), 400, "nodeSelector must be an object"))
    for response, status, fragment in cases:
        assert response.status_code == status, response.text
        assert fragment in error_of(response)
    uid_kept = post(session, server, doc).json()["response"]["uid"]
    assert uid_kept == "uid-1"
    # Still serving, with the same workers: none crashed.
    assert post(session, server, review_doc(pod(namespace="team-payments"))).status_code == 200
    assert server.worker_pids() == workers
    assert "Traceback" not in server.log()


def test_server_health_endpoints_and_unknown_paths(server, session):
    assert session.get(server.url + "/healthz").status_code == 200
    assert session.get(server.url + "/readyz").status_code == 200
    missing = session.get(server.url + "/nope")
    assert missing.status_code == 404 and "POST /mutate" in missing.json()["endpoints"]
    assert session.get(server.url + "/mutate").status_code == 405


def test_server_oversized_body_gets_413_then_serves_again(server, session):
    body = b'{"pad": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    response = session.post(server.url + "/mutate", data=body,
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413 and "at most" in error_of(response)
    assert post(session, server, review_doc(pod(namespace="team-payments"))).status_code == 200


def test_server_oversized_chunked_body_gets_413(server, session):
    chunk = b"x" * (1024 * 1024)

    def body():
        yield b'{"pad": "'
        for _ in range(8):
            yield chunk

    response = session.post(server.url + "/mutate", data=body(),
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413


def read_response(sock: ssl.SSLSocket, deadline_s: float = 10.0) -> bytes:
    sock.settimeout(deadline_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_server_declared_oversize_is_refused_without_waiting_for_the_body(server):
    """A client that announces 8 MiB and keeps the connection open gets 413 at once, then EOF."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with server.tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        response = read_response(sock)
        assert response.startswith(b"HTTP/1.1 413")
        assert b"at most" in response
        sock.settimeout(10)
        assert sock.recv(1) == b"", "the server must close the connection after a 413"


def test_server_keeps_connections_alive(server, deployment_pod_review):
    """The API server reuses connections; a new TLS handshake per review would cost ~5 ms."""
    connection = http.client.HTTPSConnection("localhost", server.port,
                                             context=server.tls_context(), timeout=10)
    try:
        body = json.dumps(deployment_pod_review)
        sockets = []
        for _ in range(3):
            connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["response"]["allowed"]
            assert not response.will_close
            sockets.append(connection.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)
    finally:
        connection.close()


def test_server_idle_connections_do_not_hold_its_threads(tmp_path, cert_dir,
                                                          deployment_pod_review):
    """The API server parks spare connections handshaken and unused; scanners open TCP and send
    nothing. Neither may hold a worker thread: with one worker of two threads, a review sent after
    three of each is answered (before the fix its handshake hung until they closed), and a parked
    connection is served when it is finally used."""
    srv = start_server(cert_dir, tmp_path / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), workers=1, threads=2)
    context = srv.tls_context()
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(3)]
    body = json.dumps(deployment_pod_review).encode()
    try:
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            idle.append(context.wrap_socket(raw, server_hostname="localhost"))
        connection = http.client.HTTPSConnection("localhost", srv.port, context=context,
                                                 timeout=20)
        try:
            connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["response"]["allowed"]
        finally:
            connection.close()
        parked = idle[-1]
        parked.sendall(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n"
                       b"Content-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = read_response(parked, deadline_s=20)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["response"]["allowed"]
    finally:
        for sock in idle:
            sock.close()
        srv.stop()
    assert "Traceback" not in srv.log()


def test_server_spreads_a_burst_of_connections_over_its_workers(tmp_path, cert_dir):
    """A client that opens its connections at once (wrk; the API server when calls overlap) used
    to find one worker taking nearly all of them: the worker awake in its poller accepted each
    new one before the others woke, and then served them on one core (29 of 32 connections on
    one of five workers in `make bench`). Each worker now steps aside after an accept, for longer
    the more connections it accepted in the last second, so the others take their share."""
    workers, count = 4, 32
    srv = start_server(cert_dir, tmp_path / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), workers=workers, threads=2)
    context = srv.tls_context()
    clients: list[ssl.SSLSocket] = []
    try:
        srv.wait_for_workers(workers)
        raw = [socket.create_connection(("127.0.0.1", srv.port), timeout=10)
               for _ in range(count)]
        for sock in raw:
            clients.append(context.wrap_socket(sock, server_hostname="localhost"))
        for sock in clients:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for sock in clients:
            assert read_response(sock, deadline_s=20).startswith(b"HTTP/1.1 200")
        held = connections_per_worker(srv)
        assert sum(held.values()) >= count, held  # and perhaps the readiness probe's
        # A fair share is 8. Before the fix one worker held all of them, every run; after it, in
        # 11 runs (5 beside a CPU hog: the 2 cores run the four workers and this client, so a
        # worker may not get the CPU before the burst is over) the most one held was 21 and the
        # second most at least 8. The bounds leave room for a loaded CI machine.
        most, second = sorted(held.values(), reverse=True)[:2]
        assert most <= 7 * count // 8 and second >= count // 8, held
    finally:
        for sock in clients:
            sock.close()
        srv.stop()


def test_server_refuses_tls_below_1_2(server):
    context = server.tls_context()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS < 1.2 only at level 0
    except (ValueError, ssl.SSLError) as exc:  # pragma: no cover - depends on local OpenSSL
        pytest.skip(f"this OpenSSL cannot build a TLS 1.1 client: {exc}")
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with pytest.raises(ssl.SSLError):
        with context.wrap_socket(raw, server_hostname="localhost"):
            pass
    raw.close()
    deadline = time.monotonic() + 10
    while "UNSUPPORTED_PROTOCOL" not in server.log():
        assert time.monotonic() < deadline, "the server did not log refusing TLS 1.1"
        time.sleep(0.1)


def test_server_logs_one_json_line_per_admission(server, session):
    doc = review_doc(pod(namespace="team-payments"), uid="log-probe-uid")
    assert post(session, server, doc).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in server.log().splitlines()
                 if "log-probe-uid" in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(lines) == 1
    entry = lines[0]
    assert entry["decision"] == "patched" and entry["rules"] == ["agentpool-node-selector"]
    assert entry["namespace"] == "team-payments" and entry["patchOps"] == 1
    assert "object" not in entry and "spec" not in json.dumps(entry)


def test_server_serves_a_replaced_certificate_without_restart(tmp_path):
    certs = tmp_path / "certs"
    create_certificates(certs, "poolkeeper", "poolkeeper-system")
    old_ca = tmp_path / "old-ca.crt"
    shutil.copy(certs / "ca.crt", old_ca)
    srv = start_server(certs, tmp_path / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), workers=1)
    try:
        assert requests.get(srv.url + "/healthz", verify=str(old_ca), timeout=5).ok
        create_certificates(certs, "poolkeeper", "poolkeeper-system", force=True)
        pid = srv.process.pid
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(srv.url + "/healthz", verify=srv.ca, timeout=5).ok:
                    break
            except requests.exceptions.SSLError:
                pass
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.2)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(srv.url + "/healthz", verify=str(old_ca), timeout=5)
        assert srv.process.pid == pid and srv.process.poll() is None
    finally:
        srv.stop()


def test_server_sees_a_changed_namespace_file(tmp_path, cert_dir):
    namespaces = tmp_path / "namespaces.yaml"
    shutil.copy(TESTDATA / "namespaces.yaml", namespaces)
    srv = start_server(cert_dir, tmp_path / "server.log", "--namespaces", str(namespaces),
                       workers=1)
    try:
        doc = review_doc(pod(namespace="team-payments"))
        with srv.session() as s:
            first = post(s, srv, doc).json()["response"]
            assert json.loads(base64.b64decode(first["patch"]))[0]["value"] == {"agentpool": "pool1"}
            namespaces.write_text(namespaces.read_text().replace(
                "team-payments, agentpool: pool1", "team-payments, agentpool: pool7"))
            deadline = time.monotonic() + 20
            while True:
                answer = post(s, srv, copy.deepcopy(doc)).json()["response"]
                value = json.loads(base64.b64decode(answer["patch"]))[0]["value"]
                if value == {"agentpool": "pool7"}:
                    break
                assert time.monotonic() < deadline, "the relabel in the file was never seen"
                time.sleep(0.2)
    finally:
        srv.stop()


def test_server_picks_up_changed_rules_and_refuses_invalid_ones(tmp_path, cert_dir):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    srv = start_server(cert_dir, tmp_path / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), "--rules", str(rules), workers=1)
    doc = review_doc(pod({"agentpool": "pool2"}, namespace="team-payments"))
    pool_rule = rules / "agentpool-node-selector.yaml"
    try:
        with srv.session() as s:
            assert post(s, srv, doc).json()["response"]["allowed"] is False
            pool_rule.write_text(pool_rule.read_text().replace("enforcement: enforce",
                                                               "enforcement: warn"))
            deadline = time.monotonic() + 20
            while not (answer := post(s, srv, doc).json()["response"])["allowed"]:
                assert time.monotonic() < deadline, "the changed rule was never picked up"
                time.sleep(0.2)
            assert answer["warnings"][0].startswith("[agentpool-node-selector] would deny")
            pool_rule.write_text(pool_rule.read_text().replace("enforcement: warn",
                                                               "enforcement: sometimes"))
            deadline = time.monotonic() + 20
            while "refused the changed rules" not in srv.log():
                assert time.monotonic() < deadline, "the invalid rule was not reported"
                post(s, srv, doc)
                time.sleep(0.2)
            assert post(s, srv, doc).json()["response"]["allowed"] is True, "kept the warn set"
    finally:
        srv.stop()


def test_server_refuses_to_start_with_invalid_rules(tmp_path, cert_dir):
    import subprocess
    import sys

    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    (rules / "remove-cpu-limits.yaml").write_text("name: remove-cpu-limits\nkind: Nope\n")
    result = subprocess.run([sys.executable, "-m", "app", "serve", "--cert-dir", str(cert_dir),
                             "--rules", str(rules), "--namespaces",
                             str(TESTDATA / "namespaces.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "remove-cpu-limits.yaml: kind: 'Nope' is not one of PoolPlacement" in result.stderr


def test_server_image_entry_point_refuses_invalid_rules_in_one_message(tmp_path, cert_dir):
    """The container runs gunicorn itself (Dockerfile ENTRYPOINT), not `poolkeeper serve`: a
    broken rules ConfigMap must stop it with the problems named, not with worker tracebacks."""
    import subprocess
    import sys

    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    (rules / "remove-cpu-limits.yaml").write_text("name: remove-cpu-limits\nkind: Nope\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKEEPER_")}
    env.update(POOLKEEPER_RULES_DIR=str(rules), POOLKEEPER_CERT_DIR=str(cert_dir),
               POOLKEEPER_NAMESPACES=str(TESTDATA / "namespaces.yaml"),
               POOLKEEPER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:app.server.conf"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "remove-cpu-limits.yaml: kind: 'Nope' is not one of PoolPlacement" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
