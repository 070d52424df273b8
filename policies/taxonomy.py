"""The fixed vocabularies a policy is written in: hazard categories, PII kinds, task types,
capabilities and ranking objectives. Policies are validated against these names, and the
classifier in `expertmesh.routing` emits only these names.

Hazard categories are the 14 of Llama Guard 3's taxonomy (Meta, "Llama Guard 3 model card",
2024; the categories follow the MLCommons AI Safety hazard taxonomy): S1 Violent Crimes,
S2 Non-Violent Crimes, S3 Sex-Related Crimes, S4 Child Sexual Exploitation, S5 Defamation,
S6 Specialized Advice, S7 Privacy, S8 Intellectual Property, S9 Indiscriminate Weapons,
S10 Hate, S11 Suicide & Self-Harm, S12 Sexual Content, S13 Elections, S14 Code Interpreter
Abuse. Using the same codes means a Llama Guard model can be plugged in as the classifier
(`expertmesh.routing.classify.SafetyClassifier`) without changing a policy.
"""

from __future__ import annotations

import types
from typing import Literal, get_args

HAZARD_CATEGORIES: types.MappingProxyType[str, str] = types.MappingProxyType(
    {
        "S1": "Violent Crimes",
        "S2": "Non-Violent Crimes",
        "S3": "Sex-Related Crimes",
        "S4": "Child Sexual Exploitation",
        "S5": "Defamation",
        "S6": "Specialized Advice",
        "S7": "Privacy",
        "S8": "Intellectual Property",
        "S9": "Indiscriminate Weapons",
        "S10": "Hate",
        "S11": "Suicide & Self-Harm",
        "S12": "Sexual Content",
        "S13": "Elections",
        "S14": "Code Interpreter Abuse",
    }
)
"""Llama Guard 3 hazard code -> name, in taxonomy order."""

HazardCode = Literal[
    "S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10", "S11", "S12", "S13", "S14"
]

PiiKind = Literal["email", "phone", "card", "iban", "national_id"]
"""What the PII detector finds: e-mail addresses, phone numbers, payment card numbers (Luhn
checked), IBANs (ISO 13616 mod-97 checked), national ids (US SSN, UK NINO, Spanish DNI)."""

TaskType = Literal["chat", "code", "sql"]

Capability = Literal["chat", "tools", "json", "sql", "code"]
"""What a model can do. A request needs `tools` when it carries tools, `json` when it asks for
a JSON response format; rules can require more (e.g. `sql` for SQL tasks)."""

Objective = Literal["cheapest", "fastest"]
"""How eligible models are ranked. "cheapest": lowest estimated cost for this request (ties:
fastest); "fastest": lowest estimated latency, time to first token plus max_tokens at the
model's decode rate (ties: cheapest)."""

PII_KINDS: tuple[str, ...] = get_args(PiiKind)
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
CAPABILITIES: tuple[str, ...] = get_args(Capability)
OBJECTIVES: tuple[str, ...] = get_args(Objective)

assert tuple(HAZARD_CATEGORIES) == get_args(HazardCode)
