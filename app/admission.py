"""Owns the decision: runs every rule over one request and composes a single response.

:func:`admit` is pure: given a request, a namespace lookup, the rules and optionally a node-pool
lookup, it returns a :class:`Decision`. It never touches the network itself (the lookups are
injected) and never
mutates the request. All rules run in one pass over one copy-on-write view, so their edits
compose into one patch; any ``enforce`` denial wins and the message names every rule that
denied. A rule in ``warn`` mode runs on a scratch view: its edits and denials become admission
warnings ("would ...") and nothing else; a rule that is ``off`` does not run.

A rule that raises (a bug, or a namespace lookup that cannot be answered) does as its
``onError`` says: ``fail`` lets the exception out (the transport answers 500, so the webhook's
failurePolicy decides); ``ignore`` skips the rule as if it had not run, with an admission
warning, and the :class:`Decision` lists it in ``errors`` for the transport to log and count. A
malformed object (:class:`~app.patching.ObjectShapeError`, deep nesting) is the request's fault,
not the rule's: it always gets out (a 400).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .kinds import template_path
from .namespaces.source import Namespace, NamespaceLookupError
from .patching import ObjectEditor, ObjectShapeError, expect_map
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
class RuleError:
    """A rule with ``onError: ignore`` that raised and was skipped."""

    rule: str
    error: Exception


@dataclass(frozen=True, slots=True)
class Decision:
    response: AdmissionResponse
    actions: tuple[Action, ...] = field(default=())
    # the namespaces the rules looked up: name -> namespace, or None when it does not exist
    namespaces: Mapping[str, Namespace | None] = field(default_factory=dict)
    errors: tuple[RuleError, ...] = field(default=())

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


SKIPPED = "not applied: it failed in poolkeeper (a bug; its log has the details)"
# The same for a rule that needed namespace labels nobody can tell (an outage, not a bug).
SKIPPED_UNKNOWN_LABELS = ("not applied: the namespace's labels cannot be known now (poolkeeper's "
                          "log has the details)")
# The request's own fault, whichever rule meets it: never skipped, always a 400.
_BAD_INPUT = (ObjectShapeError, RecursionError)


def _denial(rule: Rule, text: str) -> str:
    return f"[{rule.name}] {text}" + (f". See {rule.docs_url}" if rule.docs_url else "")


def admit(request: AdmissionRequest, namespaces: NamespaceLookup,
          rules: Sequence[Rule], nodes: NodeLookup | None = None) -> Decision:
    if request.operation not in MUTATING_OPERATIONS or request.object is None:
        return Decision(allowed())  # DELETE and CONNECT are never mutated
    editor = ObjectEditor(request.object)
    ctx = RuleContext(request, namespaces, nodes=nodes)
    template = _template_pod(request)
    # a pod controller: the pod rules see the pod its template makes
    pod = None if template is None else RuleContext(template, namespaces, ctx.looked_up, nodes)
    denials: list[str] = []
    warnings: list[str] = []
    actions: list[Action] = []
    audit: dict[str, str] = {}
    errors: list[RuleError] = []
    for rule in rules:
        if rule.enforcement == "off":
            continue
        try:
            outcome = _outcome(rule, ctx, editor, pod)
        except _BAD_INPUT:
            raise
        except Exception as exc:
            if rule.on_error == "fail":  # the request fails: the webhook's failurePolicy decides
                raise
            errors.append(RuleError(rule.name, exc))
            warnings.append(warning(rule.name, SKIPPED_UNKNOWN_LABELS if isinstance(
                exc, NamespaceLookupError) else SKIPPED))
            continue
        if outcome is None:
            continue
        actions.extend(outcome.actions)
        denials.extend(outcome.denials)
        warnings.extend(outcome.warnings)
        audit.update(outcome.audit)
    if denials:
        return Decision(denied(DENIAL_CODE, "; ".join(denials), warnings), tuple(actions),
                        ctx.looked_up, tuple(errors))
    if editor.ops:
        # auditAnnotations keys get the webhook's name as prefix from the API server, which
        # drops keys that would then hold two slashes: keep them plain.
        acted = Decision(allowed(), tuple(actions))
        audit["rules"] = ",".join(acted.rules_that("mutated"))
        if acted.rules_that("warned"):
            audit["warned"] = ",".join(acted.rules_that("warned"))
        return Decision(patched(editor.ops, warnings, audit), tuple(actions), ctx.looked_up,
                        tuple(errors))
    return Decision(allowed(warnings), tuple(actions), ctx.looked_up, tuple(errors))


@dataclass(slots=True)
class _Outcome:
    """What one rule contributes to the answer, merged only once it has run to the end."""

    actions: list[Action] = field(default_factory=list)
    denials: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    audit: tuple[tuple[str, str], ...] = ()

    def warn(self, rule: Rule, text: str) -> None:
        self.warnings.append(warning(rule.name, text, rule.docs_url))
        self.actions.append(Action(rule.name, "warned", text))


def _outcome(rule: Rule, ctx: RuleContext, editor: ObjectEditor,
             pod: RuleContext | None) -> _Outcome | None:
    """What ``rule`` does to the request (None: it does not apply). A rule that may be skipped
    (onError: ignore) edits a fork of ``editor``, adopted only once it has run to the end."""
    outcome = _Outcome()
    if pod is not None and rule.policy.ON_TEMPLATES == "warn":
        # a pod rule on a pod controller: the template is never changed (a GitOps tool would
        # see drift); the pods get the rule when they are created
        if rule.template_warnings:
            text = _template_warning(rule, pod, ctx.request.gvk.kind)
            if text:
                outcome.warn(rule, text)
        return outcome
    if not rule.match.matches(ctx):
        return None
    if rule.enforcement == "warn":  # on a scratch view: nothing it does reaches the patch
        result = rule.policy.evaluate(ctx, ObjectEditor(editor.current))
        would = [f"would {e}" for e in result.effects]
        would += [f"would deny: {d}" for d in result.denials]
        for text in (*would, *result.warnings):
            outcome.warn(rule, text)
        return outcome
    target = editor if rule.on_error == "fail" else editor.fork()
    result = rule.policy.evaluate(ctx, target)
    if target is not editor:
        editor.adopt(target)
    outcome.audit = result.audit
    for effect in result.effects:
        outcome.actions.append(Action(rule.name, "mutated", effect))
    for text in result.denials:
        outcome.denials.append(_denial(rule, text))
        outcome.actions.append(Action(rule.name, "denied", text))
    for text in result.warnings:
        outcome.warn(rule, text)
    return outcome


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
