"""Text-to-SQL on the HTTP API, beside the OpenAI routes.

    POST /v1/sql/answer  {"question": "How many characters are in Hamlet?",
                          "database": "shakespeare"}
    -> {"sql": ..., "columns": [...], "rows": [[...]], "explanation": ..., "model": ...}

The caller's API key authenticates them to a selector tenant (as on /v1/chat/completions; no
key: the policy's anonymous tenant); the model is chosen by the selector as task `sql`.
Refusals use the OpenAI error body: 400 for a refused question or SQL (the reason in
`message`), 422 when the query and its repair both failed, 404 for an unknown database, the
selector's status (401, 403, 429, ...) for its refusals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from expertmesh.routing import RoutingError, Selector
from expertmesh.serving.engine import EngineError
from expertmesh.serving.gate import _bearer
from expertmesh.serving.protocol import error_body

from .sql import SqlAnswerFailed, SqlScope, TextToSql
from .sql_guard import SqlError
from .sql_open import open_database


class SqlQuestion(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    database: str = "shakespeare"


def sql_router(
    service: TextToSql,
    selector: Selector,
    databases: Mapping[str, str],
    row_limit: int = 100,
    timeout_s: float = 2.0,
) -> APIRouter:
    router = APIRouter()

    def refuse(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(error_body(message, kind, None), status_code=status)

    @router.post("/v1/sql/answer")
    async def answer(request: Request) -> JSONResponse:
        try:
            body = SqlQuestion.model_validate(await request.json())
        except (ValidationError, ValueError) as e:
            return refuse(400, f"body must be {{question, database}}: {e}")
        if body.database not in databases:
            return refuse(404, f"unknown database {body.database!r}; have {sorted(databases)}")
        try:
            tenant = selector.authenticate(_bearer(request.headers))
            scope = SqlScope(tenant.name, row_limit=row_limit, timeout_s=timeout_s)
            result = await service.answer(
                body.question,
                await asyncio.to_thread(open_database, databases[body.database]),
                scope,
            )
        except RoutingError as e:
            return refuse(e.http_status, str(e), "permission_error")
        except SqlAnswerFailed as e:
            return refuse(422, str(e))
        except SqlError as e:
            return refuse(400, str(e))
        except EngineError as e:
            return refuse(e.status, str(e), e.type)
        return JSONResponse(result.to_dict())

    return router
