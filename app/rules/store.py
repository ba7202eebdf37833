"""Owns the rule set in force: loaded from a directory, swapped whole when the directory changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..watch import FileWatcher, StatSignature, process_watcher, stat_signature
from .base import Rule
from .loader import WEBHOOKS, RulesError, load_rules, rule_files

log = logging.getLogger("poolkeeper.rules")


class RuleStore:
    """The rule set in force, reloaded when the directory changes (a ConfigMap update).

    The file watcher (default: this process's; see :mod:`app.watch`) notices a change off the
    request path. A new set that does not validate is refused, the running set kept, and the
    error logged once per change. ``rules()`` only reads an attribute.
    """

    def __init__(self, directory: str | os.PathLike[str], *,
                 watcher: FileWatcher | None = None) -> None:
        self.directory = Path(directory)
        signature = self._signature()
        self._rules = load_rules(self.directory)
        self._by_webhook = _group(self._rules)
        (watcher or process_watcher()).watch(f"rules {self.directory}", self._signature,
                                             self._reload, initial=signature)

    def rules(self, webhook: str | None = None) -> tuple[Rule, ...]:
        """The rules in force; only those served on /mutate/<webhook> when one is named."""
        return self._rules if webhook is None else self._by_webhook.get(webhook, ())

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
            rules = load_rules(self.directory)
        except RulesError as exc:
            metrics.RULES_RELOADS.labels("failure").inc()
            log.error("refused the changed rules in %s, keeping the %d rules in force: %s",
                      self.directory, len(self._rules), exc)
            return
        self._rules, self._by_webhook = rules, _group(rules)
        metrics.RULES_RELOADS.labels("success").inc()
        log.info("loaded %d rules from %s: %s", len(rules), self.directory,
                 ", ".join(f"{r.name} ({r.enforcement})" for r in rules))


def _group(rules: tuple[Rule, ...]) -> dict[str, tuple[Rule, ...]]:
    return {w: tuple(r for r in rules if r.webhook == w) for w in WEBHOOKS}
