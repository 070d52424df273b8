"""What the selector hands back: `SelectionRequest` in, `Decision` out.

A `Decision` is the explanation as well as the choice: the chosen model, every excluded model
with the constraint that excluded it, the estimated cost, the policy version, the rules that
matched, and the fallbacks, which satisfy the same hard constraints as the choice. Exclusions
and fallbacks are formatted on first access, so a decision that nobody inspects costs no
string building on the request path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from expertmesh.policies.load import AUTO
from expertmesh.policies.policy import CatalogModel, Policy, Tenant

from .budget import Reservation
from .classify import Classification
from .compiled import CompiledPolicy, CompiledRule, effect_reason
from .decision_log import LOG_SCHEMA

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

HEADER_MODEL = "x-expertmesh-model"
HEADER_POLICY = "x-expertmesh-policy"
HEADER_DECISION_ID = "x-expertmesh-decision-id"
HEADER_COST = "x-expertmesh-estimated-cost-usd"
HEADER_EXCLUDED = "x-expertmesh-excluded-models"
HEADER_ATTEMPT = "x-expertmesh-attempt"


@dataclass(frozen=True, slots=True)
class SelectionRequest:
    """One request, as the serving layer describes it to the selector."""

    tenant: str
    """Tenant name (from `Selector.authenticate`)."""
    prompt: str = ""
    """All message text, for classification (joined by newlines)."""
    max_tokens: int | None = None
    """Output cap; None: the policy's `defaults.max_tokens` (enforce the decision's)."""
    requested_model: str | None = None
    """The request's `model` field; None or "auto" lets the policy choose."""
    capabilities: frozenset[str] = frozenset()
    """Needed capabilities: "tools" when tools are given, "json" for a JSON response format."""
    prompt_tokens: int | None = None
    """Exact prompt token count when the server tokenised it; else estimated (high)."""
    classification: Classification | None = None
    """Precomputed classification (replay, or a classifier run elsewhere); else classified."""
    count_tokens: Callable[[frozenset[str]], int | None] | None = None
    """Exact prompt tokens of the text the engine will see, given the PII kinds the decision
    redacts (the serving gate asks its engine); `decide` calls it once the plan knows the
    kinds, and reserves on the result. None, or a call returning None: `prompt_tokens`."""


@dataclass(frozen=True, slots=True)
class Exclusion:
    model: str
    constraint: str
    """residency, capability, context, rule, health, requested_model, budget or failed."""
    reason: str

    def __str__(self) -> str:
        return f"{self.model}: {self.constraint}: {self.reason}"


Stage = tuple[str, int, Any]
"""(constraint, mask of models it removed, data to explain it with)."""


