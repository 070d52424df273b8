"""Static analysis of a valid policy (`expertmesh policy check FILE`): what the schema cannot see.

Unknown models, tenants and tiers are already rejected by `load_policy` (with field paths).
This module finds what only the rules taken together reveal:

- tenants with no eligible model (residency and the rules that always apply to them);
- unreachable rules: an earlier `deny` matches every request the rule could match;
- conflicting rules: a rule, or two rules that can match the same request, leave a tenant no
  model to choose; two such rules that `prefer` different objectives (the first wins);
- models no tenant may use.

Each finding is an error (the policy would fail requests it should not) or a warning (legal
but probably not what was meant).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from .policy import CatalogModel, Policy, Rule, RuleMatch, Tenant

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    where: str
    """What it is about, as a field path: `rules[2] (name)`, `tenants[dev]`, `models[x]`."""
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def check_policy(policy: Policy) -> list[Finding]:
    """Every finding, errors first, in policy order within each severity."""
    findings: list[Finding] = []
    findings += _tenants_without_models(policy)
    findings += _unreachable_rules(policy)
    findings += _conflicting_rules(policy)
    findings += _unused_models(policy)
    return sorted(findings, key=lambda f: f.severity != "error")


def _rule_at(policy: Policy, rule: Rule) -> str:
    return f"rules[{policy.rules.index(rule)}] ({rule.name})"


def residency_eligible(policy: Policy, tenant: Tenant) -> list[CatalogModel]:
    """Models all of whose regions the tenant allows."""
    return [m for m in policy.models if m.regions <= tenant.regions]


def _applies_to(match: RuleMatch, tenant: Tenant) -> bool:
    return match.tenants is None or tenant.name in match.tenants


def _always_for_tenant(match: RuleMatch) -> bool:
    """The rule matches every request of the tenants it names (no other condition)."""
    return (
        match.safety is None
        and match.pii is None
        and match.tasks is None
        and not match.min_prompt_tokens
        and match.max_prompt_tokens is None
        and match.requested_models is None
    )


def _requested_scope(
    policy: Policy, match: RuleMatch, models: list[CatalogModel]
) -> list[CatalogModel]:
    """If the rule only matches requests for named models, only those can be chosen."""
    if match.requested_models is None or "auto" in match.requested_models:
        return models
    return [m for m in models if m.name in match.requested_models]


def _tenants_without_models(policy: Policy) -> list[Finding]:
    findings = []
    for tenant in policy.tenants:
        eligible = residency_eligible(policy, tenant)
        where = f"tenants[{tenant.name}]"
        if not eligible:
            regions = sorted({r for m in policy.models for r in m.regions})
            findings.append(
                Finding(
                    "error",
                    where,
                    f"no model is in the tenant's regions {sorted(tenant.regions)} (a model must "
                    f"process data only in allowed regions); catalog regions: {regions}. Add a "
                    "region to the tenant or a model in its regions",
                )
            )
            continue
        for rule in policy.rules:
            if not (_applies_to(rule.match, tenant) and _always_for_tenant(rule.match)):
                continue
            if rule.effect.deny is not None:
                findings.append(
                    Finding(
                        "warning",
                        where,
                        f"every request is denied by {_rule_at(policy, rule)}; if the tenant is "
                        "retired, remove it",
                    )
                )
                break
            before = eligible
            eligible = [m for m in eligible if rule.effect.keeps(m)]
            if not eligible:
                findings.append(
                    Finding(
                        "error",
                        where,
                        f"no eligible model: {_rule_at(policy, rule)} always applies and removes "
                        f"the last ones ({', '.join(m.name for m in before)}); relax the rule or "
                        "the tenant's regions",
                    )
                )
                break
    return findings


def _set_covers(outer: frozenset[str] | None, inner: frozenset[str] | None) -> bool:
    return outer is None or (inner is not None and inner <= outer)


def _covers(outer: RuleMatch, inner: RuleMatch) -> bool:
    """Every request matching `inner` also matches `outer`."""
    lo_o, hi_o = outer.min_prompt_tokens or 0, outer.max_prompt_tokens
    lo_i, hi_i = inner.min_prompt_tokens or 0, inner.max_prompt_tokens
    tokens = lo_o <= lo_i and (hi_o is None or (hi_i is not None and hi_i <= hi_o))
    return (
        tokens
        and _set_covers(outer.tenants, inner.tenants)
        and _set_covers(outer.safety, inner.safety)
        and _set_covers(outer.pii, inner.pii)
        and _set_covers(outer.tasks, inner.tasks)
        and _set_covers(outer.requested_models, inner.requested_models)
    )


def _overlap(a: RuleMatch, b: RuleMatch) -> bool:
    """Some request can match both. Safety and PII conditions are "any of", and one request
    can carry several categories, so they never exclude each other."""

    def meet(x: frozenset[str] | None, y: frozenset[str] | None) -> bool:
        return x is None or y is None or bool(x & y)

    lo = max(a.min_prompt_tokens or 0, b.min_prompt_tokens or 0)
    highs = [h for h in (a.max_prompt_tokens, b.max_prompt_tokens) if h is not None]
    return (
        (not highs or lo <= min(highs))
        and meet(a.tenants, b.tenants)
        and meet(a.tasks, b.tasks)
        and meet(a.requested_models, b.requested_models)
    )


def _unreachable_rules(policy: Policy) -> list[Finding]:
    findings = []
    for j, rule in enumerate(policy.rules):
        for earlier in policy.rules[:j]:
            if earlier.effect.deny is not None and _covers(earlier.match, rule.match):
                findings.append(
                    Finding(
                        "error",
                        _rule_at(policy, rule),
                        f"unreachable: {_rule_at(policy, earlier)} denies every request this "
                        "rule matches; move this rule before it, narrow the deny, or remove it",
                    )
                )
                break
    return findings


def _scope_tenants(policy: Policy, *matches: RuleMatch) -> list[Tenant]:
    return [t for t in policy.tenants if all(_applies_to(m, t) for m in matches)]


def _conflicting_rules(policy: Policy) -> list[Finding]:
    findings: list[Finding] = []
    restricting = [r for r in policy.rules if r.effect.deny is None and r.effect.restricts]
    for rule in restricting:
        for tenant in _scope_tenants(policy, rule.match):
            base = _requested_scope(policy, rule.match, residency_eligible(policy, tenant))
            if base and not any(rule.effect.keeps(m) for m in base):
                findings.append(
                    Finding(
                        "error",
                        _rule_at(policy, rule),
                        f"leaves tenant {tenant.name!r} no eligible model when it matches "
                        f"(of {', '.join(m.name for m in base)}); relax it, or use `deny` with "
                        "a message if refusing is intended",
                    )
                )
                break
    for a, b in combinations(policy.rules, 2):
        if a.effect.deny is not None or b.effect.deny is not None or not _overlap(a.match, b.match):
            continue
        pa, pb = a.effect.prefer, b.effect.prefer
        if pa is not None and pb is not None and pa != pb:
            findings.append(
                Finding(
                    "warning",
                    _rule_at(policy, b),
                    f"prefers {pb!r} but {_rule_at(policy, a)} can match the same request and "
                    f"prefers {pa!r}; the first matching rule wins, so this one is ignored then",
                )
            )
        if not (a.effect.restricts and b.effect.restricts):
            continue
        for tenant in _scope_tenants(policy, a.match, b.match):
            base = residency_eligible(policy, tenant)
            base = _requested_scope(policy, a.match, _requested_scope(policy, b.match, base))
            keep_a = [m for m in base if a.effect.keeps(m)]
            keep_b = [m for m in base if b.effect.keeps(m)]
            if keep_a and keep_b and not any(b.effect.keeps(m) for m in keep_a):
                findings.append(
                    Finding(
                        "error",
                        _rule_at(policy, b),
                        f"conflicts with {_rule_at(policy, a)}: both can match one request of "
                        f"tenant {tenant.name!r}, and together they leave no model ("
                        f"{a.name} keeps {', '.join(m.name for m in keep_a)}; {b.name} keeps "
                        f"{', '.join(m.name for m in keep_b)}); narrow one rule's `when`",
                    )
                )
                break
    return findings


def _unused_models(policy: Policy) -> list[Finding]:
    return [
        Finding(
            "warning",
            f"models[{m.name}]",
            f"no tenant may use it: its regions {sorted(m.regions)} are not all allowed for any "
            "tenant",
        )
        for m in policy.models
        if not any(m.regions <= t.regions for t in policy.tenants)
    ]
