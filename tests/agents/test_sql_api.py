"""Text-to-SQL on the HTTP API: authenticated like the OpenAI routes, model chosen by the
selector, refusals as OpenAI error bodies."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from expertmesh.agents.sql import SelectorChooser, TextToSql
from expertmesh.agents.sql_api import sql_router
from expertmesh.agents.sql_demo import TemplateEngine, build_sample_db
from expertmesh.policies import DEFAULT_POLICY, load_policy
from expertmesh.routing import Selector
from expertmesh.serving.api import make_api


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    db: Path = build_sample_db(tmp_path_factory.mktemp("sql") / "s.sqlite")
    engine = TemplateEngine("expertmesh-demo")
    selector = Selector(load_policy(DEFAULT_POLICY))
    app = make_api(engine)
    app.include_router(
        sql_router(TextToSql(engine, SelectorChooser(selector)), selector, {"shakespeare": str(db)})
    )
    return TestClient(app)


def test_api_answers_a_question_over_the_sample_database(client: TestClient) -> None:
    r = client.post("/v1/sql/answer", json={"question": "How many characters are in Hamlet?"})
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [[7]] and r.json()["model"] == "expertmesh-demo"


def test_api_refuses_a_wrong_key(client: TestClient) -> None:
    r = client.post(
        "/v1/sql/answer",
        json={"question": "What genre is Hamlet?"},
        headers={"Authorization": "Bearer sk-wrong"},
    )
    assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]


def test_api_reports_a_failed_question_with_the_reason(client: TestClient) -> None:
    r = client.post("/v1/sql/answer", json={"question": "Delete every play."})
    assert r.status_code == 422 and "SQL" in r.json()["error"]["message"]
    assert (
        client.post("/v1/sql/answer", json={"question": "x", "database": "nope"}).status_code == 404
    )
