"""Owns the bench through a real API server: pod creation latency with and without admission.

``../shared/tools/miniapiserver`` (k8s.io/apiserver + etcd; its admission chain runs
MutatingAdmissionWebhook and MutatingAdmissionPolicy as kube-apiserver does) gets the 1,000
namespaces, then 8 concurrent creators POST the fixture's pod over raw HTTPS (keep-alive, no
kubectl) into namespaces taken in turn, in three cases:

(a) no admission configured;
(b) poolkeeper: ``poolkeeper serve --kubeconfig`` (its cache watches this API server) behind its
    MutatingWebhookConfiguration from deploy/ (see ``DEPLOY_WEBHOOK_CONFIGURATION``);
(c) a MutatingAdmissionPolicy + binding injecting the pool from ``namespaceObject`` labels (CEL);
(d) the shipped rules as ``poolkeeper export`` prints them (deploy/overlays/in-tree): every rule's
    MutatingAdmissionPolicy and ValidatingAdmissionPolicy, judged in process like (c) but doing
    all that (b) does.

Each case starts once its configuration demonstrably acts (a probe pod gets, or no longer gets,
the nodeSelector), sends untimed warm-up pods, then times ``count`` creations. A creation that
fails, or whose pod lacks (b, c, d) or has (a) the injected selector, counts as an error. In (b)
poolkeeper's ``poolkeeper_admission_requests_total`` (every review it answered, read from its
/metrics before and after) over the pods created gives the webhook calls per pod.
"""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import urllib3
import yaml

from bench import inputs, servers
from bench.inputs import POOL_LABEL, ROOT
from bench.loadgen import percentile

# The MutatingWebhookConfiguration of case (b): deploy/'s own, applied with caBundle filled in and
# with the certificate and the service mapping made for the service it names. None applies the
# stand-in built by standin_webhook_configuration() below (used before deploy/ had one).
DEPLOY_WEBHOOK_CONFIGURATION: str | None = "deploy/base/webhook.yaml"

REVIEWS = "poolkeeper_admission_requests_total"  # every review poolkeeper answered
EXCLUDED_NAMESPACES = ["kube-system", "kube-public", "kube-node-lease", "poolkeeper-system"]
ADMISSION_API = "/apis/admissionregistration.k8s.io/v1"  # MutatingAdmissionPolicy is v1 here
CREATORS = 8


def tool_dir() -> Path:
    return Path(os.environ.get("MINIAPISERVER_TOOL", ROOT.parent / "shared/tools/miniapiserver"))


def unavailable() -> str | None:
    tool = tool_dir()
    if not (tool / "bin" / "miniapiserver").exists() or not (tool / "start.sh").exists():
        return f"miniapiserver not found at {tool} (set MINIAPISERVER_TOOL)"
    return None


# -- the admission configurations -------------------------------------------------------------


def standin_webhook_configuration() -> dict:
    """STAND-IN for deploy/'s MutatingWebhookConfiguration: one webhook, /mutate, all rules."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "poolkeeper"},
        "webhooks": [{
            "name": "placement.poolkeeper.io",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"namespace": "poolkeeper-system", "name": "poolkeeper",
                                         "path": "/mutate", "port": 443}},
            "rules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                 "resources": ["pods"], "scope": "Namespaced"},
                {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                 "resources": ["daemonsets"], "scope": "Namespaced"},
            ],
            "namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": EXCLUDED_NAMESPACES}]},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": 5,  # timeoutSeconds: 1..30, default 10 (admissionregistration/v1)
            "reinvocationPolicy": "IfNeeded",
            "matchPolicy": "Equivalent",
        }],
    }


def webhook_configuration() -> dict:
    if DEPLOY_WEBHOOK_CONFIGURATION is None:
        return standin_webhook_configuration()
    docs = yaml.safe_load_all((ROOT / DEPLOY_WEBHOOK_CONFIGURATION).read_text())
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "MutatingWebhookConfiguration":
            return doc
    raise RuntimeError(f"{DEPLOY_WEBHOOK_CONFIGURATION} holds no MutatingWebhookConfiguration")


def webhook_service(config: dict) -> tuple[str, str]:
    """(namespace, name) of the one service the configuration's webhooks call."""
    found = {(w["clientConfig"]["service"]["namespace"], w["clientConfig"]["service"]["name"])
             for w in config["webhooks"] if "service" in w.get("clientConfig", {})}
    if len(found) != 1:
        raise RuntimeError(f"expected the webhooks to call one service, found {sorted(found)}")
    return found.pop()


