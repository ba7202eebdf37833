"""Owns the decision: runs every rule over one request and composes a single response.

:func:`admit` is pure: given a request, a namespace-label lookup and the rules, it returns an
:class:`~app.review.AdmissionResponse`. It never touches the network itself (the lookup is
injected) and never mutates the request. All rules run in one pass over one copy-on-write view,
so their edits compose into one patch; any denial wins and the message names every rule that
denied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .patching import ObjectEditor
from .review import MUTATING_OPERATIONS, AdmissionRequest, AdmissionResponse, allowed, denied, patched
from .rules import Rule, RuleContext

NamespaceLookup = Callable[[str], Mapping[str, str] | None]

# A rule refusal is a policy decision about an authenticated user's object.
DENIAL_CODE = 403


@dataclass(frozen=True, slots=True)
class Decision:
    """The response plus what the log line needs: which rules acted."""

    response: AdmissionResponse
    rules: tuple[str, ...] = ()


def admit(request: AdmissionRequest, namespace_labels: NamespaceLookup,
          rules: Sequence[Rule]) -> Decision:
    if request.operation not in MUTATING_OPERATIONS or request.object is None:
        return Decision(allowed())  # DELETE and CONNECT are never mutated
    editor = ObjectEditor(request.object)
    ctx = RuleContext(request, namespace_labels)
    denials: list[str] = []
    warnings: list[str] = []
    acted: list[str] = []
    for rule in rules:
        ops_before = len(editor.ops)
        result = rule.evaluate(ctx, editor)
        denials.extend(result.denials)
        warnings.extend(result.warnings)
        if result.denials or result.warnings or len(editor.ops) != ops_before:
            acted.append(rule.name)
    if denials:
        return Decision(denied(DENIAL_CODE, "; ".join(denials), warnings), tuple(acted))
    if editor.ops:
        return Decision(patched(editor.ops, warnings), tuple(acted))
    return Decision(allowed(warnings), tuple(acted))
