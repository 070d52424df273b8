"""The demo model's text-to-SQL fine-tuning data (`sql_demo.finetune_pairs`, `write_sft_data`):
nothing held out leaks in, every SQL runs, and each prompt is exactly what the service sends."""

from __future__ import annotations

import asyncio
import json

from expertmesh.agents.sql import FixedModel, SqlScope, TextToSql
from expertmesh.agents.sql_demo import (
    HELD_OUT_ONLY,
    HELD_OUT_PLAYS,
    build_sample_db,
    finetune_pairs,
    question_pairs,
    synthetic_titles,
    write_sft_data,
)
from expertmesh.agents.sql_guard import SQLiteDatabase, check_sql


def test_no_held_out_play_or_phrasing_is_in_the_fine_tuning_set():
    pairs = finetune_pairs()
    held_phrasings = {q.split("{title}")[0] for q, _ in HELD_OUT_ONLY}
    for pair in pairs:
        assert not any(title in pair.question or title in pair.sql for title in HELD_OUT_PLAYS)
        assert not any(pair.question.startswith(p) for p in held_phrasings)
    assert len({p.question for p in pairs}) > 1000  # many titles: copying, not recall
    assert len(set(synthetic_titles(300))) == 300 and synthetic_titles(300) == synthetic_titles(300)


def test_every_fine_tuning_sql_passes_the_guard_and_runs(tmp_path):
    db = SQLiteDatabase(build_sample_db(tmp_path / "s.sqlite"))
    schema = tuple(db.schema())
    for pair in finetune_pairs()[::7]:
        db.execute(check_sql(pair.sql, schema, row_limit=1000), 5.0)


def test_each_record_is_the_prompt_the_service_sends(tmp_path, scripted):
    db_path = build_sample_db(tmp_path / "s.sqlite")
    train, val = write_sft_data(tmp_path / "data", db_path)
    records = [json.loads(line) for line in val.read_text().splitlines()]
    _, held = question_pairs()
    assert [r["answer"] for r in records] == [p.sql for p in held]
    train_records = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(train_records) == len(finetune_pairs())
    # the training copy of the database holds every title: each prompt names its literal
    for record, pair in zip(train_records, finetune_pairs()):
        literal = pair.sql.rsplit("title = ", 1)[1].rstrip(")")
        assert f"plays.title = {literal}" in record["prompt"]
    for record, pair in zip(records, held):
        engine = scripted([pair.sql])
        service = TextToSql(engine, FixedModel("m"))
        asyncio.run(service.answer(pair.question, SQLiteDatabase(db_path), SqlScope("t")))
        (request,) = engine.requests
        sent = [(m.role, m.content) for m in request.messages]
        assert sent == [("system", record["system"]), ("user", record["prompt"])]
