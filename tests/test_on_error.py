"""onError: a rule that raises is skipped (ignore) or fails the request (fail, every PoolPlacement),
in the engine and over HTTP; and /mutate/pods, the one call per pod that runs placement and the
defaults together."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging

import pytest

from app.admission import SKIPPED, SKIPPED_UNKNOWN_LABELS, admit, warning
from app.config import Settings
from app.factory import create_app
from app.namespaces import NamespaceLookupError
from app.namespaces.file import FileNamespaces
from app.patching import ObjectEditor, ObjectShapeError
from app.rules import (
    NOTHING,
    SHIPPED_RULES,
    RuleContext,
    RuleResult,
    RulesError,
    RuleStore,
    load_rules,
)
from app.watch import FileWatcher

from .support import TESTDATA, make_request, pod, review_doc, shipped_rules

RULES = shipped_rules()
NAMESPACES = {"team-a": {"agentpool": "pool1"}}


class Raising:
    """A rule kind with a bug: it raises ``error``, after ``edits`` (path, value) if any."""

    KIND_NAME = "Raising"
    OBJECT_KINDS = ("Pod",)
    OPERATIONS = ("CREATE",)
    PARAMS: dict = {}

    def __init__(self, error: Exception, edits=()):
        self.error, self.edits = error, edits

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        for path, value in self.edits:
            editor.set(path, value)
        raise self.error


def broken(name: str, error: Exception, edits=(), **changes):
    """The shipped rules with ``name`` given a bug (and the rule's fields ``changes``)."""
    return tuple(dataclasses.replace(r, policy=Raising(error, edits), **changes)
                 if r.name == name else r for r in RULES)


def limited_pod(namespace="team-a"):
    obj = pod(namespace=namespace)
    obj["metadata"]["labels"] = {"platform": "true"}
    obj["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1", "memory": "1Gi"}}
    return obj


def decide(obj, rules):
    return admit(make_request(obj), NAMESPACES.get, rules)


def ops(decision):
    return [(op["op"], op["path"]) for op in decision.response.patch]


# -- the loader ------------------------------------------------------------------------------------


def test_on_error_defaults_to_fail_for_placement_and_ignore_for_the_rest(tmp_path):
    for name, kind in (("pool", "PoolPlacement"), ("ns", "NamespaceLabels"),
                       ("pull", "ImagePullPolicy"), ("limits", "RemoveResourceLimits")):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\nkind: {kind}\n")
    assert {r.name: r.on_error for r in load_rules(tmp_path)} == {
        "pool": "fail", "ns": "ignore", "pull": "ignore", "limits": "ignore"}


def test_on_error_is_read_from_the_rule_file(tmp_path):
    (tmp_path / "pull.yaml").write_text("name: pull\nkind: ImagePullPolicy\nonError: fail\n")
    (tmp_path / "pool.yaml").write_text("name: pool\nkind: PoolPlacement\nonError: fail\n")
    assert {r.name: r.on_error for r in load_rules(tmp_path)} == {"pool": "fail", "pull": "fail"}


@pytest.mark.parametrize("text, expected", [
    ("name: rule\nkind: ImagePullPolicy\nonError: retry\n",
     "rule.yaml: onError: 'retry' is not one of ignore, fail"),
    ("name: rule\nkind: PoolPlacement\nonError: ignore\n",
     "rule.yaml: onError: 'ignore': PoolPlacement rules always fail the request"),
])
def test_on_error_refuses_unknown_values_and_a_placement_that_could_be_skipped(tmp_path, text,
                                                                                expected):
    (tmp_path / "rule.yaml").write_text(text)
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert expected in str(info.value)


def test_on_error_shipped_rules_keep_the_defaults_fail_open():
    assert {r.name: r.on_error for r in RULES} == {
        "agentpool-node-selector": "fail", "image-pull-policy": "ignore",
        "namespace-labels": "ignore", "remove-cpu-limits": "ignore"}


# -- the engine ------------------------------------------------------------------------------------


