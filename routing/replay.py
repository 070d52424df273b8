"""Replay: re-decide logged requests under a new policy and report what would change.

    report = replay_file("decisions.jsonl", load_policy("new.yaml"))
    print(report.summary())

Each `decision` record carries the request's features (never its text), so replay re-runs
the pure decision (`Selector.plan`) with the logged classification. What it reports per
request: the model before and after, the estimated cost before and after, requests that
would now be denied (or newly allowed), and constraint violations: requests whose old model
the new policy would exclude, with the constraint that excludes it. Budgets and rate limits
depend on live state and are not replayed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from expertmesh.policies.policy import Budget, Policy

from .classify import Classification
from .decision import SelectionRequest
from .decision_log import read_decision_log
from .errors import Denied, NoEligibleModel, RoutingError, Unauthorized, UnknownModel
from .pii import PiiFinding
from .select import Selector


@dataclass(frozen=True)
class ReplayRow:
    decision_id: str
    tenant: str
    old_outcome: str
    new_outcome: str
    old_model: str | None
    new_model: str | None
    old_cost_usd: float
    new_cost_usd: float
    violation: str | None
    """Why the new policy would exclude the old model (or refuse the request); None if not."""
    detail: str = ""
    """The new outcome's error message, if any."""

    @property
    def changed(self) -> bool:
        return self.old_outcome != self.new_outcome or self.old_model != self.new_model


@dataclass(frozen=True)
class ReplayReport:
    policy: str
    """`name@version` of the policy replayed against."""
    rows: tuple[ReplayRow, ...]
    skipped: int
    """Records that could not be replayed (failed before classification)."""

    @property
    def changed(self) -> list[ReplayRow]:
        return [r for r in self.rows if r.changed]

    @property
    def newly_denied(self) -> list[ReplayRow]:
        return [r for r in self.rows if r.new_outcome != "selected" and r.old_outcome == "selected"]

    @property
    def newly_served(self) -> list[ReplayRow]:
        return [r for r in self.rows if r.new_outcome == "selected" and r.old_outcome != "selected"]

    @property
    def violations(self) -> list[ReplayRow]:
        return [r for r in self.rows if r.violation is not None]

    def totals(self) -> dict[str, Any]:
        return {
            "requests": len(self.rows),
            "skipped": self.skipped,
            "model_changed": sum(
                1
                for r in self.rows
                if r.old_model != r.new_model
                and r.new_outcome == "selected"
                and r.old_outcome == "selected"
            ),
            "newly_refused": len(self.newly_denied),
            "newly_served": len(self.newly_served),
            "violations": len(self.violations),
            "old_estimated_cost_usd": sum(r.old_cost_usd for r in self.rows),
            "new_estimated_cost_usd": sum(r.new_cost_usd for r in self.rows),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "totals": self.totals(),
            "rows": [asdict(r) for r in self.rows],
        }


_OUTCOME = {Denied: "denied", NoEligibleModel: "no_model", UnknownModel: "unknown_model",
            Unauthorized: "unauthorized"}  # fmt: skip


def _request(record: dict[str, Any]) -> SelectionRequest | None:
    req = record.get("request") or {}
    if req.get("task") is None or req.get("prompt_tokens") is None:
        return None
    classification = Classification(
        safety=frozenset(req.get("safety", ())),
        pii=tuple(PiiFinding(kind, 0, 0) for kind in req.get("pii", ())),
        task=req["task"],
        prompt_tokens=int(req["prompt_tokens"]),
    )
    return SelectionRequest(
        tenant=str(record.get("tenant")),
        max_tokens=req.get("max_tokens"),
        requested_model=req.get("requested_model"),
        capabilities=frozenset(req.get("capabilities", ())),
        prompt_tokens=int(req["prompt_tokens"]),
        classification=classification,
    )


def replay(records: Iterable[dict[str, Any]], policy: Policy) -> ReplayReport:
    """Re-decide every `decision` record (fallback and settlement records are skipped)."""
    selector = Selector(_NoBudgets(policy))
    rows: list[ReplayRow] = []
    skipped = 0
    for record in records:
        if record.get("event") != "decision":
            continue
        request = _request(record)
        if request is None:
            skipped += 1
            continue
        old_outcome = str(record.get("outcome"))
        old_model = record.get("model") if old_outcome == "selected" else None
        old_cost = float(record.get("estimated_cost_usd") or 0.0)
        new_model: str | None = None
        new_cost = 0.0
        detail = ""
        violation: str | None = None
        try:
            decision = selector.plan(request, decision_id=str(record.get("decision_id")))
        except RoutingError as e:
            new_outcome = _OUTCOME.get(type(e), "error")
            detail = str(e)
            if old_model is not None:
                violation = f"now {new_outcome}: {e}"
        else:
            new_outcome = "selected"
            new_model = decision.model.name
            new_cost = decision.estimated_cost_usd
            if old_model is not None and old_model != new_model:
                why = next((x for x in decision.excluded if x.model == old_model), None)
                if why is not None and why.constraint != "requested_model":
                    violation = f"{old_model}: {why.constraint}: {why.reason}"
                elif not decision.policy.has_model(old_model):
                    violation = f"{old_model}: no longer in the catalog"
        rows.append(
            ReplayRow(
                decision_id=str(record.get("decision_id")),
                tenant=str(record.get("tenant")),
                old_outcome=old_outcome,
                new_outcome=new_outcome,
                old_model=old_model,
                new_model=new_model,
                old_cost_usd=old_cost,
                new_cost_usd=new_cost,
                violation=violation,
                detail=detail,
            )
        )
    return ReplayReport(policy.label, tuple(rows), skipped)


def replay_file(log_path: str | Path, policy: Policy) -> ReplayReport:
    return replay(read_decision_log(log_path), policy)


class _NoBudgets:
    """The policy as a source, for a selector that only plans (budgets are not replayed)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = replace(
            policy, tenants=tuple(replace(t, budget=Budget()) for t in policy.tenants)
        )

    def current(self) -> Policy:
        return self._policy
