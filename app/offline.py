"""Owns ``poolkeeper mutate``: judging the objects a user has (a file, a ``kind: List``, a
multi-document stream, ``kubectl get -o yaml`` output, an AdmissionReview) as the webhook would.

Objects are judged as given: ``status``, ``managedFields`` and ``resourceVersion`` are kept in
the output and play no part in the decision (no rule reads them).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import jsonpatch
import orjson
import yaml

from .admission import Decision, admit
from .kinds import template_path
from .review import AdmissionRequest, encode_review, parse_review, request_for
from .rules import Rule
from .rules.base import NamespaceLookup
from .text import quote

LIST_KINDS = ("List",)  # kubectl get -o yaml of several objects; also *List kinds


class InputError(ValueError):
    """INPUT cannot be read as objects; the message is one line, for the user (exit 2)."""


@dataclass(frozen=True)
class Document:
    """What INPUT holds: its objects, and the shape to print them back in."""

    objects: list[Any]
    shape: str  # "single" | "stream" | "list"
    envelope: dict[str, Any] | None = None  # the List itself, for shape "list"


def read_input(path: str, stdin: TextIO | None = None) -> Document:
    """The objects in ``path`` ('-' for stdin): YAML or JSON, one or several documents."""
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
    except IsADirectoryError:
        raise InputError(f"{path} is a directory: give a file (or '-' for stdin)") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text (YAML or JSON)") from None
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise InputError(f"{path} is not valid YAML or JSON{where}: {problem}; while parsing"
                         ) from None
    if not docs:
        raise InputError(f"{path} holds no object")
    if len(docs) == 1 and isinstance(docs[0], dict) and _is_list(docs[0]):
        items = docs[0].get("items")
        if not isinstance(items, list):
            raise InputError(f"{path}: a {docs[0].get('kind')} needs a list of items")
        return Document(items, "list", docs[0])
    return Document(docs, "single" if len(docs) == 1 else "stream")


def _is_list(doc: dict[str, Any]) -> bool:
    kind = doc.get("kind")
    return isinstance(kind, str) and (kind in LIST_KINDS or kind.endswith("List"))


def request_of(doc: Any, namespace: str | None) -> AdmissionRequest:
    """The AdmissionRequest for one object (or the request inside an AdmissionReview)."""
    if not isinstance(doc, dict):
        raise InputError("INPUT must be a Kubernetes object or an AdmissionReview")
    if doc.get("kind") == "AdmissionReview":
        return parse_review(doc)
    if not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
        raise InputError("INPUT has no apiVersion and kind: is it a Kubernetes object?")
    return request_for(doc, namespace=namespace, uid="poolkeeper-mutate")


def handled(request: AdmissionRequest, rules: Sequence[Rule]) -> bool:
    """Whether some rule in force acts on this kind of object."""
    key = (request.gvk.group, request.gvk.kind)
    if any(r.enforcement != "off" and key in r.match.kinds for r in rules):
        return True
    return template_path(*key) is not None and any(
        r.enforcement != "off" and r.policy.ON_TEMPLATES == "warn" and r.template_warnings
        for r in rules)


def describe_object(request: AdmissionRequest) -> str:
    """'Deployment team-payments/web', for messages about one of several objects."""
    name = request.display_name or "(unnamed)"
    where = f"{request.namespace}/{name}" if request.namespace else name
    return f"{request.gvk.kind} {quote(where)}"


@dataclass(frozen=True)
class Outcome:
    request: AdmissionRequest
    decision: Decision

    @property
    def result(self) -> Any:
        """The object after the patch (unchanged when denied or not patched)."""
        response = self.decision.response
        if response.allowed and response.patch:
            return jsonpatch.apply_patch(self.request.object, list(response.patch))
        return self.request.object


def judge(document: Document, rules: Sequence[Rule], namespaces: NamespaceLookup,
          namespace: str | None, err: TextIO,
          namespaces_file: str | None = None) -> list[Outcome]:
    """Judge every object; notes (unhandled kinds, namespaces missing from the file) on ``err``."""
    outcomes = []
    warned: set[str] = set()
    for doc in document.objects:
        request = request_of(doc, namespace)
        if not handled(request, rules):
            print(f"poolkeeper: no rule acts on {request.gvk.kind} "
                  f"({quote(_api_version(request))}): printed unchanged", file=err)
        elif (namespaces_file and request.namespace and request.gvk.kind != "Namespace"
              and request.namespace not in warned and namespaces(request.namespace) is None):
            warned.add(request.namespace)
            print(f"Warning: namespace {quote(request.namespace)} is not in {namespaces_file}: "
                  "treated as unlabelled", file=err)
        decision = admit(request, namespaces, rules)
        for failure in decision.errors:  # the server logs these; here there is no log
            print(f"poolkeeper: rule {failure.rule} failed and was skipped (onError: ignore), "
                  "a bug to report:\n" + "".join(traceback.format_exception(failure.error)),
                  end="", file=err)
        outcomes.append(Outcome(request, decision))
    return outcomes


def _api_version(request: AdmissionRequest) -> str:
    gvk = request.gvk
    return f"{gvk.group}/{gvk.version}" if gvk.group else gvk.version


def print_results(document: Document, outcomes: list[Outcome], output: str, out: TextIO,
                  err: TextIO) -> int:
    """Warnings and denials on ``err``, objects (or reviews) on ``out``; 1 if any was denied."""
    several = len(outcomes) > 1
    denied = 0
    for outcome in outcomes:
        response = outcome.decision.response
        prefix = f"{describe_object(outcome.request)}: " if several else ""
        for warning in response.warnings:
            print(f"Warning: {prefix}{warning}", file=err)
        if not response.allowed:
            denied += 1
            print(f"denied: {prefix}{response.message}", file=err)
    if output == "review":
        for outcome in outcomes:
            review = encode_review(outcome.request.uid, outcome.decision.response)
            print(orjson.dumps(orjson.loads(review), option=orjson.OPT_INDENT_2).decode(),
                  file=out)
        return 1 if denied else 0
    dump = _json_dump if output == "json" else _yaml_dump
    if document.shape == "single":
        if outcomes[0].decision.response.allowed:
            dump([outcomes[0].result], out)
    elif document.shape == "stream":
        dump([o.result for o in outcomes], out)
    else:
        envelope = dict(document.envelope or {})
        envelope["items"] = [o.result for o in outcomes]
        dump([envelope], out)
    return 1 if denied else 0


def _yaml_dump(documents: list[Any], out: TextIO) -> None:
    if len(documents) == 1:
        yaml.safe_dump(documents[0], out, sort_keys=False)
    else:
        yaml.safe_dump_all(documents, out, sort_keys=False)


def _json_dump(documents: list[Any], out: TextIO) -> None:
    for document in documents:  # one JSON document each, as kubectl -o json prints them
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode(), file=out)


def no_cluster_hint(message: str) -> str:
    """A kubeconfig problem, with what to do without a cluster."""
    return (f"{message}; to judge offline, give the namespaces as a file: "
            f"--namespaces FILE (e.g. kubectl get namespaces -o yaml > namespaces.yaml)")

