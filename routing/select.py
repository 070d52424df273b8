"""The selector: one facade the serving layer calls per request.

    selector = Selector(PolicyFile("examples/policies/default.yaml"),
                        ledger=BudgetLedger("budgets.sqlite"),
                        decision_log=DecisionLog("decisions.jsonl"), tracer=telemetry.tracer)
    tenant = selector.authenticate(api_key)                         # Unauthorized -> 401
    decision = selector.decide(SelectionRequest(tenant.name, prompt, max_tokens=256))
    # Denied 403, RateLimited / BudgetExceeded 429, UnknownModel 404, NoEligibleModel 400/503
    try:
        out = engine_for(decision.model).generate(..., max_tokens=decision.max_tokens)
    except (EngineError, TimeoutError) as e:
        decision = selector.fallback(decision, reason=str(e))       # same constraints, or raises
    selector.settle(decision, out.prompt_tokens, out.completion_tokens)
    response.headers.update(decision.headers())

How a decision is made (`plan`): the tenant's residency mask, then capability, context
(prompt + max_tokens), the matching rules in policy order (a `deny` ends it; other effects
intersect), health, and the requested model; each step is an AND of precomputed bitmasks
(`compiled.py`) and records which models it removed. The survivors are ranked by the
objective (first matching rule's `prefer`, else the tenant's, else the policy's). `decide`
adds the rate limit, the classification, the budget reservation (walking down the ranking
past models the budget cannot cover, so a free local model still serves a tenant whose
budget is spent), the span and the decision log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

from opentelemetry.trace import NoOpTracer, Tracer

from expertmesh.policies.load import AUTO
from expertmesh.policies.policy import CatalogModel, Policy, Tenant
from expertmesh.policies.source import PolicySource, StaticPolicy

from .auth import authenticate
from .budget import BudgetLedger, Reservation
from .classify import Classification, Classifier, RequestClassifier
from .compiled import CompiledPolicy, requested_key
from .decision import Decision, Exclusion, SelectionRequest, Stage, explain_stage, request_record
from .decision_log import DecisionLog
from .errors import (
    BudgetExceeded,
    Denied,
    NoEligibleModel,
    RateLimited,
    RoutingError,
    Unauthorized,
    UnknownModel,
)
from .health import HealthView
from .ratelimit import RateLimiter

log = logging.getLogger("expertmesh.routing")

_OUTCOMES: dict[type[RoutingError], str] = {
    Denied: "denied",
    NoEligibleModel: "no_model",
    BudgetExceeded: "budget_exceeded",
    RateLimited: "rate_limited",
    UnknownModel: "unknown_model",
    Unauthorized: "unauthorized",
}


def new_decision_id() -> str:
    return os.urandom(8).hex()


class Selector:
    """Chooses a model per request under the policy in force. Thread-safe: per-decision state
    lives in the `Decision`; shared state (compiled policy cache, rate buckets, ledger
    connections) is safe to share."""

    def __init__(
        self,
        policy: PolicySource | Policy,
        *,
        classifier: Classifier | None = None,
        ledger: BudgetLedger | None = None,
        rate_limiter: RateLimiter | None = None,
        health: HealthView | None = None,
        decision_log: DecisionLog | None = None,
        tracer: Tracer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source: PolicySource = StaticPolicy(policy) if isinstance(policy, Policy) else policy
        self._classifier: Classifier = classifier if classifier is not None else RequestClassifier()
        self._ledger = ledger
        self._rate = rate_limiter if rate_limiter is not None else RateLimiter()
        self._health = health
        self._log = decision_log
        self._tracer: Tracer = tracer if tracer is not None else NoOpTracer()
        self._clock = clock
        self._compiled = CompiledPolicy(self._source.current())
        self._require_ledger(self._compiled.policy)

    # -- policy ---------------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._compiled_now().policy

    def _compiled_now(self) -> CompiledPolicy:
        policy = self._source.current()
        compiled = self._compiled
        if policy is not compiled.policy:
            compiled = CompiledPolicy(policy)
            self._compiled = compiled  # a plain attribute swap: readers see old or new
        return compiled

    def _require_ledger(self, policy: Policy) -> None:
        if self._ledger is None and any(t.budget.limited for t in policy.tenants):
            limited = [t.name for t in policy.tenants if t.budget.limited]
            raise RoutingError(
                f"tenants {limited} have budgets but the selector has no ledger; pass "
                "ledger=BudgetLedger(path) to Selector"
            )

    # -- the request path -----------------------------------------------------------------------

    def authenticate(self, api_key: str | None) -> Tenant:
        """The tenant for an API key (None: the anonymous tenant, if the policy has one)."""
        return authenticate(self.policy, api_key)

    def classify(self, text: str) -> Classification:
        return self._classifier.classify(text)

    def plan(self, request: SelectionRequest, decision_id: str | None = None) -> Decision:
        """The decision for `request` with no side effects: no rate limit, budget, log or span
        (replay and the benchmark use this). Raises `Denied`, `UnknownModel`,
        `NoEligibleModel`, or `Unauthorized` for a tenant the policy does not have."""
        compiled = self._compiled_now()
        c = request.classification or self._classifier.classify(request.prompt)
        return self._plan(compiled, request, c, decision_id or new_decision_id())

    def decide(self, request: SelectionRequest) -> Decision:
        """Choose, reserve the budget, log and trace. See the module docstring."""
        compiled = self._compiled_now()
        decision_id = new_decision_id()
        c: Classification | None = None
        with self._tracer.start_as_current_span("expertmesh.select") as span:
            try:
                c = request.classification or self._classifier.classify(request.prompt)
                entry = compiled.tenant(request.tenant)
                if entry is None:
                    raise _unknown_tenant(request.tenant, compiled.policy)
                tenant = entry[0]
                request, planned = self._plan_counted(compiled, request, c, decision_id)
                prompt_tokens = request.prompt_tokens or c.prompt_tokens
                max_tokens = request.max_tokens or compiled.policy.default_max_tokens
                self._rate.admit(tenant.name, tenant.rate_limit, prompt_tokens + max_tokens)
                decision = self._reserve_first(planned)
            except RoutingError as e:
                record = request_record(
                    decision_id,
                    compiled.policy,
                    request.tenant,
                    requested_key(request.requested_model),
                    request.max_tokens,
                    request.prompt_tokens or (c.prompt_tokens if c else None),
                    c,
                    sorted(request.capabilities),
                )
                record["outcome"] = _OUTCOMES.get(type(e), "error")
                record["error"] = str(e)
                if isinstance(e, Denied):
                    record["denied_by"] = e.rule
                if isinstance(e, NoEligibleModel):
                    record["excluded"] = e.excluded
                self._write(record)
                span.set_attribute("expertmesh.outcome", record["outcome"])
                span.set_attribute("expertmesh.decision_id", decision_id)
                raise
            if self._log is not None:
                self._log.write(decision.to_record())
            if span.is_recording():
                span.set_attributes(
                    {
                        "expertmesh.outcome": "selected",
                        "expertmesh.decision_id": decision_id,
                        "expertmesh.tenant": tenant.name,
                        "expertmesh.model": decision.model.name,
                        "expertmesh.policy": compiled.policy.label,
                        "expertmesh.estimated_cost_usd": decision.estimated_cost_usd,
                        "expertmesh.excluded_models": decision.excluded_count,
                        "expertmesh.rules": list(decision.rules),
                        "expertmesh.task": c.task,
                        "expertmesh.safety": sorted(c.safety),
                    }
                )
            return decision

    def _plan_counted(
        self,
        compiled: CompiledPolicy,
        request: SelectionRequest,
        c: Classification,
        decision_id: str,
    ) -> tuple[SelectionRequest, Decision]:
        """The plan, on the engine's exact count of the text it will see when the request
        offers one: plan on the estimate, count the prompt with the plan's PII kinds redacted,
        plan again on that count. A rule whose token bounds flip the redaction on the exact
        count is followed to its kinds (counted once each); if they never settle, the largest
        count is kept, so the reservation stays an upper bound."""
        planned = self._plan(compiled, request, c, decision_id)
        if request.count_tokens is None:
            return request, planned
        counts: dict[frozenset[str], int | None] = {}
        while planned.redact_pii not in counts and len(counts) < 3:
            counts[planned.redact_pii] = request.count_tokens(planned.redact_pii)
            exact = counts[planned.redact_pii]
            if exact is None:
                return replace(request, count_tokens=None), planned
            counted = replace(request, prompt_tokens=exact, count_tokens=None)
            planned = self._plan(compiled, counted, c, decision_id)
        exact = counts.get(planned.redact_pii)
        if exact is None:  # the kinds did not settle: the largest count bounds every text
            exact = max(n for n in counts.values() if n is not None)
            counted = replace(request, prompt_tokens=exact, count_tokens=None)
            planned = self._plan(compiled, counted, c, decision_id)
        return replace(request, prompt_tokens=exact, count_tokens=None), planned

    def fallback(self, decision: Decision, reason: str = "error") -> Decision:
        """Release `decision`'s reservation and move to its next fallback (reserving for it).
        The new decision has the same id, `attempt + 1`, and the failed model among its
        exclusions. Raises `NoEligibleModel` when no fallback is left (or affordable)."""
        self.release(decision)
        failed_bit = 1 << decision._compiled.index[decision.model.name]
        stages = [
            *decision._stages,
            ("failed", failed_bit, f"attempt {decision.attempt}: {reason}"),
        ]
        tried = decision._tried
        budget_error: BudgetExceeded | None = None
        for model in decision.fallbacks:
            i = decision._compiled.index[model.name]
            tried |= 1 << i
            try:
                reservation = self._reserve(decision.tenant, model, decision)
            except BudgetExceeded as e:
                stages.append(("budget", 1 << i, str(e)))
                budget_error = budget_error or e
                continue
            nxt = _replace_choice(decision, i, stages, tried, reservation)
            nxt.attempt = decision.attempt + 1
            if self._log is not None:
                self._log.write(nxt.to_record(event="fallback"))
            return nxt
        if budget_error is not None:
            raise budget_error
        raise NoEligibleModel(
            f"no fallback left for decision {decision.decision_id} after {decision.model.name!r} "
            f"failed ({reason})",
            {e.model: f"{e.constraint}: {e.reason}" for e in _explain(decision, stages)},
        )

    def settle(self, decision: Decision, input_tokens: int, output_tokens: int) -> float:
        """Charge the real cost of the chosen model's call; returns it in USD."""
        cost = decision.model.cost_micro_usd(input_tokens, output_tokens)
        if decision.reservation is not None:
            assert self._ledger is not None
            self._ledger.settle(decision.reservation.id, cost)
            if cost > decision.reservation.amount_micro_usd:
                log.warning(
                    "decision %s cost %d micro-USD, above its reservation of %d: enforce "
                    "decision.max_tokens and pass exact prompt_tokens",
                    decision.decision_id,
                    cost,
                    decision.reservation.amount_micro_usd,
                )
            decision.reservation = None
        if self._log is not None:
            self._write(
                {
                    **request_record(
                        decision.decision_id,
                        decision.policy,
                        decision.tenant.name,
                        decision.requested_model,
                        decision.max_tokens_requested,
                        decision.prompt_tokens,
                        decision.classification,
                        sorted(decision.capabilities),
                        event="settled",
                    ),
                    "model": decision.model.name,
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "cost_usd": cost / 1e6,
                }
            )
        return cost / 1e6

    def release(self, decision: Decision) -> None:
        """Drop the reservation of a call that failed before costing anything."""
        if decision.reservation is not None:
            assert self._ledger is not None
            self._ledger.release(decision.reservation.id)
            decision.reservation = None

    # -- internals ------------------------------------------------------------------------------

    def _write(self, record: dict[str, object]) -> None:
        if self._log is not None:
            self._log.write(record)

    def _reserve(
        self, tenant: Tenant, model: CatalogModel, decision: Decision
    ) -> Reservation | None:
        if model.free:
            return None  # zero marginal cost: never blocked by a budget
        if self._ledger is None:
            if tenant.budget.limited:
                self._require_ledger(decision.policy)
            return None
        cost = model.cost_micro_usd(decision.prompt_tokens, decision.max_tokens)
        return self._ledger.reserve(tenant.name, cost, tenant.budget, now=self._clock())

    def _reserve_first(self, decision: Decision) -> Decision:
        """Reserve for the chosen model; if the budget cannot cover it, walk down the ranking
        (auto requests) to the first model it can, recording each budget exclusion."""
        try:
            decision.reservation = self._reserve(decision.tenant, decision.model, decision)
            return decision
        except BudgetExceeded as first_error:
            if decision.requested_model != AUTO:
                raise
            error = first_error
        compiled = decision._compiled
        stages = [*decision._stages, ("budget", 1 << decision._ranked[0], str(error))]
        refused = 1 << decision._ranked[0]
        for rank, i in enumerate(decision._ranked[1:], 1):
            try:
                reservation = self._reserve(decision.tenant, compiled.models[i], decision)
            except BudgetExceeded as e:
                stages.append(("budget", 1 << i, str(e)))
                refused |= 1 << i
                continue
            # The affordable model becomes the choice; its fallbacks skip the refused ones.
            return Decision(
                decision_id=decision.decision_id,
                compiled=compiled,
                tenant=decision.tenant,
                model_index=i,
                classification=decision.classification,
                prompt_tokens=decision.prompt_tokens,
                max_tokens=decision.max_tokens,
                max_tokens_requested=decision.max_tokens_requested,
                requested_model=decision.requested_model,
                capabilities=decision.capabilities,
                objective=decision.objective,
                rules=decision.rules,
                redact_pii=decision.redact_pii,
                stages=stages,
                eligible=decision._eligible & ~refused,
                ranked=decision._ranked[rank:],
                reservation=reservation,
                tried=refused,
            )
        raise error

    def _plan(
        self,
        compiled: CompiledPolicy,
        request: SelectionRequest,
        c: Classification,
        decision_id: str,
    ) -> Decision:
        entry = compiled.tenant(request.tenant)
        if entry is None:
            raise _unknown_tenant(request.tenant, compiled.policy)
        tenant, eligible, rules = entry
        policy = compiled.policy
        prompt_tokens = request.prompt_tokens or c.prompt_tokens
        max_tokens = request.max_tokens or policy.default_max_tokens
        stages: list[Stage] = []
        if eligible != compiled.all_mask:
            stages.append(("residency", compiled.all_mask & ~eligible, tenant))
        caps = request.capabilities
        if caps:
            kept = eligible & compiled.capability_mask(caps)
            if kept != eligible:
                stages.append(("capability", eligible & ~kept, caps))
                eligible = kept
        kept = eligible & compiled.context_mask(prompt_tokens + max_tokens)
        if kept != eligible:
            stages.append(("context", eligible & ~kept, (prompt_tokens, max_tokens)))
            eligible = kept

        # Rules, in policy order; the tenant's list holds only rules that can apply to it.
        requested = requested_key(request.requested_model)
        task, safety, pii = c.task, c.safety, c.pii_kinds
        matched: list[str] = []
        prefer: str | None = None
        redact: frozenset[str] = frozenset()
        for r in rules:
            if (
                (r.tasks is not None and task not in r.tasks)
                or (r.safety is not None and r.safety.isdisjoint(safety))
                or (r.pii is not None and r.pii.isdisjoint(pii))
                or prompt_tokens < r.min_tokens
                or (r.max_tokens is not None and prompt_tokens > r.max_tokens)
                or (r.requested is not None and requested not in r.requested)
            ):
                continue
            matched.append(r.name)
            if r.deny is not None:
                raise Denied(r.name, r.deny, decision_id)
            if r.restricts:
                kept = eligible & r.keep_mask
                if kept != eligible:
                    stages.append(("rule", eligible & ~kept, r))
                    eligible = kept
            if prefer is None:
                prefer = r.prefer
            if r.redact:
                redact = redact | r.redact

        if self._health is not None:
            kept = eligible & compiled.health_mask(self._health.unhealthy())
            if kept != eligible:
                stages.append(("health", eligible & ~kept, "marked unhealthy by the server"))
                eligible = kept

        objective = prefer or tenant.objective or policy.objective
        if requested != AUTO:
            index = compiled.index.get(requested)
            if index is None:
                raise UnknownModel(
                    f"model {requested!r} is not in policy {policy.label}; use 'auto' or one of: "
                    f"{', '.join(m.name for m in compiled.models)}"
                )
            others = eligible & ~(1 << index)
            if others:
                stages.append(("requested_model", others, requested))
            if not (eligible >> index) & 1:
                raise _no_model(
                    compiled, stages, tenant, f"requested model {requested!r} is excluded"
                )
            ranked: list[int] = [index]
        else:
            if not eligible:
                raise _no_model(compiled, stages, tenant, "every model is excluded")
            ranked = _rank(compiled, eligible, prompt_tokens, max_tokens, objective == "cheapest")
        return Decision(
            decision_id=decision_id,
            compiled=compiled,
            tenant=tenant,
            model_index=ranked[0],
            classification=c,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            max_tokens_requested=request.max_tokens,
            requested_model=requested,
            capabilities=caps,
            objective=objective,
            rules=tuple(matched),
            redact_pii=redact,
            stages=stages,
            eligible=eligible,
            ranked=ranked,
        )


