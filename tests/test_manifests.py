"""deploy/: every manifest is valid Kubernetes, the base renders, and it says what issue 6 asks.

Objects are validated with kubernetes-validate --strict (unknown fields fail) against a pinned
Kubernetes version, and the base and overlays are rendered with `kubectl kustomize` where
kubectl exists. deploy/monitoring/ belongs to tests/test_monitoring.py.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from app.certs import serving_names
from app.config import Settings
from app.rules import PATHS, load_rules
from integration.manifests import (
    DEPLOY,
    ca_bundle,
    kubectl,
    listed_files,
    manages_certificates,
    render,
    with_ca_bundle,
)

from .support import ROOT, skip_or_fail

try:
    import kubernetes_validate
except ImportError:  # every test here skips, or fails under POOLKEEPER_REQUIRE_SHARED=1
    kubernetes_validate = None

# The Kubernetes version manifests are validated against (kubernetes-validate ships its schemas;
# setup.cfg's range keeps one that has them). The base also needs 1.30 (ValidatingAdmissionPolicy
# GA); the no-admission-policy overlay is for 1.28 and 1.29.
KUBERNETES_VERSION = "1.36.0"
BASE_MINIMUM = "1.30.0"
NO_POLICY_MINIMUM = "1.28.0"

OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
CRD_KINDS = {"Certificate", "Issuer"}  # cert-manager's: no schema in kubernetes-validate
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding",
                  "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicy",
                  "MutatingAdmissionPolicyBinding"}
# deploy/overlays/in-tree: the exported policies instead of the webhook (tests/test_export.py
# checks that they are current); MutatingAdmissionPolicy v1 needs 1.36.
IN_TREE_KINDS = {"Namespace", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
                 "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
SYSTEM_NAMESPACES = {"poolkeeper-system", "kube-system", "kube-public", "kube-node-lease"}
PLAIN_FILES = sorted(p for p in DEPLOY.rglob("*.yaml")
                     if p.name != "kustomization.yaml" and "monitoring" not in p.parts)

needs_kubectl = pytest.mark.usefixtures("kubectl_present")


@pytest.fixture(scope="module", autouse=True)
def kubernetes_validate_present() -> None:
    if kubernetes_validate is None:
        skip_or_fail("kubernetes-validate is a test extra: pip install -e '.[test]'")


@pytest.fixture
def kubectl_present() -> None:
    if kubectl() is None:
        skip_or_fail("kubectl not found: `kubectl kustomize` renders deploy/; install kubectl "
                     "(e.g. apt-get install kubectl) to check the manifests")


def validate(obj: dict, version: str = KUBERNETES_VERSION) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes "
                    f"{version}: {path}: {exc.message}")


def base_objects() -> list[dict]:
    """The base: rendered when kubectl exists, else its plain files (no rules ConfigMap)."""
    return render(DEPLOY) if kubectl() else listed_files(DEPLOY)


def by_kind(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return base_objects()


@pytest.fixture(scope="module")
def webhooks(base) -> dict[str, dict]:
    config = by_kind(base, "MutatingWebhookConfiguration")
    return {w["name"]: w for w in config["webhooks"]}


def excluded_names(selector: dict) -> set[str]:
    (requirement,) = [e for e in selector.get("matchExpressions", [])
                      if e["key"] == "kubernetes.io/metadata.name"]
    assert requirement["operator"] == "NotIn"
    return set(requirement["values"])


# -- validity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PLAIN_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifests_every_file_is_strictly_valid(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for obj in docs:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == "cert-manager.io/v1"
            continue
        validate(obj)


def test_manifests_base_is_valid_on_its_minimum_version(base):
    for obj in base:
        validate(obj, BASE_MINIMUM)


@needs_kubectl
@pytest.mark.parametrize("directory", ["deploy", *(f"deploy/overlays/{o}" for o in OVERLAYS)])
def test_manifests_kustomize_renders(directory: str):
    objects = render(ROOT / directory)
    kinds = [o["kind"] for o in objects]
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            validate(obj)
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"cluster-scoped {obj['kind']} has one"
        else:
            assert obj["metadata"].get("namespace") == "poolkeeper-system", obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "poolkeeper"
    if directory.endswith("in-tree"):  # nothing runs: no workload, RBAC or webhook
        assert set(kinds) == IN_TREE_KINDS
        return
    assert kinds.count("MutatingWebhookConfiguration") == 1
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
            "Service", "Deployment", "PodDisruptionBudget", "ResourceQuota"} <= set(kinds)
    if directory.endswith("no-admission-policy"):
        assert "ValidatingAdmissionPolicy" not in kinds
        for obj in objects:
            validate(obj, NO_POLICY_MINIMUM)
    else:
        assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= set(kinds)


def test_manifests_overlays_are_the_documented_ones():
    assert OVERLAYS == ["cert-manager", "external-certs", "in-tree", "kind",
                        "no-admission-policy"]
    readme = (ROOT / "README.md").read_text()
    for overlay in OVERLAYS:
        assert f"deploy/overlays/{overlay}" in readme


# -- rules ConfigMap -------------------------------------------------------------------------------


def test_manifests_rules_kustomization_lists_exactly_the_rule_files():
    kustomization = yaml.safe_load((ROOT / "rules/Kustomization").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "poolkeeper-rules"
    assert generator["namespace"] == "poolkeeper-system"
    assert generator["options"]["disableNameSuffixHash"] is True
    on_disk = sorted(p.name for p in (ROOT / "rules").glob("*.yaml"))
    assert sorted(generator["files"]) == on_disk, (
        "rules/Kustomization must list every rules/*.yaml (the cluster's ConfigMap is generated "
        "from it)")


@needs_kubectl
def test_manifests_rules_configmap_holds_the_shipped_rules_and_loads(base, tmp_path):
    configmap = by_kind(base, "ConfigMap")
    assert configmap["metadata"]["name"] == "poolkeeper-rules"
    shipped = {p.name: p.read_text() for p in (ROOT / "rules").glob("*.yaml")}
    assert configmap["data"] == shipped
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    assert [r.name for r in load_rules(tmp_path)] == sorted(p.removesuffix(".yaml")
                                                             for p in shipped)


# -- the webhook configuration ---------------------------------------------------------------------


def test_manifests_webhooks_are_as_the_issue_says(webhooks):
    assert list(webhooks) == ["placement.poolkeeper.io", "defaults.poolkeeper.io",
                              "defaults-opted-out.poolkeeper.io", "workloads.poolkeeper.io",
                              "namespaces.poolkeeper.io"]
    # placement and the defaults in one call for pooled namespaces; workloads: every rule (the
    # pool rule judges, pod rules warn)
    assert {n: w["clientConfig"]["service"]["path"] for n, w in webhooks.items()} == {
        "placement.poolkeeper.io": "/mutate/pods", "defaults.poolkeeper.io": "/mutate/defaults",
        "defaults-opted-out.poolkeeper.io": "/mutate/defaults",
        "workloads.poolkeeper.io": "/mutate", "namespaces.poolkeeper.io": "/mutate/namespaces"}
    for name, webhook in webhooks.items():
        path = webhook["clientConfig"]["service"]["path"]
        assert path == "/mutate" or path.removeprefix("/mutate/") in PATHS  # the app serves it
        assert webhook["clientConfig"]["service"] == {
            "namespace": "poolkeeper-system", "name": "poolkeeper", "path": path, "port": 443}
        assert "url" not in webhook["clientConfig"]
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["sideEffects"] == "NoneOnDryRun"
        assert webhook["timeoutSeconds"] == 3
        # workloads never patches, so a reinvocation could change nothing
        assert webhook["reinvocationPolicy"] == (
            "Never" if name == "workloads.poolkeeper.io" else "IfNeeded")
        assert webhook["matchPolicy"] == "Equivalent"
        assert "poolkeeper-system" in excluded_names(webhook["namespaceSelector"])
        assert SYSTEM_NAMESPACES <= excluded_names(webhook["namespaceSelector"])
    assert {n: w["failurePolicy"] for n, w in webhooks.items()} == {
        "placement.poolkeeper.io": "Fail", "defaults.poolkeeper.io": "Ignore",
        "defaults-opted-out.poolkeeper.io": "Ignore", "workloads.poolkeeper.io": "Ignore",
        "namespaces.poolkeeper.io": "Ignore"}

    def rules(webhook):
        return {(tuple(r["apiGroups"]), tuple(r["apiVersions"]), tuple(r["resources"]),
                 tuple(r["operations"])) for r in webhook["rules"]}

    assert rules(webhooks["placement.poolkeeper.io"]) == {
        (("",), ("v1",), ("pods",), ("CREATE", "UPDATE")),
        (("apps",), ("v1",), ("daemonsets",), ("CREATE", "UPDATE"))}
    for name in ("defaults.poolkeeper.io", "defaults-opted-out.poolkeeper.io"):
        assert rules(webhooks[name]) == {(("",), ("v1",), ("pods",), ("CREATE",))}
        assert webhooks[name]["matchConditions"] == \
            webhooks["defaults.poolkeeper.io"]["matchConditions"]
    assert rules(webhooks["namespaces.poolkeeper.io"]) == {(("",), ("v1",), ("namespaces",),
                                                            ("CREATE", "UPDATE"))}
    assert rules(webhooks["workloads.poolkeeper.io"]) == {
        (("apps",), ("v1",), ("deployments", "replicasets", "statefulsets"), ("CREATE", "UPDATE")),
        (("batch",), ("v1",), ("jobs", "cronjobs"), ("CREATE", "UPDATE")),
        (("",), ("v1",), ("replicationcontrollers",), ("CREATE", "UPDATE"))}
    placement_namespaces = webhooks["placement.poolkeeper.io"]["namespaceSelector"]
    assert {"key": "agentpool", "operator": "Exists"} in placement_namespaces["matchExpressions"]
    # namespaces that opted out (an empty pool label) never wait on the fail-closed webhook
    assert {"key": "agentpool", "operator": "NotIn", "values": [""]} in \
        placement_namespaces["matchExpressions"]


def test_manifests_placement_skips_mirror_pods(webhooks):
    conditions = {c["name"]: c["expression"]
                  for c in webhooks["placement.poolkeeper.io"]["matchConditions"]}
    assert set(conditions) == {"not-a-mirror-pod", "pod-update-can-change-placement"}
    mirror = conditions["not-a-mirror-pod"]
    assert "'kubernetes.io/config.mirror' in object.metadata.annotations" in mirror
    assert mirror.lstrip().startswith("!")


def test_manifests_placement_gets_only_pod_updates_that_can_change_placement(webhooks):
    # Ordinary pod updates (labels, annotations, finalizers) must not depend on poolkeeper, which
    # fails closed: only a pod whose old version has scheduling gates can change its nodeSelector
    # or affinity. CREATEs and DaemonSet updates all go. (The apiserver tier runs the CEL.)
    (condition,) = [c["expression"] for c in webhooks["placement.poolkeeper.io"]["matchConditions"]
                    if c["name"] == "pod-update-can-change-placement"]
    assert " ".join(condition.split()) == (
        "request.operation != 'UPDATE' || request.resource.resource != 'pods' || "
        "(has(oldObject.spec.schedulingGates) && size(oldObject.spec.schedulingGates) > 0)")
    # The fail-open defaults get no UPDATEs at all; namespaces only those that change the pool
    # label (the pool rule's check that the pool has nodes).
    for name in ("defaults.poolkeeper.io", "defaults-opted-out.poolkeeper.io"):
        assert all(r["operations"] == ["CREATE"] for r in webhooks[name]["rules"])


def test_manifests_namespaces_get_only_updates_that_change_the_pool_label(webhooks):
    (condition,) = webhooks["namespaces.poolkeeper.io"]["matchConditions"]
    assert condition["name"] == "update-changes-the-pool-label"
    key = yaml.safe_load((ROOT / "rules/agentpool-node-selector.yaml").read_text())[
        "params"]["namespaceLabelKey"]
    label = "has({o}.metadata.labels) && '{k}' in {o}.metadata.labels ? {o}.metadata.labels['{k}'] : ''"
    assert " ".join(condition["expression"].split()) == (
        f"request.operation != 'UPDATE' || ({label.format(o='object', k=key)}) != "
        f"({label.format(o='oldObject', k=key)})")


def test_manifests_webhooks_send_each_rule_what_it_matches(webhooks):
    """Every shipped rule's kinds and operations reach it through its own webhook (pod
    controllers other than DaemonSets through the fail-open workloads webhook, which runs every
    rule on /mutate), and each webhook excludes at least the namespaces the rules served there
    exclude."""
    from app.kinds import OBJECT_KINDS
    from app.rules.loader import ELSEWHERE

    resources = {name: (kind.group, name.lower() + "s") for name, kind in OBJECT_KINDS.items()}
    resources["Namespace"] = ("", "namespaces")
    for rule in load_rules(ROOT / "rules"):
        doc = yaml.safe_load((ROOT / "rules" / f"{rule.name}.yaml").read_text())
        for kind in doc["match"]["kinds"]:
            own = kind in ("Pod", "DaemonSet", "Namespace")
            served = (serving(webhooks, ELSEWHERE.get(rule.kind_name, {}).get(kind, doc["webhook"]))
                      if own else {"workloads.poolkeeper.io": webhooks["workloads.poolkeeper.io"]})
            sent = {name: w for name, w in served.items()
                    if any(resources[kind][1] in r["resources"] for r in w["rules"])}
            assert sent, (rule.name, kind)
            for webhook in sent.values():
                assert own or webhook["clientConfig"]["service"]["path"] == "/mutate", kind
                group, resource = resources[kind]
                for operation in doc["match"]["operations"]:
                    assert any(group in r["apiGroups"] and resource in r["resources"]
                               and operation in r["operations"] for r in webhook["rules"]), \
                        (rule.name, kind, operation)
                # A namespace the rule leaves alone is not sent to the webhook at all, so
                # (placement failing closed) the control plane never waits on poolkeeper.
                excluded = set(doc["match"].get("excludedNamespaces", SYSTEM_NAMESPACES))
                assert excluded <= excluded_names(webhook["namespaceSelector"]), rule.name


def serving(webhooks: dict[str, dict], rule_webhook: str) -> dict[str, dict]:
    """The webhooks whose path serves the rules of ``rule_webhook`` (app.rules.PATHS)."""
    return {name: w for name, w in webhooks.items()
            if rule_webhook in PATHS.get(w["clientConfig"]["service"]["path"]
                                         .removeprefix("/mutate/"), ())}


def test_manifests_placement_rules_are_served_only_by_fail_closed_webhooks(webhooks):
    # The loader keeps every PoolPlacement rule on `webhook: placement` with onError: fail; that
    # is fail closed only if every webhook whose path serves placement has failurePolicy Fail.
    placement = serving(webhooks, "placement")
    assert list(placement) == ["placement.poolkeeper.io"]
    assert {w["failurePolicy"] for w in placement.values()} == {"Fail"}
    for rule in load_rules(ROOT / "rules"):
        if rule.kind_name == "PoolPlacement":
            assert (rule.webhook, rule.on_error) == ("placement", "fail")
        else:
            assert rule.on_error == "ignore", rule.name  # the defaults stay fail open


def test_manifests_each_pod_reaches_one_poolkeeper_webhook(webhooks):
    # One call per pod: the pooled namespaces' webhook runs placement and the defaults, the others
    # the defaults only; their namespaceSelectors split the namespaces by the pool label
    # (non-empty, absent, empty), so no pod goes to two (each would reinvoke the other after its
    # patch) and none to none.
    params = yaml.safe_load((ROOT / "rules/agentpool-node-selector.yaml").read_text())["params"]
    key = params["namespaceLabelKey"]
    pods = {name: w for name, w in webhooks.items()
            if any("pods" in r["resources"] for r in w["rules"])}
    assert list(pods) == ["placement.poolkeeper.io", "defaults.poolkeeper.io",
                          "defaults-opted-out.poolkeeper.io"]
    by_pool_label = {}
    for name, webhook in pods.items():
        expressions = webhook["namespaceSelector"]["matchExpressions"]
        assert "matchLabels" not in webhook["namespaceSelector"]
        on_pool = [(e["operator"], tuple(e.get("values", ()))) for e in expressions
                   if e["key"] == key]
        assert [e for e in expressions if e["key"] not in (key, "kubernetes.io/metadata.name")] \
            == []
        by_pool_label[tuple(sorted(on_pool))] = name
        assert excluded_names(webhook["namespaceSelector"]) == \
            excluded_names(pods["placement.poolkeeper.io"]["namespaceSelector"])
    assert by_pool_label == {
        (("Exists", ()), ("NotIn", ("",))): "placement.poolkeeper.io",  # a non-empty pool label
        (("DoesNotExist", ()),): "defaults.poolkeeper.io",  # none
        (("In", ("",)),): "defaults-opted-out.poolkeeper.io"}  # an empty one: opted out
    assert serving(webhooks, "defaults") == pods  # the defaults reach pods in every class


def test_manifests_serving_certificate_covers_the_service_the_webhooks_call(base, webhooks,
                                                                            tmp_path):
    result = subprocess.run([sys.executable, "-m", "app", "certs", "--out", str(tmp_path),
                             "--service", "poolkeeper", "--namespace", "poolkeeper-system"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    service = by_kind(base, "Service")
    for webhook in webhooks.values():
        ref = webhook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"]) == (service["metadata"]["name"],
                                                   service["metadata"]["namespace"])
        assert f"{ref['name']}.{ref['namespace']}.svc" in sans  # the API server's server name
    # The caBundle integration/deploy.sh sets is the CA `poolkeeper certs` printed.
    assert ca_bundle(tmp_path / "ca.crt") == result.stdout.strip()
    (rendered,) = [o for o in with_ca_bundle(base, result.stdout.strip())
                   if o["kind"] == "MutatingWebhookConfiguration"]
    for webhook in rendered["webhooks"]:
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == \
            (tmp_path / "ca.crt").read_bytes()


def test_manifests_cert_manager_certificate_has_the_same_names():
    docs = list(yaml.safe_load_all(
        (DEPLOY / "overlays/cert-manager/certificates.yaml").read_text()))
    (serving,) = [d for d in docs if d["kind"] == "Certificate" and not d["spec"].get("isCA")]
    assert serving["spec"]["secretName"] == "poolkeeper-tls"
    assert serving["spec"]["dnsNames"] == serving_names("poolkeeper", "poolkeeper-system")
    kustomization = (DEPLOY / "overlays/cert-manager/kustomization.yaml").read_text()
    ns, name = serving["metadata"]["namespace"], serving["metadata"]["name"]
    assert f"cert-manager.io/inject-ca-from: {ns}/{name}" in kustomization


# -- the workload ----------------------------------------------------------------------------------


def test_manifests_service_maps_443_to_the_https_port_and_the_metrics_port(base):
    service = by_kind(base, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"https": (443, "https"), "metrics": (9090, "metrics")}
    pod = by_kind(base, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert {"name": "https", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert pod["metadata"]["annotations"]["prometheus.io/scheme"] == "http"
    monitor = DEPLOY / "monitoring/servicemonitor.yaml"
    if monitor.exists():  # what deploy/monitoring scrapes must exist here
        doc = yaml.safe_load(monitor.read_text())
        assert doc["spec"]["endpoints"][0]["port"] == "metrics"


def test_manifests_deployment_is_highly_available(base):
    deployment = by_kind(base, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = by_kind(base, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (spread, *_) = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "DoNotSchedule" and spread["maxSkew"] == 1
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_manifests_deployment_is_system_cluster_critical_within_its_quota(base):
    # As Gatekeeper: scheduled before and preempted after ordinary pods, since placement fails
    # closed; the quota scoped to that class lets the API server admit it outside kube-system
    # where ResourceQuota limits the system classes (GKE).
    spec = by_kind(base, "Deployment")["spec"]
    assert spec["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    quota = by_kind(base, "ResourceQuota")
    assert quota["metadata"]["namespace"] == "poolkeeper-system"
    assert quota["spec"]["scopeSelector"]["matchExpressions"] == [
        {"scopeName": "PriorityClass", "operator": "In", "values": ["system-cluster-critical"]}]
    rollout = spec["replicas"] + spec["strategy"]["rollingUpdate"]["maxSurge"]
    assert int(quota["spec"]["hard"]["pods"]) >= 2 * rollout
    assert set(quota["spec"]["hard"]) == {"pods"}  # no limit on anything that could bite


def test_manifests_deployment_probes_and_resources(base):
    pod = by_kind(base, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, "https", "HTTPS")
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert set(resources["limits"]) == {"memory"}  # no CPU limit: throttling means timeouts
    assert resources["limits"]["memory"] == resources["requests"]["memory"]


def test_manifests_deployment_is_locked_down(base):
    pod = by_kind(base, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # One token, projected and short-lived, for the namespace watch and events; none by default.
    assert pod["automountServiceAccountToken"] is False
    assert by_kind(base, "ServiceAccount")["automountServiceAccountToken"] is False
    (token,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    sources = token["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["expirationSeconds"] <= 3600
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["kube-api-access"]["mountPath"] == \
        "/var/run/secrets/kubernetes.io/serviceaccount"  # where app/kube.py reads it
    # Writable: only memory-backed emptyDirs (the metrics files; the pair poolkeeper serves).
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {n for n, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"tmp", "tls"}
    assert all(volumes[n]["emptyDir"]["medium"] == "Memory" for n in writable)


def test_manifests_deployment_settings_match_its_mounts(base):
    pod = by_kind(base, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {f"POOLKEEPER_{f.upper()}" for f in Settings.__dataclass_fields__}
    assert {n for n in env if n.startswith("POOLKEEPER_")} <= known
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert env["POOLKEEPER_CERT_DIR"] == mounts["tls"]
    assert "emptyDir" in volumes["tls"]  # poolkeeper writes the pair it serves there
    assert env["POOLKEEPER_MANAGE_CERTS"] == "true"
    assert env["POOLKEEPER_RULES_DIR"] == mounts["rules"]
    assert volumes["rules"]["configMap"]["name"] == "poolkeeper-rules"
    # gunicorn's default worker count follows the node's cores, not the container's share.
    assert int(env["POOLKEEPER_WORKERS"]) >= 2
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(mounts["tmp"] + "/")  # writable


def named(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def test_manifests_cluster_role_grants_only_what_is_used(base):
    role = named(base, "ClusterRole", "poolkeeper")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
        # the pool rule's node watch (unknownPools), and the drift audit's node lists
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        # the drift audit reads, paged
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": ["apps"], "resources": ["replicasets", "daemonsets"], "verbs": ["list"]}]
    subjects = [{"kind": "ServiceAccount", "name": "poolkeeper", "namespace": "poolkeeper-system"}]
    binding = named(base, "ClusterRoleBinding", "poolkeeper")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == subjects
    # Leases (the audit election, the replica records) only in poolkeeper's own namespace
    leases = named(base, "Role", "poolkeeper-leases")
    assert leases["metadata"]["namespace"] == "poolkeeper-system"
    assert leases["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                "verbs": ["get", "list", "create", "update", "delete"]}]
    role_binding = named(base, "RoleBinding", "poolkeeper-leases")
    assert role_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                       "name": leases["metadata"]["name"]}
    assert role_binding["subjects"] == subjects
    pod = by_kind(base, "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert float(env["POOLKEEPER_AUDIT_INTERVAL"]["value"]) > 0  # on in the cluster, off locally
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert by_kind(base, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == \
        "poolkeeper"


def test_manifests_certificate_rbac_names_exactly_the_objects_poolkeeper_manages(base):
    # By resourceNames, what the Deployment's settings name; create (which cannot be restricted
    # by name) only for secrets in poolkeeper's namespace. list and watch are restricted by name
    # too: app/certmanager.py sends them with a fieldSelector on metadata.name.
    env = {e["name"]: e.get("value") for e in
           by_kind(base, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    namespace, secret = env["POOLKEEPER_CERT_SECRET"].split("/")
    role = named(base, "Role", "poolkeeper-certs")
    assert role["metadata"]["namespace"] == namespace == "poolkeeper-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret],
         "verbs": ["get", "list", "watch", "update"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
    cluster_role = named(base, "ClusterRole", "poolkeeper-certs")
    assert cluster_role["rules"] == [
        {"apiGroups": ["admissionregistration.k8s.io"],
         "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": [env["POOLKEEPER_WEBHOOK_CONFIGURATION"]],
         "verbs": ["get", "list", "watch", "patch"]}]
    assert env["POOLKEEPER_WEBHOOK_CONFIGURATION"] == \
        by_kind(base, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert env["POOLKEEPER_SERVICE"] == by_kind(base, "Service")["metadata"]["name"]
    subject = [{"kind": "ServiceAccount", "name": "poolkeeper", "namespace": "poolkeeper-system"}]
    for kind, role_kind in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        binding = named(base, kind, "poolkeeper-certs")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": role_kind, "name": "poolkeeper-certs"}
        assert binding["subjects"] == subject
    source = (ROOT / "app/certmanager.py").read_text()
    assert source.count('"fieldSelector": f"metadata.name={name}"') == 2  # list and watch


def test_manifests_no_kustomization_owns_the_cabundle():
    # kubectl apply -k (client- or server-side) and GitOps tools then never remove it.
    for directory in ("deploy", *(f"deploy/overlays/{o}" for o in OVERLAYS)):
        objects = render(ROOT / directory) if kubectl() else listed_files(ROOT / directory)
        for obj in objects:
            for webhook in obj.get("webhooks", []):
                assert "caBundle" not in webhook["clientConfig"], (directory, webhook["name"])


@needs_kubectl
@pytest.mark.parametrize("overlay", ["external-certs", "cert-manager"])
def test_manifests_external_certificates_mount_the_secret_and_drop_the_certificate_rbac(overlay):
    objects = render(DEPLOY / "overlays" / overlay)
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["POOLKEEPER_MANAGE_CERTS"] == "false"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume == {"name": "tls", "secret": {"secretName": "poolkeeper-tls",
                                                "defaultMode": 0o440}}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True and mount["mountPath"] == env["POOLKEEPER_CERT_DIR"]
    assert not [o for o in objects if o["metadata"]["name"] == "poolkeeper-certs"]
    assert manages_certificates(objects) is False
    assert manages_certificates(render(DEPLOY)) is True


def test_manifests_network_policy_admits_the_webhook_from_anywhere_metrics_from_monitoring(base):
    policy = by_kind(base, "NetworkPolicy")
    pod = by_kind(base, "Deployment")["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    webhook, metrics = policy["spec"]["ingress"]
    assert "from" not in webhook  # the API server's address differs per provider
    assert webhook["ports"] == [{"port": "https", "protocol": "TCP"}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {"https", "metrics"} == names  # the named ports the policy refers to


@needs_kubectl
def test_manifests_readme_patch_moves_the_metrics_namespace(tmp_path):
    # The kustomize patch README "Deploying to a cluster" shows for another monitoring namespace.
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```yaml\n(# tmp/kustomization.yaml\n.*?)```", readme, re.S).group(1)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(  # kustomize takes relative paths only
        snippet.replace("../deploy", os.path.relpath(DEPLOY, overlay)))
    policy = by_kind(render(overlay), "NetworkPolicy")
    assert policy["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "prometheus"}


def test_manifests_admission_policy_matches_the_placement_webhook_and_rule(base, webhooks):
    policy = by_kind(base, "ValidatingAdmissionPolicy")
    constraints = policy["spec"]["matchConstraints"]
    assert constraints["namespaceSelector"] == \
        webhooks["placement.poolkeeper.io"]["namespaceSelector"]
    (rule,) = constraints["resourceRules"]
    assert (rule["resources"], rule["operations"]) == (["pods"], ["CREATE", "UPDATE"])
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    params = yaml.safe_load((ROOT / "rules/agentpool-node-selector.yaml").read_text())["params"]
    assert variables["namespaceLabelKey"] == repr(params["namespaceLabelKey"])
    assert variables["nodeLabelKey"] == repr(params["nodeLabelKey"])
    assert variables["allowedPoolsAnnotation"] == repr(params["allowedPoolsAnnotation"])
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert "kubernetes.io/config.mirror" in policy["spec"]["matchConditions"][0]["expression"]
    binding = by_kind(base, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}


def test_manifests_uninstall_script_names_what_the_base_installs(base, webhooks):
    """integration/uninstall.sh deletes the admission objects by name before anything else."""
    script = (ROOT / "integration/uninstall.sh").read_text()
    settings = dict(re.findall(r"^([A-Z_]+)=(\S+)", script, re.M))
    assert settings["WEBHOOK_CONFIGURATION"] == \
        by_kind(base, "MutatingWebhookConfiguration")["metadata"]["name"]
    policy = by_kind(base, "ValidatingAdmissionPolicy")["metadata"]["name"]
    assert settings["POLICY"] == policy == \
        by_kind(base, "ValidatingAdmissionPolicyBinding")["metadata"]["name"]
    assert set(settings["EXCLUDED"].split(",")) == \
        excluded_names(webhooks["placement.poolkeeper.io"]["namespaceSelector"])
    params = yaml.safe_load((ROOT / "rules/agentpool-node-selector.yaml").read_text())["params"]
    for variable, param in (("NAMESPACE_LABEL_KEY", "namespaceLabelKey"),
                            ("NODE_LABEL_KEY", "nodeLabelKey")):
        assert settings[variable] == f"${{{variable}:-{params[param]}}}"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^uninstall:.*\n\t.*integration/uninstall\.sh \$\(UNINSTALL_FROM\)$",
                     makefile, re.M)


# -- the image -------------------------------------------------------------------------------------


def test_manifests_image_lock_pins_every_runtime_dependency_within_setup_cfg():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    setup = ConfigParser()
    setup.read(ROOT / "setup.cfg")
    wanted = [Requirement(line) for line in
              setup["options"]["install_requires"].strip().splitlines()]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock lacks {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name]), (
            f"requirements.lock pins {name}=={pins[name]}, setup.cfg wants {requirement}: "
            "run `make lock`")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile
    assert re.search(r"^USER \d+", dockerfile, re.M), "the image runs as a numeric non-root user"
    uid = re.search(r"^USER (\d+)", dockerfile, re.M).group(1)
    pod = yaml.safe_load((DEPLOY / "base/deployment.yaml").read_text())["spec"]["template"]
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == uid


def test_manifests_image_installs_the_package_and_its_build_context_holds_what_it_copies():
    # The image carries poolkeeper's metadata (importlib.metadata.version: the build_info
    # metric), installed without dependencies (those are the lock's), and copies only what
    # .dockerignore lets into the build context: a missing file would fail `docker build`.
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "--target=/app /src" in line]
    assert len(installs) == 1 and "--no-deps" in installs[0], "the package is pip-installed"
    included = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")}
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert source in included, f".dockerignore keeps {source} out of the context"
                assert (ROOT / source).exists(), source
