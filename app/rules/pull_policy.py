"""Owns the ImagePullPolicy rule kind: one imagePullPolicy for every container of a pod."""

from __future__ import annotations

from ..patching import ObjectEditor
from .base import NOTHING, Param, RuleContext, RuleResult, pod_containers
from .params import one_of


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class ImagePullPolicy:
    """Sets ``imagePullPolicy`` on every container and init container.

    The API server has already defaulted the field (Always for ``:latest`` or untagged images,
    else IfNotPresent) before webhooks run, so this is an override.
    """

    KIND_NAME = "ImagePullPolicy"
    OBJECT_KINDS: tuple[str, ...] = ("Pod",)
    OPERATIONS: tuple[str, ...] = ("CREATE",)
    ON_TEMPLATES = "warn"
    PARAMS = {
        # the imagePullPolicy every container gets
        "policy": Param("Always", one_of("Always", "IfNotPresent", "Never")),
    }

    def __init__(self, policy: str = "Always"):
        self.policy = policy

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        changed = sum(editor.set((*path, "imagePullPolicy"), self.policy)
                      for path, _ in list(pod_containers(editor.current)))
        if not changed:
            return NOTHING
        return RuleResult(effects=(
            f"set imagePullPolicy={self.policy} on {_plural(changed, 'container')}",))
