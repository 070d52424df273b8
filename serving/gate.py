"""`SelectorGate`: the model selector (`expertmesh.routing`) in front of the API.

Per request: the bearer key is authenticated to a tenant (unknown key -> 401; no key -> the
policy's anonymous tenant, if it has one), the selector classifies the prompt and chooses a
model under the policy in force (reloaded when the file changes), reserves the request's
maximum cost in the SQLite budget ledger, and explains the decision in response headers. The
engine gets the decision's `max_tokens` cap (what the reservation assumed) and a prompt with
the PII kinds the policy redacts replaced. When the request ends, the real cost is settled.

The client's key is only used here; engines never see it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from expertmesh.policies import PolicyError, PolicyFile
from expertmesh.routing import (
    BudgetLedger,
    DecisionLog,
    RoutingError,
    SelectionRequest,
    Selector,
    redact_pii,
)

from .api import GateDecision
from .engine import Engine, EngineError, Message
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


class SelectorGate:
    def __init__(self, selector: Selector, engine: Engine) -> None:
        self.selector = selector
        self.served = {card.id for card in engine.models()}
        self._count = getattr(engine, "count_prompt_tokens", None)
        """Exact prompt tokens from the engine's tokenizer, where it offers them."""

    @classmethod
    def from_policy_file(
        cls,
        path: str | Path,
        engine: Engine,
        ledger_path: str | Path | None = None,
        decision_log: str | Path | None = None,
        tracer: Any = None,
    ) -> SelectorGate:
        def rejected(error: PolicyError) -> None:
            log.error("policy %s rejected, the previous version stays in force: %s", path, error)

        source = PolicyFile(path, on_error=rejected)
        ledger = None
        if ledger_path is not None or any(t.budget.limited for t in source.current().tenants):
            ledger = BudgetLedger(ledger_path or Path(path).with_suffix(".budget.sqlite"))
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
            exact = None
            if isinstance(body, ChatCompletionRequest):
                text = "\n".join(m.text() for m in body.messages)
                if self._count is not None:
                    messages = tuple(Message(m.role, m.text()) for m in body.messages)
                    exact = self._count(None, messages)
            else:
                text = body.prompt_text()
                if self._count is not None:
                    exact = self._count(text)
            decision = self.selector.decide(
                SelectionRequest(
                    tenant=tenant.name,
                    prompt=text,
                    max_tokens=body.output_limit(),
                    requested_model=None if body.model == "auto" else body.model,
                    prompt_tokens=exact,
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

        kinds = decision.redact_pii
        return GateDecision(
            model=decision.model.name,
            headers=decision.headers(),
            settle=settle,
            max_tokens=decision.max_tokens,
            rewrite=(lambda t: redact_pii(t, kinds)) if kinds else None,
            release=lambda: selector.release(decision),
        )