def test_on_error_ignore_skips_the_rule_and_the_others_still_apply():
    error = RuntimeError("a bug")
    decision = decide(limited_pod(), broken("remove-cpu-limits", error))
    response = decision.response
    assert response.allowed
    assert ops(decision) == [("add", "/spec/nodeSelector"),
                             ("add", "/spec/containers/0/imagePullPolicy")]
    assert response.warnings == ("[remove-cpu-limits] " + SKIPPED,)
    assert len(response.warnings[0]) < 120
    assert [(e.rule, e.error) for e in decision.errors] == [("remove-cpu-limits", error)]
    assert decision.rules == ("agentpool-node-selector", "image-pull-policy")
    assert response.audit_annotations["rules"] == "agentpool-node-selector,image-pull-policy"


def test_on_error_ignore_leaves_no_partial_edit_behind():
    # The rule edits, then raises: as if it had not run, and later rules see the object unedited.
    edits = [(("spec", "nodeSelector", "half"), "done"), (("metadata", "labels", "x"), "y")]
    decision = decide(limited_pod(), broken("image-pull-policy", KeyError("x"), edits))
    assert ops(decision) == [("add", "/spec/nodeSelector"),
                             ("remove", "/spec/containers/0/resources/limits/cpu")]
    assert decision.response.warnings[0] == warning("image-pull-policy", SKIPPED)


def test_on_error_ignore_covers_a_rule_that_fails_in_its_match():
    # A namespaceSelector whose lookup cannot be answered: the rule cannot run, so it is skipped.
    from app.rules import LabelSelector, Requirement

    def lookup(name):
        raise NamespaceLookupError(f"cannot look up namespace {name!r}")

    (rule,) = shipped_rules("remove-cpu-limits")
    selector = LabelSelector((Requirement("team", "Exists"),))
    rules = (dataclasses.replace(rule, match=dataclasses.replace(rule.match,
                                                                   namespace_selector=selector)),)
    decision = admit(make_request(limited_pod()), lookup, rules)
    assert decision.response.allowed and decision.response.patch == ()
    assert [e.rule for e in decision.errors] == ["remove-cpu-limits"]
    assert isinstance(decision.errors[0].error, NamespaceLookupError)
    # an outage, not a bug: the warning says so
    assert decision.response.warnings == ("[remove-cpu-limits] " + SKIPPED_UNKNOWN_LABELS,)


def test_on_error_ignore_covers_warn_mode():
    decision = decide(limited_pod(), broken("remove-cpu-limits", RuntimeError("bug"),
                                            enforcement="warn"))
    assert decision.response.warnings == ("[remove-cpu-limits] " + SKIPPED,)
    assert [e.rule for e in decision.errors] == ["remove-cpu-limits"]


@pytest.mark.parametrize("name", ["agentpool-node-selector", "remove-cpu-limits"])
def test_on_error_fail_lets_the_error_out(name):
    error = RuntimeError("a bug")
    with pytest.raises(RuntimeError) as info:
        decide(limited_pod(), broken(name, error, on_error="fail"))
    assert info.value is error


def test_on_error_a_malformed_object_is_a_bad_request_whatever_the_rule_says():
    for error in (ObjectShapeError("spec.containers must be a list"), RecursionError()):
        with pytest.raises(type(error)):
            decide(limited_pod(), broken("remove-cpu-limits", error))


def test_on_error_rules_that_do_not_match_are_never_run():
    calls = []

    class Counting(Raising):
        def evaluate(self, ctx, editor):
            calls.append(ctx.request.uid)
            return NOTHING

    (rule,) = shipped_rules("remove-cpu-limits")
    counting = (dataclasses.replace(rule, policy=Counting(RuntimeError())),)
    assert decide(limited_pod(), counting).errors == ()
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "12345-a-dev"}}
    assert decide(namespace, counting).response.patch == ()
    assert len(calls) == 1


# -- over HTTP: /mutate/pods, log line, metric -----------------------------------------------------