def with_ca_bundle(config: dict, ca_bundle: str) -> dict:
    config = copy.deepcopy(config)
    for webhook in config["webhooks"]:
        webhook["clientConfig"]["caBundle"] = ca_bundle
    return config


def mutating_admission_policy() -> list[dict]:
    """Case (c): the same injection in CEL. nodeSelector is an atomic map for server-side apply,
    so an ApplyConfiguration cannot set one key of it; a JSONPatch adds the key (or the map)."""
    pool = ("namespaceObject != null && has(namespaceObject.metadata.labels) && "
            f"'{POOL_LABEL}' in namespaceObject.metadata.labels ? "
            f"namespaceObject.metadata.labels['{POOL_LABEL}'] : ''")
    patch = ("variables.pool == '' ? [] : "
             "!has(object.spec.nodeSelector) ? "
             f"[JSONPatch{{op: 'add', path: '/spec/nodeSelector', value: {{'{POOL_LABEL}': "
             "variables.pool}}] : "
             f"'{POOL_LABEL}' in object.spec.nodeSelector ? [] : "
             "[JSONPatch{op: 'add', path: '/spec/nodeSelector/' + "
             f"jsonpatch.escapeKey('{POOL_LABEL}'), value: variables.pool}}]")
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": "agentpool-node-selector"},
        "spec": {
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                "resources": ["pods"]}]},
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
            "variables": [{"name": "pool", "expression": pool}],
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": patch}}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": "agentpool-node-selector"},
        "spec": {
            "policyName": "agentpool-node-selector",
            "matchResources": {"namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": EXCLUDED_NAMESPACES}]}},
        },
    }
    return [policy, binding]


def exported_policies() -> list[dict]:
    """Case (d): what `poolkeeper export` prints for the shipped rules (left-out parts aside)."""
    from app.export import export_policies
    from app.rules import load_rules

    return list(export_policies(load_rules(ROOT / "rules")).objects)


_COLLECTIONS = {
    "MutatingWebhookConfiguration": f"{ADMISSION_API}/mutatingwebhookconfigurations",
    "MutatingAdmissionPolicy": f"{ADMISSION_API}/mutatingadmissionpolicies",
    "MutatingAdmissionPolicyBinding": f"{ADMISSION_API}/mutatingadmissionpolicybindings",
    "ValidatingAdmissionPolicy": f"{ADMISSION_API}/validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": f"{ADMISSION_API}/validatingadmissionpolicybindings",
}


# -- the API server and its client ------------------------------------------------------------


