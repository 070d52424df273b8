"""Text-to-SQL execution accuracy on the held-out questions of the bundled sample database.

    .venv/bin/python benchmarks/bench_sql.py [--quick] [--model DIR] [--out benchmarks/out/bench_sql.json]

Every system goes through the same service (`agents/sql.py`: schema linking, prompt, SQL
guard, read-only execution, one repair). A question counts as correct when the rows its SQL
returns equal the gold SQL's rows (as a sorted multiset); `same_shape` counts first attempts
equal to the gold SQL with every string literal masked (the query right up to the values it
compares). Systems:

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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlglot
from common import print_table, write_json
from sqlglot import exp

from expertmesh.agents.sql import FixedModel, SqlScope, TextToSql
from expertmesh.agents.sql_demo import TemplateEngine, build_sample_db, question_pairs
from expertmesh.agents.sql_guard import SqlError, SQLiteDatabase, check_sql
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.serving.engine import Engine

HELD = "held-out plays"
SEEN = "train plays"
"""The train templates over the plays the model was fine-tuned on (in-distribution)."""


def _shape(sql: str) -> str:
    """The query with every string literal masked: equal shapes = the same query up to the
    values compared (what the model learned apart from copying literals)."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except sqlglot.errors.SqlglotError:
        return sql
    for literal in list(tree.find_all(exp.Literal)):
        if literal.is_string:
            literal.replace(exp.Literal.string("?"))
    return tree.sql("sqlite")


def _key(rows: Any) -> list[str]:
    return sorted(repr(tuple(r)) for r in rows)


async def evaluate(
    name: str,
    engine: Engine,
    model: str,
    db: SQLiteDatabase,
    pairs: list[Any],
    split: str,
    ground: bool = True,
) -> dict[str, Any]:
    service = TextToSql(engine, FixedModel(model), max_tokens=64, ground_values=ground)
    scope = SqlScope("bench", row_limit=1000)
    correct = valid = repaired = grounded = shaped = 0
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
        ok = _key(answer.rows) == _key(gold.rows)
        correct += ok
        grounded += bool(answer.grounded)
        shaped += _shape(answer.attempts[0].sql) == _shape(pair.sql)
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
        "correct": correct,
        "execution_accuracy": correct / len(pairs) if pairs else 0.0,
        "seconds": round(elapsed, 2),
        "answers": details,
    }


async def run(quick: bool, model_dir: Path = DEMO_MODEL_DIR) -> list[dict[str, Any]]:
    seen, held = question_pairs()
    if quick:
        seen, held = seen[:6], held[:6]
    db = SQLiteDatabase(build_sample_db(Path(tempfile.mkdtemp()) / "shakespeare.sqlite"))
    results = [
        await evaluate("template baseline", TemplateEngine(), "sql-templates", db, held, HELD)
    ]

    from expertmesh.serving.local_engine import ExpertMeshEngine

    demo = ExpertMeshEngine.load("expertmesh-demo", model_dir)
    try:
        weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
        for pairs, split in ((held, HELD), (seen, SEEN)):
            for ground in (False, True):
                name = "expertmesh-demo" + (" + value grounding" if ground else "")
                row = await evaluate(name, demo, "expertmesh-demo", db, pairs, split, ground)
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
            results.append(await evaluate(f"remote {remote}", engine, "remote", db, held, HELD))
        finally:
            await engine.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 held-out questions")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="checkpoint directory")
    parser.add_argument("--out", default="benchmarks/out/bench_sql.json")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick, args.model))
    keys = ["system", "split", "questions", "executed", "same_shape", "grounded", "correct"]
    print_table(
        "text-to-SQL execution accuracy (rows equal to the gold SQL's)",
        [*keys, "accuracy", "s"],
        [[r[k] for k in (*keys, "execution_accuracy", "seconds")] for r in results],
    )
    print(
        f"wrote {write_json(args.out, {'benchmark': 'bench_sql', 'quick': args.quick, 'results': results})}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
