"""The policy YAML schema: pydantic models for what a user writes (the edge). `load.py` turns a
validated `PolicySpec` into the frozen `Policy` the selector uses; nothing past it sees these.

    version: 1
    name: default
    defaults: {objective: cheapest, max_tokens: 512}
    models:
      - name: expertmesh-demo
        engine: expertmesh
        input_usd_per_1m: 0
        output_usd_per_1m: 0
        context_window: 2048
        capabilities: [chat]
        regions: [local]
        safety_tier: standard
        latency: {ttft_ms: 50, tokens_per_s: 40}
    tenants:
      - name: dev
        api_key_hashes: ["sha256:..."]     # expertmesh policy hash-key
        regions: [local, eu]
        budget: {per_day_usd: 5, per_month_usd: 50}
        rate_limit: {requests_per_minute: 120, tokens_per_minute: 200000}
    rules:
      - name: no-weapons
        when: {safety: [S9]}
        then: {deny: "Requests about weapons of mass destruction are refused."}
    fallbacks:
      big-model: [mid-model, expertmesh-demo]
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator

from .taxonomy import HAZARD_CATEGORIES, PII_KINDS, Capability, Objective, TaskType

SCHEMA_VERSION = 1
KEY_HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
MAX_PRICE_DECIMALS = 6


def _name(value: object) -> str:
    if isinstance(value, str) and _NAME.match(value):
        return value
    raise ValueError(
        f"invalid name {value!r}; use letters, digits and . _ : / @ -, starting with a letter "
        "or digit, at most 128 characters"
    )


def _price(value: object) -> Decimal:
    """USD per 1M tokens as an exact Decimal with at most 6 decimal places."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of USD per 1M tokens, e.g. 0.15; got {value!r}")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(
            f"must be a number of USD per 1M tokens, e.g. 0.15; got {value!r}"
        ) from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"must be a finite number >= 0 (0 for our own models); got {value!r}")
    exponent = price.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_PRICE_DECIMALS:
        raise ValueError(
            f"at most {MAX_PRICE_DECIMALS} decimal places (prices are held exactly); got {value!r}"
        )
    return price


def _key_hash(value: object) -> str:
    if isinstance(value, str) and KEY_HASH_PATTERN.match(value):
        return value
    if isinstance(value, str) and not value.startswith("sha256:"):
        raise ValueError(
            "looks like a plaintext API key; store only its hash: run "
            "`expertmesh policy hash-key KEY` and paste the `sha256:...` line here"
        )
    raise ValueError(f"must be 'sha256:' followed by 64 lowercase hex digits; got {value!r}")


def _usd(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of USD, e.g. 25; got {value!r}")
    amount = Decimal(str(value))
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"must be a finite number of USD >= 0; got {value!r}")
    return amount


def _any_or_list(allowed: tuple[str, ...], what: str, example: str) -> Any:
    """A validator for fields written as "any" or a list drawn from `allowed`."""

    def validate(value: object) -> str | list[str]:
        if value == "any":
            return "any"
        if not isinstance(value, list) or not value:
            raise ValueError(
                f"must be 'any' or a non-empty list of {what}, e.g. {example}; got {value!r}"
            )
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ValueError(
                f"unknown {what} {unknown}; use 'any' or some of: {', '.join(allowed)}"
            )
        return list(value)

    return PlainValidator(validate)


def _redact(value: object) -> bool | list[str]:
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(v in PII_KINDS for v in value):
        return list(value)
    raise ValueError(
        f"must be true (all PII kinds), false, or a list of PII kinds from {', '.join(PII_KINDS)}; "
        f"got {value!r}"
    )


Name = Annotated[str, PlainValidator(_name)]


def _decimal_text(value: Decimal) -> str:
    """Canonical text of an exact amount (for the version hash): "0.15", "10", "0"."""
    return format(value.normalize(), "f")


