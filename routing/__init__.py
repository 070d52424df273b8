"""Request classification and model selection: classify a request (`classify.py`, `pii.py`),
choose a model under the policy in force with every exclusion explained (`select.py`,
`decision.py`, `compiled.py`), hold exact budgets in a SQLite ledger (`budget.py`),
authenticate API keys and rate-limit tenants (`auth.py`, `ratelimit.py`), log decisions and
replay them under a new policy (`decision_log.py`, `replay.py`). Depends on
`expertmesh.policies`; the serving layer depends on this package through `Selector`."""

from .auth import authenticate
from .budget import BudgetLedger, Reservation, Spend, UnknownReservation
from .classify import (
    Classification,
    Classifier,
    KeywordSafetyClassifier,
    RequestClassifier,
    SafetyClassifier,
    estimate_tokens,
)
from .decision import Decision, Exclusion, SelectionRequest
from .decision_log import DecisionLog, read_decision_log
from .errors import (
    BudgetExceeded,
    DecisionLogError,
    Denied,
    NoEligibleModel,
    RateLimited,
    RoutingError,
    Unauthorized,
    UnknownModel,
)
from .health import HealthView, ModelHealth
from .pii import PiiFinding, find_pii, redact_pii
from .ratelimit import RateLimiter
from .replay import ReplayReport, ReplayRow, replay, replay_file
from .select import Selector

__all__ = [
    "BudgetExceeded",
    "BudgetLedger",
    "Classification",
    "Classifier",
    "Decision",
    "DecisionLog",
    "DecisionLogError",
    "Denied",
    "Exclusion",
    "HealthView",
    "KeywordSafetyClassifier",
    "ModelHealth",
    "NoEligibleModel",
    "PiiFinding",
    "RateLimited",
    "RateLimiter",
    "ReplayReport",
    "ReplayRow",
    "RequestClassifier",
    "Reservation",
    "RoutingError",
    "SafetyClassifier",
    "SelectionRequest",
    "Selector",
    "Spend",
    "Unauthorized",
    "UnknownModel",
    "UnknownReservation",
    "authenticate",
    "estimate_tokens",
    "find_pii",
    "read_decision_log",
    "redact_pii",
    "replay",
    "replay_file",
]
