"""Owns the rules: rule kinds (pool placement and the defaults), loading rules/*.yaml, and the
rule set in force."""

from .base import NOTHING, LabelSelector, Match, Policy, Requirement, Rule, RuleContext, RuleResult
from .limits import RemoveResourceLimits
from .loader import (
                   DEFAULT_EXCLUDED_NAMESPACES,
                   ENFORCEMENTS,
                   ON_ERROR,
                   PATHS,
                   RULE_KINDS,
                   SHIPPED_RULES,
                   WEBHOOKS,
                   RulesError,
                   RuleSet,
                   load_rule_set,
                   load_rules,
                   parse_rule_file,
                   rules_digest,
)
from .namespace_labels import NamespaceLabels
from .pool import MIRROR_POD_ANNOTATION, PoolPlacement
from .pull_policy import ImagePullPolicy
from .store import RuleStore

__all__ = [
    "NOTHING", "LabelSelector", "Match", "Policy", "Requirement", "Rule", "RuleContext",
    "RuleResult", "ImagePullPolicy", "NamespaceLabels", "RemoveResourceLimits",
    "DEFAULT_EXCLUDED_NAMESPACES", "ENFORCEMENTS", "ON_ERROR", "PATHS", "RULE_KINDS",
    "SHIPPED_RULES", "WEBHOOKS",
    "RuleSet", "RuleStore", "RulesError", "load_rule_set", "load_rules", "parse_rule_file",
    "rules_digest", "MIRROR_POD_ANNOTATION",
    "PoolPlacement",
]