Price = Annotated[Decimal, PlainValidator(_price), PlainSerializer(_decimal_text, return_type=str)]
Usd = Annotated[Decimal, PlainValidator(_usd), PlainSerializer(_decimal_text, return_type=str)]
KeyHash = Annotated[str, PlainValidator(_key_hash)]
Text = Annotated[str, Field(min_length=1, strict=True)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DefaultsSpec(_Spec):
    objective: Objective = "cheapest"
    """How eligible models are ranked unless a tenant or rule says otherwise."""
    max_tokens: PositiveInt = 1024
    """Output cap for requests that give no max_tokens; it bounds each budget reservation."""


class LatencySpec(_Spec):
    ttft_ms: PositiveFloat
    """Expected time to first token, milliseconds."""
    tokens_per_s: PositiveFloat
    """Expected decode rate per request, tokens per second."""


class ModelSpec(_Spec):
    name: Name
    engine: Text
    """Engine that serves the model: "expertmesh" (local), "openai", "vllm", ..."""
    endpoint: Text | None = None
    """URL or engine-specific id; leave out for a local engine."""
    input_usd_per_1m: Price
    output_usd_per_1m: Price
    context_window: PositiveInt
    capabilities: list[Capability] = Field(min_length=1)
    regions: list[Text] = Field(min_length=1)
    """Every region where this model may process data."""
    safety_tier: Text
    """A label rules can require or forbid, e.g. strict / standard / permissive."""
    latency: LatencySpec


class BudgetSpec(_Spec):
    per_day_usd: Usd | None = None
    per_month_usd: Usd | None = None


class RateLimitSpec(_Spec):
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None


class TenantSpec(_Spec):
    name: Name
    api_key_hashes: list[KeyHash] = []
    regions: list[Text] = Field(min_length=1)
    """Regions this tenant's data may be processed in (data residency)."""
    budget: BudgetSpec = BudgetSpec()
    rate_limit: RateLimitSpec = RateLimitSpec()
    objective: Objective | None = None


class MatchSpec(_Spec):
    tenants: list[Name] | None = Field(default=None, min_length=1)
    safety: (
        Annotated[
            str | list[str], _any_or_list(tuple(HAZARD_CATEGORIES), "hazard codes", "[S1, S9]")
        ]
        | None
    ) = None
    """Hazard codes (Llama Guard 3: S1-S14) or "any" (the request is flagged at all)."""
    pii: (
        Annotated[str | list[str], _any_or_list(PII_KINDS, "PII kinds", "[email, card]")] | None
    ) = None
    """PII kinds or "any"."""
    task: list[TaskType] | None = Field(default=None, min_length=1)
    min_prompt_tokens: NonNegativeInt | None = None
    max_prompt_tokens: NonNegativeInt | None = None
    model: list[Text] | None = Field(default=None, min_length=1)
    """Requested model: catalog names, or "auto" for requests that leave the choice to us."""


class EffectSpec(_Spec):
    deny: Text | None = None
    require_models: list[Name] | None = Field(default=None, min_length=1)
    forbid_models: list[Name] = []
    require_tiers: list[Text] | None = Field(default=None, min_length=1)
    forbid_tiers: list[Text] = []
    require_regions: list[Text] | None = Field(default=None, min_length=1)
    require_capabilities: list[Capability] = []
    prefer: Objective | None = None
    redact_pii: Annotated[bool | list[str], PlainValidator(_redact)] = False


class RuleSpec(_Spec):
    name: Name
    when: MatchSpec = MatchSpec()
    """Leave out to match every request."""
    then: EffectSpec


class PolicySpec(_Spec):
    version: Literal[1]
    name: Name
    defaults: DefaultsSpec = DefaultsSpec()
    models: list[ModelSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = Field(min_length=1)
    anonymous_tenant: Name | None = None
    """Tenant that requests without an API key act as; leave out to require a key."""
    rules: list[RuleSpec] = []
    fallbacks: dict[Name, list[Name]] = {}