class Decision:
    """The selector's choice for one request (attempt 0) or one fallback (attempt >= 1)."""

    __slots__ = (
        "_compiled",
        "_eligible",
        "_excluded",
        "_fallback_order",
        "_ranked",
        "_stages",
        "_tried",
        "attempt",
        "capabilities",
        "classification",
        "decision_id",
        "max_tokens",
        "max_tokens_requested",
        "model",
        "objective",
        "prompt_tokens",
        "redact_pii",
        "requested_model",
        "reservation",
        "rules",
        "tenant",
    )

    def __init__(
        self,
        *,
        decision_id: str,
        compiled: CompiledPolicy,
        tenant: Tenant,
        model_index: int,
        classification: Classification,
        prompt_tokens: int,
        max_tokens: int,
        max_tokens_requested: int | None,
        requested_model: str,
        capabilities: frozenset[str],
        objective: str,
        rules: tuple[str, ...],
        redact_pii: frozenset[str],
        stages: list[Stage],
        eligible: int,
        ranked: Sequence[int],
        attempt: int = 0,
        reservation: Reservation | None = None,
        tried: int = 0,
        fallback_order: tuple[int, ...] | None = None,
    ) -> None:
        self.decision_id = decision_id
        self._compiled = compiled
        self.tenant = tenant
        self.model: CatalogModel = compiled.models[model_index]
        self.classification = classification
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        """The output cap the engine must enforce (the reservation assumes it)."""
        self.max_tokens_requested = max_tokens_requested
        """What the request asked for (None: the policy default applied)."""
        self.requested_model = requested_model
        self.capabilities = capabilities
        self.objective = objective
        self.rules = rules
        """Names of the rules that matched, in policy order."""
        self.redact_pii = redact_pii
        """PII kinds to redact from the prompt before it reaches the model (`redact_pii`)."""
        self._stages = stages
        self._eligible = eligible
        self._ranked = ranked
        self.attempt = attempt
        self.reservation = reservation
        """The budget hold for this attempt; None for free models."""
        self._tried = tried | (1 << model_index)
        self._fallback_order = fallback_order
        self._excluded: tuple[Exclusion, ...] | None = None

    # -- what the serving layer reads ---------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._compiled.policy

    @property
    def estimated_cost_usd(self) -> float:
        """Upper bound: prompt tokens + max_tokens at the model's prices (what is reserved)."""
        return self.model.cost_usd(self.prompt_tokens, self.max_tokens)

    @property
    def estimated_cost_micro_usd(self) -> int:
        return self.model.cost_micro_usd(self.prompt_tokens, self.max_tokens)

    @property
    def fallbacks(self) -> tuple[CatalogModel, ...]:
        """Models to try, in order, if this one errors or times out. Each passed every hard
        constraint this request was held to (residency, safety rules, context, capability,
        health at decision time). The policy's chain for the chosen model when it has one,
        else, for "auto" requests, the other eligible models in rank order."""
        models = self._compiled.models
        return tuple(models[i] for i in self._fallback_indices() if not (self._tried >> i) & 1)

    @property
    def excluded(self) -> tuple[Exclusion, ...]:
        """Every model not chosen for a hard reason, with the first constraint it failed."""
        if self._excluded is None:
            self._excluded = tuple(self._explain())
        return self._excluded

    @property
    def excluded_count(self) -> int:
        """len(excluded), without formatting the reasons."""
        return sum(mask.bit_count() for _, mask, _ in self._stages)

    def headers(self) -> dict[str, str]:
        """Response headers that explain the decision."""
        h = {
            HEADER_MODEL: self.model.name,
            HEADER_POLICY: self.policy.label,
            HEADER_DECISION_ID: self.decision_id,
            HEADER_COST: f"{self.estimated_cost_usd:.6f}",
            HEADER_EXCLUDED: str(self.excluded_count),
        }
        if self.attempt:
            h[HEADER_ATTEMPT] = str(self.attempt)
        return h

    def to_record(self, event: str = "decision") -> dict[str, Any]:
        """The decision log line (see `decision_log.py`)."""
        return {
            **request_record(
                self.decision_id,
                self.policy,
                self.tenant.name,
                self.requested_model,
                self.max_tokens_requested,
                self.prompt_tokens,
                self.classification,
                sorted(self.capabilities),
                event,
            ),
            "outcome": "selected",
            "attempt": self.attempt,
            "model": self.model.name,
            "max_tokens": self.max_tokens,
            "fallbacks": [m.name for m in self.fallbacks],
            "estimated_cost_usd": self.estimated_cost_usd,
            "objective": self.objective,
            "rules": list(self.rules),
            "redact_pii": sorted(self.redact_pii),
            "excluded": {e.model: f"{e.constraint}: {e.reason}" for e in self.excluded},
        }

    def __repr__(self) -> str:
        return (
            f"Decision(id={self.decision_id}, model={self.model.name!r}, attempt={self.attempt}, "
            f"excluded={len(self.excluded)}, cost<=${self.estimated_cost_usd:.6f}, "
            f"policy={self.policy.label})"
        )

    # -- internals the selector uses ----------------------------------------------------------

    def _fallback_indices(self) -> tuple[int, ...]:
        if self._fallback_order is None:
            chosen = self._ranked[0] if self._ranked else -1
            chain = self._compiled.fallbacks.get(chosen)
            eligible = self._eligible
            if chain is not None:
                order = tuple(i for i in chain if (eligible >> i) & 1)
            elif self.requested_model == AUTO:
                order = tuple(i for i in self._ranked[1:] if (eligible >> i) & 1)
            else:
                order = ()
            self._fallback_order = order
        return self._fallback_order

    def _explain(self) -> list[Exclusion]:
        models = self._compiled.models
        return [e for stage in self._stages for e in explain_stage(models, stage)]


def explain_stage(models: Sequence[CatalogModel], stage: Stage) -> list[Exclusion]:
    """The exclusions one stage recorded, one per model it removed, in catalog order."""
    constraint, mask, data = stage
    out = []
    i = 0
    while mask:
        if mask & 1:
            out.append(Exclusion(models[i].name, constraint, _reason(constraint, models[i], data)))
        mask >>= 1
        i += 1
    return out


def _reason(constraint: str, model: CatalogModel, data: Any) -> str:
    if constraint == "residency":
        tenant: Tenant = data
        return (
            f"regions {sorted(model.regions)} not all allowed for tenant {tenant.name!r} "
            f"({sorted(tenant.regions)})"
        )
    if constraint == "capability":
        return f"lacks {sorted(data - model.capabilities)}"
    if constraint == "context":
        prompt, max_tokens = data
        return f"context window {model.context_window} < prompt {prompt} + max_tokens {max_tokens}"
    if constraint == "rule":
        rule: CompiledRule = data
        return f"{rule.name!r}: {effect_reason(rule.rule.effect, model)}"
    if constraint == "requested_model":
        return f"the request asked for {data!r}"
    return str(data)


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_record(
    decision_id: str,
    policy: Policy,
    tenant: str | None,
    requested_model: str,
    max_tokens: int | None,
    prompt_tokens: int | None,
    classification: Classification | None,
    capabilities: list[str],
    event: str = "decision",
) -> dict[str, Any]:
    """The part of a log record that describes the request (enough to re-decide it)."""
    c = classification
    return {
        "schema": LOG_SCHEMA,
        "event": event,
        "ts": utc_now_iso(),
        "decision_id": decision_id,
        "policy": policy.label,
        "policy_version": policy.version,
        "tenant": tenant,
        "request": {
            "requested_model": requested_model,
            "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens,
            "safety": sorted(c.safety) if c else [],
            "pii": sorted(c.pii_kinds) if c else [],
            "task": c.task if c else None,
            "capabilities": capabilities,
        },
    }
