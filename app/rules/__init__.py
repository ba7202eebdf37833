"""Owns the rules: rule kinds (pool placement and the defaults) and the loading of rules/*.yaml."""

from .base import (KNOWN_KINDS, NOTHING, LabelSelector, Match, Requirement, Rule, RuleContext,
                   RuleKind, RuleResult)
from .defaults import ImagePullPolicy, NamespaceLabels, RemoveResourceLimits, qos_class
from .loader import (ENFORCEMENTS, RULE_KINDS, SHIPPED_RULES, WEBHOOKS, RuleStore, RulesError,
                     load_rules, parse_rule_file)
from .pool import MIRROR_POD_ANNOTATION, PoolPlacement

__all__ = [
    "KNOWN_KINDS", "NOTHING", "LabelSelector", "Match", "Requirement", "Rule", "RuleContext",
    "RuleKind", "RuleResult", "ImagePullPolicy", "NamespaceLabels", "RemoveResourceLimits",
    "qos_class", "ENFORCEMENTS", "RULE_KINDS", "SHIPPED_RULES", "WEBHOOKS", "RuleStore",
    "RulesError", "load_rules", "parse_rule_file", "MIRROR_POD_ANNOTATION", "PoolPlacement",
]