def _rank(
    compiled: CompiledPolicy, eligible: int, prompt_tokens: int, max_tokens: int, cheapest: bool
) -> list[int]:
    """Eligible model indices, best first: by estimated cost then latency ("cheapest") or
    latency then cost ("fastest"); catalog order breaks ties."""
    inp, outp = compiled.input_price, compiled.output_price
    ttft, ms_per_token = compiled.ttft_ms, compiled.ms_per_token
    keyed = []
    mask = eligible
    while mask:
        low = mask & -mask
        i = low.bit_length() - 1
        mask ^= low
        cost = prompt_tokens * inp[i] + max_tokens * outp[i]
        latency = ttft[i] + max_tokens * ms_per_token[i]
        keyed.append((cost, latency, i) if cheapest else (latency, cost, i))
    keyed.sort()
    return [k[2] for k in keyed]


def _unknown_tenant(name: str, policy: Policy) -> Unauthorized:
    return Unauthorized(
        f"tenant {name!r} is not in policy {policy.label} (removed by a reload?); "
        "authenticate again"
    )


def _explain(decision: Decision, stages: list[Stage]) -> list[Exclusion]:
    models = decision._compiled.models
    return [e for stage in stages for e in explain_stage(models, stage)]


def _no_model(
    compiled: CompiledPolicy, stages: list[Stage], tenant: Tenant, summary: str
) -> NoEligibleModel:
    excluded = {
        e.model: f"{e.constraint}: {e.reason}"
        for stage in stages
        for e in explain_stage(compiled.models, stage)
    }
    unhealthy_only = any(constraint == "health" for constraint, _, _ in stages)
    return NoEligibleModel(f"tenant {tenant.name!r}: {summary}", excluded, unhealthy_only)


def _replace_choice(
    decision: Decision,
    index: int,
    stages: list[Stage],
    tried: int,
    reservation: Reservation | None,
) -> Decision:
    return Decision(
        decision_id=decision.decision_id,
        compiled=decision._compiled,
        tenant=decision.tenant,
        model_index=index,
        classification=decision.classification,
        prompt_tokens=decision.prompt_tokens,
        max_tokens=decision.max_tokens,
        max_tokens_requested=decision.max_tokens_requested,
        requested_model=decision.requested_model,
        capabilities=decision.capabilities,
        objective=decision.objective,
        rules=decision.rules,
        redact_pii=decision.redact_pii,
        stages=stages,
        eligible=decision._eligible,
        ranked=decision._ranked,
        attempt=decision.attempt,
        reservation=reservation,
        tried=tried,
        fallback_order=decision._fallback_indices(),
    )
