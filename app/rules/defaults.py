"""Owns the defaulting rule kinds: namespace labels, image pull policy, removal of resource limits."""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Iterator, Mapping

from ..patching import ObjectEditor, ObjectShapeError, Path, expect_list, expect_map, lookup
from .base import NOTHING, Param, RuleContext, RuleResult
from .params import label_key, label_map, name_list, one_of, optional_regex


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class NamespaceLabels:
    """Labels every new namespace: fixed labels, plus a system id taken from its name.

    ``systemIdLabel`` gets the name up to the first '-' (the whole name when it has none).
    Existing values of these keys are overwritten. An optional ``namePattern`` is checked with
    its own enforcement (``namePatternEnforcement``).
    """

    KIND = "NamespaceLabels"
    KINDS = ("Namespace",)
    OPERATIONS = ("CREATE",)
    PARAMS = {
        "labels": Param({"type": "user-workload"}, label_map,
                        "labels set on every new namespace; existing values are overwritten"),
        "systemIdLabel": Param("systemid", label_key,
                               "label that gets the namespace name up to the first '-'"),
        "namePattern": Param(r"^[0-9]{5}-[a-z0-9]+-(dev|test|prod)$", optional_regex,
                             "regular expression new namespace names should match; null: none"),
        "namePatternEnforcement": Param("warn", one_of("enforce", "warn", "off"),
                                        "what a name that does not match the pattern gets"),
    }

    def __init__(self, labels: Mapping[str, str] = PARAMS["labels"].default,
                 systemIdLabel: str = "systemid",
                 namePattern: str | None = PARAMS["namePattern"].default,
                 namePatternEnforcement: str = "warn"):
        self.labels = dict(labels)
        self.system_id_label = systemIdLabel
        self.name_pattern = re.compile(namePattern) if namePattern else None
        self.name_pattern_enforcement = namePatternEnforcement

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        meta = expect_map(editor.current, ("metadata",))
        name = ctx.request.name or meta.get("name") or ""
        generate_name = meta.get("generateName") or ""
        if not isinstance(name, str) or not isinstance(generate_name, str):
            raise ObjectShapeError("metadata.name and metadata.generateName must be strings")
        wanted = dict(self.labels)
        system_id = (name or generate_name).split("-", 1)[0]
        if system_id:
            wanted[self.system_id_label] = system_id
        changed = [f"{key}={value}" for key, value in wanted.items()
                   if editor.set(("metadata", "labels", key), value)]
        effects = (f"set labels {', '.join(changed)}",) if changed else ()
        if not (self.name_pattern and name and self.name_pattern_enforcement != "off"
                and not self.name_pattern.search(name)):
            return RuleResult(effects=effects)
        problem = f"namespace name {name!r} does not match {self.name_pattern.pattern}"
        if self.name_pattern_enforcement == "enforce":
            return RuleResult(effects=effects, denials=(f"{problem}; choose a name that does",))
        return RuleResult(effects=effects, warnings=(problem,))


def _containers(obj: dict) -> Iterator[tuple[Path, dict]]:
    """(path, container) for every init container and container of a pod."""
    for field in ("initContainers", "containers"):
        for index, container in enumerate(expect_list(obj, ("spec", field))):
            if isinstance(container, dict):
                yield ("spec", field, index), container


class ImagePullPolicy:
    """Sets ``imagePullPolicy`` on every container and init container.

    The API server has already defaulted the field (Always for ``:latest`` or untagged images,
    else IfNotPresent) before webhooks run, so this is an override.
    """

    KIND = "ImagePullPolicy"
    KINDS = ("Pod",)
    OPERATIONS = ("CREATE",)
    PARAMS = {
        "policy": Param("Always", one_of("Always", "IfNotPresent", "Never"),
                        "the imagePullPolicy every container gets"),
    }

    def __init__(self, policy: str = "Always"):
        self.policy = policy

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        changed = sum(editor.set((*path, "imagePullPolicy"), self.policy)
                      for path, _ in list(_containers(editor.current)))
        if not changed:
            return NOTHING
        return RuleResult(effects=(
            f"set imagePullPolicy={self.policy} on {_plural(changed, 'container')}",))


# Resource names: optional DNS prefix and '/', then a name (core/v1 ResourceName).
_RESOURCE_NAME = r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"


class RemoveResourceLimits:
    """Removes resource limits (default: cpu) from every container and init container.

    ``limits`` itself goes when it becomes empty; requests and other limits stay. Pods annotated
    ``<keepAnnotation>: "true"`` are left alone. A Guaranteed pod that becomes Burstable gets a
    warning.
    """

    KIND = "RemoveResourceLimits"
    KINDS = ("Pod",)
    OPERATIONS = ("CREATE",)
    PARAMS = {
        "resources": Param(["cpu"], name_list(_RESOURCE_NAME, "resource names such as cpu"),
                           "the limits to remove"),
        "keepAnnotation": Param("poolkeeper.io/keep-limits", label_key,
                                'pods with this annotation set to "true" keep their limits'),
    }

    def __init__(self, resources: list[str] = ("cpu",),  # type: ignore[assignment]
                 keepAnnotation: str = "poolkeeper.io/keep-limits"):
        self.resources = tuple(resources)
        self.keep_annotation = keepAnnotation

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        obj = editor.current
        if expect_map(obj, ("metadata", "annotations")).get(self.keep_annotation) == "true":
            return NOTHING
        containers = list(_containers(obj))
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
        # Guaranteed needs cpu and memory limits on every container: removing either ends it.
        if was_guaranteed and any(r in ("cpu", "memory") for _, present, _ in removals
                                  for r in present):
            return RuleResult(effects=effects, warnings=(
                f"QoS class changes from Guaranteed to Burstable: {'/'.join(self.resources)} "
                "limits removed",))
        return RuleResult(effects=effects)


_LIMITS = ("resources", "limits")


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                       r"(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
             "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
             "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2**10),
             "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
             "Pi": Decimal(2**50), "Ei": Decimal(2**60)}


def parse_quantity(value: object) -> Decimal | None:
    """A resource.Quantity string ('500m', '1Gi', '1e3') as a number; None when it is not one."""
    if isinstance(value, str):
        return _parse_quantity_text(value)
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
    if a == b:  # the usual case: requests defaulted from limits by the API server
        return True
    qa, qb = parse_quantity(a), parse_quantity(b)
    return qa == qb if qa is not None and qb is not None else a == b


def _resource_map(container: dict, part: str) -> dict:
    value = lookup(container, ("resources", part), {})
    return value if isinstance(value, dict) else {}


def is_guaranteed(pod: dict) -> bool:
    """Every container has cpu and memory limits, and requests (defaulted from limits by the
    API server) equal them; stops at the first container that does not."""
    return _guaranteed([c for _, c in _containers(pod)])


def _guaranteed(containers: list[dict]) -> bool:
    for container in containers:
        requests, limits = _resource_map(container, "requests"), _resource_map(container, "limits")
        for resource in ("cpu", "memory"):
            if resource not in limits or (resource in requests and
                                          not _same_quantity(requests[resource], limits[resource])):
                return False
    return bool(containers)


def qos_class(pod: dict) -> str:
    """Guaranteed, Burstable or BestEffort, as the kubelet computes it from cpu and memory.

    BestEffort: no container requests or limits cpu or memory.
    """
    if is_guaranteed(pod):
        return "Guaranteed"
    for _, container in _containers(pod):
        requests, limits = _resource_map(container, "requests"), _resource_map(container, "limits")
        if any(r in requests or r in limits for r in ("cpu", "memory")):
            return "Burstable"
    return "BestEffort"
