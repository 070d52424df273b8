"""A policy compiled for the request path: models become bit positions, and every hard
constraint a precomputed bitmask, so a decision is a handful of integer ANDs instead of a loop
over models per constraint.

Bit i of a mask stands for `CompiledPolicy.models[i]`. Masks are built once per policy version
(per tenant and per capability set lazily, then cached); nothing here runs pydantic.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from expertmesh.policies.load import AUTO
from expertmesh.policies.policy import CatalogModel, Policy, Rule, RuleEffect, Tenant


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule's match as plain fields (None: not constrained) and its effect as one mask."""

    name: str
    tasks: frozenset[str] | None
    safety: frozenset[str] | None
    pii: frozenset[str] | None
    min_tokens: int
    max_tokens: int | None
    requested: frozenset[str] | None
    keep_mask: int
    """Models that survive the rule's require/forbid effects (all models if it has none)."""
    restricts: bool
    deny: str | None
    prefer: str | None
    redact: frozenset[str]
    rule: Rule


def _bits(indices: list[int]) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


class CompiledPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.models: tuple[CatalogModel, ...] = policy.models
        self.index = {m.name: i for i, m in enumerate(self.models)}
        self.all_mask = (1 << len(self.models)) - 1
        self.input_price = [m.input_price_pico for m in self.models]
        self.output_price = [m.output_price_pico for m in self.models]
        self.ttft_ms = [m.latency.ttft_ms for m in self.models]
        self.ms_per_token = [1000.0 / m.latency.tokens_per_s for m in self.models]
        # Context: models sorted by window; suffix masks give "window >= n" with one bisect.
        order = sorted(range(len(self.models)), key=lambda i: self.models[i].context_window)
        self.ctx_sorted = [self.models[i].context_window for i in order]
        self.ctx_at_least: list[int] = [0] * (len(order) + 1)
        for k in range(len(order) - 1, -1, -1):
            self.ctx_at_least[k] = self.ctx_at_least[k + 1] | (1 << order[k])
        self.rules = tuple(self._compile_rule(r) for r in policy.rules)
        self.fallbacks = {
            self.index[src]: tuple(self.index[m] for m in chain)
            for src, chain in policy.fallbacks.items()
        }
        self._tenant_cache: dict[str, tuple[Tenant, int, tuple[CompiledRule, ...]]] = {}
        self._capability_masks: dict[frozenset[str], int] = {}
        self._health_key: frozenset[str] | None = None
        self._health_mask = self.all_mask

    def mask_of(self, keep: Callable[[CatalogModel], bool]) -> int:
        """Mask of the models for which `keep(model)` is true."""
        return _bits([i for i, m in enumerate(self.models) if keep(m)])

    def _compile_rule(self, rule: Rule) -> CompiledRule:
        match, effect = rule.match, rule.effect
        return CompiledRule(
            name=rule.name,
            tasks=match.tasks,
            safety=match.safety,
            pii=match.pii,
            min_tokens=match.min_prompt_tokens or 0,
            max_tokens=match.max_prompt_tokens,
            requested=match.requested_models,
            keep_mask=self.mask_of(effect.keeps),
            restricts=effect.restricts,
            deny=effect.deny,
            prefer=effect.prefer,
            redact=effect.redact_pii,
            rule=rule,
        )

    def tenant(self, name: str) -> tuple[Tenant, int, tuple[CompiledRule, ...]] | None:
        """(tenant, residency mask, rules that can apply to it), cached per tenant."""
        cached = self._tenant_cache.get(name)
        if cached is None:
            tenant = self.policy.tenant(name)
            if tenant is None:
                return None
            residency = self.mask_of(lambda m: m.regions <= tenant.regions)
            rules = tuple(
                r
                for r in self.rules
                if r.rule.match.tenants is None or name in r.rule.match.tenants
            )
            cached = self._tenant_cache[name] = (tenant, residency, rules)
        return cached

    def capability_mask(self, needed: frozenset[str]) -> int:
        mask = self._capability_masks.get(needed)
        if mask is None:
            mask = self._capability_masks[needed] = self.mask_of(lambda m: needed <= m.capabilities)
        return mask

    def context_mask(self, tokens: int) -> int:
        """Models whose context window holds `tokens`."""
        return self.ctx_at_least[bisect.bisect_left(self.ctx_sorted, tokens)]

    def health_mask(self, unhealthy: frozenset[str]) -> int:
        if unhealthy is not self._health_key:
            self._health_key = unhealthy
            self._health_mask = self.all_mask & ~_bits(
                [self.index[n] for n in unhealthy if n in self.index]
            )
        return self._health_mask


def effect_reason(effect: RuleEffect, model: CatalogModel) -> str:
    """Which of a rule's constraints `model` fails, in words."""
    if effect.require_models is not None and model.name not in effect.require_models:
        return f"not among required models {sorted(effect.require_models)}"
    if model.name in effect.forbid_models:
        return "model forbidden"
    if effect.require_tiers is not None and model.safety_tier not in effect.require_tiers:
        return f"safety tier {model.safety_tier!r} not in required {sorted(effect.require_tiers)}"
    if model.safety_tier in effect.forbid_tiers:
        return f"safety tier {model.safety_tier!r} forbidden"
    if effect.require_regions is not None and not model.regions <= effect.require_regions:
        return f"regions {sorted(model.regions)} not all in {sorted(effect.require_regions)}"
    missing = effect.require_capabilities - model.capabilities
    return f"lacks capabilities {sorted(missing)}"


def requested_key(requested_model: str | None) -> str:
    return AUTO if requested_model is None or requested_model == "" else requested_model
