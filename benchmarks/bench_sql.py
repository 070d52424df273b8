"""Text-to-SQL execution accuracy on held-out questions over the bundled sample database.

    .venv/bin/python benchmarks/bench_sql.py [--quick] [--model DIR]   # -> benchmarks/results/bench_sql.json

Three question sets, the first the one to read:

- `held-out shapes` (`agents/sql_eval.HELD_OUT_SHAPES`, 32 questions): query shapes and
  wordings the fine-tuning data never had (joins both ways, aggregates, GROUP BY/HAVING,
  negation, ordering, LIKE, BETWEEN, subqueries; tests/agents/test_sql_eval.py checks that).
- `held-out plays` (`sql_demo.question_pairs()`, 18): the train templates over three plays
  the model never saw, plus one new phrasing of a train query: it measures copying a title.
- `train plays` (35): the train templates over the fine-tuning plays (in-distribution).

Every system goes through the same service (`agents/sql.py`: schema linking, prompt, SQL
guard, read-only execution, one repair). A question counts as correct when the rows its SQL
returns equal the gold SQL's rows (`sql_eval.rows_match`: as a multiset, in order where the
question asks for an order, columns in any order); `same_shape` counts first attempts equal to
the gold SQL with every string literal masked (the query right up to the values it
compares); `train_template_shape` counts first attempts that are one of the fine-tuning
queries (every literal masked): on held-out shapes, a train query recalled. Systems:

- `template baseline` (rule-based, same run): the train question templates as regexes
  (`sql_demo.TemplateEngine`); it cannot answer the held-out-only phrasing.
- `expertmesh-demo`: the bundled demo model (or `--model DIR`; the JSON records its weights'
  SHA-256 prefix), fine-tuned by the demo pipeline's text-to-SQL stage on
  `sql_demo.finetune_pairs()` (train plays and titles outside the database; no held-out play,
  no held-out-only phrasing). Greedy decoding. Twice: the model alone, and with the service's
  value grounding (`sql.ground_literals`, on by default in serving), which replaces a literal
  the model got wrong by the one stored value of that column the question names. Also on the
  train plays' questions (in-distribution), to tell what the model learned from what it
  generalises.
- a remote OpenAI-compatible model, when `EXPERTMESH_SQL_REMOTE_URL` and
  `EXPERTMESH_SQL_REMOTE_MODEL` (and optionally `EXPERTMESH_SQL_REMOTE_KEY`) are set.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result

from expertmesh.agents.sql import FixedModel, SqlScope, TextToSql
from expertmesh.agents.sql_demo import (
    TemplateEngine,
    build_sample_db,
    finetune_pairs,
    question_pairs,
)
from expertmesh.agents.sql_eval import HELD_OUT_SHAPES, rows_match, sql_shape
from expertmesh.agents.sql_guard import SqlError, SQLiteDatabase, check_sql
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.serving.engine import Engine

SHAPES = "held-out shapes"
"""Query shapes and wordings the fine-tuning data never had (`sql_eval.HELD_OUT_SHAPES`)."""
HELD = "held-out plays"
"""The train templates over plays the model never saw (copying a title, not writing SQL)."""
SEEN = "train plays"
"""The train templates over the plays the model was fine-tuned on (in-distribution)."""


TRAIN_SHAPES = frozenset(sql_shape(p.sql) for p in finetune_pairs())
"""Query shapes the demo model was fine-tuned on (numbers and strings masked): a first attempt
of one of these shapes on a held-out-shape question is a train query recalled, not written."""


@dataclass(frozen=True)
class Case:
    question: str
    sql: str
    ordered: bool = False


def _shape(sql: str) -> str:
    """The query with every string literal masked: equal shapes = the same query up to the
    values compared (what the model learned apart from copying literals)."""
    return sql_shape(sql, mask_numbers=False)


async def evaluate(
    name: str,
    engine: Engine,
    model: str,
    db: SQLiteDatabase,
    pairs: list[Case],
    split: str,
    ground: bool = True,
) -> dict[str, Any]:
    service = TextToSql(engine, FixedModel(model), max_tokens=64, ground_values=ground)
    scope = SqlScope("bench", row_limit=1000)
    correct = valid = repaired = grounded = shaped = recalled = 0
    details = []
    started = time.perf_counter()
    for pair in pairs:
        gold = db.execute(check_sql(pair.sql, tuple(db.schema()), row_limit=1000), 5.0)
        try:
            answer = await service.answer(pair.question, db, scope)
        except SqlError as e:
            details.append({"question": pair.question, "error": str(e), "correct": False})
            continue
        valid += 1
        repaired += len(answer.attempts) > 1
        ok = rows_match(answer.rows, gold.rows, pair.ordered)
        correct += ok
        grounded += bool(answer.grounded)
        shaped += _shape(answer.attempts[0].sql) == _shape(pair.sql)
        recalled += sql_shape(answer.attempts[0].sql) in TRAIN_SHAPES
        details.append(
            {
                "question": pair.question,
                "sql": answer.sql,
                "grounded": answer.grounded,
                "correct": ok,
            }
        )
    elapsed = time.perf_counter() - started
    return {
        "system": name,
        "split": split,
        "questions": len(pairs),
        "executed": valid,
        "repaired": repaired,
        "grounded": grounded,
        "same_shape": shaped,
        "train_template_shape": recalled,
        "correct": correct,
        "execution_accuracy": correct / len(pairs) if pairs else 0.0,
        "seconds": round(elapsed, 2),
        "answers": details,
    }


async def run(quick: bool, model_dir: Path = DEMO_MODEL_DIR) -> list[dict[str, Any]]:
    seen_pairs, held_pairs = question_pairs()
    seen = [Case(p.question, p.sql) for p in seen_pairs]
    held = [Case(p.question, p.sql) for p in held_pairs]
    shapes = [Case(q.question, q.sql, q.ordered) for q in HELD_OUT_SHAPES]
    if quick:
        seen, held, shapes = seen[:6], held[:6], shapes[::4]
    db = SQLiteDatabase(build_sample_db(Path(tempfile.mkdtemp()) / "shakespeare.sqlite"))
    results = [
        await evaluate("template baseline", TemplateEngine(), "sql-templates", db, cases, split)
        for cases, split in ((shapes, SHAPES), (held, HELD))
    ]

    from expertmesh.serving.local_engine import ExpertMeshEngine

    demo = ExpertMeshEngine.load("expertmesh-demo", model_dir)
    try:
        weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
        for cases, split in ((shapes, SHAPES), (held, HELD), (seen, SEEN)):
            for ground in (False, True):
                name = "expertmesh-demo" + (" + value grounding" if ground else ", model alone")
                row = await evaluate(name, demo, "expertmesh-demo", db, cases, split, ground)
                results.append({**row, "weights_sha256": weights})
    finally:
        await demo.shutdown()

    url, remote = (
        os.environ.get("EXPERTMESH_SQL_REMOTE_URL"),
        os.environ.get("EXPERTMESH_SQL_REMOTE_MODEL"),
    )
    if url and remote:
        from expertmesh.serving.remote_engine import RemoteOpenAIEngine

        engine = RemoteOpenAIEngine(
            "remote", url, remote, os.environ.get("EXPERTMESH_SQL_REMOTE_KEY")
        )
        try:
            for cases, split in ((shapes, SHAPES), (held, HELD)):
                results.append(
                    await evaluate(f"remote {remote}", engine, "remote", db, cases, split)
                )
        finally:
            await engine.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the shapes, 6 others")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="checkpoint directory")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick, args.model))
    keys = ["system", "split", "questions", "executed", "same_shape", "train_template_shape"]
    keys += ["grounded", "correct"]
    print_table(
        "text-to-SQL execution accuracy (rows equal to the gold SQL's)",
        [*keys, "accuracy", "s"],
        [[r[k] for k in (*keys, "execution_accuracy", "seconds")] for r in results],
    )
    by = {(r["system"], r["split"]): r["execution_accuracy"] for r in results}
    summary = {
        split: {
            "model_alone": by.get(("expertmesh-demo, model alone", split)),
            "with_grounding": by.get(("expertmesh-demo + value grounding", split)),
            "template_baseline": by.get(("template baseline", split)),
        }
        for split in (SHAPES, HELD, SEEN)
    }
    path = write_result(
        "bench_sql" + ("_quick" if args.quick else ""),
        {"quick": args.quick, "summary": summary, "results": results},
        baseline="template baseline: the train templates as regexes (sql_demo.TemplateEngine), "
        "same service, same questions, same run",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
