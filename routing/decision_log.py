"""The decision log: one JSON object per line for every decision and fallback, what
`expertmesh policy replay` re-decides. Records hold the request's features (tenant, hazard
codes, PII kinds, task, token counts, requested model, capabilities), never the prompt text.

    {"schema": 1, "event": "decision", "ts": "2026-11-25T17:09:39Z", "decision_id": "...",
     "policy": "default@3f2a...", "policy_version": "<sha256>", "tenant": "dev",
     "request": {"requested_model": "auto", "max_tokens": 256, "prompt_tokens": 40,
                 "safety": [], "pii": ["email"], "task": "chat", "capabilities": []},
     "outcome": "selected", "model": "expertmesh-demo", "fallbacks": [],
     "estimated_cost_usd": 0.0, "objective": "cheapest", "rules": ["pii-stays-local"],
     "excluded": {"gpt-x": "rule 'pii-stays-local': regions ['us'] not all in ['local']"}}

`outcome` is "selected", "denied", "no_model", "budget_exceeded", "rate_limited",
"unknown_model" or "unauthorized".
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DecisionLogError

LOG_SCHEMA = 1


class DecisionLog:
    """Appends records to a JSONL file; thread-safe; each line is flushed as written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_decision_log(path: str | Path) -> Iterator[dict[str, Any]]:
    """The log's records in order; a line that is not a decision record raises
    `DecisionLogError` naming the line. Blank lines are skipped."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DecisionLogError(str(path), number, f"invalid JSON: {e.msg}") from None
            if not isinstance(record, dict) or record.get("schema") != LOG_SCHEMA:
                raise DecisionLogError(
                    str(path), number, f'expected an object with "schema": {LOG_SCHEMA}'
                )
            yield record
