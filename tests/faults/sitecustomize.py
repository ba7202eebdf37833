"""Fault injection for the apiserver tier: put this directory on PYTHONPATH of one `poolkeeper
serve` and Python loads it at start-up, in the CLI and in every gunicorn process.

It stands in for a bug in a rule: a shipped rule kind raises RuntimeError when the pod it judges
carries the annotation FAULT_ANNOTATION naming that kind (e.g. ``RemoveResourceLimits``). Nothing
else changes, so the server, its rules and the API server in front of it are the real ones.
"""

from __future__ import annotations

import functools

from app.rules import ImagePullPolicy, PoolPlacement, RemoveResourceLimits

FAULT_ANNOTATION = "poolkeeper.test/raise-in"


def _inject(kind: type) -> None:
    evaluate = kind.evaluate

    @functools.wraps(evaluate)
    def faulty(self, ctx, editor):
        metadata = (ctx.request.object or {}).get("metadata") or {}
        if (metadata.get("annotations") or {}).get(FAULT_ANNOTATION) == kind.KIND_NAME:
            raise RuntimeError(f"fault injected into {kind.KIND_NAME} by tests/faults")
        return evaluate(self, ctx, editor)

    kind.evaluate = faulty


for _kind in (PoolPlacement, ImagePullPolicy, RemoveResourceLimits):
    _inject(_kind)
