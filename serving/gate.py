"""`SelectorGate`: the model selector (`expertmesh.routing`) in front of the API.

Per request: the bearer key is authenticated to a tenant (unknown key -> 401; no key -> the
policy's anonymous tenant, if it has one), the selector classifies the prompt and chooses a
model under the policy in force (reloaded when the file changes), reserves the request's
maximum cost in the SQLite budget ledger, and explains the decision in response headers. The
engine gets the decision's `max_tokens` cap (what the reservation assumed) and a prompt with
the PII kinds the policy redacts replaced; the reservation is priced on the engine's own count
of exactly that prompt (`Engine.count_prompt_tokens`, asked once the plan knows the kinds), so
it is a true upper bound. When the request ends, the real cost is settled.

The client's key is only used here; engines never see it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from expertmesh.models.generate import SamplingParams
from expertmesh.observability.events import EventSink, SourcedEvents
from expertmesh.policies import PolicyError
from expertmesh.routing import (
    BudgetLedger,
    DecisionLog,
    RoutingError,
    SelectionRequest,
    Selector,
    redact_pii,
)
from expertmesh.routing.budget_watch import SOURCE as BUDGET_SOURCE
from expertmesh.routing.budget_watch import LedgerWatch
from expertmesh.routing.policy_watch import SOURCE as POLICY_SOURCE
from expertmesh.routing.policy_watch import PolicyWatch, WatchedPolicyFile

from .api import GateDecision, engine_request
from .engine import Engine, EngineError
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


class GateRefused(EngineError):
    """A selector refusal as an HTTP error (401, 403, 404, 429, ...)."""

    def __init__(self, error: RoutingError) -> None:
        super().__init__(str(error))
        self.status = error.http_status
        self.type = {
            401: "authentication_error",
            403: "permission_error",
            429: "rate_limit_error",
        }.get(error.http_status, "invalid_request_error")
        self.code = error.code
        retry = getattr(error, "retry_after_s", None)
        if retry is not None:
            self.retry_after_s = float(retry)


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization") or headers.get("Authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _redactor(kinds: frozenset[str]) -> Callable[[str], str] | None:
    """The rewrite that replaces these PII kinds (None: none to replace)."""
    return (lambda text: redact_pii(text, kinds)) if kinds else None


class SelectorGate:
    def __init__(self, selector: Selector, engine: Engine) -> None:
        self.selector = selector
        self.engine = engine
        self.served = {card.id for card in engine.models()}

    @classmethod
    def from_policy_file(
        cls,
        path: str | Path,
        engine: Engine,
        ledger_path: str | Path | None = None,
        decision_log: str | Path | None = None,
        tracer: Any = None,
        events: EventSink | None = None,
        check_interval_s: float = 1.0,
    ) -> SelectorGate:
        """The gate of a policy file; `events`: where its detectors report (the policy
        source's rejected versions, `routing/policy_watch.py`; the budget ledger's lock and
        spent budgets, `routing/budget_watch.py`), e.g. the replica's `events.jsonl`."""

        def rejected(error: PolicyError) -> None:
            log.error("policy %s rejected, the previous version stays in force: %s", path, error)

        policy_events = SourcedEvents(events, POLICY_SOURCE) if events is not None else None
        source = WatchedPolicyFile(
            path, PolicyWatch(policy_events, path), check_interval_s, on_error=rejected
        )
        ledger = None
        if ledger_path is not None or any(t.budget.limited for t in source.current().tenants):
            ledger_file = ledger_path or Path(path).with_suffix(".budget.sqlite")
            watch = None
            if events is not None:
                watch = LedgerWatch(SourcedEvents(events, BUDGET_SOURCE), ledger_file)
            ledger = BudgetLedger(ledger_file, monitor=watch)
        selector = Selector(
            source,
            ledger=ledger,
            decision_log=DecisionLog(decision_log) if decision_log else None,
            tracer=tracer,
        )
        return cls(selector, engine)

    async def admit(
        self, request_id: str, headers: Mapping[str, str], body: BaseModel, kind: str
    ) -> GateDecision:
        assert isinstance(body, ChatCompletionRequest | CompletionRequest)
        try:
            tenant = self.selector.authenticate(_bearer(headers))
            if isinstance(body, ChatCompletionRequest):
                text = "\n".join(m.text() for m in body.messages)
            else:
                text = body.prompt_text()

            def count_tokens(kinds: frozenset[str]) -> int | None:
                """The engine's count of the prompt it will get: these PII kinds redacted."""
                probe = engine_request(
                    request_id, body.model, body, SamplingParams(max_tokens=1), _redactor(kinds)
                )
                return self.engine.count_prompt_tokens(probe)

            decision = self.selector.decide(
                SelectionRequest(
                    tenant=tenant.name,
                    prompt=text,
                    max_tokens=body.output_limit(),
                    requested_model=None if body.model == "auto" else body.model,
                    count_tokens=count_tokens,
                )
            )
        except RoutingError as e:
            raise GateRefused(e) from e
        if decision.model.name not in self.served:
            self.selector.release(decision)
            raise EngineError(
                f"the policy chose {decision.model.name!r}, which this server does not serve "
                f"(it serves {sorted(self.served)}); add an engine for it or fix the catalog"
            )
        selector = self.selector

        async def settle(prompt_tokens: int, completion_tokens: int) -> None:
            selector.settle(decision, prompt_tokens, completion_tokens)

        return GateDecision(
            model=decision.model.name,
            headers=decision.headers(),
            settle=settle,
            max_tokens=decision.max_tokens,
            rewrite=_redactor(decision.redact_pii),
            release=lambda: selector.release(decision),
        )