class MiniAPI:
    def __init__(self, state_dir: Path, keep: bool = False):
        self.dir = state_dir
        self.keep = keep
        self.env: dict[str, str] = {}
        self.pool: urllib3.HTTPSConnectionPool | None = None

    def start(self) -> MiniAPI:
        tool = tool_dir()
        result = subprocess.run([str(tool / "start.sh")], capture_output=True, text=True,
                                env={**os.environ, "MINIAPI_DIR": str(self.dir)}, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"miniapiserver did not start:\n{result.stdout}\n{result.stderr}")
        self.env = dict(entry.split("=", 1) for entry in result.stdout.splitlines() if "=" in entry)
        host, port = self.env["APISERVER_URL"].split("//", 1)[1].rsplit(":", 1)
        if host != "127.0.0.1":
            raise RuntimeError(f"miniapiserver is not on 127.0.0.1: {self.env['APISERVER_URL']}")
        self.pool = urllib3.HTTPSConnectionPool(
            host, int(port), maxsize=CREATORS + 2, block=True,
            ca_certs=str(self.dir / "certs" / "apiserver.crt"), cert_reqs="CERT_REQUIRED",
            assert_hostname=False, retries=False, timeout=urllib3.Timeout(connect=5, read=30))
        return self

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
        subprocess.run([str(tool_dir() / "stop.sh"), str(self.dir),
                        *([] if self.keep else ["--rm"])], capture_output=True, timeout=60)

    @property
    def kubeconfig(self) -> str:
        return self.env["KUBECONFIG"]

    def map_service(self, namespace: str, name: str, port: int) -> None:
        with open(self.env["WEBHOOK_SERVICE_FILE"], "a") as f:
            f.write(f"{namespace}/{name}=127.0.0.1:{port}\n")

    def request(self, method: str, path: str, body: bytes | None = None):
        assert self.pool is not None
        return self.pool.request(method, path, body=body,
                                 headers={"Content-Type": "application/json"})

    def apply(self, obj: dict) -> None:
        response = self.request("POST", _COLLECTIONS[obj["kind"]], orjson.dumps(obj))
        if response.status != 201:
            raise RuntimeError(f"creating {obj['kind']} failed: {response.status} "
                               f"{response.data[:500]!r}")

    def delete(self, obj: dict) -> None:
        response = self.request("DELETE", f"{_COLLECTIONS[obj['kind']]}/{obj['metadata']['name']}")
        if response.status not in (200, 202, 404):
            raise RuntimeError(f"deleting {obj['kind']} failed: {response.status}")

    def create_namespaces(self, names: list[str]) -> None:
        def create(index_name: tuple[int, str]) -> None:
            index, name = index_name
            body = orjson.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": name, "labels": {POOL_LABEL: f"pool{index % inputs.POOLS + 1}"}}})
            response = self.request("POST", "/api/v1/namespaces", body)
            if response.status not in (201, 409):
                raise RuntimeError(f"creating namespace {name}: {response.status} "
                                   f"{response.data[:300]!r}")

        with ThreadPoolExecutor(CREATORS) as pool:
            list(pool.map(create, enumerate(names)))

    def create_pod(self, namespace: str, body: bytes) -> tuple[float, int, dict | None]:
        began = time.perf_counter()
        response = self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)
        elapsed = time.perf_counter() - began
        selector = None
        if response.status == 201:
            selector = (orjson.loads(response.data).get("spec") or {}).get("nodeSelector") or {}
        return elapsed, response.status, selector


# -- the cases ---------------------------------------------------------------------------------


@dataclass
class CaseResult:
    key: str
    label: str
    count: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    cpu_ms: float | None = None  # CPU of API server + etcd (+ poolkeeper) per pod created
    note: str = ""
    warmup_errors: int = 0  # failed or unmutated creations among the untimed ones
    calls_per_pod: float | None = None  # (b): reviews poolkeeper answered per pod created
    latencies: list[float] = field(default_factory=list, repr=False)


def _expect(mutated: bool) -> Callable[[int, dict | None], bool]:
    def ok(status: int, selector: dict | None) -> bool:
        return status == 201 and selector is not None and (POOL_LABEL in selector) == mutated
    return ok


def _timed_creates(api: MiniAPI, names: list[str], body: bytes, count: int,
                   ok: Callable[[int, dict | None], bool], offset: int,
                   creators: int = CREATORS) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal errors
        elapsed, status, selector = api.create_pod(names[(offset + i) % len(names)], body)
        with lock:
            latencies.append(elapsed)
            if not ok(status, selector):
                errors += 1

    with ThreadPoolExecutor(creators) as pool:
        list(pool.map(one, range(count)))
    return latencies, errors


def _wait_for(api: MiniAPI, namespace: str, body: bytes, ok: Callable[[int, dict | None], bool],
              what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        _, status, selector = api.create_pod(namespace, body)
        if ok(status, selector):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what} (last: HTTP {status}, "
                               f"nodeSelector {selector})")
        time.sleep(0.2)


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / servers.CLK_TCK


