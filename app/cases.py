"""Owns golden rule cases: finding them under testdata/rules/ and judging one against the rules.

A case is a directory ``<dir>/<rule-name>/<case-name>/`` holding:

``input.yaml``       the object as the API server would send it (required)
``namespaces.yaml``  Namespace objects the cache would return (optional; List or multi-document)
``nodes.yaml``       Node objects the node watch would hold (optional; List or multi-document):
                     without it the rules have no node source, so a namespace's pool is not
                     checked for nodes
``old.yaml``         the object before the change: makes the request an UPDATE (optional)
``expected.yaml``    the object after the patch; absent means no patch is expected
``denied.txt``       the request must be denied, the message containing every non-empty line
``warnings.txt``     every non-empty line must appear in one of the warnings, and every warning
                     must contain one of the lines; absent means no warning is expected
``rule.yaml``        the rule to run instead of its file in the rules directory (optional): a
                     rule file as in rules/, validated the same way, its ``name`` the rule
                     directory's; for settings the shipped rule does not use (say, a deny that
                     only ``enforce`` gives)

Only the rule the case is filed under runs, as its file in the rules directory configures it
(or the case's ``rule.yaml``). Objects are compared after the patch is applied, not op lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jsonpatch
import yaml

from .admission import admit
from .namespaces.file import parse_namespaces
from .nodes import FixedNodes, parse_nodes
from .review import request_for
from .rules import Rule, parse_rule_file

CASE_FILES = ("input.yaml", "namespaces.yaml", "nodes.yaml", "old.yaml", "expected.yaml",
              "denied.txt", "warnings.txt", "rule.yaml")


@dataclass(frozen=True)
class Case:
    rule: str
    name: str
    path: Path

    @property
    def id(self) -> str:
        return f"{self.rule}/{self.name}"


@dataclass(frozen=True)
class CaseResult:
    case: Case
    passed: bool
    detail: str = ""


def discover(directory: str | Path) -> list[Case]:
    """The cases under ``directory``, which is the case root (``<rule>/<case>/``), one rule's
    directory (``<case>/``) or one case (it holds ``input.yaml``)."""
    directory = Path(directory)
    if (directory / "input.yaml").is_file():
        return [Case(directory.resolve().parent.name, directory.name, directory)]
    children = sorted(p for p in directory.iterdir() if p.is_dir())
    if any((child / "input.yaml").is_file() for child in children):
        rule = directory.resolve().name
        return [Case(rule, child.name, child) for child in children]
    cases = []
    for rule_dir in children:
        for case_dir in sorted(p for p in rule_dir.iterdir() if p.is_dir()):
            cases.append(Case(rule_dir.name, case_dir.name, case_dir))
    return cases


def default_case_root(rules_dir: str | Path) -> Path:
    """Where a rules directory's golden cases live: ``testdata/rules`` beside it (so the
    shipped rules' cases are found from any working directory)."""
    return Path(rules_dir).resolve().parent / "testdata" / "rules"


def junit_xml(results: Sequence[CaseResult], seconds: float = 0.0) -> str:
    """The results as a JUnit XML report: one testsuite, a testcase per case (classname the
    rule), a failure element with the detail for each failed case."""
    from xml.etree import ElementTree as ET

    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite", name="poolkeeper", tests=str(len(results)),
                          failures=str(sum(not r.passed for r in results)), errors="0",
                          time=f"{seconds:.3f}")
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=result.case.rule,
                             name=result.case.name)
        if not result.passed:
            ET.SubElement(case, "failure", message=result.detail[:500]).text = result.detail
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def load_case_rule(case: Case) -> Rule:
    """The case's ``rule.yaml``, validated as a file in rules/ is; ValueError naming each
    problem. Its ``name`` must be the rule directory's."""
    path = case.path / "rule.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(doc, dict) and doc.get("name") != case.rule:
        raise ValueError(f"{path}: name: {doc.get('name')!r} must equal the rule directory name "
                         f"{case.rule!r}")
    rule, problems = parse_rule_file(path, stem=case.rule)
    if rule is None:
        raise ValueError("invalid rule.yaml: " + "; ".join(problems))
    return rule


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def run_case(case: Case, rules: Sequence[Rule]) -> CaseResult:
    try:
        return _judge(case, rules)
    except (OSError, yaml.YAMLError, ValueError, jsonpatch.JsonPatchException) as exc:
        return CaseResult(case, False, f"cannot run: {exc}")


def _judge(case: Case, rules: Sequence[Rule]) -> CaseResult:
    unknown = sorted(p.name for p in case.path.iterdir() if p.name not in CASE_FILES)
    if unknown:
        return CaseResult(case, False, f"unknown files {unknown}; allowed: {list(CASE_FILES)}")
    if (case.path / "rule.yaml").exists():
        selected = [load_case_rule(case)]
    else:
        selected = [r for r in rules if r.name == case.rule]
    if not selected:
        return CaseResult(case, False, f"no rule named {case.rule!r} in the rules directory")
    obj = yaml.safe_load((case.path / "input.yaml").read_text())
    old_path, ns_path = case.path / "old.yaml", case.path / "namespaces.yaml"
    old = yaml.safe_load(old_path.read_text()) if old_path.exists() else None
    namespaces = parse_namespaces(ns_path.read_text()) if ns_path.exists() else {}
    nodes_path = case.path / "nodes.yaml"
    nodes = FixedNodes(parse_nodes(nodes_path.read_text())) if nodes_path.exists() else None
    decision = admit(request_for(obj, old), namespaces.get, selected,
                     nodes.pools if nodes is not None else None)
    response = decision.response
    # A rule that raised was skipped (onError: ignore): whatever the answer, the case fails.
    problems = [f"rule {failure.rule} raised {type(failure.error).__name__}: {failure.error}"
                for failure in decision.errors]
    denied_path = case.path / "denied.txt"
    if denied_path.exists():
        if response.allowed:
            problems.append("expected a denial, but it was allowed")
        else:
            problems += [f"denial lacks {line!r}: {response.message}"
                         for line in _lines(denied_path) if line not in (response.message or "")]
    elif not response.allowed:
        problems.append(f"denied: {response.message}")
    warnings_path = case.path / "warnings.txt"
    expected_warnings = _lines(warnings_path) if warnings_path.exists() else []
    problems += [f"no warning contains {line!r}; warnings: {list(response.warnings)}"
                 for line in expected_warnings if not any(line in w for w in response.warnings)]
    problems += [f"unexpected warning {w!r}" + ("" if warnings_path.exists() else
                                                  " (no warnings.txt: none expected)")
                 for w in response.warnings if not any(line in w for line in expected_warnings)]
    expected_path = case.path / "expected.yaml"
    if response.allowed:
        result = jsonpatch.apply_patch(obj, list(response.patch)) if response.patch else obj
        if expected_path.exists():
            expected = yaml.safe_load(expected_path.read_text())
            if result != expected:
                diff = jsonpatch.make_patch(expected, result).patch
                problems.append(f"object differs from expected.yaml: {diff}")
        elif response.patch:
            problems.append(f"expected no patch, got {list(response.patch)}")
    return CaseResult(case, not problems, "; ".join(problems))