class Store:
    """A rule store holding given rules, grouped as RuleStore groups them."""

    digest, loaded_at = "test", 0.0

    def __init__(self, rules):
        from app.rules.loader import by_path

        self._all, self._by_path = rules, by_path(rules)

    def rules(self, path=None):
        return self._all if path is None else self._by_path.get(path, ())


@pytest.fixture
def client_for(tmp_path):
    def make(rules=None):
        watcher = FileWatcher()
        store = Store(rules) if rules is not None else RuleStore(SHIPPED_RULES, watcher=watcher)
        app = create_app(Settings(cert_dir=str(tmp_path)),
                         source=FileNamespaces(TESTDATA / "namespaces.yaml"), rules=store,
                         watcher=watcher)
        return app.test_client()
    return make


def post(client, doc, path):
    response = client.post(path, data=json.dumps(doc), headers={"Content-Type": "application/json"})
    return response.status_code, response.get_json()["response"]


def patch_paths(answer):
    return [op["path"] for op in json.loads(base64.b64decode(answer["patch"]))] \
        if "patch" in answer else []


def rule_errors(rule):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("poolkeeper_rule_errors_total", {"rule": rule}) or 0.0


def test_on_error_paths_serve_their_rules(client_for):
    client = client_for()
    doc = review_doc(limited_pod(namespace="team-payments"))
    pinned, pulled, unlimited = ("/spec/nodeSelector", "/spec/containers/0/imagePullPolicy",
                                 "/spec/containers/0/resources/limits/cpu")
    expected = {"/mutate/pods": [pinned, pulled, unlimited], "/mutate": [pinned, pulled, unlimited],
                "/mutate/placement": [pinned], "/mutate/defaults": [pulled, unlimited],
                "/mutate/namespaces": []}
    for path, paths in expected.items():
        status, answer = post(client, doc, path)
        assert status == 200 and patch_paths(answer) == paths, path
    status, _ = post(client, doc, "/mutate/pod")
    assert status == 404


def test_pods_path_gives_a_daemonset_no_defaults_template_warnings(client_for):
    """/mutate/pods judges DaemonSets for placement; the defaults' template warnings ("pods of
    this DaemonSet will get: ...") are not given there, as they were not while placement had
    its own path (DaemonSets of unpooled namespaces reach no poolkeeper webhook at all)."""
    template = limited_pod(namespace="team-payments")
    daemonset = {"apiVersion": "apps/v1", "kind": "DaemonSet",
                 "metadata": {"name": "agent", "namespace": "team-payments"},
                 "spec": {"selector": {"matchLabels": {"app": "agent"}},
                          "template": {"metadata": {"labels": {"platform": "true"}},
                                       "spec": template["spec"]}}}
    doc = review_doc(daemonset)
    status, answer = post(client_for(), doc, "/mutate/pods")
    assert status == 200 and answer["allowed"] is True
    assert patch_paths(answer) == ["/spec/template/spec/nodeSelector"]
    assert "warnings" not in answer
    # every rule, as the workloads webhook runs them: the defaults do warn there
    status, answer = post(client_for(), doc, "/mutate")
    assert any("pods of this DaemonSet will get" in w for w in answer.get("warnings", ()))


def test_on_error_skipped_rule_is_logged_counted_and_warned_over_http(client_for, caplog):
    client = client_for(broken("remove-cpu-limits", ZeroDivisionError("division by zero")))
    before = rule_errors("remove-cpu-limits")
    with caplog.at_level(logging.INFO, logger="poolkeeper"):
        status, answer = post(client, review_doc(limited_pod(namespace="team-payments")),
                              "/mutate/pods")
    assert status == 200 and answer["allowed"] is True
    assert patch_paths(answer) == ["/spec/nodeSelector", "/spec/containers/0/imagePullPolicy"]
    assert answer["warnings"] == ["[remove-cpu-limits] " + SKIPPED]
    assert rule_errors("remove-cpu-limits") == before + 1
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.name == "poolkeeper.webhook" and "remove-cpu-limits" in error.getMessage()
    assert error.exc_info[0] is ZeroDivisionError  # the traceback is in the log
    (line,) = [r for r in caplog.records if r.name == "poolkeeper.admission"]
    assert line.fields["decision"] == "patched"
    assert line.fields["skippedRules"] == ["remove-cpu-limits"]


