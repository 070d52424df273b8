"""Policy files -> `Policy`: YAML parsing, schema validation, cross-field checks, and the version
hash. Every problem surfaces here at once as one `PolicyError` whose lines read
`<field path> (line N): <what is wrong>; <how to fix it>`.

    policy = load_policy("examples/policies/default.yaml")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from expertmesh.observability.validation import Loc as _Loc
from expertmesh.observability.validation import Problem as _Problem
from expertmesh.observability.validation import describe_error, problem_lines

from .errors import PolicyError
from .policy import (
    MICRO_PER_USD,
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
from .schema import SCHEMA_VERSION, EffectSpec, MatchSpec, PolicySpec
from .taxonomy import HAZARD_CATEGORIES, PII_KINDS

__all__ = ["load_policy", "parse_policy", "policy_from_text"]

AUTO = "auto"
"""The requested-model value that leaves the choice to the policy."""


def load_policy(path: str | Path) -> Policy:
    """Read, validate and build the policy at `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(
            [f"<file>: cannot read ({e.strerror or e}); check the path"], str(path)
        ) from None
    return policy_from_text(text, source=str(path))


def policy_from_text(text: str, source: str | None = None) -> Policy:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError([f"<file>: not valid YAML: {e}"], source) from None
    return parse_policy(data, source=source, _root=root)


def parse_policy(data: object, source: str | None = None, _root: yaml.Node | None = None) -> Policy:
    """Validate a policy given as plain data (what `yaml.safe_load` returns)."""
    if not isinstance(data, Mapping):
        raise PolicyError(
            [
                f"<top level>: must be a mapping with keys {', '.join(PolicySpec.model_fields)}; "
                f"got {type(data).__name__}"
            ],
            source,
        )
    try:
        spec = PolicySpec.model_validate(data)
    except ValidationError as e:
        problems = [
            describe_error(err, PolicySpec, schema_version=SCHEMA_VERSION) for err in e.errors()
        ]
        raise PolicyError(problem_lines(problems, _root), source) from None
    problems = _cross_check(spec)
    if problems:
        raise PolicyError(problem_lines(problems, _root), source)
    return _build(spec, source)


def policy_version(spec: PolicySpec) -> str:
    """SHA-256 of the validated spec in canonical JSON (sorted keys, defaults filled in)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Cross-field checks: names that must refer to something, duplicates, contradictions.
# ---------------------------------------------------------------------------------------------


def _cross_check(spec: PolicySpec) -> list[_Problem]:
    problems: list[_Problem] = []
    models = _unique(spec.models, "models", "model", problems)
    tenants = _unique(spec.tenants, "tenants", "tenant", problems)
    _unique(spec.rules, "rules", "rule", problems)
    known_models = ", ".join(models)
    tiers = {m.safety_tier for m in spec.models}
    regions = {r for m in spec.models for r in m.regions}

    def need_model(loc: _Loc, name: str, allow_auto: bool = False) -> None:
        if name not in models and not (allow_auto and name == AUTO):
            auto = " or 'auto'" if allow_auto else ""
            problems.append(
                (loc, f"unknown model {name!r}; use a catalog model{auto}: {known_models}")
            )

    key_owner: dict[str, str] = {}
    for i, t in enumerate(spec.tenants):
        for j, digest in enumerate(t.api_key_hashes):
            if digest in key_owner and key_owner[digest] != t.name:
                problems.append(
                    (
                        ("tenants", i, "api_key_hashes", j),
                        f"the same key hash belongs to tenant {key_owner[digest]!r}; "
                        "give each tenant its own keys",
                    )
                )
            key_owner.setdefault(digest, t.name)
    if spec.anonymous_tenant is not None and spec.anonymous_tenant not in tenants:
        problems.append(
            (
                ("anonymous_tenant",),
                f"unknown tenant {spec.anonymous_tenant!r}; known tenants: {', '.join(tenants)}",
            )
        )
    for i, rule in enumerate(spec.rules):
        problems += _check_match(rule.when, ("rules", i, "when"), tenants, need_model)
        problems += _check_effect(rule.then, ("rules", i, "then"), tiers, regions, need_model)
    for source_model, chain in spec.fallbacks.items():
        need_model(("fallbacks", source_model), source_model)
        seen: set[str] = set()
        for j, name in enumerate(chain):
            loc: _Loc = ("fallbacks", source_model, j)
            need_model(loc, name)
            if name == source_model:
                problems.append((loc, f"{name!r} falls back to itself; remove it from its chain"))
            elif name in seen:
                problems.append((loc, f"{name!r} is listed twice in the chain; keep one"))
            seen.add(name)
    return problems


def _unique(items: list[Any], key: str, what: str, problems: list[_Problem]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.name in first:
            problems.append(
                (
                    (key, i, "name"),
                    f"duplicate {what} name {item.name!r} (also {key}[{first[item.name]}]); "
                    f"{what} names must be unique",
                )
            )
        else:
            first[item.name] = i
    return first


def _check_match(
    match: MatchSpec, loc: _Loc, tenants: Mapping[str, int], need_model: Any
) -> list[_Problem]:
    problems: list[_Problem] = []
    for j, name in enumerate(match.tenants or ()):
        if name not in tenants:
            problems.append(
                (
                    (*loc, "tenants", j),
                    f"unknown tenant {name!r}; known tenants: {', '.join(tenants)}",
                )
            )
    for j, name in enumerate(match.model or ()):
        need_model((*loc, "model", j), name, allow_auto=True)
    lo, hi = match.min_prompt_tokens, match.max_prompt_tokens
    if lo is not None and hi is not None and lo > hi:
        problems.append(
            (
                (*loc, "max_prompt_tokens"),
                f"max_prompt_tokens {hi} < min_prompt_tokens {lo}: the rule can never match; "
                "swap or fix them",
            )
        )
    return problems


def _check_effect(
    effect: EffectSpec, loc: _Loc, tiers: set[str], regions: set[str], need_model: Any
) -> list[_Problem]:
    problems: list[_Problem] = []
    given = {k for k in effect.model_fields_set if k != "deny"}
    if effect.deny is not None and given:
        problems.append(
            (
                (*loc, "deny"),
                f"deny ends the request, so {', '.join(sorted(given))} would never apply; "
                "put them in a separate rule or remove them",
            )
        )
    if effect.deny is None and not given:
        problems.append(
            (
                loc,
                "the rule does nothing; give an effect: deny, require_models, forbid_models, "
                "require_tiers, forbid_tiers, require_regions, require_capabilities, prefer "
                "or redact_pii",
            )
        )
    for key in ("require_models", "forbid_models"):
        for j, name in enumerate(getattr(effect, key) or ()):
            need_model((*loc, key, j), name)
    for key in ("require_tiers", "forbid_tiers"):
        for j, tier in enumerate(getattr(effect, key) or ()):
            if tier not in tiers:
                problems.append(
                    (
                        (*loc, key, j),
                        f"unknown safety tier {tier!r}; tiers in the catalog: {', '.join(sorted(tiers))}",
                    )
                )
    for j, region in enumerate(effect.require_regions or ()):
        if region not in regions:
            problems.append(
                (
                    (*loc, "require_regions", j),
                    f"no model is in region {region!r}; regions in the catalog: "
                    f"{', '.join(sorted(regions))}",
                )
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Spec -> frozen Policy
# ---------------------------------------------------------------------------------------------


def _pico_per_token(price_per_1m_usd: Decimal) -> int:
    return int(price_per_1m_usd * 10**6)


def _micro_usd(amount: Decimal | None) -> int | None:
    return None if amount is None else int(amount * MICRO_PER_USD)


def _opt(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _build(spec: PolicySpec, source: str | None) -> Policy:
    models = tuple(
        CatalogModel(
            name=m.name,
            engine=m.engine,
            endpoint=m.endpoint,
            input_price_pico=_pico_per_token(m.input_usd_per_1m),
            output_price_pico=_pico_per_token(m.output_usd_per_1m),
            context_window=m.context_window,
            capabilities=frozenset(m.capabilities),
            regions=frozenset(m.regions),
            safety_tier=m.safety_tier,
            latency=LatencyTarget(m.latency.ttft_ms, m.latency.tokens_per_s),
        )
        for m in spec.models
    )
    tenants = tuple(
        Tenant(
            name=t.name,
            key_hashes=tuple(t.api_key_hashes),
            regions=frozenset(t.regions),
            budget=Budget(_micro_usd(t.budget.per_day_usd), _micro_usd(t.budget.per_month_usd)),
            rate_limit=RateLimit(t.rate_limit.requests_per_minute, t.rate_limit.tokens_per_minute),
            objective=t.objective,
        )
        for t in spec.tenants
    )
    rules = []
    for r in spec.rules:
        w, e = r.when, r.then
        safety = frozenset(HAZARD_CATEGORIES) if w.safety == "any" else _opt(w.safety)  # type: ignore[arg-type]
        pii = frozenset(PII_KINDS) if w.pii == "any" else _opt(w.pii)  # type: ignore[arg-type]
        if e.redact_pii is True:
            redact = frozenset(PII_KINDS)
        elif e.redact_pii is False:
            redact = frozenset()
        else:
            redact = frozenset(e.redact_pii)
        rules.append(
            Rule(
                name=r.name,
                match=RuleMatch(
                    tenants=_opt(w.tenants),
                    safety=safety,
                    pii=pii,
                    tasks=_opt(w.task),  # type: ignore[arg-type]
                    min_prompt_tokens=w.min_prompt_tokens,
                    max_prompt_tokens=w.max_prompt_tokens,
                    requested_models=_opt(w.model),
                ),
                effect=RuleEffect(
                    deny=e.deny,
                    require_models=_opt(e.require_models),
                    forbid_models=frozenset(e.forbid_models),
                    require_tiers=_opt(e.require_tiers),
                    forbid_tiers=frozenset(e.forbid_tiers),
                    require_regions=_opt(e.require_regions),
                    require_capabilities=frozenset(e.require_capabilities),
                    prefer=e.prefer,
                    redact_pii=redact,
                ),
            )
        )
    return Policy(
        name=spec.name,
        version=policy_version(spec),
        objective=spec.defaults.objective,
        default_max_tokens=spec.defaults.max_tokens,
        models=models,
        tenants=tenants,
        rules=tuple(rules),
        fallbacks={k: tuple(v) for k, v in spec.fallbacks.items()},
        anonymous_tenant=spec.anonymous_tenant,
        source=source,
    )
