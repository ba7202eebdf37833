"""Owns what every namespace source shares: the protocol, its errors and the labels' type.

Kept apart from the package's ``__init__`` (which re-exports all of it) so that the file source,
and ``poolkeeper test`` through it, import no kubernetes client (see the import contracts in
setup.cfg).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from app.config import ConfigError

Labels = dict[str, str]


class NamespaceLookupError(Exception):
    """A namespace's labels cannot be known now (e.g. the API server is unreachable too long)."""


class NamespacesFileError(ConfigError):
    """The namespaces file cannot be read or does not hold Namespace objects."""


@runtime_checkable
class NamespaceSource(Protocol):
    def labels(self, name: str) -> Labels | None:
        """The namespace's labels; None if it does not exist. Raises NamespaceLookupError."""

    def ready(self) -> bool:
        """True once the first full listing (or the first file load) succeeded."""

    def start(self) -> None:
        """Start background threads (daemon threads); idempotent."""

    def stop(self) -> None:
        """Stop background threads promptly."""
