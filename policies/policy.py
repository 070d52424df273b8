"""The validated policy: frozen dataclasses that the selector trusts (built by `load.py`).

Money is held in integers so that budgets are exact: prices as pico-USD (1e-12 USD) per token,
which is the YAML's "USD per 1M tokens" times 10**6 (exact for up to six decimal places), and
budgets as micro-USD (1e-6 USD), the unit of the budget ledger. A request's cost is computed
in pico-USD and rounded *up* to micro-USD when it is reserved or charged, so rounding can only
make the ledger stricter, never let it overspend.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from .taxonomy import Objective

PICO_PER_MICRO = 10**6
MICRO_PER_USD = 10**6


def pico_to_micro_ceil(pico: int) -> int:
    """Pico-USD -> micro-USD, rounded up (a reservation never under-counts)."""
    return -(-pico // PICO_PER_MICRO)


@dataclass(frozen=True)
class LatencyTarget:
    ttft_ms: float
    """Time to first token the model is expected to meet, in milliseconds."""
    tokens_per_s: float
    """Decode rate the model is expected to sustain, tokens per second per request."""

    def estimate_ms(self, output_tokens: int) -> float:
        """Expected time to produce `output_tokens`: first token, then the rest at the rate."""
        return self.ttft_ms + 1000.0 * output_tokens / self.tokens_per_s


@dataclass(frozen=True)
class CatalogModel:
    """One model the selector can choose."""

    name: str
    engine: str
    """Which engine serves it ("expertmesh" for the local MoE engine, "openai", "vllm", ...)."""
    endpoint: str | None
    """Where the engine reaches it (URL or engine-specific id); None for a local engine."""
    input_price_pico: int
    """Pico-USD per input token (= USD per 1M input tokens x 10**6); 0 for our own models."""
    output_price_pico: int
    """Pico-USD per output token."""
    context_window: int
    """Prompt plus output tokens the model accepts."""
    capabilities: frozenset[str]
    regions: frozenset[str]
    """Every region where the model may process data (all must be allowed for a tenant)."""
    safety_tier: str
    latency: LatencyTarget

    @property
    def free(self) -> bool:
        """Zero marginal cost: never reserved against, never blocked by a budget."""
        return self.input_price_pico == 0 and self.output_price_pico == 0

    def cost_pico(self, input_tokens: int, output_tokens: int) -> int:
        return input_tokens * self.input_price_pico + output_tokens * self.output_price_pico

    def cost_micro_usd(self, input_tokens: int, output_tokens: int) -> int:
        """Cost in micro-USD, rounded up: what the ledger reserves or charges."""
        return pico_to_micro_ceil(self.cost_pico(input_tokens, output_tokens))

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return self.cost_pico(input_tokens, output_tokens) / 1e12


@dataclass(frozen=True)
class Budget:
    """Spending limits of one tenant; None means no limit for that period. Periods are UTC
    calendar days and months."""

    per_day_micro_usd: int | None = None
    per_month_micro_usd: int | None = None

    @property
    def limited(self) -> bool:
        return self.per_day_micro_usd is not None or self.per_month_micro_usd is not None


@dataclass(frozen=True)
class RateLimit:
    """Per-tenant limits over a sliding minute; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Counted as prompt tokens plus max_tokens of each admitted request."""


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: tuple[str, ...]
    """`sha256:<hex>` digests of the tenant's API keys (`expertmesh policy hash-key`)."""
    regions: frozenset[str]
    """Regions the tenant's data may be processed in."""
    budget: Budget
    rate_limit: RateLimit
    objective: Objective | None
    """Overrides the policy's default objective for this tenant."""