def run(work: Path, count: int, warmup: int, creators: tuple[int, ...] = (CREATORS, 1),
        log_level: str | None = None, keep: bool = False,
        progress: Callable[[str], None] = print) -> dict[int, list[CaseResult]]:
    """Cases (a) to (d), each timed with every number of concurrent ``creators``."""
    names = inputs.namespace_names()
    body = orjson.dumps(inputs.pod_for_create())
    api = MiniAPI(work / "miniapiserver", keep=keep)
    results: dict[int, list[CaseResult]] = {c: [] for c in creators}
    server = None
    try:
        api.start()
        progress(f"  miniapiserver at {api.env['APISERVER_URL']}; creating {len(names)} namespaces")
        api.create_namespaces(names)
        mutated, untouched = _expect(True), _expect(False)
        probe_ns = names[0]

        offset = 0

        def measure(key: str, label: str, ok, note: str = "") -> None:
            nonlocal offset
            pids = [int(api.env["APISERVER_PID"]), int(api.env["ETCD_PID"])]
            hook = server if key == "webhook" else None  # poolkeeper idles on during (c) and (d)
            for n in creators:
                _, warmup_errors = _timed_creates(api, names, body, warmup, ok, offset, n)
                offset += warmup
                reviews_before = hook.counter(REVIEWS) if hook else 0.0
                cpu_before = _cpu_seconds(pids) + (hook.cpu_seconds() if hook else 0.0)
                latencies, errors = _timed_creates(api, names, body, count, ok, offset, n)
                cpu = _cpu_seconds(pids) + (hook.cpu_seconds() if hook else 0.0) - cpu_before
                calls = (hook.counter(REVIEWS) - reviews_before) / count if hook else None
                offset += count
                ordered = sorted(latencies)
                result = CaseResult(key, label, len(ordered), errors,
                                    percentile(ordered, 50) * 1000,
                                    percentile(ordered, 99) * 1000, ordered[-1] * 1000,
                                    cpu / len(ordered) * 1000, note, warmup_errors,
                                    calls, latencies=ordered)
                results[n].append(result)
                progress(f"  {label}, {n} creators: p50 {result.p50_ms:.2f} ms, "
                         f"p99 {result.p99_ms:.2f} ms, {errors} errors "
                         f"({warmup_errors} in the warm-up)"
                         + (f", {calls:.2f} webhook calls per pod" if calls is not None else ""))

        measure("none", "(a) no admission configured", untouched)

        config = webhook_configuration()
        service_ns, service_name = webhook_service(config)
        certs = work / "webhook-certs"
        ca_bundle = servers.make_certs(certs, service=service_name, namespace=service_ns)
        config = with_ca_bundle(config, ca_bundle)
        server = servers.start("poolkeeper", certs, work, kubeconfig=api.kubeconfig,
                               log_level=log_level)
        api.map_service(service_ns, service_name, server.port)
        api.apply(config)
        _wait_for(api, probe_ns, body, mutated, "the poolkeeper webhook injects the pool")
        source = ("stand-in MutatingWebhookConfiguration (bench/apiserver.py)"
                  if DEPLOY_WEBHOOK_CONFIGURATION is None else DEPLOY_WEBHOOK_CONFIGURATION)
        measure("webhook", "(b) poolkeeper webhook", mutated, source)
        api.delete(config)
        # poolkeeper keeps running (idle) until the API server is gone, so its stop does not wait
        # on the API server's open connections (about 2 s since app/server/worker.py, 20 s before).
        _wait_for(api, probe_ns, body, untouched, "the webhook configuration is gone")

        policy_objects = mutating_admission_policy()
        for obj in policy_objects:
            api.apply(obj)
        _wait_for(api, probe_ns, body, mutated, "the MutatingAdmissionPolicy injects the pool")
        measure("policy", "(c) MutatingAdmissionPolicy (CEL)", mutated)
        for obj in reversed(policy_objects):
            api.delete(obj)
        _wait_for(api, probe_ns, body, untouched, "the MutatingAdmissionPolicy is gone")

        exported = exported_policies()
        for obj in exported:
            api.apply(obj)
        _wait_for(api, probe_ns, body, mutated, "the exported policies inject the pool")
        measure("exported", "(d) exported policies (poolkeeper export)", mutated,
                "deploy/overlays/in-tree: every shipped rule")
        for obj in reversed(exported):
            api.delete(obj)
    finally:
        api.stop()
        if server is not None:
            server.stop()
    return results