def test_on_error_unknowable_labels_skip_a_default_with_a_warning_line_not_a_traceback(
        tmp_path, caplog):
    """An outage is not a bug: a default with a namespaceSelector whose labels cannot be known
    is skipped with its own warning, logged at WARNING without a traceback, and counted."""
    from app.rules import LabelSelector, Requirement

    class Unreachable(FileNamespaces):
        def namespace(self, name):
            raise NamespaceLookupError(f"cannot look up namespace {name!r}: API server gone")

    (rule,) = shipped_rules("remove-cpu-limits")
    selector = LabelSelector((Requirement("team", "Exists"),))
    rules = (dataclasses.replace(rule, match=dataclasses.replace(rule.match,
                                                                   namespace_selector=selector)),)
    app = create_app(Settings(cert_dir=str(tmp_path)),
                     source=Unreachable(TESTDATA / "namespaces.yaml"), rules=Store(rules),
                     watcher=FileWatcher())
    before = rule_errors("remove-cpu-limits")
    with caplog.at_level(logging.INFO, logger="poolkeeper"):
        status, answer = post(app.test_client(), review_doc(limited_pod(namespace="team-a")),
                              "/mutate/defaults")
    assert status == 200 and answer["allowed"] is True and "patch" not in answer
    assert answer["warnings"] == ["[remove-cpu-limits] " + SKIPPED_UNKNOWN_LABELS]
    assert rule_errors("remove-cpu-limits") == before + 1
    (line,) = [r for r in caplog.records if r.name == "poolkeeper.webhook"]
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "API server gone" in line.getMessage()


def test_on_error_placement_error_is_a_500_so_the_webhook_fails_closed(client_for, caplog):
    client = client_for(broken("agentpool-node-selector", RuntimeError("a bug"),
                               on_error="fail"))
    with caplog.at_level(logging.INFO, logger="poolkeeper"):
        status, answer = post(client, review_doc(limited_pod(namespace="team-payments")),
                              "/mutate/pods")
    assert status == 500 and answer["status"]["code"] == 500
    assert "internal error" in answer["status"]["message"]
    (line,) = [r for r in caplog.records if r.name == "poolkeeper.admission"]
    assert line.fields["decision"] == "error" and "skippedRules" not in line.fields


# -- offline: poolkeeper mutate and poolkeeper test ------------------------------------------------


def test_on_error_offline_mutate_prints_the_traceback_of_a_skipped_rule():
    """`poolkeeper mutate` has no log: the traceback the server would log goes to stderr."""
    import io

    from app.offline import Document, judge

    err = io.StringIO()
    document = Document([limited_pod(namespace="team-payments")], "single")
    (outcome,) = judge(document, broken("remove-cpu-limits", ZeroDivisionError("division by zero")),
                       NAMESPACES.get, None, err)
    assert outcome.decision.response.warnings == ("[remove-cpu-limits] " + SKIPPED,)
    printed = err.getvalue()
    assert "rule remove-cpu-limits failed and was skipped" in printed
    assert "ZeroDivisionError: division by zero" in printed and "Traceback" in printed


def test_on_error_a_golden_case_fails_when_its_rule_raised():
    """`poolkeeper test`: a skipped rule is a failed case, even if the rest of the answer matches
    (a case with no expected change would otherwise pass while its rule crashed)."""
    from app.cases import discover, run_case

    cases = [c for c in discover(TESTDATA / "rules") if c.rule == "remove-cpu-limits"
             and not (c.path / "rule.yaml").exists()]  # those judge with their own rule file
    assert cases
    for case in cases:
        assert run_case(case, RULES).passed, case.id
        result = run_case(case, broken("remove-cpu-limits", ZeroDivisionError("division by zero")))
        assert not result.passed and "rule remove-cpu-limits raised " in \
            result.detail, case.id
