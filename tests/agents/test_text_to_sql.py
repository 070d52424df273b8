"""The text-to-SQL service: schema linking, the one repair attempt, scope, and the selector
choosing the model with task type `sql`."""

from __future__ import annotations

import asyncio

import pytest

from expertmesh.agents.sql import (
    FixedModel,
    SelectorChooser,
    SqlAnswerFailed,
    SqlScope,
    TextToSql,
    extract_sql,
    link_schema,
)
from expertmesh.agents.sql_demo import TemplateEngine, build_sample_db
from expertmesh.agents.sql_guard import SQLiteDatabase, SqlRefused
from expertmesh.policies import load_policy
from expertmesh.routing import Selector


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> SQLiteDatabase:
    return SQLiteDatabase(build_sample_db(tmp_path_factory.mktemp("sql") / "s.sqlite"))


def test_repair_feeds_the_error_back_and_the_second_sql_answers(
    scripted, db: SQLiteDatabase
) -> None:
    engine = scripted(
        ["SELECT titel FROM plays", "```sql\nSELECT title FROM plays WHERE year < 1596\n```"]
    )
    answer = asyncio.run(
        TextToSql(engine, FixedModel("expertmesh-demo")).answer(
            "Which plays were written before 1596?", db, SqlScope("t")
        )
    )
    assert sorted(r[0] for r in answer.rows) == [
        "A Midsummer Night's Dream",
        "Richard III",
        "Romeo and Juliet",
    ]
    assert len(answer.attempts) == 2 and "titel" in (answer.attempts[0].error or "")
    repair = engine.requests[1].messages
    assert repair is not None and "titel" in repair[-1].content


def test_second_failure_raises_with_both_attempts(scripted, db: SQLiteDatabase) -> None:
    engine = scripted(["DELETE FROM plays", "DROP TABLE plays"])
    with pytest.raises(SqlAnswerFailed) as e:
        asyncio.run(
            TextToSql(engine, FixedModel("expertmesh-demo")).answer("Drop it", db, SqlScope("t"))
        )
    assert [a.sql for a in e.value.attempts] == ["DELETE FROM plays", "DROP TABLE plays"]
    assert len(engine.requests) == 2


def test_scope_hides_tables_from_the_prompt_and_refuses_them(scripted, db: SQLiteDatabase) -> None:
    engine = scripted(["SELECT * FROM plays", "SELECT * FROM plays"])
    scope = SqlScope("t", allowed_tables=frozenset({"characters"}))
    with pytest.raises(SqlAnswerFailed, match="outside this caller's scope"):
        asyncio.run(
            TextToSql(engine, FixedModel("expertmesh-demo")).answer("List plays", db, scope)
        )
    prompt = engine.requests[0].messages
    assert prompt is not None and "CREATE TABLE plays" not in prompt[-1].content


def test_empty_question_is_refused(scripted, db: SQLiteDatabase) -> None:
    with pytest.raises(SqlRefused, match="empty"):
        asyncio.run(TextToSql(scripted([]), FixedModel("m")).answer(" ", db, SqlScope("t")))


def test_schema_linking_picks_tables_by_name_overlap(db: SQLiteDatabase) -> None:
    schema = db.schema()
    assert link_schema("Where is act 1 scene 3 set?", schema) == ("plays", "scenes")
    assert link_schema("What genre is Hamlet?", schema) == ("plays",)
    assert link_schema("Hello there", schema) == tuple(schema)


def test_extract_sql_takes_the_fenced_block_or_the_select() -> None:
    assert extract_sql("Sure:\n```sql\nSELECT 1\n```\nDone") == "SELECT 1"
    assert extract_sql("Here it is: SELECT 2") == "SELECT 2"


def test_selector_chooses_the_model_as_task_sql_and_settles(db: SQLiteDatabase) -> None:
    from expertmesh.policies import DEFAULT_POLICY

    selector = Selector(load_policy(DEFAULT_POLICY))
    engine = TemplateEngine("expertmesh-demo")
    answer = asyncio.run(
        TextToSql(engine, SelectorChooser(selector)).answer(
            "What genre is Hamlet?", db, SqlScope("anonymous")
        )
    )
    assert answer.model == "expertmesh-demo" and answer.rows == (("tragedy",),)
    assert "Read plays" in answer.explanation


def test_selector_sees_the_request_as_task_sql(db: SQLiteDatabase) -> None:
    import yaml

    from expertmesh.policies import DEFAULT_POLICY, parse_policy
    from expertmesh.routing import Classification, Denied

    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["rules"].append(
        {"name": "no-sql", "when": {"task": ["sql"]}, "then": {"deny": "no SQL here"}}
    )

    class ChatOnly:  # classifies everything as chat, so only SelectorChooser can make it sql
        def classify(self, text: str) -> Classification:
            return Classification(frozenset(), (), "chat", 10)

    chooser = SelectorChooser(Selector(parse_policy(data), classifier=ChatOnly()))
    with pytest.raises(Denied, match="no SQL here"):
        asyncio.run(
            TextToSql(TemplateEngine("expertmesh-demo"), chooser).answer(
                "What genre is Hamlet?", db, SqlScope("anonymous")
            )
        )


