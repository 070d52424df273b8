"""Error types of `expertmesh.routing`. Each carries the HTTP status and OpenAI-style error code
the serving layer answers with, and a message that names the field and the fix.

    except RoutingError as e:
        return JSONResponse({"error": {"message": str(e), "code": e.code}}, status_code=e.http_status)
"""

from __future__ import annotations

from collections.abc import Mapping


class RoutingError(Exception):
    """Base class for every error a request can get from the selector."""

    http_status: int = 500
    code: str = "routing_error"


class Unauthorized(RoutingError):
    """No API key where one is required, or a key that matches no tenant (HTTP 401)."""

    http_status = 401
    code = "invalid_api_key"


class RateLimited(RoutingError):
    """The tenant is over a rate limit (HTTP 429); retry after `retry_after_s`."""

    http_status = 429
    code = "rate_limit_exceeded"

    def __init__(self, tenant: str, limit: str, retry_after_s: float) -> None:
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(
            f"tenant {tenant!r} is over its rate limit ({limit}); retry after "
            f"{retry_after_s:.1f} s or raise tenants[{tenant}].rate_limit in the policy"
        )


class BudgetExceeded(RoutingError):
    """Reserving the request's maximum cost would exceed a budget (HTTP 429, as OpenAI
    reports an exhausted quota)."""

    http_status = 429
    code = "insufficient_quota"

    def __init__(
        self, tenant: str, period: str, limit_usd: float, committed_usd: float, needed_usd: float
    ) -> None:
        self.tenant = tenant
        self.period = period
        self.limit_usd = limit_usd
        self.committed_usd = committed_usd
        self.needed_usd = needed_usd
        super().__init__(
            f"tenant {tenant!r} {period} budget: ${committed_usd:.6f} of ${limit_usd:.6f} spent or "
            f"reserved, this request may cost up to ${needed_usd:.6f}; lower max_tokens, wait "
            f"for the next {period}, or raise tenants[{tenant}].budget.per_{period}_usd"
        )


class Denied(RoutingError):
    """A policy rule refuses the request (HTTP 403)."""

    http_status = 403
    code = "policy_denied"

    def __init__(self, rule: str, message: str, decision_id: str) -> None:
        self.rule = rule
        self.message = message
        self.decision_id = decision_id
        super().__init__(f"{message} (policy rule {rule!r}, decision {decision_id})")


class UnknownModel(RoutingError):
    """The request names a model that is not in the catalog (HTTP 404)."""

    http_status = 404
    code = "model_not_found"


class NoEligibleModel(RoutingError):
    """Every model was excluded by a hard constraint (HTTP 400; 503 when health was what
    removed the last candidates). `excluded` maps each model to why."""

    code = "no_eligible_model"

    def __init__(
        self, summary: str, excluded: Mapping[str, str], unhealthy_only: bool = False
    ) -> None:
        self.excluded = dict(excluded)
        self.http_status = 503 if unhealthy_only else 400
        reasons = "; ".join(f"{m}: {r}" for m, r in self.excluded.items())
        super().__init__(f"{summary}. Excluded: {reasons}" if reasons else summary)


class DecisionLogError(RoutingError):
    """A decision log line cannot be read (replay)."""

    def __init__(self, path: str, line_number: int, reason: str) -> None:
        self.path = path
        self.line_number = line_number
        super().__init__(f"{path}:{line_number}: not a decision record ({reason})")
