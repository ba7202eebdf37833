"""The golden cases under testdata/rules/, run by pytest exactly as `poolkeeper test` runs them."""

from __future__ import annotations

import inspect
import shutil

import pytest

from app.cases import discover, run_case

from .support import TESTDATA, shipped_rules

CASES = discover(TESTDATA / "rules")
RULES = shipped_rules()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_case(case):
    result = run_case(case, RULES)
    assert result.passed, result.detail


def test_rule_cases_cover_every_rule_with_mutate_leave_alone_and_deny():
    by_rule: dict[str, set[str]] = {}
    for case in CASES:
        kinds = by_rule.setdefault(case.rule, set())
        if (case.path / "expected.yaml").exists():
            kinds.add("mutate")
        elif (case.path / "denied.txt").exists():
            kinds.add("deny")
        else:
            kinds.add("leave-alone")
    assert set(by_rule) == {r.name for r in RULES}
    for rule in RULES:
        wanted = {"mutate", "leave-alone"} | ({"deny"} if rule.kind_name in CAN_DENY else set())
        missing = wanted - by_rule[rule.name]
        assert not missing, f"{rule.name} lacks a case of each kind in {sorted(missing)}"


# Rule kinds that can deny with some settings: their rules need a deny case, if need be with a
# rule.yaml giving those settings (namespace-labels denies only with namePatternEnforcement:
# enforce). ImagePullPolicy and RemoveResourceLimits only edit and warn.
CAN_DENY = {"PoolPlacement", "NamespaceLabels"}


def test_rule_cases_deny_only_in_kinds_known_to_deny():
    from app.rules import RULE_KINDS

    assert CAN_DENY <= set(RULE_KINDS)
    for name, kind in RULE_KINDS.items():  # a kind denies by returning RuleResult(denials=...)
        assert ("denials=" in inspect.getsource(kind)) == (name in CAN_DENY), (
            f"{name}: update CAN_DENY (a rule that can deny needs a deny case)")


def test_rule_case_runner_reports_problems(tmp_path):
    case_dir = tmp_path / "image-pull-policy" / "broken"
    case_dir.mkdir(parents=True)
    (case_dir / "input.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {platform: 'true'}}\n"
        "spec: {containers: [{name: c, image: i, imagePullPolicy: Never}]}\n")
    (case_dir / "denied.txt").write_text("nope\n")
    (case_dir / "warnings.txt").write_text("some warning\n")
    case = discover(tmp_path)[0]
    result = run_case(case, RULES)
    assert not result.passed
    assert "expected a denial" in result.detail and "no warning contains" in result.detail
    (case_dir / "denied.txt").unlink()
    (case_dir / "warnings.txt").unlink()
    assert "expected no patch" in run_case(case, RULES).detail
    (case_dir / "stray.txt").write_text("")
    assert "unknown files ['stray.txt']" in run_case(case, RULES).detail
    (case_dir / "stray.txt").unlink()
    (case_dir / "input.yaml").write_text("a: [")
    assert "cannot run" in run_case(case, RULES).detail
    assert "no rule named" in run_case(case, ()).detail


def test_rule_case_runner_checks_denial_text(tmp_path):
    case_dir = tmp_path / "agentpool-node-selector" / "denial"
    case_dir.mkdir(parents=True)
    (case_dir / "input.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: t}\n"
        "spec: {nodeSelector: {agentpool: b}, containers: [{name: c, image: i}]}\n")
    (case_dir / "namespaces.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: t, labels: {agentpool: a}}\n")
    case = discover(tmp_path)[0]
    assert "denied:" in run_case(case, RULES).detail
    (case_dir / "denied.txt").write_text('"b"\nnot in the message\n')
    result = run_case(case, RULES)
    assert not result.passed and "denial lacks 'not in the message'" in result.detail


def test_rule_case_runner_shows_how_the_object_differs(tmp_path):
    shutil.copytree(TESTDATA / "rules/image-pull-policy/platform-pod-pulls-always",
                    tmp_path / "image-pull-policy/case")
    expected = tmp_path / "image-pull-policy/case/expected.yaml"
    expected.write_text(expected.read_text().replace("Always", "Never", 1))
    result = run_case(discover(tmp_path)[0], RULES)
    assert not result.passed and "object differs from expected.yaml" in result.detail
    assert "Always" in result.detail


def copy_case(tmp_path, case_id: str):
    shutil.copytree(TESTDATA / "rules" / case_id, tmp_path / case_id)
    return tmp_path / case_id


def test_rule_case_runner_fails_on_a_warning_no_warnings_txt_expects(tmp_path):
    case_dir = copy_case(tmp_path, "namespace-labels/namespace-name-off-pattern-gets-a-warning")
    (case_dir / "warnings.txt").unlink()
    result = run_case(discover(tmp_path)[0], RULES)
    assert not result.passed
    assert "unexpected warning" in result.detail and "no warnings.txt" in result.detail
    (case_dir / "warnings.txt").write_text("does not match\n")
    assert run_case(discover(tmp_path)[0], RULES).passed
    (case_dir / "warnings.txt").write_text("something else entirely\n")
    result = run_case(discover(tmp_path)[0], RULES)
    assert "no warning contains 'something else entirely'" in result.detail
    assert "unexpected warning" in result.detail


def test_rule_case_rule_yaml_replaces_the_rule_under_test(tmp_path):
    case_dir = copy_case(tmp_path, "namespace-labels/name-off-pattern-is-denied-when-enforced")
    case = discover(tmp_path)[0]
    assert run_case(case, RULES).passed
    assert run_case(case, ()).passed  # the case's rule runs even where the directory lacks it
    rule_yaml = case_dir / "rule.yaml"
    rule_yaml.write_text(rule_yaml.read_text().replace("namePatternEnforcement: enforce",
                                                       "namePatternEnforcement: warn"))
    result = run_case(case, RULES)
    assert not result.passed and "expected a denial" in result.detail
    rule_yaml.unlink()
    assert "expected a denial" in run_case(case, RULES).detail  # the shipped rule only warns


def test_rule_case_rule_yaml_is_validated_as_a_rule_file(tmp_path):
    case_dir = copy_case(tmp_path, "namespace-labels/name-off-pattern-is-denied-when-enforced")
    rule_yaml = case_dir / "rule.yaml"
    text = rule_yaml.read_text()
    case = discover(tmp_path)[0]
    rule_yaml.write_text(text.replace("name: namespace-labels", "name: other-rule"))
    result = run_case(case, RULES)
    assert not result.passed
    assert "'other-rule' must equal the rule directory name 'namespace-labels'" in result.detail
    rule_yaml.write_text(text.replace("namePatternEnforcement: enforce",
                                      "namePatternEnforcement: sometimes"))
    result = run_case(case, RULES)
    assert not result.passed and "invalid rule.yaml" in result.detail
    assert f"{rule_yaml}: params" in result.detail and "sometimes" in result.detail
    rule_yaml.write_text("kind: [")
    assert "cannot run" in run_case(case, RULES).detail
