"""Owns the RemoveResourceLimits rule kind: removes resource limits (cpu by default) from pods."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from ..patching import ObjectEditor, ObjectShapeError, Path, expect_list, expect_map, lookup
from ..text import quote
from .base import NOTHING, Param, RuleContext, RuleResult, pod_containers
from .params import label_key, name_list


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# Resource names: optional DNS prefix and '/', then a name (core/v1 ResourceName).
_RESOURCE_NAME = r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"


class RemoveResourceLimits:
    """Removes resource limits (default: cpu) from every container and init container.

    ``limits`` itself goes when it becomes empty; requests and other limits stay. Pods annotated
    ``<keepAnnotation>: "true"`` are left alone. A Guaranteed pod that becomes Burstable gets a
    warning.
    """

    KIND_NAME = "RemoveResourceLimits"
    OBJECT_KINDS: tuple[str, ...] = ("Pod",)
    OPERATIONS: tuple[str, ...] = ("CREATE",)
    ON_TEMPLATES = "warn"
    PARAMS = {
        # the limits to remove
        "resources": Param(["cpu"], name_list(_RESOURCE_NAME, "resource names such as cpu")),
        # pods with this annotation set to "true" keep their limits
        "keepAnnotation": Param("poolkeeper.io/keep-limits", label_key),
    }

    def __init__(self, resources: Sequence[str] = ("cpu",),
                 keepAnnotation: str = "poolkeeper.io/keep-limits"):
        self.resources = tuple(resources)
        self.keep_annotation = keepAnnotation

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        obj = editor.current
        if expect_map(obj, ("metadata", "annotations")).get(self.keep_annotation) == "true":
            return NOTHING
        containers = list(pod_containers(obj))
        removals = []
        for path, container in containers:
            limits = expect_map(container, _LIMITS)
            present = [r for r in self.resources if r in limits]
            if present:
                removals.append(((*path, *_LIMITS), present, len(present) == len(limits)))
        if not removals:
            return NOTHING
        # QoS only matters when something goes; it needs every quantity parsed, so only then.
        was_guaranteed = _guaranteed([container for _, container in containers])
        for limits_path, present, all_of_them in removals:
            if all_of_them:
                editor.remove(limits_path)
            else:
                for resource in present:
                    editor.remove((*limits_path, resource))
        effects = (f"remove {'/'.join(self.resources)} limits from "
                   f"{_plural(len(removals), 'container')}",)
        warnings = []
        # Guaranteed needs cpu and memory limits on every container: removing either ends it.
        if was_guaranteed and any(r in ("cpu", "memory") for _, present, _ in removals
                                  for r in present):
            warnings.append(f"QoS class changes from Guaranteed to Burstable: "
                            f"{'/'.join(self.resources)} limits removed")
        by_path = {tuple(path): container for path, container in containers}
        removed = {_container_name(by_path[tuple(path)]): set(present)
                   for (*path, _, _), present, _ in removals}
        warnings += _references_to_removed(obj, containers, removed)
        return RuleResult(effects=effects, warnings=tuple(warnings))


_LIMITS = ("resources", "limits")
# Warnings about references to a removed limit: the first few, then a count.
_MAX_REFERENCE_WARNINGS = 3


def _container_name(container: dict) -> str:
    name = container.get("name")
    return name if isinstance(name, str) else ""


def _references_to_removed(pod: dict, containers: list[tuple[Path, dict]],
                           removed: dict[str, set[str]]) -> list[str]:
    """Warnings for downward API references (env valueFrom, downwardAPI and projected volumes)
    to a limit this rule removes: they then read the node's allocatable amount instead."""
    found: list[str] = []

    def check(ref: object, default_container: str, where: str) -> None:
        if not isinstance(ref, dict):
            return
        resource, target = ref.get("resource"), ref.get("containerName") or default_container
        if not isinstance(resource, str) or not isinstance(target, str):
            return
        if resource.startswith("limits.") and resource[7:] in removed.get(target, ()):
            of = "" if target == default_container else f" of {quote(target)}"
            found.append(f"{where} reads removed {resource}{of}: it gets the node's "
                         f"allocatable {resource[7:]}")

    for _, container in containers:
        found_name = container.get("name")
        name = found_name if isinstance(found_name, str) else ""
        for env in expect_list(container, ("env",)):
            # a pod has dozens of plain env vars: look at each cheaply, word only a reference
            value_from = env.get("valueFrom") if isinstance(env, dict) else None
            ref = value_from.get("resourceFieldRef") if isinstance(value_from, dict) else None
            if ref is not None:
                check(ref, name, f"container {quote(name)} env {quote(env.get('name'))}")
    for volume in expect_list(pod, ("spec", "volumes")):
        if not isinstance(volume, dict):
            continue
        sources = [volume.get("downwardAPI")] + [
            source.get("downwardAPI") for source in expect_list(volume, ("projected", "sources"))
            if isinstance(source, dict)]
        for source in sources:
            for item in expect_list(source, ("items",)) if isinstance(source, dict) else ():
                if isinstance(item, dict) and (ref := item.get("resourceFieldRef")):
                    check(ref, "", f"volume {quote(volume.get('name'))} {quote(item.get('path'))}")
    if len(found) > _MAX_REFERENCE_WARNINGS:
        extra = len(found) - _MAX_REFERENCE_WARNINGS
        found = found[:_MAX_REFERENCE_WARNINGS] + [f"and {extra} more references to removed "
                                                   "limits"]
    return found


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                       r"(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
             "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
             "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2**10),
             "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
             "Pi": Decimal(2**50), "Ei": Decimal(2**60)}


# Longer strings are not quantities: the API server's own grammar (k8s.io/apimachinery
# resource.ParseQuantity) admits a number, a suffix and an exponent, and real ones are a handful
# of characters. The bound also keeps the parse cache below small.
MAX_QUANTITY_LENGTH = 64


def parse_quantity(value: object) -> Decimal | None:
    """A resource.Quantity string ('500m', '1Gi', '1e3') as a number; None when it is not one."""
    if isinstance(value, str):
        return _parse_quantity_text(value) if len(value) <= MAX_QUANTITY_LENGTH else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Decimal(str(value))
    return None


# Pods repeat a handful of quantities ("500m", "1Gi"); a Decimal is immutable, so share it.
@functools.lru_cache(maxsize=1024)
def _parse_quantity_text(value: str) -> Decimal | None:
    match = _QUANTITY.match(value.strip())
    if not match:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIXES[suffix]
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
        return None


def _same_quantity(a: object, b: object) -> bool:
    """Whether two quantities are equal; ObjectShapeError when either is not a quantity (the API
    server rejects such a pod, so only a forged review carries one)."""
    return _quantity(a) == _quantity(b)


def _quantity(value: object) -> Decimal:
    quantity = parse_quantity(value)
    if quantity is None:
        raise ObjectShapeError(f"resource quantity {quote(value)} is not a quantity (such as "
                               "500m, 2 or 1Gi)")
    return quantity


def _resource_map(container: dict, part: str) -> dict:
    value = lookup(container, ("resources", part), {})
    return value if isinstance(value, dict) else {}


def _guaranteed(containers: list[dict]) -> bool:
    for container in containers:
        requests, limits = _resource_map(container, "requests"), _resource_map(container, "limits")
        for resource in ("cpu", "memory"):
            if resource not in limits or (resource in requests and
                                          not _same_quantity(requests[resource], limits[resource])):
                return False
    return bool(containers)