@dataclass(frozen=True)
class RuleMatch:
    """When a rule applies. Every given field must match (AND); a list matches when any of its
    entries does (OR). None: the field is not constrained."""

    tenants: frozenset[str] | None = None
    safety: frozenset[str] | None = None
    """Matches when the request is flagged with any of these hazard codes."""
    pii: frozenset[str] | None = None
    """Matches when any of these PII kinds was found ("any" in YAML: all kinds)."""
    tasks: frozenset[str] | None = None
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    requested_models: frozenset[str] | None = None
    """What the client asked for: catalog names, or "auto" for "let the policy choose"."""

    @property
    def unconditional(self) -> bool:
        return all(
            v is None
            for v in (
                self.tenants,
                self.safety,
                self.pii,
                self.tasks,
                self.min_prompt_tokens,
                self.max_prompt_tokens,
                self.requested_models,
            )
        )


@dataclass(frozen=True)
class RuleEffect:
    """What a matching rule does. `deny` ends the decision; every other effect of every matching
    rule applies (the eligible set is intersected); for `prefer`, the first matching rule that
    sets it wins."""

    deny: str | None = None
    """Refuse the request with this message (HTTP 403)."""
    require_models: frozenset[str] | None = None
    forbid_models: frozenset[str] = frozenset()
    require_tiers: frozenset[str] | None = None
    forbid_tiers: frozenset[str] = frozenset()
    require_regions: frozenset[str] | None = None
    """Keep only models all of whose regions are in this set (e.g. PII stays local)."""
    require_capabilities: frozenset[str] = frozenset()
    prefer: Objective | None = None
    redact_pii: frozenset[str] = frozenset()
    """PII kinds to redact from the prompt before it reaches the model."""

    @property
    def restricts(self) -> bool:
        return bool(
            self.require_models is not None
            or self.forbid_models
            or self.require_tiers is not None
            or self.forbid_tiers
            or self.require_regions is not None
            or self.require_capabilities
        )

    def keeps(self, model: CatalogModel) -> bool:
        """Whether `model` survives this effect's model constraints."""
        return (
            (self.require_models is None or model.name in self.require_models)
            and model.name not in self.forbid_models
            and (self.require_tiers is None or model.safety_tier in self.require_tiers)
            and model.safety_tier not in self.forbid_tiers
            and (self.require_regions is None or model.regions <= self.require_regions)
            and self.require_capabilities <= model.capabilities
        )


@dataclass(frozen=True)
class Rule:
    name: str
    match: RuleMatch
    effect: RuleEffect


@dataclass(frozen=True)
class Policy:
    """A validated policy. `version` is the SHA-256 of its canonical form: two files that mean
    the same thing (key order, comments, spacing aside) have the same version."""

    name: str
    version: str
    objective: Objective
    default_max_tokens: int
    """Output cap applied when a request gives no max_tokens (it bounds the reservation)."""
    models: tuple[CatalogModel, ...]
    tenants: tuple[Tenant, ...]
    rules: tuple[Rule, ...]
    fallbacks: Mapping[str, tuple[str, ...]]
    """Model -> ordered models to try when it fails; filtered by the request's constraints."""
    anonymous_tenant: str | None
    """Tenant that requests without an API key act as; None: a key is required."""
    source: str | None = None
    _models_by_name: Mapping[str, CatalogModel] = field(init=False, repr=False, compare=False)
    _tenants_by_name: Mapping[str, Tenant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fallbacks", types.MappingProxyType(dict(self.fallbacks)))
        object.__setattr__(
            self, "_models_by_name", types.MappingProxyType({m.name: m for m in self.models})
        )
        object.__setattr__(
            self, "_tenants_by_name", types.MappingProxyType({t.name: t for t in self.tenants})
        )

    @property
    def short_version(self) -> str:
        return self.version[:12]

    @property
    def label(self) -> str:
        """`name@short_version`, as sent in the `x-expertmesh-policy` header."""
        return f"{self.name}@{self.short_version}"

    def model(self, name: str) -> CatalogModel:
        try:
            return self._models_by_name[name]
        except KeyError:
            raise KeyError(
                f"unknown model {name!r}; catalog: {', '.join(self._models_by_name)}"
            ) from None

    def has_model(self, name: str) -> bool:
        return name in self._models_by_name

    def tenant(self, name: str) -> Tenant | None:
        return self._tenants_by_name.get(name)
