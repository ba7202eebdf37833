"""Owns the decision: runs every rule over one request and composes a single response.

:func:`admit` is pure: given a request, a namespace lookup, the rules and optionally a node-pool
lookup, it returns a :class:`Decision`. It never touches the network itself (the lookups are
injected) and never
mutates the request. All rules run in one pass over one copy-on-write view, so their edits
compose into one patch; any ``enforce`` denial wins and the message names every rule that
denied. A rule in ``warn`` mode runs on a scratch view: its edits and denials become admission
warnings ("would ...") and nothing else; a rule that is ``off`` does not run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .kinds import template_path
from .namespaces.source import Namespace
from .patching import ObjectEditor, expect_map
from .review import (
    MUTATING_OPERATIONS,
    AdmissionRequest,
    AdmissionResponse,
    GroupVersionKind,
    allowed,
    denied,
    patched,
)
from .rules import Rule, RuleContext
from .rules.base import NamespaceLookup, NodeLookup

# A rule refusal is a policy decision about an authenticated user's object.
DENIAL_CODE = 403
# Warnings longer than this are truncated (admission warnings should stay under 120 characters;
# the API server drops ones over 256 and limits their total).
MAX_WARNING = 120


@dataclass(frozen=True, slots=True)
class Action:
    """What one rule did to one request, for logs, metrics and events."""

    rule: str
    effect: str  # mutated | denied | warned
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    response: AdmissionResponse
    actions: tuple[Action, ...] = field(default=())
    # the namespaces the rules looked up: name -> namespace, or None when it does not exist
    namespaces: Mapping[str, Namespace | None] = field(default_factory=dict)

    @property
    def rules(self) -> tuple[str, ...]:
        """Names of the rules that acted, each once, in order."""
        return tuple(dict.fromkeys(a.rule for a in self.actions))

    def rules_that(self, effect: str) -> tuple[str, ...]:
        """The rules that ``effect`` (mutated, denied, warned), each once, in order: the one
        answer the log line, the audit annotations and the metrics all give."""
        return tuple(dict.fromkeys(a.rule for a in self.actions if a.effect == effect))


# With a rule's docsURL appended a warning may be longer, up to what the API server keeps whole.
MAX_WARNING_WITH_URL = 256


def warning(rule: str, text: str, docs_url: str | None = None) -> str:
    message = f"[{rule}] {text}"
    message = message if len(message) < MAX_WARNING else message[:MAX_WARNING - 4] + "..."
    if docs_url and len(message) + len(docs_url) + 6 <= MAX_WARNING_WITH_URL:
        message += f"{'' if message.endswith('.') else '.'} See {docs_url}"
    return message


def _denial(rule: Rule, text: str) -> str:
    return f"[{rule.name}] {text}" + (f". See {rule.docs_url}" if rule.docs_url else "")


def admit(request: AdmissionRequest, namespaces: NamespaceLookup,
          rules: Sequence[Rule], nodes: NodeLookup | None = None) -> Decision:
    if request.operation not in MUTATING_OPERATIONS or request.object is None:
        return Decision(allowed())  # DELETE and CONNECT are never mutated
    editor = ObjectEditor(request.object)
    ctx = RuleContext(request, namespaces, nodes=nodes)
    template = _template_pod(request)
    denials: list[str] = []
    warnings: list[str] = []
    actions: list[Action] = []
    audit: dict[str, str] = {}
    for rule in rules:
        if rule.enforcement == "off":
            continue
        if template is not None and rule.policy.ON_TEMPLATES == "warn":
            # a pod rule on a pod controller: the template is never changed (a GitOps tool
            # would see drift); the pods get the rule when they are created
            if rule.template_warnings:
                text = _template_warning(rule, RuleContext(template, namespaces, ctx.looked_up,
                                                           nodes), request.gvk.kind)
                if text:
                    warnings.append(warning(rule.name, text, rule.docs_url))
                    actions.append(Action(rule.name, "warned", text))
            continue
        if not rule.match.matches(ctx):
            continue
        if rule.enforcement == "warn":
            result = rule.policy.evaluate(ctx, ObjectEditor(editor.current))
            would = [f"would {e}" for e in result.effects]
            would += [f"would deny: {d}" for d in result.denials]
            for text in (*would, *result.warnings):
                warnings.append(warning(rule.name, text, rule.docs_url))
                actions.append(Action(rule.name, "warned", text))
            continue
        result = rule.policy.evaluate(ctx, editor)
        audit.update(result.audit)
        for effect in result.effects:
            actions.append(Action(rule.name, "mutated", effect))
        for text in result.denials:
            denials.append(_denial(rule, text))
            actions.append(Action(rule.name, "denied", text))
        for text in result.warnings:
            warnings.append(warning(rule.name, text, rule.docs_url))
            actions.append(Action(rule.name, "warned", text))
    if denials:
        return Decision(denied(DENIAL_CODE, "; ".join(denials), warnings), tuple(actions),
                        ctx.looked_up)
    if editor.ops:
        # auditAnnotations keys get the webhook's name as prefix from the API server, which
        # drops keys that would then hold two slashes: keep them plain.
        acted = Decision(allowed(), tuple(actions))
        audit["rules"] = ",".join(acted.rules_that("mutated"))
        if acted.rules_that("warned"):
            audit["warned"] = ",".join(acted.rules_that("warned"))
        return Decision(patched(editor.ops, warnings, audit), tuple(actions), ctx.looked_up)
    return Decision(allowed(warnings), tuple(actions), ctx.looked_up)


def _template_pod(request: AdmissionRequest) -> AdmissionRequest | None:
    """For a pod controller, the CREATE of a pod made from its template (what its controller
    will ask for); None for other kinds."""
    path = template_path(request.gvk.group, request.gvk.kind)
    if path is None or request.object is None:
        return None
    template = expect_map(request.object, path)
    metadata = dict(expect_map(template, ("metadata",)))
    if request.namespace:
        metadata["namespace"] = request.namespace
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
           "spec": expect_map(template, ("spec",))}
    return AdmissionRequest(uid=request.uid, gvk=GroupVersionKind("", "v1", "Pod"),
                            operation="CREATE", namespace=request.namespace, name="",
                            object=pod, old_object=None, dry_run=request.dry_run,
                            user=request.user)


def _template_warning(rule: Rule, pod: RuleContext, kind: str) -> str | None:
    """What a pod rule would do to the pods of a controller, in words; None when nothing."""
    if not rule.match.matches(pod) or pod.request.object is None:
        return None
    result = rule.policy.evaluate(pod, ObjectEditor(pod.request.object))
    if not result.effects:
        return None
    return f"pods of this {kind} will get: {'; '.join(result.effects)}"
