"""Declarative selection policies: the YAML schema (`schema.py`), validation into frozen
dataclasses (`load.py` -> `policy.py`), static checks (`check.py`), reload on change
(`source.py`), API-key hashing (`keys.py`) and the vocabularies rules are written in
(`taxonomy.py`: Llama Guard 3 hazard codes, PII kinds, task types). Imports only
`expertmesh.observability` (its config-file error lines); `expertmesh.routing` applies policies to requests."""

from pathlib import Path

from .check import Finding, check_policy
from .errors import PolicyError
from .keys import hash_api_key, new_api_key
from .load import AUTO, load_policy, parse_policy, policy_from_text
from .policy import (
    Budget,
    CatalogModel,
    LatencyTarget,
    Policy,
    RateLimit,
    Rule,
    RuleEffect,
    RuleMatch,
    Tenant,
)
from .source import PolicyFile, PolicySource, StaticPolicy
from .taxonomy import CAPABILITIES, HAZARD_CATEGORIES, OBJECTIVES, PII_KINDS, TASK_TYPES

DEFAULT_POLICY = Path(__file__).resolve().parent / "default.yaml"
"""The bundled policy the server loads unless told otherwise (see its comments)."""

__all__ = [
    "AUTO",
    "CAPABILITIES",
    "DEFAULT_POLICY",
    "HAZARD_CATEGORIES",
    "OBJECTIVES",
    "PII_KINDS",
    "TASK_TYPES",
    "Budget",
    "CatalogModel",
    "Finding",
    "LatencyTarget",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "PolicySource",
    "RateLimit",
    "Rule",
    "RuleEffect",
    "RuleMatch",
    "StaticPolicy",
    "Tenant",
    "check_policy",
    "hash_api_key",
    "load_policy",
    "new_api_key",
    "parse_policy",
    "policy_from_text",
]
