"""Policy files -> `Policy`: YAML parsing, schema validation, cross-field checks, and the version
hash. Every problem surfaces here at once as one `PolicyError` whose lines read
`<field path> (line N): <what is wrong>; <how to fix it>`.

    policy = load_policy("examples/policies/default.yaml")
"""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

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

_Loc = tuple[int | str, ...]
_Problem = tuple[_Loc, str]


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
        problems = [_describe(err) for err in e.errors()]
        raise PolicyError(_lines(problems, _root), source) from None
    problems = _cross_check(spec)
    if problems:
        raise PolicyError(_lines(problems, _root), source)
    return _build(spec, source)


def policy_version(spec: PolicySpec) -> str:
    """SHA-256 of the validated spec in canonical JSON (sorted keys, defaults filled in)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# pydantic errors -> `<field path>: <message>` lines
# ---------------------------------------------------------------------------------------------


def _path(loc: _Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _model_at(loc: _Loc) -> type[BaseModel] | None:
    """The schema model that validates the value at `loc`, if that value is a model."""

    def unwrap(tp: Any) -> Any:
        if get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            return args[0] if len(args) == 1 else tp
        return tp

    tp: Any = PolicySpec
    for part in loc:
        tp = unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if not isinstance(part, str) or part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        else:
            return None
    tp = unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _strip_union_tags(loc: _Loc) -> _Loc:
    """pydantic puts the union member it tried into `loc` (e.g. 'list[...]', 'literal[...]')."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "bool"))))


def _describe(error: Mapping[str, Any]) -> _Problem:
    loc = _strip_union_tags(tuple(error["loc"]))
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    got = f"got {value!r}"
    field = loc[-1] if loc else None
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f"; allowed keys: {', '.join(model.model_fields)}" if model else ""
        message = f"unknown key {field!r}{allowed}"
    elif kind == "missing" and loc == ("version",):
        message = f"required key 'version' is missing; add `version: {SCHEMA_VERSION}`"
    elif kind == "missing":
        message = f"required key {field!r} is missing; add it"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        model = _model_at(loc)
        keys = f" with keys: {', '.join(model.model_fields)}" if model else ""
        message = f"must be a mapping{keys}; {got}"
    elif kind == "literal_error" and loc == ("version",):
        message = f"unsupported version {value!r}; this release reads `version: {SCHEMA_VERSION}`"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected')}; {got}"
    elif kind == "greater_than":
        message = f"must be > {ctx['gt']}; {got}"
    elif kind == "greater_than_equal":
        message = f"must be >= {ctx['ge']}; {got}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"must be a whole number; {got}"
    elif kind in ("float_type", "float_parsing", "finite_number"):
        message = f"must be a finite number; {got}"
    elif kind == "string_type":
        message = f"must be a string; {got} (quote it in YAML)"
    elif kind == "string_too_short":
        message = "must not be empty"
    elif kind == "bool_type":
        message = f"must be true or false; {got}"
    elif kind == "list_type":
        message = f"must be a list, e.g. [a, b]; {got}"
    elif kind == "too_short":
        message = f"must not be empty; give at least one entry or leave the key out; {got}"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = f"{error['msg']}; {got}"
    return loc, message


def _line_of(root: yaml.Node | None, loc: _Loc) -> int | None:
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if 0 <= part < len(node.value) else None
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def _lines(problems: list[_Problem], root: yaml.Node | None) -> list[str]:
    out = []
    for loc, message in problems:
        line = _line_of(root, loc) if root is not None else None
        where = f"{_path(loc)} (line {line})" if line else _path(loc)
        out.append(f"{where}: {message}")
    return out


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
