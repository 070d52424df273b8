"""Selector speed: decision time with 50 models and 20 rules (classification excluded), and
classification time for a 2 KB prompt; p50 and p99 per call.

    .venv/bin/python benchmarks/bench_selector.py [--quick]   # -> benchmarks/results/bench_selector.json

Goals (issue 6): decision p99 <= 50 us, classification p99 <= 200 us.

Baselines, same process run: a naive selector that validates the policy from its YAML data on
every decision (what a gateway does when it re-reads its config per request), then decides with
the same code; and LiteLLM's `Router` picking among the same 50 models (`litellm_baseline`;
`pip install -e '.[bench]'`), skipped with a printed reason when litellm is not installed.
LiteLLM picks a deployment of a model group (random, cheapest, by tag, by context window); it
evaluates no policy rules, budgets or fallback plans, so its rows are the cost of a pick, not of
the same decision.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result

from expertmesh.policies import HAZARD_CATEGORIES, parse_policy
from expertmesh.routing import (
    Classification,
    RequestClassifier,
    RoutingError,
    SelectionRequest,
    Selector,
)
from expertmesh.routing.pii import PiiFinding

GOAL_DECISION_P99_US = 50.0
GOAL_CLASSIFY_P99_US = 200.0
REGIONS = ["local", "eu", "us", "apac"]
TIERS = ["strict", "standard", "permissive"]
CAPS = ["chat", "tools", "json", "code", "sql"]


def build_policy_data(n_models: int = 50, seed: int = 0) -> dict[str, Any]:
    """50 models over four regions and three tiers; 3 tenants; 20 rules using every match
    field and every effect except deny on common paths (a deny ends a decision early, which
    would flatter the timing)."""
    rng = random.Random(seed)
    models = []
    for i in range(n_models):
        region = REGIONS[i % 4]
        free = region == "local"
        models.append(
            {
                "name": f"m{i:02d}-{region}",
                "engine": "expertmesh" if free else "openai",
                "endpoint": None if free else f"https://{region}.example/v1",
                "input_usd_per_1m": 0 if free else round(rng.uniform(0.05, 5), 3),
                "output_usd_per_1m": 0 if free else round(rng.uniform(0.2, 20), 3),
                "context_window": rng.choice([4096, 8192, 32768, 128000, 200000]),
                "capabilities": ["chat", *rng.sample(CAPS[1:], rng.randint(0, 4))],
                "regions": [region],
                "safety_tier": TIERS[i % 3],
                "latency": {"ttft_ms": rng.uniform(50, 800), "tokens_per_s": rng.uniform(15, 200)},
            }
        )
    names = [m["name"] for m in models]
    tenants = [
        {"name": "eu-bank", "regions": ["eu", "local"], "objective": "cheapest"},
        {"name": "us-retail", "regions": ["us", "eu", "local"], "objective": "fastest"},
        {"name": "global-lab", "regions": REGIONS},
    ]
    codes = list(HAZARD_CATEGORIES)
    rules: list[dict[str, Any]] = [
        {"name": "deny-s4", "when": {"safety": ["S4"]}, "then": {"deny": "refused (S4)"}},
        {"name": "s6-strict", "when": {"safety": ["S6"]}, "then": {"require_tiers": ["strict"]}},
        {"name": "pii-local-eu", "when": {"pii": ["card", "iban", "national_id"]},
         "then": {"require_regions": ["local", "eu"], "redact_pii": ["card", "iban"]}},
        {"name": "contact-redact", "when": {"pii": ["email", "phone"]}, "then": {"redact_pii": True}},
        {"name": "sql-cap", "when": {"task": ["sql"]}, "then": {"require_capabilities": ["sql"]}},
        {"name": "code-cap", "when": {"task": ["code"]}, "then": {"require_capabilities": ["code"]}},
        {"name": "long-fast", "when": {"min_prompt_tokens": 8000}, "then": {"prefer": "fastest"}},
        {"name": "bank-no-permissive", "when": {"tenants": ["eu-bank"]}, "then": {"forbid_tiers": ["permissive"]}},
        {"name": "retail-short-cheap", "when": {"tenants": ["us-retail"], "max_prompt_tokens": 200},
         "then": {"prefer": "cheapest"}},
        {"name": "auto-no-premium", "when": {"model": ["auto"]}, "then": {"forbid_models": names[:4]}},
    ]  # fmt: skip
    for k in range(10):  # ten more, each on a different hazard code or tenant/task mix
        code = codes[(k + 6) % len(codes)]
        if code == "S4":
            code = "S13"
        rules.append(
            {
                "name": f"extra-{k}",
                "when": {"safety": [code], "task": [["chat", "code", "sql"][k % 3]]},
                "then": {"forbid_models": rng.sample(names, 3)},
            }
        )
    assert len(rules) == 20
    return {
        "version": 1,
        "name": "bench",
        "defaults": {"objective": "cheapest", "max_tokens": 512},
        "models": models,
        "tenants": tenants,
        "rules": rules,
        "fallbacks": {
            names[i]: rng.sample([n for n in names if n != names[i]], 5) for i in range(0, 50, 5)
        },
    }


def build_requests(n: int, seed: int = 1) -> list[SelectionRequest]:
    """Requests with precomputed classifications (the decision benchmark excludes it)."""
    rng = random.Random(seed)
    tenants = ["eu-bank", "us-retail", "global-lab"]
    out = []
    for _ in range(n):
        safety = frozenset(rng.sample(list(HAZARD_CATEGORIES), rng.choice([0, 0, 0, 1, 2])))
        safety = safety - {"S4"}
        pii = tuple(
            PiiFinding(k, 0, 0)
            for k in rng.sample(
                ["email", "phone", "card", "iban", "national_id"], rng.choice([0, 0, 1, 2])
            )
        )
        c = Classification(
            safety, pii, rng.choice(["chat", "chat", "code", "sql"]), rng.randint(20, 12000)
        )
        out.append(
            SelectionRequest(
                tenant=rng.choice(tenants),
                max_tokens=rng.choice([None, 128, 1024]),
                capabilities=frozenset(rng.sample(["tools", "json"], rng.choice([0, 0, 1]))),
                classification=c,
            )
        )
    return out


def prompt_2kb() -> str:
    """About 2 KB of ordinary business text with code, an e-mail, a phone number and a card."""
    body = (
        "Please review the attached quarterly summary and draft a reply to the finance team. "
        "Revenue grew 12% quarter on quarter, driven by the enterprise tier; churn fell to 2.1%. "
        "The hiring plan adds four engineers in Q3 and a support lead in Q4. Can you also check "
        "the function below, it raises an exception when the list is empty:\n"
        "def mean(xs):\n    return sum(xs) / len(xs)\n"
    )
    text = (body * 6)[
        :1900
    ] + " Contact jane.doe@example.com or +1 415 555 0132; card 4111 1111 1111 1111."
    return text[:2048]


def percentiles_us(fn: Callable[[], object], n: int, warmup: int = 200) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    perf = time.perf_counter_ns
    for _ in range(n):
        t0 = perf()
        fn()
        times.append(perf() - t0)
    times.sort()
    return {
        "n": n,
        "p50_us": times[n // 2] / 1e3,
        "p99_us": times[min(n - 1, int(n * 0.99))] / 1e3,
        "mean_us": sum(times) / n / 1e3,
    }


def cycling(items: list[Any], call: Callable[[Any], object]) -> Callable[[], object]:
    state = {"i": 0}

    def step() -> object:
        i = state["i"]
        state["i"] = (i + 1) % len(items)
        try:
            return call(items[i])
        except RoutingError as e:  # a denial or no-model answer is a decision too
            return e

    return step


def percentiles_us_async(
    fn: Callable[[], Awaitable[object]], n: int, warmup: int = 50
) -> dict[str, float]:
    """`percentiles_us` for a coroutine function, every call awaited in one event loop (the
    loop's own cost per await is in the figure, as it is in a server)."""

    async def measure() -> dict[str, float]:
        for _ in range(warmup):
            await fn()
        times = []
        perf = time.perf_counter_ns
        for _ in range(n):
            t0 = perf()
            await fn()
            times.append(perf() - t0)
        times.sort()
        return {
            "n": n,
            "p50_us": times[n // 2] / 1e3,
            "p99_us": times[min(n - 1, int(n * 0.99))] / 1e3,
            "mean_us": sum(times) / n / 1e3,
        }

    return asyncio.run(measure())


LITELLM_FREE_COST_PER_TOKEN = 1e-12
"""LiteLLM reads a cost of 0 as "not set" and falls back to its own price map, so free (local)
models get this instead: they stay the cheapest, as in our policy."""


def litellm_deployments(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The same 50 models as LiteLLM deployments of one model group `auto`: prices, context
    window (`max_input_tokens`) and the model's region as a tag (tag routing is LiteLLM's nearest
    thing to our residency rules)."""
    return [
        {
            "model_name": "auto",
            "litellm_params": {
                "model": f"openai/{m['name']}",
                "api_base": m["endpoint"] or "http://127.0.0.1:9/v1",
                "api_key": "unused",
                "input_cost_per_token": float(m["input_usd_per_1m"]) / 1e6
                or LITELLM_FREE_COST_PER_TOKEN,
                "output_cost_per_token": float(m["output_usd_per_1m"]) / 1e6
                or LITELLM_FREE_COST_PER_TOKEN,
                "tags": list(m["regions"]),
            },
            "model_info": {"id": m["name"], "max_input_tokens": m["context_window"]},
        }
        for m in data["models"]
    ]


def litellm_baseline(
    data: dict[str, Any], requests: list[SelectionRequest], n: int
) -> tuple[list[dict[str, Any]], str]:
    """LiteLLM's `Router` picking among the same 50 models, in three set-ups from the barest to
    the nearest to what our selector does: a random pick (`simple-shuffle`, sync); the cheapest
    deployment among those tagged with the request tenant's regions (`cost-based-routing`,
    tag filtering, async); and that plus LiteLLM's pre-call checks (context window). Requests
    cycle over the same 1,000 shapes (tenant -> region tags). Each row records how many picks
    broke the tenant's residency (a check that the filter ran). Returns (rows, note); no rows
    when litellm is not installed."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-map download
    try:
        import litellm
        from litellm import Router
    except ImportError:
        return [], "litellm not installed (pip install 'expertmesh[bench]'); LiteLLM rows skipped"
    litellm.suppress_debug_info = True
    version = importlib.metadata.version("litellm")
    regions = {t["name"]: list(t["regions"]) for t in data["tenants"]}
    region_of = {m["name"]: m["regions"][0] for m in data["models"]}
    messages = [{"role": "user", "content": "hello"}]
    deployments = litellm_deployments(data)
    rows: list[dict[str, Any]] = []
    try:
        shuffle = Router(model_list=deployments, routing_strategy="simple-shuffle")
        stats = percentiles_us(
            lambda: shuffle.get_available_deployment(model="auto", messages=messages), n
        )
        rows.append({"setup": "simple-shuffle (random pick, no filter)", **stats})
        for pre_call in (False, True):
            router = Router(
                model_list=deployments,
                routing_strategy="cost-based-routing",
                enable_tag_filtering=True,
                tag_filtering_match_any=True,
                enable_pre_call_checks=pre_call,
            )
            state = {"i": 0, "off_region": 0}

            async def pick(router: Router = router, state: dict[str, int] = state) -> object:
                r = requests[state["i"] % len(requests)]
                state["i"] += 1
                tags = regions[r.tenant]
                d = await router.async_get_available_deployment(
                    model="auto", request_kwargs={"metadata": {"tags": tags}}, messages=messages
                )
                state["off_region"] += region_of[d["model_info"]["id"]] not in tags
                return d

            stats = percentiles_us_async(pick, n)
            name = "cost-based-routing + region tags" + (" + pre-call checks" if pre_call else "")
            rows.append({"setup": name, **stats, "off_region_picks": state["off_region"]})
    except Exception as e:  # an API change in litellm must not sink the benchmark
        return rows, f"litellm {version} failed: {type(e).__name__}: {e}"
    return rows, f"litellm {version} Router, same 50 models, {n} picks per set-up"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n_decide = 5_000 if args.quick else 50_000
    n_classify = 2_000 if args.quick else 20_000
    n_naive = 300 if args.quick else 2_000
    n_litellm = 300 if args.quick else 2_000  # its filtered pick takes milliseconds

    data = build_policy_data()
    policy = parse_policy(data)
    selector = Selector(policy)
    requests = build_requests(1_000)
    text = prompt_2kb()
    classifier = RequestClassifier()
    outcomes = {"selected": 0, "refused": 0}
    for r in requests:
        try:
            selector.plan(r)
            outcomes["selected"] += 1
        except RoutingError:
            outcomes["refused"] += 1

    def naive(r: SelectionRequest) -> object:
        return Selector(parse_policy(data)).plan(r)

    rows = []
    decision = percentiles_us(cycling(requests, selector.plan), n_decide)
    classify = percentiles_us(lambda: classifier.classify(text), n_classify)
    full = percentiles_us(
        cycling(
            [
                SelectionRequest(r.tenant, text, r.max_tokens, capabilities=r.capabilities)
                for r in requests[:50]
            ],
            selector.decide,
        ),
        n_classify,
    )
    naive_stats = percentiles_us(cycling(requests, naive), n_naive, warmup=20)
    lite_rows, lite_note = litellm_baseline(data, requests, n_litellm)

    rows.append(
        [
            "decision (plan), 50 models / 20 rules",
            decision["p50_us"],
            decision["p99_us"],
            GOAL_DECISION_P99_US,
            decision["p99_us"] <= GOAL_DECISION_P99_US,
        ]
    )
    rows.append(
        [
            "classification, 2 KB prompt",
            classify["p50_us"],
            classify["p99_us"],
            GOAL_CLASSIFY_P99_US,
            classify["p99_us"] <= GOAL_CLASSIFY_P99_US,
        ]
    )
    rows.append(
        ["decide(): classify + rate limit + plan + span", full["p50_us"], full["p99_us"], "-", "-"]
    )
    rows.append(
        [
            "baseline: naive (validate policy per decision)",
            naive_stats["p50_us"],
            naive_stats["p99_us"],
            "-",
            "-",
        ]
    )
    for lite in lite_rows:
        rows.append([f"LiteLLM Router: {lite['setup']}", lite["p50_us"], lite["p99_us"], "-", "-"])
    print_table(
        f"Selector ({len(policy.models)} models, {len(policy.rules)} rules, {len(requests)} request shapes: "
        f"{outcomes['selected']} selected, {outcomes['refused']} refused)",
        ["what", "p50 us", "p99 us", "goal p99 us", "met"],
        rows,
    )  # fmt: skip
    speedup = naive_stats["p50_us"] / decision["p50_us"]
    print(f"naive baseline / selector, p50: {speedup:,.0f}x")
    print(f"LiteLLM: {lite_note}")
    for lite in lite_rows:
        print(
            f"LiteLLM {lite['setup']} / selector decision, p50: "
            f"{lite['p50_us'] / decision['p50_us']:,.1f}x"
        )
    path = write_result(
        "bench_selector" + ("_quick" if args.quick else ""),
        {
            "models": len(policy.models),
            "rules": len(policy.rules),
            "request_shapes": len(requests),
            "outcomes": outcomes,
            "decision": decision,
            "classification_2kb": classify,
            "decide_full": full,
            "baseline_naive": naive_stats,
            "baseline_litellm": lite_rows,
            "baseline_litellm_note": lite_note,
            "ratios_p50_vs_decision": {
                "naive": speedup,
                **{r["setup"]: r["p50_us"] / decision["p50_us"] for r in lite_rows},
            },
            "goals": {
                "decision_p99_us": GOAL_DECISION_P99_US,
                "classification_p99_us": GOAL_CLASSIFY_P99_US,
            },
            "prompt_bytes": len(text.encode()),
            "quick": args.quick,
        },
        baseline="naive selector (policy validated per decision) and LiteLLM's Router on the "
        "same 50 models, same process run",
    )
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
