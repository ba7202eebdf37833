"""The golden cases under testdata/rules/, run by pytest exactly as `poolkeeper test` runs them."""

from __future__ import annotations

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
    for rule, kinds in by_rule.items():
        assert {"mutate", "leave-alone"} <= kinds, rule
    # Only the pool rule can deny with the shipped settings.
    assert "deny" in by_rule["agentpool-node-selector"]


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
    import shutil

    shutil.copytree(TESTDATA / "rules/image-pull-policy/platform-pod-pulls-always",
                    tmp_path / "image-pull-policy/case")
    expected = tmp_path / "image-pull-policy/case/expected.yaml"
    expected.write_text(expected.read_text().replace("Always", "Never", 1))
    result = run_case(discover(tmp_path)[0], RULES)
    assert not result.passed and "object differs from expected.yaml" in result.detail
    assert "Always" in result.detail
