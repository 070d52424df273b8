"""The selector in front of the API: keys, budgets (reserve, settle, release), decision
headers, PII redaction before the engine, named-model refusal. Real selector, real SQLite
ledger, fake engine (the `Engine` protocol)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_api import FakeEngine

from expertmesh.policies import hash_api_key, policy_from_text
from expertmesh.routing import BudgetLedger, Selector
from expertmesh.serving.api import make_api
from expertmesh.serving.engine import EngineError
from expertmesh.serving.gate import SelectorGate

KEY = "sk-test-gate-key"
POLICY = f"""
version: 1
name: gate-test
defaults: {{objective: cheapest, max_tokens: 64}}
models:
  - name: fake
    engine: expertmesh
    input_usd_per_1m: 1000
    output_usd_per_1m: 2000
    context_window: 128
    capabilities: [chat]
    regions: [local]
    safety_tier: standard
    latency: {{ttft_ms: 100, tokens_per_s: 20}}
tenants:
  - name: team
    api_key_hashes: ["{hash_api_key(KEY)}"]
    regions: [local]
    budget: {{per_day_usd: 0.05}}
rules:
  - name: redact-contacts
    when: {{pii: [email]}}
    then: {{redact_pii: [email]}}
"""


@pytest.fixture
def setup(tmp_path):
    engine = FakeEngine()
    ledger = BudgetLedger(tmp_path / "budget.sqlite", durable=False)
    selector = Selector(policy_from_text(POLICY), ledger=ledger)
    client = TestClient(make_api(engine, gate=SelectorGate(selector, engine)))
    return client, engine, ledger


def ask(client, content="one two", key=KEY, **extra):
    extra.setdefault("max_tokens", 5)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_missing_or_wrong_key_is_401(setup):
    client, engine, _ = setup
    assert ask(client, key=None).status_code == 401
    r = ask(client, key="sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert engine.requests == []


def test_decision_is_explained_in_headers_and_real_cost_settled(setup):
    client, engine, ledger = setup
    r = ask(client, "one two three", max_tokens=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-expertmesh-model"] == "fake"
    assert r.headers["x-expertmesh-policy"].startswith("gate-test@")
    assert r.headers["x-expertmesh-decision-id"]
    assert engine.requests[-1].params.max_tokens == 10  # the cap the reservation assumed
    spend = ledger.spend("team")
    assert spend.day_reserved == 0
    # FakeEngine reports 3 prompt tokens and 3 completion tokens: 3*1000 + 3*2000 micro-USD/1M
    assert spend.day_spent == 3 * 1000 + 3 * 2000


def test_budget_exhausted_is_429_insufficient_quota(setup):
    client, _, ledger = setup
    # 0.05 USD a day. 64 output tokens at 2000 USD/1M may cost 0.128 USD: refused up front.
    big = ask(client, max_tokens=64)
    assert big.status_code == 429
    assert big.json()["error"]["message"].startswith("tenant 'team' day budget")
    # Small requests fit; each really costs 0.009 USD, until the day's budget is spent.
    codes = [ask(client, "one two three", max_tokens=5).status_code for _ in range(10)]
    assert codes[0] == 200 and codes[-1] == 429
    assert ledger.spend("team").day_spent <= 50_000  # never overspent


def test_pii_is_redacted_before_the_engine(setup):
    client, engine, _ = setup
    r = ask(client, "write to jane.doe@example.com now")
    assert r.status_code == 200
    sent = engine.requests[-1].messages[-1].content
    assert "jane.doe@example.com" not in sent and "REDACTED" in sent


def test_engine_failure_releases_the_reservation(setup):
    client, engine, ledger = setup
    engine.error = EngineError("boom")
    assert ask(client).status_code == 500
    spend = ledger.spend("team")
    assert spend.day_reserved == 0 and spend.day_spent == 0


def test_named_model_outside_the_catalog_is_404(setup):
    client, _, _ = setup
    r = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 404


class CountingEngine(FakeEngine):
    """Counts a prompt as its characters, so redaction changes the count."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: list[tuple[str, ...]] = []

    def count_prompt_tokens(self, request):
        texts = tuple(m.content for m in request.messages)
        self.counted.append(texts)
        return sum(len(t) for t in texts)


def test_the_reservation_is_priced_on_the_engines_count_of_the_redacted_prompt(tmp_path):
    engine = CountingEngine()
    ledger = BudgetLedger(tmp_path / "budget.sqlite", durable=False)
    selector = Selector(policy_from_text(POLICY), ledger=ledger)
    client = TestClient(make_api(engine, gate=SelectorGate(selector, engine)))
    content = "write to someone.important@example.org"
    r = ask(client, content, max_tokens=4)
    assert r.status_code == 200, r.text
    sent = engine.requests[-1].messages[-1].content
    assert sent != content and "example.org" not in sent  # redacted for the engine
    assert engine.counted == [(sent,)]  # counted once, on exactly the text the engine got
    prompt_tokens = len(sent)
    assert prompt_tokens != len(content)
    reserved = float(r.headers["x-expertmesh-estimated-cost-usd"])
    assert reserved == pytest.approx((prompt_tokens * 1000 + 4 * 2000) / 1e6)


def test_an_engine_that_cannot_count_leaves_the_estimate(setup):
    client, _engine, _ = setup  # FakeEngine.count_prompt_tokens -> None
    r = ask(client, "one two three", max_tokens=4)
    assert r.status_code == 200 and float(r.headers["x-expertmesh-estimated-cost-usd"]) > 0
