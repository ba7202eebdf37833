"""Owns the rule set in force: loaded from a directory, swapped whole when the directory changes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..watch import FileWatcher, StatSignature, process_watcher, stat_signature
from .base import Rule
from .loader import RulesError, RuleSet, by_path, load_rule_set, rule_files

log = logging.getLogger("poolkeeper.rules")


class RuleStore:
    """The rule set in force, reloaded when the directory changes (a ConfigMap update).

    The file watcher (default: this process's; see :mod:`app.watch`) notices a change off the
    request path. A new set that does not validate is refused, the running set kept, and the
    error logged once per change. ``rules()`` only reads an attribute. ``digest`` says which set
    is in force (:func:`~app.rules.loader.rules_digest`), ``loaded_at`` since when (Unix time).
    """

    def __init__(self, directory: str | os.PathLike[str], *,
                 watcher: FileWatcher | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self._clock = clock
        signature = self._signature()
        self._state = _State(load_rule_set(self.directory), clock())
        (watcher or process_watcher()).watch(f"rules {self.directory}", self._signature,
                                             self._reload, initial=signature)

    def rules(self, path: str | None = None) -> tuple[Rule, ...]:
        """The rules in force; only those served on /mutate/<path> when one is named."""
        state = self._state
        return state.rules if path is None else state.by_path.get(path, ())

    @property
    def digest(self) -> str:
        """The digest of the rule set in force."""
        return self._state.digest

    @property
    def loaded_at(self) -> float:
        """Unix time the rule set in force was loaded."""
        return self._state.loaded_at

    def _signature(self) -> tuple[tuple[str, StatSignature], ...] | str:
        try:
            # stat_signature follows the ConfigMap's ..data symlinks
            return tuple((p.name, stat_signature(p)) for p in rule_files(self.directory))
        except OSError as exc:
            return f"error: {exc}"

    def _reload(self) -> None:
        # Imported here: `poolkeeper serve` loads the rules to check them before gunicorn sets up
        # the multiprocess metrics directory, which must come before prometheus_client's import.
        from .. import metrics

        try:
            rule_set = load_rule_set(self.directory)
        except RulesError as exc:
            metrics.RULES_RELOADS.labels("failure").inc()
            log.error("refused the changed rules in %s, keeping the %d rules in force: %s",
                      self.directory, len(self._state.rules), exc)
            return
        self._state = _State(rule_set, self._clock())
        rules = rule_set.rules
        metrics.RULES_RELOADS.labels("success").inc()
        metrics.initialise_rules(rule.name for rule in rules)
        log.info("loaded %d rules from %s (digest %s): %s", len(rules), self.directory,
                 rule_set.digest[:12], ", ".join(f"{r.name} ({r.enforcement})" for r in rules))


class _State:
    """One loaded set, swapped whole so a reader never sees rules and digest of two sets."""

    __slots__ = ("rules", "by_path", "digest", "loaded_at")

    def __init__(self, rule_set: RuleSet, loaded_at: float) -> None:
        self.rules = rule_set.rules
        self.by_path = by_path(rule_set.rules)
        self.digest = rule_set.digest
        self.loaded_at = loaded_at