def test_value_linking_names_stored_literals_the_question_mentions(tmp_path, monkeypatch):
    from expertmesh.agents import sql as sql_module
    from expertmesh.agents.sql import link_values, prepare_prompt

    db = SQLiteDatabase(build_sample_db(tmp_path / "s.sqlite"))
    rendered = [
        v.render("sqlite")
        for v in link_values("How many characters are in richard iii?", db, ["characters", "plays"])
    ]
    assert rendered == ["plays.title = 'Richard III'"]  # "Richard" (a character) is inside it
    night = prepare_prompt("What genre is A Midsummer Night's Dream?", db)
    assert "Values: plays.title = 'A Midsummer Night''s Dream'\n" in night.messages[1].content
    both = link_values("Who is Hamlet in Hamlet?", db, ["characters", "plays"])
    assert {(v.table, v.column) for v in both} == {("characters", "name"), ("plays", "title")}
    assert link_values("Who is Hamlet?", db, ["plays"], frozenset({"plays"}))[0].table == "plays"
    assert "Values:" not in prepare_prompt("How many plays are there?", db).messages[1].content
    monkeypatch.setattr(sql_module, "VALUE_SCAN_ROWS", 5)  # 57 names, 10 titles: not scanned
    assert link_values("Who is Hamlet in Hamlet?", db, ["characters", "plays"]) == ()


def test_the_answer_reports_the_value_hints_its_prompt_carried(scripted, tmp_path):
    db = SQLiteDatabase(build_sample_db(tmp_path / "s.sqlite"))
    engine = scripted(["SELECT year FROM plays WHERE title = 'Macbeth'"])
    answer = asyncio.run(
        TextToSql(engine, FixedModel("expertmesh-demo")).answer(
            "What year was Macbeth written?", db, SqlScope("t")
        )
    )
    assert answer.rows == ((1606,),)
    assert "plays.title = 'Macbeth'" in answer.linked_values
    assert "Values: " in engine.requests[0].messages[1].content


def test_value_grounding_replaces_only_an_unambiguous_wrong_literal():
    from expertmesh.agents.sql import LinkedValue, ground_literals

    schema = {"plays": ("id", "title", "year"), "characters": ("id", "play_id", "name")}
    othello = [LinkedValue("plays", "title", "Othello")]
    sql, changes = ground_literals(
        "SELECT year FROM plays WHERE title = 'Winter''s Tale'", othello, schema, "sqlite"
    )
    assert sql == "SELECT year FROM plays WHERE title = 'Othello'"
    assert changes == ("plays.title: 'Winter''s Tale' -> 'Othello'",)
    aliased, _ = ground_literals(
        "SELECT p.year FROM plays AS p WHERE 'hamlet' = p.title", othello, schema, "sqlite"
    )
    assert "'Othello' = p.title" in aliased
    unchanged = [
        ("SELECT year FROM plays WHERE title = 'Othello'", othello),  # already right
        ("SELECT year FROM plays WHERE title = 'X'", [*othello, LinkedValue("plays", "title", "Hamlet")]),
        ("SELECT name FROM characters WHERE name = 'Iago'", othello),  # no value of that column
        ("SELECT year FROM plays WHERE year = 1600", othello),  # not a string literal
        ("SELEC year FRM plays", othello),  # does not parse: the guard reports it
    ]  # fmt: skip
    for query, values in unchanged:
        assert ground_literals(query, values, schema, "sqlite") == (query, ())


def test_the_service_grounds_a_wrong_title_and_says_so(scripted, tmp_path):
    db = SQLiteDatabase(build_sample_db(tmp_path / "s.sqlite"))
    wrong = "SELECT year FROM plays WHERE title = 'The Winter''s Tale'"
    question = "What year was Othello written?"
    answer = asyncio.run(
        TextToSql(scripted([wrong]), FixedModel("expertmesh-demo")).answer(
            question, db, SqlScope("t")
        )
    )
    assert answer.rows == ((1603,),) and answer.sql.endswith("title = 'Othello'")
    assert answer.grounded == ("plays.title: 'The Winter''s Tale' -> 'Othello'",)
    assert "Value grounding: plays.title" in answer.explanation
    raw = asyncio.run(
        TextToSql(scripted([wrong]), FixedModel("expertmesh-demo"), ground_values=False)
        .answer(question, db, SqlScope("t"))
    )  # fmt: skip
    assert raw.rows == () and raw.grounded == ()


def test_a_slow_query_does_not_block_the_event_loop(tmp_path, scripted):
    import time

    class SlowDatabase(SQLiteDatabase):
        def execute(self, query, timeout_s):
            time.sleep(
                0.5
            )  # a query that takes its time (the database works, the loop must not wait)
            return super().execute(query, timeout_s)

    db = SlowDatabase(build_sample_db(tmp_path / "s.sqlite"))
    service = TextToSql(scripted(["SELECT COUNT(*) FROM plays"]), FixedModel("expertmesh-demo"))

    async def run() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        answer = await service.answer("How many plays are there?", db, SqlScope("t"))
        task.cancel()
        assert answer.rows == ((10,),)
        return ticks

    assert asyncio.run(run()) >= 20  # the loop kept running during the 0.5 s query
