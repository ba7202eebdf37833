"""Owns what every namespace source shares: the protocol, its errors, and what a source knows of
a namespace (its labels, and the few annotations the rules read).

Kept apart from the package's ``__init__`` (which re-exports all of it) so that the file source,
and ``poolkeeper test`` through it, import no kubernetes client (see the import contracts in
setup.cfg).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from app.config import ConfigError

Labels = dict[str, str]

# The only annotations the sources keep: the rules' params may only name annotations under this
# prefix (e.g. poolkeeper.io/allowed-pools), and every other annotation (last-applied
# configurations, tool state: often kilobytes) is dropped when a namespace is read.
KEPT_ANNOTATIONS = "poolkeeper.io/"

_NONE: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Namespace:
    """What the rules may know of a namespace: its labels and its kept annotations."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=lambda: _NONE)


def kept_annotations(metadata: Mapping[str, Any]) -> Mapping[str, str]:
    """The annotations of ``metadata`` a source keeps (those under KEPT_ANNOTATIONS and whose
    values are strings); a shared empty map when there are none, the usual case."""
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict) or not annotations:
        return _NONE
    kept = {k: v for k, v in annotations.items()
            if isinstance(k, str) and k.startswith(KEPT_ANNOTATIONS) and isinstance(v, str)}
    return kept or _NONE


class NamespaceLookupError(Exception):
    """A namespace's labels cannot be known now (e.g. the API server is unreachable too long)."""


class NamespacesFileError(ConfigError):
    """The namespaces file cannot be read or does not hold Namespace objects."""


@runtime_checkable
class NamespaceSource(Protocol):
    def namespace(self, name: str) -> Namespace | None:
        """The namespace's labels and kept annotations; None if it does not exist. Raises
        NamespaceLookupError."""

    def labels(self, name: str) -> Labels | None:
        """The namespace's labels; None if it does not exist. Raises NamespaceLookupError."""

    def ready(self) -> bool:
        """True once the first full listing (or the first file load) succeeded."""

    def start(self) -> None:
        """Start background threads (daemon threads); idempotent."""

    def stop(self) -> None:
        """Stop background threads promptly."""
