"""`benchmarks/bench_sql.evaluate` scores what it should: gold SQL from an engine scores every
held-out-shape question, the train templates score none of them, and an ordered question
answered in the wrong order is wrong."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_sql

from expertmesh.agents.sql_demo import TemplateEngine, build_sample_db
from expertmesh.agents.sql_eval import HELD_OUT_SHAPES
from expertmesh.agents.sql_guard import SQLiteDatabase
from expertmesh.serving.engine import EngineHealth, EngineOutput, EngineRequest, ModelCard


class AnswerKey:
    """An engine that answers each question of the prompt with `reply(question)`."""

    def __init__(self, reply: Callable[[str], str]) -> None:
        self.reply = reply

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard("key", 4096)]

    def count_prompt_tokens(self, request: EngineRequest) -> None:
        return None

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        m = re.search(r"Question: (.*)\nSQL:", request.messages[1].content)
        assert m is not None
        yield EngineOutput(self.reply(m.group(1)), "stop", 10, 5)

    def health(self) -> EngineHealth:
        return EngineHealth(True, "ok")

    async def shutdown(self) -> None:
        return None


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> SQLiteDatabase:
    return SQLiteDatabase(build_sample_db(tmp_path_factory.mktemp("sql") / "s.sqlite"))


CASES = [bench_sql.Case(q.question, q.sql, q.ordered) for q in HELD_OUT_SHAPES]


def _run(engine: object, model: str, db: SQLiteDatabase, cases: list[bench_sql.Case]) -> dict:
    return asyncio.run(bench_sql.evaluate("t", engine, model, db, cases, bench_sql.SHAPES))  # type: ignore[arg-type]


def test_gold_sql_scores_every_question(db: SQLiteDatabase) -> None:
    gold = {q.question: q.sql for q in HELD_OUT_SHAPES}
    row = _run(AnswerKey(gold.__getitem__), "key", db, CASES)
    assert row["correct"] == row["same_shape"] == len(CASES)
    assert row["train_template_shape"] == 0


def test_the_train_templates_score_none(db: SQLiteDatabase) -> None:
    row = _run(TemplateEngine(), "sql-templates", db, CASES)
    assert row["correct"] == 0 and row["executed"] == 0


def test_an_ordered_question_in_the_wrong_order_is_wrong(db: SQLiteDatabase) -> None:
    ordered = [c for c in CASES if c.ordered]
    assert ordered
    row = _run(
        AnswerKey(lambda q: next(c.sql for c in ordered if c.question == q) + " DESC"),
        "key",
        db,
        ordered,
    )
    assert row["correct"] == 0 and row["executed"] == len(ordered)
