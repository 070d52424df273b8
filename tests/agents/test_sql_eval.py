"""The held-out text-to-SQL set of new shapes (`agents/sql_eval.py`): every gold SQL runs and
returns the rows written for it, no question's query shape or wording is in the fine-tuning
data, and the execution match is neither too strict nor too lenient."""

from __future__ import annotations

from collections import Counter

import pytest
import sqlglot
from sqlglot import exp

from expertmesh.agents.sql_demo import (
    HELD_OUT_ONLY,
    PARAPHRASES,
    TRAIN_TEMPLATES,
    build_sample_db,
    finetune_pairs,
    question_pairs,
    template_sql,
)
from expertmesh.agents.sql_eval import HELD_OUT_SHAPES, rows_match, sql_shape
from expertmesh.agents.sql_guard import SQLiteDatabase, check_sql

ALL_TEMPLATES = TRAIN_TEMPLATES + PARAPHRASES + HELD_OUT_ONLY
"""Every question template the old data uses (train, paraphrases, the held-out phrasing)."""


def _training_sql() -> list[str]:
    """Every SQL the fine-tuning data (and the old validation set) holds."""
    train, held = question_pairs()
    return [p.sql for p in (*finetune_pairs(), *train, *held)]


def _signature(sql: str) -> tuple[tuple[str, ...], ...]:
    """A coarse shape that ignores the order of joins and of `a = b` sides: the multiset of
    syntax node types, the tables, the columns selected and the columns filtered on (literals
    ignored). Selecting a title by a character's name is another query than the reverse."""
    tree = sqlglot.parse_one(sql, read="sqlite")
    nodes = Counter(type(n).__name__ for n in tree.walk() if not isinstance(n, exp.Literal))
    tables = {t.name for t in tree.find_all(exp.Table)}
    selected = {c.name for e in tree.expressions for c in e.find_all(exp.Column)}
    filtered = {
        c.name for w in tree.find_all(exp.Where, exp.Having) for c in w.find_all(exp.Column)
    }
    return (
        tuple(sorted(f"{k}:{v}" for k, v in nodes.items())),
        *(tuple(sorted(x)) for x in (tables, selected, filtered)),
    )


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> SQLiteDatabase:
    return SQLiteDatabase(build_sample_db(tmp_path_factory.mktemp("sql") / "s.sqlite"))


def test_the_set_is_large_and_covers_joins_aggregates_negation_and_ordering() -> None:
    assert len(HELD_OUT_SHAPES) >= 24
    assert len({q.question for q in HELD_OUT_SHAPES}) == len(HELD_OUT_SHAPES)
    features = Counter(f for q in HELD_OUT_SHAPES for f in q.features)
    for needed in ("join", "aggregate", "group", "negation", "order", "subquery", "like"):
        assert features[needed] >= 3, needed


@pytest.mark.parametrize("q", HELD_OUT_SHAPES, ids=lambda q: q.question)
def test_gold_sql_passes_the_guard_and_returns_the_rows_written_for_it(
    q, db: SQLiteDatabase
) -> None:
    result = db.execute(check_sql(q.sql, tuple(db.schema()), row_limit=1000), 5.0)
    assert not result.truncated
    assert rows_match(result.rows, q.expected, q.ordered), (result.rows, q.expected)
    if q.ordered:  # the order is what is asked: the same rows reversed must not pass
        assert not rows_match(result.rows[::-1], q.expected, ordered=True)


def test_no_held_out_query_shape_is_in_the_fine_tuning_data() -> None:
    train = _training_sql()
    train_shapes = {sql_shape(s) for s in train}
    train_signatures = {_signature(s) for s in train}
    for q in HELD_OUT_SHAPES:
        assert sql_shape(q.sql) not in train_shapes, q.question
        assert _signature(q.sql) not in train_signatures, q.question
    assert len({sql_shape(q.sql) for q in HELD_OUT_SHAPES}) >= 24  # distinct shapes, not copies


def test_no_train_template_or_paraphrase_matches_a_held_out_question() -> None:
    for q in HELD_OUT_SHAPES:
        assert template_sql(q.question, ALL_TEMPLATES) == "", q.question
    train_questions = {p.question.lower() for p in finetune_pairs()}
    assert not {q.question.lower() for q in HELD_OUT_SHAPES} & train_questions


def test_the_signature_sees_through_join_order() -> None:
    a = "SELECT COUNT(*) FROM characters JOIN plays ON plays.id = characters.play_id WHERE plays.title = 'X'"
    b = "SELECT COUNT(*) FROM plays JOIN characters ON characters.play_id = plays.id WHERE plays.title = 'Y'"
    assert _signature(a) == _signature(b)
    assert _signature(a) != _signature(b.replace("plays.title", "plays.genre"))
    reverse = "SELECT plays.title FROM plays JOIN characters ON characters.play_id = plays.id WHERE characters.name = 'Z'"
    names = "SELECT characters.name FROM plays JOIN characters ON characters.play_id = plays.id WHERE plays.title = 'Z'"
    assert _signature(reverse) != _signature(names)


def test_rows_match_allows_column_order_and_int_float_but_not_other_rows() -> None:
    assert rows_match([(4, "comedy"), (1, "history")], [("history", 1), ("comedy", 4)])
    assert rows_match([(1601.8000000001,)], [(1601.8,)])
    assert rows_match([(5.0,)], [(5,)])
    assert not rows_match([("comedy", 4)], [("comedy", 4), ("history", 1)])
    assert not rows_match([("comedy", 3)], [("comedy", 4)])
    assert not rows_match([("a",), ("b",)], [("b",), ("a",)], ordered=True)
    assert rows_match([("a",), ("b",)], [("b",), ("a",)])
    assert not rows_match([("a", 1)], [("a",)])


def test_shape_masks_literals_only() -> None:
    assert sql_shape("SELECT title FROM plays WHERE year > 1600") == sql_shape(
        "SELECT title FROM plays WHERE year > 1605"
    )
    assert sql_shape("SELECT title FROM plays WHERE year > 1600", mask_numbers=False) != sql_shape(
        "SELECT title FROM plays WHERE year > 1605", mask_numbers=False
    )
    assert sql_shape("SELECT title FROM plays WHERE genre = 'a'") != sql_shape(
        "SELECT title FROM plays WHERE genre != 'a'"
    )
