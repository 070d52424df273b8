"""API keys: hashed, compared in constant time, unknown keys 401, anonymous only without a key;
rate limits 429."""

from __future__ import annotations

import hmac

import pytest

from expertmesh.policies import RateLimit, hash_api_key
from expertmesh.routing import (
    RateLimited,
    RateLimiter,
    SelectionRequest,
    Selector,
    Unauthorized,
    authenticate,
)
from expertmesh.routing import auth as auth_module


def test_key_authenticates_its_tenant(make_policy, api_keys):
    policy = make_policy()
    assert authenticate(policy, api_keys["eu-corp"]).name == "eu-corp"
    assert authenticate(policy, api_keys["global"]).name == "global"


def test_policy_stores_only_hashes(make_policy, api_keys):
    policy = make_policy()
    stored = [h for t in policy.tenants for h in t.key_hashes]
    assert hash_api_key(api_keys["eu-corp"]) in stored
    assert all(h.startswith("sha256:") and api_keys["eu-corp"] not in h for h in stored)


def test_unknown_key_is_401(make_policy):
    with pytest.raises(Unauthorized) as e:
        authenticate(make_policy(), "sk-not-a-real-key")
    assert e.value.http_status == 401 and e.value.code == "invalid_api_key"


def test_missing_key_is_401_without_anonymous_tenant(make_policy):
    with pytest.raises(Unauthorized, match="no API key"):
        Selector(make_policy()).authenticate(None)


def test_anonymous_tenant_serves_keyless_requests_but_not_wrong_keys(make_policy):
    policy = make_policy(anonymous_tenant="eu-corp")
    assert authenticate(policy, None).name == "eu-corp"
    assert authenticate(policy, "").name == "eu-corp"
    with pytest.raises(Unauthorized):
        authenticate(policy, "sk-wrong")


def test_every_stored_digest_is_compared_in_constant_time(make_policy, api_keys, monkeypatch):
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    policy = make_policy()
    authenticate(policy, api_keys["eu-corp"])  # matches the first tenant's digest
    stored = [h for t in policy.tenants for h in t.key_hashes]
    assert [a for a, _ in calls] == stored  # no early exit after the match
    assert {b for _, b in calls} == {hash_api_key(api_keys["eu-corp"])}


def test_rate_limit_requests_per_minute_is_429_with_retry_after():
    limiter = RateLimiter()
    limit = RateLimit(requests_per_minute=2)
    limiter.admit("t", limit, 10, now=0.0)
    limiter.admit("t", limit, 10, now=0.0)
    with pytest.raises(RateLimited) as e:
        limiter.admit("t", limit, 10, now=0.0)
    assert e.value.http_status == 429 and e.value.retry_after_s == pytest.approx(30.0)
    limiter.admit("t", limit, 10, now=30.0)  # half a minute refills one request
    limiter.admit("other", limit, 10, now=0.0)  # tenants have their own buckets


def test_rate_limit_tokens_per_minute_counts_prompt_and_max_tokens():
    limiter = RateLimiter()
    limit = RateLimit(tokens_per_minute=1000)
    limiter.admit("t", limit, 600, now=0.0)
    with pytest.raises(RateLimited, match="tokens_per_minute"):
        limiter.admit("t", limit, 600, now=0.0)
    with pytest.raises(RateLimited, match="lower max_tokens"):
        limiter.admit("t", limit, 5000, now=100.0)


def test_selector_applies_the_tenant_rate_limit(make_policy, policy_data):
    tenants = policy_data()["tenants"]
    tenants[0]["rate_limit"] = {"requests_per_minute": 1}
    selector = Selector(make_policy(tenants=tenants))
    selector.decide(SelectionRequest("eu-corp", "hi"))
    with pytest.raises(RateLimited):
        selector.decide(SelectionRequest("eu-corp", "hi"))
    selector.decide(SelectionRequest("global", "hi"))
